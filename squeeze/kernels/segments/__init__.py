"""Selected clusters → merged row segments, and the CSR helpers every segment reader shares.

A selection is a mask over the clusters of each (batch row, KV head), ``[B, Hkv, C]``, and a
cluster-ordered layout gives every cluster a contiguous row range through ``offsets [Hkv, C + 1]``.
:func:`segments` merges adjacent selected clusters (and the empty ones between them, which cost
nothing) into ``[start, end)`` row segments in CSR form: the segments of (b, h) are
``seg_start/seg_end[seg_ptr[b * Hkv + h] : seg_ptr[b * Hkv + h + 1]]``.

Backends (:mod:`squeeze.kernels.dispatch`): ``reference.py`` (PyTorch, compact), ``native.py``
(C, CPU: the reference's compact segments in one pass, the rows of each group with them) and
``triton.py`` (one program per (b, h), no host synchronisation, padded: each (b, h) owns
``ceil(C / 2)`` entries, the unused ones empty ``[0, 0)``; the same segments once the empty ones
are dropped).
"""

from __future__ import annotations

import torch

from .. import dispatch
from . import native
from .reference import segments_reference


def segments(mask: torch.Tensor, offsets: torch.Tensor, *, backend: str | None = None):
    """Merged row segments of the selected clusters.

    Args:
        mask: ``[B, Hkv, C]`` bool (C = K + 1 with the window column, or the level-1 clusters).
        offsets: ``[Hkv, C + 1]`` int64 CSR row offsets (or ``l1_offsets``: runs of children).
        backend: ``None`` (automatic), ``"torch"``, ``"native"`` or ``"triton"``.
    Returns:
        ``(seg_ptr [B*Hkv + 1], seg_start [S], seg_end [S])`` int64 (padded on the Triton path).
    """
    return _segments(mask, offsets, backend)[:3]


def segments_with_lengths(mask: torch.Tensor, offsets: torch.Tensor, *, backend=None):
    """:func:`segments` and the rows they cover per (batch row, KV head), ``[B, Hkv]`` int64
    (:func:`group_lengths`; the native kernel counts them as it goes)."""
    *found, lengths = _segments(mask, offsets, backend)
    if lengths is None:
        lengths = group_lengths(*found).view(mask.shape[0], mask.shape[1])
    return (*found, lengths)


def _segments(mask, offsets, backend):
    """``(seg_ptr, seg_start, seg_end, lengths [B, Hkv] or None)`` from the chosen backend."""
    if mask.dim() != 3 or offsets.shape != (mask.shape[1], mask.shape[2] + 1):
        raise ValueError(
            f"offsets must be [Hkv, C + 1] for mask [B, Hkv, C] = {tuple(mask.shape)}, got "
            f"{tuple(offsets.shape)}"
        )
    name = dispatch.choose("segments", mask.device, backend=backend)
    if name == "native":
        return native.segments_native(mask, offsets)
    if name == "triton":
        from .triton import segments_triton

        return (*segments_triton(mask, offsets), None)
    return (*segments_reference(mask, offsets), None)


def gather_rows(x, seg_ptr, seg_start, seg_end, counts, out, *, backend=None):
    """The rows every group's segments cover, group after group in segment order.

    Args:
        x: ``[Hkv, N, D]`` rows (any dtype); group ``i`` reads head ``i % Hkv``.
        seg_ptr, seg_start, seg_end: the CSR segments of the ``B * Hkv`` groups, in bounds
            (checked by the caller).
        counts: ``[B * Hkv]`` int64 rows each group's segments cover (:func:`group_lengths`).
        out: ``[counts.sum(), D]`` in ``x``'s dtype, written and returned.
    The native kernel copies each segment whole (``memcpy``); the PyTorch backend (and a Triton
    choice: no kernel of its own) expands the segments to row indices and runs one
    ``index_select``.
    """
    name = dispatch.choose("segments", x.device, backend=backend)
    if name == "native" and x.is_contiguous() and out.is_contiguous():
        return native.gather_rows_native(x, seg_ptr, seg_start, seg_end, counts, out)
    hkv, n, d = x.shape
    owner, row = expand_rows(seg_ptr, seg_start, seg_end, out.shape[0])
    return torch.index_select(x.reshape(-1, d), 0, (owner % hkv) * n + row, out=out)


def expand_counts(counts: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``[total]`` int64: ``i`` repeated ``counts[i]`` times (``total = counts.sum()``; passing it
    avoids a host synchronisation)."""
    return torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), counts, output_size=total
    )


def owners(ptr: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``[total]`` int64: the group owning each entry of a CSR array (group ``i`` owns entries
    ``ptr[i] : ptr[i + 1]``)."""
    return expand_counts(ptr[1:] - ptr[:-1], total)


def group_lengths(seg_ptr, seg_start, seg_end) -> torch.Tensor:
    """``[groups]`` int64: rows covered by the segments of each group (``B * Hkv`` groups)."""
    lengths = seg_end - seg_start
    per = torch.zeros(seg_ptr.numel() - 1, dtype=torch.int64, device=lengths.device)
    return per.index_add_(0, owners(seg_ptr, lengths.numel()), lengths)


def expand_rows(seg_ptr, seg_start, seg_end, total: int | None = None):
    """Every row of the segments, in segment order: ``(group [R], row [R])`` int64, ``row`` in
    ``[seg_start, seg_end)`` of its segment, ``group`` the CSR group owning it."""
    lengths = seg_end - seg_start
    seg_of_row = expand_counts(lengths, total)
    first = torch.cumsum(lengths, 0) - lengths  # where each segment's rows start
    pos = torch.arange(seg_of_row.numel(), device=lengths.device)
    row = seg_start[seg_of_row] + (pos - first[seg_of_row])
    return owners(seg_ptr, lengths.numel())[seg_of_row], row
