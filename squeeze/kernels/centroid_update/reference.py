"""Centroid update in PyTorch, sorted: labels are sorted once per call (all groups together,
through the key ``g·K + label``), so every cluster is a contiguous segment of the sorted order.
The points are gathered in that order a chunk of rows at a time and each chunk's segments are
summed in fp32 (``torch.segment_reduce``); a segment cut by a chunk boundary is summed in two
parts. There is no per-point scatter of D-vectors; counts come from ``bincount``."""

from __future__ import annotations

import torch

#: Default byte size of the fp32 chunk of gathered rows.
CHUNK_BYTES = 16 * 2**20


def sort_labels(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cluster order of the points of G groups.

    Args:
        labels: [G, N] int64 cluster ids in ``[0, k)``.
        k: clusters per group.

    Returns:
        order [G·N] int64: flat point indices (into ``x.reshape(G·N, D)``) sorted by (group, label),
        stable; key [G·N] int64: the sorted keys ``g·k + label``; counts [G, k] int64.
    """
    g = labels.shape[0]
    offsets = torch.arange(g, device=labels.device, dtype=torch.int64).unsqueeze(1) * k
    flat = (labels + offsets).reshape(-1)
    key, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=g * k).view(g, k)
    return order, key, counts


def centroid_update_reference(
    x: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    *,
    weights: torch.Tensor | None = None,
    sorted_labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    chunk_rows: int | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path of :func:`squeeze.kernels.centroid_update.centroid_update` (same
    arguments, no ``backend``)."""
    g, n, d = x.shape
    order, key, counts = sorted_labels if sorted_labels is not None else sort_labels(labels, k)
    rows = g * n
    chunk_rows = min(rows, chunk_rows or max(1, CHUNK_BYTES // (4 * d)))
    lengths = counts.reshape(-1)
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    w = None
    if weights is None:
        totals = lengths.to(torch.float32)
    else:
        w = weights.to(torch.float32).reshape(-1)[order]
        totals = torch.segment_reduce(w, "sum", lengths=lengths, unsafe=True)
        w = torch.where(totals[key] > 0, w, torch.ones_like(w))  # all-zero clusters: plain mean
        totals = torch.where(totals > 0, totals, lengths.to(torch.float32))
    flat = x.reshape(rows, d)
    sums = torch.zeros(g * k, d, dtype=torch.float32, device=x.device)
    if workspace is not None and workspace.numel() >= chunk_rows * d:
        buf = workspace[: chunk_rows * d].view(chunk_rows, d)
    else:
        buf = torch.empty(chunk_rows, d, dtype=torch.float32, device=x.device)
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        part = buf[: r1 - r0]
        if x.dtype == torch.float32:
            torch.index_select(flat, 0, order[r0:r1], out=part)
        else:
            part.copy_(flat.index_select(0, order[r0:r1]))
        if w is not None:
            part.mul_(w[r0:r1].unsqueeze(1))
        if r0 == 0 and r1 == rows:
            sums = torch.segment_reduce(part, "sum", lengths=lengths, axis=0, unsafe=True)
            break
        # the part of each segment inside [r0, r1); most are empty
        inside = ends.clamp(r0, r1) - starts.clamp(r0, r1)
        sums += torch.segment_reduce(part, "sum", lengths=inside, axis=0, unsafe=True)
    means = sums.div_(totals.clamp_min(1e-30).unsqueeze(1))
    return means.view(g, k, d), counts
