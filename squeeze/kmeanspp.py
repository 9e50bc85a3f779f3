"""k-means++ seeding, batched over G groups, and the distance helpers the Lloyd loop shares.

The first centre is drawn ∝ w; then each round draws ``step = ⌈(k−1)/PP_ROUNDS⌉`` distinct
centres ∝ w·D² (Gumbel-top-b, i.e. sequential sampling without replacement from the same D²)
and refreshes D² with one chunked matmul against only the new centres: total matmul work is one
assignment pass (N·k·D), the rest O(G·N) per round. On the native backend each round's
elementwise work (D² refresh, Gumbel keys) is one fused pass (:func:`squeeze.kernels.native.kmeans.pp_keys`),
with the same rounds and random draws.
"""

from __future__ import annotations

import torch

from .kernels.assign import TILE_BYTES, assign, choose_backend
from .kernels.native import kmeans as native_kmeans

#: k-means++ draws its centres in about this many rounds (see :func:`kmeanspp`).
PP_ROUNDS = 32


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [G, N, D], idx [G, M] int64 → [G, M, D]."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def sqdist(score: torch.Tensor, x_sq: torch.Tensor, spherical: bool) -> torch.Tensor:
    """‖x − c‖² from a best score (x·c − ½‖c‖², or x·c for unit c when spherical), in place."""
    return score.mul_(-2).add_(x_sq).add_(1.0 if spherical else 0.0).clamp_min_(0)


def _min_sqdist(xw, x_sq, cb, ws: torch.Tensor, spherical: bool) -> torch.Tensor:
    """[G, N] fp32 squared distance of each point to its nearest centre of cb [G, B, D]."""
    g, n, _ = xw.shape
    b = cb.shape[1]
    half = None if spherical else 0.5 * (cb * cb).sum(-1).unsqueeze(1)  # [G, 1, B]
    ct = cb.transpose(1, 2)
    rows = max(1, min(n, ws.numel() // (g * b)))
    out = torch.empty(g, n, dtype=torch.float32, device=xw.device)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        tile = ws[: g * (n1 - n0) * b].view(g, n1 - n0, b)
        torch.bmm(xw[:, n0:n1], ct, out=tile)
        if half is not None:
            tile.sub_(half)
        out[:, n0:n1] = tile.amax(dim=-1)
    return sqdist(out, x_sq, spherical)


def kmeanspp(
    xw, x_sq, k: int, w, gen, ws=None, spherical: bool = False, backend: str | None = None
) -> torch.Tensor:
    """Batched k-means++ seeding: [G, k, D] fp32 centres drawn from the points ``xw [G, N, D]``
    (squared norms ``x_sq [G, N]``, weights ``w`` or ``None``, a private generator ``gen``)."""
    g = xw.shape[0]
    backend = choose_backend(xw, backend)
    step = max(1, -(-(k - 1) // PP_ROUNDS))
    if ws is None:
        ws = torch.empty(max(g * step, TILE_BYTES // 16), dtype=torch.float32, device=xw.device)
    logw = None if w is None else w.log()
    idx = torch.empty(g, k, dtype=torch.int64, device=xw.device)
    if backend == "native":
        return _kmeanspp_native(xw, x_sq.contiguous(), k, logw, gen, spherical, step, idx)
    d2 = None
    filled = 0
    while filled < k:
        b = 1 if filled == 0 else min(step, k - filled)
        keys = torch.zeros_like(x_sq) if d2 is None else d2.log()
        if logw is not None:
            keys += logw
        u = torch.rand(x_sq.shape, generator=gen, device=x_sq.device)
        new = (keys - u.log_().neg_().log_()).topk(b, dim=1).indices  # Gumbel-top-b
        idx[:, filled : filled + b] = new
        filled += b
        if filled < k:
            near = _min_sqdist(xw, x_sq, gather_rows(xw, new), ws, spherical)
            d2 = near if d2 is None else torch.minimum(d2, near, out=d2)
    return gather_rows(xw, idx)


def _kmeanspp_native(xw, x_sq, k: int, logw, gen, spherical: bool, step: int, idx) -> torch.Tensor:
    """:func:`kmeanspp` on the native kernels: the same rounds and random draws, with each
    round's elementwise work (D² refresh, Gumbel keys) fused into one pass."""
    logw = None if logw is None else logw.contiguous()
    d2 = torch.empty_like(x_sq)
    keys = torch.empty_like(x_sq)
    u = torch.rand(x_sq.shape, generator=gen, device=x_sq.device)
    native_kmeans.pp_keys(None, x_sq, 0.0, d2, True, u, logw, keys)  # first centre ∝ w
    filled = 0
    while filled < k:
        b = 1 if filled == 0 else min(step, k - filled)
        new = keys.topk(b, dim=1).indices  # Gumbel-top-b
        idx[:, filled : filled + b] = new
        if filled + b < k:
            cb = gather_rows(xw, new)
            half = None if spherical else 0.5 * (cb * cb).sum(-1)
            best = assign(xw, cb, half_sq=half, backend="native")[1]
            u = torch.rand(x_sq.shape, generator=gen, device=x_sq.device)
            off = 1.0 if spherical else 0.0
            native_kmeans.pp_keys(best, x_sq, off, d2, filled == 0, u, logw, keys)
        filled += b
    return gather_rows(xw, idx)
