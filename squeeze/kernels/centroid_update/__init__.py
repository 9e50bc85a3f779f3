"""Centroid update: per-cluster (weighted) means of G groups of points.

Backends (``backend=`` or ``$SQUEEZE_BACKEND``; capabilities in :mod:`squeeze.kernels.dispatch`):
``native.py`` (CPU: cluster sums in point order, no sort, in ``kernels/native/kmeans.c``),
``reference.py`` (PyTorch: sorted segments summed a chunk of rows at a time) and ``triton.py``
(CUDA: one program per cluster run of the sorted order, no atomics).
"""

from __future__ import annotations

import torch

from .. import dispatch
from .native import cluster_sums
from .reference import CHUNK_BYTES, centroid_update_reference, sort_labels

__all__ = ["CHUNK_BYTES", "centroid_update", "centroid_update_reference", "sort_labels"]


def centroid_update(
    x: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    *,
    weights: torch.Tensor | None = None,
    sorted_labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    chunk_rows: int | None = None,
    workspace: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster (weighted) means of G groups of points.

    Args:
        x: [G, N, D] points, any float dtype (summed in fp32).
        labels: [G, N] int64 cluster ids in ``[0, k)``.
        k: clusters per group.
        weights: optional [G, N] non-negative point weights. A cluster whose members all have
            weight 0 gets their unweighted mean.
        sorted_labels: the output of :func:`sort_labels` for ``labels``, to share one sort between
            several updates.
        chunk_rows: sorted rows gathered at a time (default: a ~16 MB fp32 chunk).
        workspace: optional 1-D fp32 scratch of at least ``chunk_rows·D`` elements for the chunk.
        backend: ``None`` (automatic: Triton for CUDA tensors, native on CPU when it builds),
            ``"triton"``, ``"native"`` or ``"torch"``. ``sorted_labels``, ``chunk_rows`` and
            ``workspace`` only serve the torch and Triton backends.

    Returns:
        means [G, k, D] fp32 (zero for an empty cluster) and counts [G, k] int64.

    Extra memory: one [chunk_rows, D] fp32 chunk (plus its copy in x's dtype when x is not fp32),
    three [G·k, D] fp32 sums and O(G·N) indices; native: one [G·k, D] fp32 sum (and an fp32
    copy of x when x is fp64).
    """
    be = dispatch.choose("centroid_update", x.device, dtype=x.dtype, backend=backend)
    if be == "triton":
        from .triton import centroid_update_triton

        return centroid_update_triton(x, labels, k, weights=weights, sorted_labels=sorted_labels)
    if be == "native":
        sums, totals, counts = cluster_sums(x, labels, k, weights)
        return sums.div_(totals.clamp_min(1e-30).unsqueeze(-1)), counts
    return centroid_update_reference(
        x, labels, k, weights=weights, sorted_labels=sorted_labels, chunk_rows=chunk_rows,
        workspace=workspace,
    )  # fmt: skip
