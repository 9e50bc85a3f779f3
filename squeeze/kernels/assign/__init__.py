"""Nearest-centroid assignment (FlashAssign), batched over G groups.

The [G, N, K] score matrix is never built. Backends (``backend=`` or ``$SQUEEZE_BACKEND``;
capabilities in :mod:`squeeze.kernels.dispatch`): ``native.py`` (CPU: the fused GEMM + argmax of
``kernels/native/kmeans.c``), ``reference.py`` (PyTorch: chunked matmul, one tile reduced at a
time) and ``triton.py`` (CUDA: fused distance + online argmax over centroid tiles). All
arithmetic is fp32 whatever the input dtype, so fp16 keys whose squared norm overflows fp16
(norm > 256) are still assigned correctly. :func:`reassign` reuses a previous assignment where
it must hold (the k-means iterations after the first, on the native backend).
"""

from __future__ import annotations

import torch

from .. import dispatch
from .native import assign_native
from .reference import CHUNK_K, TILE_BYTES, assign_reference, default_chunk_n

__all__ = [
    "CHUNK_K", "TILE_BYTES", "assign", "assign_reference", "choose_backend", "default_chunk_n",
    "reassign",
]  # fmt: skip


def choose_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """``"triton"``, ``"native"`` or ``"torch"``: the k-means kernels' backend for points ``x``
    (one choice serves a whole :func:`squeeze.kmeans` call)."""
    return dispatch.choose("assign", x.device, dtype=x.dtype, backend=backend)


def assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    half_sq: torch.Tensor | None = None,
    chunk_n: int | None = None,
    chunk_k: int | None = None,
    workspace: torch.Tensor | None = None,
    backend: str | None = None,
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
            tile (lets a caller reuse one allocation across calls; torch backend only).
        backend: ``None`` (automatic: Triton for CUDA tensors, native on CPU when it builds),
            ``"triton"``, ``"native"`` or ``"torch"``.

    Returns:
        labels [G, N] int64 (ties go to the lowest index) and best score [G, N] fp32. The two
        backends sum the dot products in different orders, so scores agree to fp32 round-off
        and labels may differ only between near-tied centroids.

    Extra memory: a [G, K, D] fp32 copy of the centroids, the outputs, and (torch) one
    [G, chunk_n, chunk_k] fp32 tile, or (native, non-fp32 x) one [G, chunk_n, D] fp32 chunk.
    """
    be = choose_backend(x, backend)
    if be == "triton":
        from .triton import assign_triton

        return assign_triton(x, centroids, half_sq=half_sq)
    if be == "native":
        k = centroids.shape[1]
        chunk_n = min(
            x.shape[1], chunk_n or default_chunk_n(x.shape[0], min(k, CHUNK_K), x.shape[1])
        )
        return assign_native(x, centroids, half_sq, chunk_n)
    return assign_reference(
        x, centroids, half_sq=half_sq, chunk_n=chunk_n, chunk_k=chunk_k, workspace=workspace
    )


def reassign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    half_sq: torch.Tensor | None,
    prev: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    groups: list[int],
    *,
    chunk_n: int | None = None,
    backend: str = "native",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`assign` for the listed groups, reusing the previous assignment where it must hold.

    ``prev = (centroids, half_sq, labels, score)`` of the last :func:`assign` of the same points.
    A centroid whose row (and offset) is unchanged bit for bit has unchanged scores. So a point
    whose previous best centroid is unchanged keeps it against every unchanged centroid, and only
    the moved centroids are scored (a tie goes to the lower index, as in :func:`assign`); a point
    whose previous best moved is scored against all centroids. The result equals a full
    :func:`assign` bit for bit when the backend scores a (point, centroid) pair the same whatever
    the other rows of the call (the native kernel does; BLAS need not), so only the native backend
    takes this path. Groups not listed get label 0 and score 0.

    Extra memory: one [G, N] int64 and fp32 result, the moved centroids, and the rows of the points
    scored in full, gathered at most ``max(chunk_n, 16 MiB / (4·D))`` at a time.
    """
    g, n, d = x.shape
    k = centroids.shape[1]
    p_c, p_half, p_lab, p_score = prev
    labels = torch.zeros(g, n, dtype=torch.int64, device=x.device)
    best = torch.zeros(g, n, dtype=torch.float32, device=x.device)
    same = (centroids.view(torch.int32) == p_c.view(torch.int32)).all(-1)
    if half_sq is not None:
        same &= half_sq.view(torch.int32) == p_half.view(torch.int32)
    rows = max(chunk_n or 1, TILE_BYTES // (4 * d))

    def sub(i, pts, cols):
        h = None if half_sq is None else half_sq[i : i + 1, cols]
        return assign(pts, centroids[i : i + 1, cols], half_sq=h, chunk_n=chunk_n, backend=backend)

    everything = slice(None)
    for i in groups:
        moved = (~same[i]).nonzero().flatten()
        full = (~same[i])[p_lab[i]].nonzero().flatten()
        m, f = moved.numel(), full.numel()
        if f * k + n * m >= n * k:  # cheaper to score everything
            lab, sc = sub(i, x[i : i + 1], everything)
            labels[i], best[i] = lab[0], sc[0]
            continue
        lab, sc = p_lab[i].clone(), p_score[i].clone()
        if m:
            m_lab, m_sc = sub(i, x[i : i + 1], moved)
            cand = moved[m_lab[0]]
            better = (m_sc[0] > sc) | ((m_sc[0] == sc) & (cand < lab))
            lab = torch.where(better, cand, lab)
            sc = torch.where(better, m_sc[0], sc)
        for r0 in range(0, f, rows):
            idx = full[r0 : r0 + rows]
            f_lab, f_sc = sub(i, x[i, idx].unsqueeze(0), everything)
            lab[idx], sc[idx] = f_lab[0], f_sc[0]
        labels[i], best[i] = lab, sc
    return labels, best
