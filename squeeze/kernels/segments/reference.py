"""Selected clusters → merged row segments, in PyTorch (compact CSR: no empty segments)."""

from __future__ import annotations

import torch


def segments_reference(mask: torch.Tensor, offsets: torch.Tensor):
    """See :func:`squeeze.kernels.segments.segments`; adjacent selected clusters are merged, so
    S counts contiguous runs."""
    b, hkv, _c = mask.shape
    empty = (offsets[:, 1:] == offsets[:, :-1])[None]
    run = mask | empty  # an empty cluster costs nothing and must not break a run
    pad = torch.zeros(b, hkv, 1, dtype=torch.bool, device=mask.device)
    starts = run & ~torch.cat([pad, run[..., :-1]], dim=-1)
    ends = run & ~torch.cat([run[..., 1:], pad], dim=-1)
    bs, hs, cs = starts.nonzero(as_tuple=True)
    ce = ends.nonzero(as_tuple=True)[2]
    seg_start = offsets[hs, cs]
    seg_end = offsets[hs, ce + 1]
    keep = seg_end > seg_start
    seg_start, seg_end, flat = seg_start[keep], seg_end[keep], (bs * hkv + hs)[keep]
    per_head = torch.bincount(flat, minlength=b * hkv)
    seg_ptr = torch.zeros(b * hkv + 1, dtype=torch.int64, device=mask.device)
    seg_ptr[1:] = per_head.cumsum(0)
    return seg_ptr, seg_start, seg_end
