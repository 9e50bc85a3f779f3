"""Nearest-centroid assignment in PyTorch: points ``chunk_n`` at a time against centroids
``chunk_k`` at a time, each [G, chunk_n, chunk_k] fp32 tile reduced at once into a running
(best score, best index) pair per point."""

from __future__ import annotations

import torch

#: Default size of the fp32 score tile: large enough for an efficient matmul, small enough to
#: stay near the caches and bound the memory the assignment adds.
TILE_BYTES = 16 * 2**20
#: Default number of centroids per tile.
CHUNK_K = 4096


def default_chunk_n(groups: int, chunk_k: int, n: int, tile_bytes: int = TILE_BYTES) -> int:
    """Points per chunk so that one [groups, chunk_n, chunk_k] fp32 tile is about ``tile_bytes``."""
    return max(16, min(n, tile_bytes // (4 * groups * max(chunk_k, 1))))


def assign_reference(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    half_sq: torch.Tensor | None = None,
    chunk_n: int | None = None,
    chunk_k: int | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path of :func:`squeeze.kernels.assign.assign` (same arguments, no
    ``backend``): chunked bmm + max."""
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
