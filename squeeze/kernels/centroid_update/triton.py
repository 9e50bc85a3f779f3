"""Sorted centroid update in Triton (reference: reference.py).

The labels are sorted once (``sort_labels``: all groups together), so each cluster is a contiguous
run ``[start, end)`` of the sorted order. One program per (cluster, ``BLOCK_D`` slice of D) walks
its run ``BLOCK_M`` members at a time, gathers their rows, and sums ``w·x`` in fp32 registers,
then writes the mean once. **No atomics at all** (zero per cluster run): every cluster has exactly
one owner. The cost is load imbalance when one cluster is much larger than the rest (its program
walks all of it); with G·K programs (52K for G=32, K=1638) the GPU scheduler hides typical skew.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import sort_labels

BLOCK_M = 32


@triton.jit
def _segment_mean_kernel(
    x_ptr, order_ptr, w_ptr, start_ptr, total_ptr, out_ptr,
    N, D, sxg, sxn, sxd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr,
):  # fmt: skip
    cl = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    r0 = tl.load(start_ptr + cl)
    r1 = tl.load(start_ptr + cl + 1)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for i0 in range(r0, r1, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        imask = i < r1
        flat = tl.load(order_ptr + i, mask=imask, other=0)  # row of x.view(G * N, D)
        gi = flat // N
        ni = flat % N
        xt = tl.load(
            x_ptr + gi[:, None] * sxg + ni[:, None] * sxn + offs_d[None, :] * sxd,
            mask=imask[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_W:
            xt = xt * tl.load(w_ptr + i, mask=imask, other=0.0)[:, None]
        acc += tl.sum(xt, 0)
    total = tl.load(total_ptr + cl)
    tl.store(out_ptr + cl * D + offs_d, acc / tl.maximum(total, 1e-30), mask=dmask)


def centroid_update_triton(
    x: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    *,
    weights: torch.Tensor | None = None,
    sorted_labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster (weighted) means; same contract as
    :func:`squeeze.kernels.centroid_update.centroid_update`.

    Args:
        x: ``[G, N, D]`` points, fp32 / bf16 / fp16, any strides (summed in fp32).
        labels: ``[G, N]`` int64 in ``[0, k)``.
        k: clusters per group.
        weights: optional ``[G, N]`` non-negative weights (an all-zero cluster gets its plain mean).
        sorted_labels: ``sort_labels(labels, k)``, to share one sort.
    Returns:
        means ``[G, k, D]`` fp32 (zero for an empty cluster) and counts ``[G, k]`` int64.
    """
    g, n, d = x.shape
    order, key, counts = sorted_labels if sorted_labels is not None else sort_labels(labels, k)
    lengths = counts.reshape(-1)
    starts = torch.zeros(g * k + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(lengths, 0, out=starts[1:])
    w = None
    if weights is None:
        totals = lengths.to(torch.float32)
    else:  # O(G·N) scalar work in torch, as the reference: all-zero clusters fall back to 1
        w = weights.to(torch.float32).reshape(-1)[order]
        totals = torch.zeros(g * k, dtype=torch.float32, device=x.device).index_add_(0, key, w)
        w = torch.where(totals[key] > 0, w, torch.ones_like(w)).contiguous()
        totals = torch.where(totals > 0, totals, lengths.to(torch.float32))
    means = torch.empty(g * k, d, dtype=torch.float32, device=x.device)
    block_d = min(128, max(16, triton.next_power_of_2(d)))
    grid = (g * k, triton.cdiv(d, block_d))
    _segment_mean_kernel[grid](
        x, order, w if w is not None else totals, starts, totals.contiguous(), means,
        n, d, *x.stride(), BLOCK_M=BLOCK_M, BLOCK_D=block_d, HAS_W=w is not None, num_warps=4,
    )  # fmt: skip
    return means.view(g, k, d), counts
