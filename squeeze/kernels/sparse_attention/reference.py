"""Sparse attention in PyTorch: the plain oracle and the gather backend (``"torch"``)."""

from __future__ import annotations

import torch

from .. import FLASH_CPU, NEG_INF
from ..scratch import buffer
from ..segments import gather_rows, group_lengths


def sparse_attention_reference(q, k, v, seg_ptr, seg_start, seg_end, scale: float):
    """The oracle: each (b, h)'s segments expanded to token indices, gathered, fp32 softmax
    (a Python loop over heads). Arguments as :func:`squeeze.kernels.sparse_attention.sparse_attention`."""
    B, Hkv, R, D = q.shape
    out = torch.zeros(B, Hkv, R, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hkv, R), NEG_INF, dtype=torch.float32, device=q.device)
    ptr, starts, ends = seg_ptr.tolist(), seg_start.tolist(), seg_end.tolist()
    for b in range(B):
        for h in range(Hkv):
            segs = range(ptr[b * Hkv + h], ptr[b * Hkv + h + 1])
            rows = torch.cat(
                [torch.zeros(0, dtype=torch.int64)]
                + [torch.arange(starts[i], ends[i]) for i in segs]
            ).to(q.device)
            if rows.numel() == 0:
                continue
            scores = (q[b, h].float() @ k[h, rows].float().T) * scale
            lse[b, h] = torch.logsumexp(scores, dim=-1)
            out[b, h] = torch.softmax(scores, dim=-1) @ v[h, rows].float()
    return out, lse


def gather_attention(q, k, v, seg_ptr, seg_start, seg_end, scale: float):
    """The ``"torch"`` backend: per (b, h), its selected rows gathered into reused buffers
    (:func:`~squeeze.kernels.segments.gather_rows`, K and V), then attention over them with its
    LSE. One (b, h) at a time, so that its rows are still in cache when attended: gathering
    every (b, h) first (480 MB for a 512-row bf16 prefill over 32K keys) cost as much as the
    attention itself."""
    B, Hkv, R, D = q.shape
    out = torch.zeros(B * Hkv, R, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B * Hkv, R), NEG_INF, dtype=torch.float32, device=q.device)
    per_group = group_lengths(seg_ptr, seg_start, seg_end)
    counts = per_group.tolist()
    if max(counts, default=0) == 0 or R == 0:
        return out.view(B, Hkv, R, D), lse.view(B, Hkv, R)
    dtype = k.dtype if q.dtype == k.dtype else torch.float32
    qq = q.reshape(B * Hkv, R, D).to(dtype)
    ptr = seg_ptr.tolist()
    for i, n in enumerate(counts):
        if not n:
            continue
        h, a, b = i % Hkv, ptr[i], ptr[i + 1]
        one = torch.tensor([0, b - a], dtype=torch.int64, device=q.device)
        rows = (one, seg_start[a:b], seg_end[a:b], per_group[i : i + 1])
        kg = gather_rows(
            k[h : h + 1], *rows, buffer("gather_k", n * D, k.dtype, k.device).view(n, D)
        )
        vg = gather_rows(
            v[h : h + 1], *rows, buffer("gather_v", n * D, k.dtype, k.device).view(n, D)
        )
        out[i], lse[i] = _attend(qq[i], kg.to(dtype), vg.to(dtype), scale)
    return out.view(B, Hkv, R, D), lse.view(B, Hkv, R)


def _attend(q, k, v, scale):
    """``q [R, D]`` over ``k, v [n, D]`` (n > 0), all one dtype: ``out [R, D]``, ``lse [R]``."""
    if q.device.type == "cpu" and FLASH_CPU is not None:
        o, lse = FLASH_CPU(q[None, None], k[None, None], v[None, None], 0.0, False, scale=scale)
        return o[0, 0], lse[0, 0]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    step = max(1, (16 << 20) // max(1, k.shape[0]))  # query rows per block: ~64 MB of scores
    for r in range(0, q.shape[0], step):
        s = (q[r : r + step] @ k.T).float() * scale
        lse[r : r + step] = torch.logsumexp(s, dim=-1)
        out[r : r + step] = torch.exp(s - lse[r : r + step, None]) @ v.float()
    return out, lse
