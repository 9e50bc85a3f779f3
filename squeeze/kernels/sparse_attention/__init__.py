"""Sparse attention over selected token segments of a cluster-ordered context, with its LSE.

The context's keys/values of one layer are stored per KV head in cluster order, ``k, v [Hkv, N, D]``,
so a selection of clusters is a list of contiguous ``[start, end)`` token segments per KV head, given
in CSR form: the segments of (batch ``b``, KV head ``h``) are
``seg_start/seg_end[seg_ptr[b * Hkv + h] : seg_ptr[b * Hkv + h + 1]]``. The queries of one KV head's
GQA group (and the M question rows) are packed as rows, ``q [B, Hkv, R, D]``. No mask: every context
key precedes the queries. The result comes with its log-sum-exp, to be merged with a dense tail.

Backends (``backend=`` or ``$SQUEEZE_BACKEND``; capabilities in :mod:`squeeze.kernels.dispatch`):
  * ``"native"`` (``native.py``, C in ``kernels/native/sparse_attention.c``): CPU; K/V fp32, bf16,
    and fp16 where the compiler has ``_Float16``; reads the selected rows in place. Automatic for
    CPU when R is small (decode).
  * ``"torch"`` (``reference.py``): gather the selected rows of each KV head into a reused buffer
    (:func:`~squeeze.kernels.segments.gather_rows`: one copy per segment on CPU) and run
    attention per (b, h) on them (the CPU flash kernel, which
    returns the LSE; matmul + softmax elsewhere). Automatic for large R (prefill) on CPU.
  * ``"triton"`` (``triton.py``): the Triton flash kernel (flash-decoding chunks balanced across
    heads, GQA group packed as tile rows). Automatic for CUDA tensors.

:func:`sparse_attention_reference` is the plain oracle the tests hold every backend to.
"""

from __future__ import annotations

import torch

from ...validation import check_same_device, check_scale, check_tensor
from .. import dispatch
from . import native, reference

