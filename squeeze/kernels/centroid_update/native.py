"""Cluster sums on the native C kernel (``kernels/native/kmeans.c``, CPU): each point added
into its cluster's fp32 sum in point order (the order of a stable sort by label), parallel over
(group, column slice), with no sort."""

from __future__ import annotations

import torch

from .. import native
from ..native.kmeans import kernels


def cluster_sums(
    x: torch.Tensor, labels: torch.Tensor, k: int, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums [G, k, D] fp32, totals [G, k] fp32 and counts [G, k] int64.

    ``sums`` are Σ w'·x over each cluster's members and ``totals`` Σ w', with w' = w, or 1 for all
    members of a cluster whose weights sum to 0 (and everywhere without weights).
    """
    g, n, d = x.shape
    if x.dtype not in native.build_info("kmeans").dtypes:  # fp64 (or an fp16 the build lacks)
        x = x.to(torch.float32)
    x = x.contiguous()
    labels = labels.contiguous()
    w = None if weights is None else weights.to(torch.float32).contiguous()
    sums = torch.empty(g, k, d, dtype=torch.float32)
    totals = torch.empty(g, k, dtype=torch.float32)
    counts = torch.empty(g, k, dtype=torch.int64)
    rc = kernels().sums(
        x.data_ptr(), native.DTYPE_CODES[x.dtype], g, n, d, labels.data_ptr(),
        None if w is None else w.data_ptr(), k, sums.data_ptr(), totals.data_ptr(),
        counts.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc == -2:
        raise ValueError(f"labels must lie in [0, k) = [0, {k})")
    if rc == -1:  # the dtype is one the build reads: -1 is its scratch allocation
        raise MemoryError("native k-means cluster sums could not allocate its scratch memory")
    if rc != 0:
        raise RuntimeError(f"native k-means cluster sums failed with code {rc}")
    return sums, totals, counts
