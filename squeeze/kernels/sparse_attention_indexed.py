"""Sparse attention over an index list of selected cache slots (caches we cannot reorder).

The segment form (:mod:`squeeze.kernels.sparse_attention`) reads contiguous runs of a cluster-ordered
context. A paged cache (vLLM) cannot be reordered, so there the selection is a list of slot
indices per (batch row, KV head): ``idx[idx_ptr[b * Hkv + h] : idx_ptr[b * Hkv + h + 1]]`` are rows
of ``k[h]`` / ``v[h]``, in any order. ``k`` and ``v`` may be strided views: a ``[slots, Hkv, D]``
cache is passed as ``cache.transpose(0, 1)``.

Backends: the PyTorch reference (gather + fp32 softmax), and the Triton kernel
(:mod:`squeeze.kernels.sparse_attention_triton`) for CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1`` when ``$SQUEEZE_BACKEND=triton``; see :mod:`squeeze.kernels.backend`.
"""

from __future__ import annotations

import math

import torch

from squeeze.kernels import backend as _backend
from squeeze.validation import check_same_device, check_tensor

QK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sparse_attention_indexed(
    q, k, v, idx_ptr, idx, *, scale=None, backend=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed queries over the selected rows of each KV head.

    Args:
        q: ``[B, Hkv, R, D]`` fp32 / bf16 / fp16 packed query rows (GQA group x M rows).
        k, v: ``[Hkv, S, D]`` (any strides) keys / values of S slots, one dtype.
        idx_ptr: ``[B * Hkv + 1]`` int64 CSR offsets into ``idx``.
        idx: ``[T]`` int64 slot indices in ``[0, S)``; no slot twice within one (b, h).
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``None`` (auto), ``"torch"`` or ``"triton"``.
    Returns:
        ``out [B, Hkv, R, D]`` float32 and ``lse [B, Hkv, R]`` float32; a (b, h) without slots
        gives ``out`` 0 and ``lse`` -inf.
    """
    scale = _check(q, k, v, idx_ptr, idx, scale)
    if _backend.use_triton("sparse_attention_indexed", q.device, backend):
        from squeeze.kernels.sparse_attention_triton import sparse_attention_indexed_triton

        return sparse_attention_indexed_triton(q, k, v, idx_ptr, idx, scale)
    return sparse_attention_indexed_reference(q, k, v, idx_ptr, idx, scale=scale)


def sparse_attention_indexed_reference(q, k, v, idx_ptr, idx, *, scale=None):
    """Plain PyTorch oracle: gather each (b, h)'s rows, fp32 softmax (a Python loop over heads)."""
    scale = _check(q, k, v, idx_ptr, idx, scale)
    return attend_index_lists(q, k, v, idx_ptr.tolist(), idx, scale)


def attend_index_lists(q, k, v, ptr: list[int], idx: torch.Tensor, scale: float):
    """The oracle's loop: ``q [B, Hkv, R, D]`` over rows ``idx[ptr[b*Hkv+h] : ptr[b*Hkv+h+1]]`` of
    ``k, v [Hkv, S, D]`` per (b, h) → ``out [B, Hkv, R, D]``, ``lse [B, Hkv, R]`` fp32 (no checks)."""
    B, Hkv, R, D = q.shape
    out = torch.zeros(B, Hkv, R, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hkv, R), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(Hkv):
            rows = idx[ptr[b * Hkv + h] : ptr[b * Hkv + h + 1]]
            if rows.numel() == 0:
                continue
            scores = (q[b, h].float() @ k[h, rows].float().T) * scale
            lse[b, h] = torch.logsumexp(scores, dim=-1)
            out[b, h] = torch.softmax(scores, dim=-1) @ v[h, rows].float()
    return out, lse


def _check(q, k, v, idx_ptr, idx, scale) -> float:
    check_tensor("q", q, 4, layout="[B, Hkv, R, D]")
    check_tensor("k", k, 3, layout="[Hkv, S, D]")
    check_tensor("v", v, 3, layout="[Hkv, S, D]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in QK_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if v.dtype != k.dtype or v.shape != k.shape:
        raise ValueError(
            f"v must match k ({k.dtype}, {tuple(k.shape)}), got {v.dtype}, {tuple(v.shape)}"
        )
    B, Hkv, _, D = q.shape
    if k.shape[0] != Hkv or k.shape[2] != D:
        raise ValueError(f"k must be [Hkv={Hkv}, S, D={D}], got shape {tuple(k.shape)}")
    for name, t in (("idx_ptr", idx_ptr), ("idx", idx)):
        check_tensor(name, t, 1, layout="int64", floating=False)
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor, got {t.dtype}")
    if idx_ptr.numel() != B * Hkv + 1:
        raise ValueError(
            f"idx_ptr must have B * Hkv + 1 = {B * Hkv + 1} entries, got {idx_ptr.numel()}"
        )
    check_same_device(q=q, k=k, v=v, idx_ptr=idx_ptr, idx=idx)
    if q.device.type == "cpu":  # value checks sync; skipped on accelerators (decode hot path)
        if (
            int(idx_ptr[0]) != 0
            or int(idx_ptr[-1]) != idx.numel()
            or bool((idx_ptr.diff() < 0).any())
        ):
            raise ValueError(f"idx_ptr must rise from 0 to len(idx) = {idx.numel()}")
        if idx.numel() and not (int(idx.min()) >= 0 and int(idx.max()) < k.shape[1]):
            raise ValueError(f"idx must lie in [0, S = {k.shape[1]})")
    if scale is None:
        return D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)