QK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sparse_attention(
    q, k, v, seg_ptr, seg_start, seg_end, *, scale=None, backend=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed queries over the selected segments of each KV head.

    Args:
        q: ``[B, Hkv, R, D]`` fp32 / bf16 / fp16 packed query rows.
        k, v: ``[Hkv, N, D]`` context keys / values in cluster order, one dtype (fp32 / bf16 / fp16).
        seg_ptr: ``[B * Hkv + 1]`` int64 CSR offsets into ``seg_start`` / ``seg_end``.
        seg_start, seg_end: ``[S]`` int64 token ranges ``[start, end)`` into ``k[h]`` / ``v[h]``;
            the segments of one (b, h) are disjoint (overlaps would be counted twice); empty
            segments are allowed.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``None`` (automatic), ``"torch"``, ``"native"`` or ``"triton"``.
    Returns:
        ``out [B, Hkv, R, D]`` float32 and ``lse [B, Hkv, R]`` float32 (natural log of the sum of
        ``exp(scale * q.k)``); a (b, h) without keys gives ``out`` 0 and ``lse`` -inf.
    """
    scale = check_inputs(q, k, v, seg_ptr, seg_start, seg_end, scale)
    name = select_backend(q, k, backend)
    if name == "native" and q.numel():
        # the kernel checks the segments itself (the same bounds); on a failure the check here
        # names the bad segment
        try:
            return native.sparse_attention_native(q, k, v, seg_ptr, seg_start, seg_end, scale)
        except ValueError:
            check_segments(seg_ptr, seg_start, seg_end, k.shape[1])
            raise
    # no host sync in a CUDA decode step: there the Triton kernel keeps its reads in bounds
    # itself (bad segments give a wrong answer, not an out-of-bounds read)
    if not (name == "triton" and q.device.type == "cuda"):
        check_segments(seg_ptr, seg_start, seg_end, k.shape[1])
    if name == "native":
        return native.sparse_attention_native(q, k, v, seg_ptr, seg_start, seg_end, scale)
    if name == "triton":
        from .triton import sparse_attention_triton

        return sparse_attention_triton(q, k, v, seg_ptr, seg_start, seg_end, scale)
    return reference.gather_attention(q, k, v, seg_ptr, seg_start, seg_end, scale)


def sparse_attention_reference(
    q, k, v, seg_ptr, seg_start, seg_end, *, scale=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain PyTorch oracle (checked inputs): expand each (b, h)'s segments to token
    indices, gather, fp32 softmax."""
    scale = check_inputs(q, k, v, seg_ptr, seg_start, seg_end, scale)
    check_segments(seg_ptr, seg_start, seg_end, k.shape[1])
    return reference.sparse_attention_reference(q, k, v, seg_ptr, seg_start, seg_end, scale)


def select_backend(q: torch.Tensor, k: torch.Tensor, backend: str | None = None) -> str:
    """The backend :func:`sparse_attention` runs for these tensors (see the module docstring)."""
    return dispatch.choose(
        "sparse_attention", q.device, dtype=k.dtype, head_dim=k.shape[2], rows=q.shape[2],
        backend=backend,
    )  # fmt: skip


def check_inputs(q, k, v, seg_ptr, seg_start, seg_end, scale) -> float:
    """Types, shapes and devices of the arguments (values: :func:`check_segments`); the scale."""
    check_tensor("q", q, 4, layout="[B, Hkv, R, D]")
    check_tensor("k", k, 3, layout="[Hkv, N, D]")
    check_tensor("v", v, 3, layout="[Hkv, N, D]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in QK_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if v.dtype != k.dtype:
        raise TypeError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    if v.shape != k.shape:
        raise ValueError(
            f"v must have k's shape {tuple(k.shape)} [Hkv, N, D], got {tuple(v.shape)}"
        )
    B, Hkv, _, D = q.shape
    if k.shape[0] != Hkv:
        raise ValueError(f"k must have Hkv={Hkv} heads (q.shape[1]), got shape {tuple(k.shape)}")
    if k.shape[2] != D:
        raise ValueError(f"k must have head size D={D} (q.shape[3]), got shape {tuple(k.shape)}")
    for name, t in (("seg_ptr", seg_ptr), ("seg_start", seg_start), ("seg_end", seg_end)):
        check_tensor(name, t, 1, layout="int64", floating=False)
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor, got {t.dtype}")
    if seg_ptr.numel() != B * Hkv + 1:
        raise ValueError(
            f"seg_ptr must have B * Hkv + 1 = {B * Hkv + 1} entries, got {seg_ptr.numel()}"
        )
    if seg_end.numel() != seg_start.numel():
        raise ValueError(
            f"seg_end must have seg_start's length {seg_start.numel()}, got {seg_end.numel()}"
        )
    check_same_device(q=q, k=k, v=v, seg_ptr=seg_ptr, seg_start=seg_start, seg_end=seg_end)
    return check_scale(scale, D)


def check_segments(seg_ptr, seg_start, seg_end, n: int) -> None:
    """Segment values, checked without touching the kernels (numpy on CPU: ~20 us for 2k segments)."""
    cpu = seg_ptr.device.type == "cpu"
    ptr, st, en = (t.numpy() if cpu else t for t in (seg_ptr, seg_start, seg_end))
    s = st.shape[0]
    if int(ptr[0]) != 0 or int(ptr[-1]) != s or bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(
            f"seg_ptr must rise from 0 to len(seg_start) = {s}, got {seg_ptr.tolist()}"
        )
    if s and bool(((st < 0) | (en < st) | (en > n)).any()):
        bad = int(((seg_start < 0) | (seg_end < seg_start) | (seg_end > n)).nonzero()[0, 0])
        raise ValueError(
            f"segments must satisfy 0 <= seg_start <= seg_end <= N = {n}; segment {bad} is "
            f"[{int(seg_start[bad])}, {int(seg_end[bad])})"
        )
