"""Chunked nearest-centroid assignment (PyTorch reference of FlashAssign).

The [G, N, K] score matrix is never built: points are taken ``chunk_n`` at a time and centroids
``chunk_k`` at a time; each [G, chunk_n, chunk_k] fp32 tile is reduced at once into a running
(best score, best index) pair per point. All arithmetic is fp32 whatever the input dtype, so fp16
keys whose squared norm overflows fp16 (norm > 256) are still assigned correctly.
"""

from __future__ import annotations

import torch

from squeeze.kernels.backend import use_triton

#: Default size of the fp32 score tile: large enough for an efficient matmul, small enough to
#: stay near the caches and bound the memory the assignment adds.
TILE_BYTES = 16 * 2**20
#: Default number of centroids per tile.
CHUNK_K = 4096


def default_chunk_n(groups: int, chunk_k: int, n: int, tile_bytes: int = TILE_BYTES) -> int:
    """Points per chunk so that one [groups, chunk_n, chunk_k] fp32 tile is about ``tile_bytes``."""
    return max(16, min(n, tile_bytes // (4 * groups * max(chunk_k, 1))))


def assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    half_sq: torch.Tensor | None = None,
    chunk_n: int | None = None,
    chunk_k: int | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and value of the best centroid of every point, batched over G groups.

    The score of centroid k for point x is ``s_k = x·c_k − half_sq_k``. With
    ``half_sq = ½‖c‖²`` the best (largest) score is the nearest centroid in L2, since
    ``‖x − c_k‖² = ‖x‖² − 2·s_k``; with ``half_sq=None`` it is the largest inner product (the nearest
    centroid when all centroids have unit norm: spherical k-means).

    Args:
        x: [G, N, D] points, any float dtype (cast to fp32 one chunk at a time).
        centroids: [G, K, D] float centroids (used in fp32).
        half_sq: [G, K] fp32 score offsets, normally ``0.5 * (c * c).sum(-1)``, or None.
        chunk_n: points per tile (default: :func:`default_chunk_n`, a ~16 MB tile).
        chunk_k: centroids per tile (default ``min(K, 4096)``).
        workspace: optional 1-D fp32 scratch of at least ``G·chunk_n·chunk_k`` elements for the
            tile (lets a caller reuse one allocation across calls).

    Returns:
        labels [G, N] int64 (ties go to the lowest index) and best score [G, N] fp32.

    Extra memory: one [G, chunk_n, chunk_k] fp32 tile, a [G, D, K] fp32 copy of the centroids,
    and the outputs.
    """
    if use_triton("assign", x.device):  # CUDA tensors: the fused Triton kernel (assign_triton.py)
        from squeeze.kernels.assign_triton import assign_triton

        return assign_triton(x, centroids, half_sq=half_sq)
    g, n, _ = x.shape
    k = centroids.shape[1]
    chunk_k = min(k, chunk_k or CHUNK_K)
    chunk_n = min(n, chunk_n or default_chunk_n(g, chunk_k, n))
    ct = centroids.to(torch.float32).transpose(1, 2).contiguous()  # [G, D, K]
    hs = None if half_sq is None else half_sq.to(torch.float32).unsqueeze(1)  # [G, 1, K]
    labels = torch.empty(g, n, dtype=torch.int64, device=x.device)
    best = torch.empty(g, n, dtype=torch.float32, device=x.device)
    tile_buf = workspace
    if tile_buf is None or tile_buf.numel() < g * chunk_n * chunk_k:
        tile_buf = torch.empty(g * chunk_n * chunk_k, dtype=torch.float32, device=x.device)
    for n0 in range(0, n, chunk_n):
        n1 = min(n, n0 + chunk_n)
        xc = x[:, n0:n1].to(torch.float32)
        run_val = best[:, n0:n1]
        run_idx = labels[:, n0:n1]
        for k0 in range(0, k, chunk_k):
            k1 = min(k, k0 + chunk_k)
            tile = tile_buf[: g * (n1 - n0) * (k1 - k0)].view(g, n1 - n0, k1 - k0)
            torch.bmm(xc, ct[:, :, k0:k1], out=tile)
            if hs is not None:
                tile.sub_(hs[:, :, k0:k1])
            val, idx = tile.max(dim=-1)
            if k0 == 0:
                run_val.copy_(val)
                run_idx.copy_(idx)
            else:
                better = val > run_val  # strict: ties keep the earlier (lower) index
                run_val.copy_(torch.where(better, val, run_val))
                run_idx.copy_(torch.where(better, idx + k0, run_idx))
    return labels, best
