"""Selected clusters → padded per-head row segments in one Triton kernel (no host sync).

Reference: :mod:`squeeze.kernels.segments.reference`. One program per (b, h) walks the columns
in ``BLOCK_C`` tiles: the kept (or empty) columns form runs; a run's first column gives a segment
start, its last column a segment end, compacted per head with a prefix sum. The segment lists are
padded per head to ``ceil(C / 2)`` entries (the most runs C columns can hold) with empty
segments, so ``seg_ptr`` is ``arange(B·Hkv + 1) · width``: a CSR the sparse attention kernel reads
as is. Zero-length runs (only empty clusters) are kept as empty segments; dropping them gives
exactly the reference's segments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_C = 128


@triton.jit
def _segments_kernel(
    keep_ptr, off_ptr, start_ptr, end_ptr, C, HKV, WIDTH, soh, BLOCK_C: tl.constexpr
):
    bh = tl.program_id(0)
    h = bh % HKV
    n_start = bh * 0
    n_end = bh * 0
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        run = _run(keep_ptr, off_ptr, bh, h, cs, C, soh)
        prev = _run(keep_ptr, off_ptr, bh, h, cs - 1, C, soh)
        nxt = _run(keep_ptr, off_ptr, bh, h, cs + 1, C, soh)
        first = run & ~prev
        last = run & ~nxt
        pos_s = n_start + tl.cumsum(first.to(tl.int32), 0) - 1
        pos_e = n_end + tl.cumsum(last.to(tl.int32), 0) - 1
        cs_ok = tl.where(run, cs, 0)
        rows0 = tl.load(off_ptr + h * soh + cs_ok, mask=first, other=0)
        rows1 = tl.load(off_ptr + h * soh + cs_ok + 1, mask=last, other=0)
        tl.store(start_ptr + bh * WIDTH + pos_s, rows0, mask=first)
        tl.store(end_ptr + bh * WIDTH + pos_e, rows1, mask=last)
        n_start += tl.sum(first.to(tl.int32), 0)
        n_end += tl.sum(last.to(tl.int32), 0)


@triton.jit
def _run(keep_ptr, off_ptr, bh, h, cs, C, soh):
    """Column cs is in a run: kept, or an empty cluster (costs nothing, must not break a run)."""
    ok = (cs >= 0) & (cs < C)
    cs = tl.where(ok, cs, 0)
    keep = tl.load(keep_ptr + bh * C + cs, mask=ok, other=0) != 0
    o0 = tl.load(off_ptr + h * soh + cs, mask=ok, other=0)
    o1 = tl.load(off_ptr + h * soh + cs + 1, mask=ok, other=0)
    return ok & (keep | (o0 == o1))


def segments_triton(mask: torch.Tensor, offsets: torch.Tensor):
    """Kept clusters → padded per-head segments; contract of
    :func:`squeeze.kernels.segments.segments`, each (b, h) owning ``width = ceil(C / 2)`` entries.

    Args:
        mask: ``[B, Hkv, C]`` bool / int8.
        offsets: ``[Hkv, C + 1]`` int64 row offsets.
    Returns:
        ``seg_ptr [B·Hkv + 1]``, ``seg_start``, ``seg_end [B·Hkv·width]`` int64.
    """
    b, hkv, c = mask.shape
    width = max(1, (c + 1) // 2)
    keep = mask.to(torch.int8).contiguous()
    offsets = offsets.contiguous()
    start = torch.zeros(b * hkv * width, dtype=torch.int64, device=mask.device)
    end = torch.zeros_like(start)
    _segments_kernel[(b * hkv,)](
        keep, offsets, start, end, c, hkv, width, offsets.stride(0), BLOCK_C=BLOCK_C
    )
    ptr = torch.arange(b * hkv + 1, dtype=torch.int64, device=mask.device) * width
    return ptr, start, end
