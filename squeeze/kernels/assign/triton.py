"""FlashAssign in Triton: fused distance + online argmax over centroid tiles (reference: reference.py).

One program owns ``BLOCK_N`` points of one group: it loads them once, then streams the group's
centroids in ``BLOCK_K`` tiles, computing the scores ``x·c − ½‖c‖²`` (L2) or ``x·ĉ`` (cosine, unit
centroids) of the tile in fp32 and folding the tile's best into a register-resident (best score,
index) pair. Only the labels and the best scores (``N`` floats, used for the k-means cost) are
written: the ``[N, K]`` score matrix never reaches memory. ``N``, ``K``, ``D`` and every stride are
runtime arguments; only the block sizes (``BLOCK_D = next_pow2(D)``) and the dot precision are
compile-time, so a new context length does not recompile.

Cosine needs no normalised copy of x: ``argmax_k x·ĉ_k`` equals ``argmax_k x̂·ĉ_k`` (‖x‖ is
constant per point).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting

BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _assign_kernel(
    x_ptr, c_ptr, hs_ptr, lab_ptr, best_ptr,
    N, K, D,
    sxg, sxn, sxd, scg, sck, scd, shg, shk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_HALF: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < N
    dmask = offs_d < D
    x = tl.load(
        x_ptr + g * sxg + rows[:, None].to(tl.int64) * sxn + offs_d[None, :] * sxd,
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    idx = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        c = tl.load(
            c_ptr + g * scg + ks[:, None] * sck + offs_d[None, :] * scd,
            mask=kmask[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        s = tl.dot(x, tl.trans(c), input_precision=PRECISION)
        if HAS_HALF:
            s = s - tl.load(hs_ptr + g * shg + ks * shk, mask=kmask, other=0.0)[None, :]
        s = tl.where(kmask[None, :], s, float("-inf"))
        tile_best = tl.max(s, 1)
        tile_idx = tl.argmax(s, 1, tie_break_left=True)
        better = tile_best > best  # strict: ties keep the earlier (lower) index
        best = tl.where(better, tile_best, best)
        idx = tl.where(better, tile_idx + k0, idx)
    out = g * N + rows
    tl.store(lab_ptr + out, idx.to(tl.int64), mask=rmask)
    tl.store(best_ptr + out, best, mask=rmask)


def assign_triton(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    half_sq: torch.Tensor | None = None,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and score of the best centroid of every point; same contract as
    :func:`squeeze.kernels.assign.assign`.

    Args:
        x: ``[G, N, D]`` points, fp32 / bf16 / fp16 (any strides; converted to fp32 in registers).
        centroids: ``[G, K, D]`` centroids (read in fp32).
        half_sq: ``[G, K]`` fp32 ``½‖c‖²`` (L2), or ``None`` (inner product: cosine with unit
            centroids).
        precision: ``"ieee"`` (exact fp32 products: labels match the reference on tie-free data)
            or ``"tf32"`` (tensor cores, faster on GPU, may flip near-ties).
    Returns:
        labels ``[G, N]`` int64 (ties: lowest index) and best score ``[G, N]`` fp32.
    """
    g, n, d = x.shape
    k = centroids.shape[1]
    if interpreting():
        precision = "ieee"
    c = centroids if centroids.dtype == torch.float32 else centroids.float()
    labels = torch.empty(g, n, dtype=torch.int64, device=x.device)
    best = torch.empty(g, n, dtype=torch.float32, device=x.device)
    if n == 0 or g == 0:
        return labels, best
    hs = half_sq.float() if half_sq is not None else c.new_zeros(1, 1)
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(n, BLOCK_N), g)
    _assign_kernel[grid](
        x, c, hs, labels, best, n, k, d, *x.stride(), *c.stride(), *hs.stride(),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=block_d,
        HAS_HALF=half_sq is not None, PRECISION=precision, num_warps=4,
    )  # fmt: skip
    return labels, best
