"""Flash k-means front end: batched Lloyd iterations over G independent problems.

Each iteration is a chunked assignment (:mod:`squeeze.kernels.assign`, the N×K distance matrix is
never built) followed by a sorted centroid update (:mod:`squeeze.kernels.centroid_update`). The
groups (layers × KV heads) run together in batched matmuls; each stops on its own once converged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import NEG_INF
from .kernels.assign import (
    CHUNK_K,
    TILE_BYTES,
    assign,
    choose_backend,
    default_chunk_n,
    reassign,
)
from .kernels.centroid_update import CHUNK_BYTES, centroid_update, sort_labels
from .kernels.native import kmeans as native_kmeans
from .validation import check_int, check_same_device, check_tensor

METRICS = ("cosine", "l2")
INITS = ("k-means++", "random")
#: k-means++ draws its centres in about this many rounds (see :func:`_kmeanspp`).
PP_ROUNDS = 32
#: Skip the iterations of a group whose centroids stopped changing bit for bit: each would repeat
#: the last one exactly, so results (``n_iter`` included) are those of running them.
SKIP_REPEATS = True
#: Native backend: after the first iteration, score only the centroids that moved (and, against
#: all centroids, the points whose best centroid moved); bit-identical to scoring everything
#: (see :func:`squeeze.kernels.assign.reassign`).
REUSE_SCORES = True
_TINY = 1e-30


@dataclass(frozen=True)
class KMeansResult:
    """Output of :func:`kmeans` for G groups, N points and K clusters.

    Attributes:
        centroids: [G, K, D] fp32 (weighted) means of the raw members of each cluster.
        labels: [G, N] int64 cluster of each point.
        counts: [G, K] int64 points per cluster (weights do not change counts).
        inertia: [G] fp64 objective of the final labels and centroids: Σ w·‖x − c‖² for ``"l2"``,
            Σ w·‖x̂ − ĉ‖² over unit vectors for ``"cosine"``.
        n_iter: [G] int64 Lloyd iterations each group ran.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    counts: torch.Tensor
    inertia: torch.Tensor
    n_iter: torch.Tensor

    @property
    def iters(self) -> int:
        """The largest number of iterations any group ran."""
        return int(self.n_iter.max())


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    metric: str = "cosine",
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    init: str | torch.Tensor = "k-means++",
    weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> KMeansResult:
    """Cluster each of G groups of N points into k clusters (Lloyd's algorithm, batched).

    Args:
        x: [G, N, D] points, fp32, fp16, bf16 or fp64, finite. All arithmetic is fp32.
        k: clusters per group, ``1 <= k <= N``.
        metric: ``"cosine"``: spherical k-means as in Squeezed Attention. Points are L2-normalised
            for the assignment (argmax of x̂·ĉ, equivalently argmin ‖x̂ − ĉ‖²), the internal
            centroids ĉ are the normalised means of the normalised members, and the returned
            ``centroids`` are the means of the raw, un-normalised members. ``"l2"``: plain Lloyd.
        iters: Lloyd iterations at most (>= 1).
        tol: a group stops once its objective changes by less than ``tol`` relative to the
            previous iteration (``|J_{t-1} − J_t| < tol·J_t``); its labels and centroids are then
            frozen. ``tol=0`` runs exactly ``iters`` iterations.
        seed: seeds a private ``torch.Generator``; the global RNG is neither used nor changed.
        init: ``"k-means++"`` (batched: one uniform centre, then ~:data:`PP_ROUNDS` rounds, each
            drawing ⌈(k−1)/PP_ROUNDS⌉ distinct centres with probability ∝ w·D² and refreshing D²
            with one chunked matmul; exact sequential k-means++ when k <= PP_ROUNDS + 1; costs
            about one Lloyd iteration), ``"random"`` (k distinct points, uniform, weights ignored),
            or a [G, k, D] tensor of initial centroids.
        weights: optional [G, N] non-negative point weights: weighted means, inertia and
            k-means++ sampling. They do not change ``counts``.
        chunk_size: points per assignment tile; default: a [G, chunk, min(k, 4096)] fp32 tile of
            about 16 MB.
        backend: kernels to use: ``None`` (auto: Triton for CUDA tensors, the native C kernels
            on CPU when they build, else PyTorch), ``"triton"``, ``"native"`` or ``"torch"`` (the
            PyTorch reference); see :mod:`squeeze.kernels.dispatch`.

    Returns:
        :class:`KMeansResult`. When N >= k no cluster is empty: every iteration each empty cluster
        is re-seeded with a distinct point among those worst served by their centroid (largest
        w·distance; each cluster keeps its first member).

    Peak extra memory beyond x, in bytes, with B = 4·G·N·D (one fp32 copy of x):
    ``B`` (the fp32 working copy, normalised for cosine; none for ``"l2"`` on contiguous fp32 x)
    + ``W = max(4·G·chunk·min(k, 4096), 16 MiB)`` (one scratch shared by the score tiles, the
    update's sorted chunks and the seeding tiles; 16 MiB by default)
    + about ``128·G·N`` (labels, scores, sort keys and order) + about ``32·G·k·D`` (centroids).
    The [G, N, k] distance matrix (4·G·N·k bytes) is never built.
    """
    init_c = _check_args(x, k, metric, iters, tol, seed, init, weights, chunk_size)
    be = choose_backend(x, backend)
    g, n, d = x.shape
    spherical = metric == "cosine"
    xw, x_sq = _working_copy(x, spherical)
    w = None if weights is None else weights.to(torch.float32)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    chunk_k = min(k, CHUNK_K)
    chunk_n = min(n, chunk_size or default_chunk_n(g, chunk_k, n))
    chunk_rows = min(g * n, max(1, CHUNK_BYTES // (4 * d)))
    # one fp32 scratch shared by the score tiles, the update chunks and the seeding tiles
    ws = torch.empty(
        max(g * chunk_n * chunk_k, chunk_rows * d), dtype=torch.float32, device=x.device
    )

    if init_c is not None:
        c = init_c.to(torch.float32)
    elif init == "random":
        idx = torch.rand(g, n, generator=gen, device=x.device).topk(k, dim=1).indices
        c = _gather_rows(xw, idx)
    else:
        c = _kmeanspp(xw, x_sq, k, w, gen, ws, spherical, be)
    if spherical:  # unit centroids (a zero row becomes e_0): the score is then x̂·ĉ alone
        c = _unit(c, torch.eye(1, d, device=x.device).expand_as(c))

    labels: torch.Tensor | None = None
    prev = torch.full((g,), float("inf"), dtype=torch.float64, device=x.device)
    active = torch.ones(g, dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(g, dtype=torch.int64, device=x.device)
    n_active = g
    last = None  # (centroids, offsets, labels, scores) of the last assignment
    for it in range(iters):
        half = None if spherical else 0.5 * (c * c).sum(-1)
        if last is not None and be == "native" and REUSE_SCORES:
            groups = active.nonzero().flatten().tolist()
            new, score = reassign(xw, c, half, last, groups, chunk_n=chunk_n, backend=be)
        elif n_active == g:
            new, score = assign(
                xw, c, half_sq=half, chunk_n=chunk_n, chunk_k=chunk_k, workspace=ws, backend=be
            )
        else:  # only the groups still running (the others' labels are kept below)
            new = torch.zeros(g, n, dtype=torch.int64, device=x.device)
            score = torch.zeros(g, n, dtype=torch.float32, device=x.device)
            for i in active.nonzero().flatten().tolist():
                new[i : i + 1], score[i : i + 1] = assign(
                    xw[i : i + 1], c[i : i + 1], half_sq=None if half is None else half[i : i + 1],
                    chunk_n=chunk_n, chunk_k=chunk_k, workspace=ws, backend=be,
                )  # fmt: skip
        if be == "native" and REUSE_SCORES:
            last = (c, half, new, score.clone())
        cost = _sqdist(score, x_sq, spherical)  # ‖x − c‖² to the best centroid
        if w is not None:
            cost.mul_(w)
        obj = cost.sum(1, dtype=torch.float64)
        labels = new if labels is None else torch.where(active.unsqueeze(1), new, labels)
        counts = torch.bincount(_flat_keys(labels, k), minlength=g * k).view(g, k)
        n_empty = (counts == 0).sum(1) * active
        delta = (prev - obj).abs()
        done = active & ((delta < tol * obj) | ((delta == 0) & (tol > 0)))
        n_iter += active
        e_max = int(n_empty.max())
        if e_max:
            labels = _fill_empty(labels, counts, n_empty, cost, e_max)
        order = sort_labels(labels, k) if be != "native" else None
        means, counts = centroid_update(
            xw, labels, k, weights=w, sorted_labels=order, chunk_rows=chunk_rows, workspace=ws,
            backend=be,
        )  # fmt: skip
        if spherical:
            means = _unit(means, c)
        c_next = torch.where(active.view(g, 1, 1), means, c)
        prev = torch.where(active, obj, prev)
        active = active & ~done
        if SKIP_REPEATS:
            # Centroids unchanged bit for bit: the next iteration is this one again (same input,
            # deterministic kernels), and so is every later one. Count them without running them.
            # With tol > 0 the first repeat would see a zero change and stop the group.
            same = (c_next.view(torch.int32) == c.view(torch.int32)).flatten(1).all(1)
            fixed = active & same
            rest = iters - it - 1
            n_iter += fixed * (rest if tol == 0 else min(rest, 1))
            active = active & ~fixed
        c = c_next
        n_active = int(active.sum())
        if not n_active:
            break
    assert labels is not None

    inertia = _inertia(xw, c, labels, w, ws)
    if spherical:
        del xw
        c, _ = centroid_update(
            x, labels, k, weights=w, sorted_labels=order, chunk_rows=chunk_rows, workspace=ws,
            backend=be,
        )  # fmt: skip
    return KMeansResult(centroids=c, labels=labels, counts=counts, inertia=inertia, n_iter=n_iter)


def _check_args(x, k, metric, iters, tol, seed, init, weights, chunk_size) -> torch.Tensor | None:
    check_tensor("x", x, 3, layout="[G, N, D]")
    g, n, d = x.shape
    if min(g, n, d) < 1:
        raise ValueError(f"x must be [G, N, D] with G, N, D >= 1, got shape {tuple(x.shape)}")
    _check_finite("x", x)
    check_int("k", k, low=1, high=n)
    check_int("iters", iters, low=1)
    check_int("seed", seed, low=0)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, low=1)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol must be a float, got {type(tol).__name__}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if weights is not None:
        check_tensor("weights", weights, 2, layout="[G, N]")
        if tuple(weights.shape) != (g, n):
            raise ValueError(f"weights must be [G, N] = {[g, n]}, got shape {tuple(weights.shape)}")
        check_same_device(x=x, weights=weights)
        _check_finite("weights", weights)
        if bool((weights < 0).any()):
            raise ValueError("weights must be non-negative")
    if isinstance(init, torch.Tensor):
        check_tensor("init", init, 3, layout="[G, K, D]")
        if tuple(init.shape) != (g, k, d):
            raise ValueError(
                f"init must be [G, K, D] = {[g, k, d]} centroids, got shape {tuple(init.shape)}"
            )
        check_same_device(x=x, init=init)
        _check_finite("init", init)
        return init
    if not isinstance(init, str):
        raise TypeError(f"init must be one of {INITS} or a tensor, got {type(init).__name__}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS} or a [G, K, D] tensor, got {init!r}")
    return None


def _check_finite(name: str, t: torch.Tensor) -> None:
    """ValueError if t holds NaN or inf (one pass, no temporary: NaN propagates through min/max)."""
    lo, hi = torch.aminmax(t)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or inf values")


def _working_copy(x: torch.Tensor, spherical: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 points (unit rows when spherical) [G, N, D] and their squared norms [G, N].

    No copy for contiguous fp32 x when not spherical; otherwise one fp32 copy, filled in chunks
    so that no other [G, N, D] temporary is made.
    """
    g, n, d = x.shape
    same = x.dtype == torch.float32 and x.is_contiguous() and not spherical
    xw = x if same else torch.empty(g, n, d, dtype=torch.float32, device=x.device)
    x_sq = torch.empty(g, n, dtype=torch.float32, device=x.device)
    rows = max(1, min(n, TILE_BYTES // (16 * g * d)))
    for n0 in range(0, n, rows):
        part = x[:, n0 : n0 + rows].to(torch.float32)
        sq = torch.linalg.vector_norm(part, dim=-1).square_()
        if spherical:
            part = part / sq.sqrt().clamp_min_(_TINY).unsqueeze(-1)
            sq = torch.linalg.vector_norm(part, dim=-1).square_()
        if not same:
            xw[:, n0 : n0 + rows] = part
        x_sq[:, n0 : n0 + rows] = sq
    return xw, x_sq


def _flat_keys(labels: torch.Tensor, k: int) -> torch.Tensor:
    """[G·N] int64 keys ``g·k + label``."""
    g = labels.shape[0]
    return (labels + torch.arange(g, device=labels.device).unsqueeze(1) * k).reshape(-1)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [G, N, D], idx [G, M] int64 → [G, M, D]."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def _unit(c: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Rows of c [G, K, D] scaled to unit norm; rows of norm ~0 are taken from ``fallback``."""
    norm = torch.linalg.vector_norm(c, dim=-1, keepdim=True)
    return torch.where(norm > _TINY, c / norm.clamp_min(_TINY), fallback)


def _fill_empty(labels, counts, n_empty, cost, e_max: int) -> torch.Tensor:
    """Give each empty cluster a distinct point, the worst served (largest ``cost`` [G, N]).

    The first member of every non-empty cluster is never taken, so no cluster is emptied; with
    N >= K there are always enough candidates.
    """
    g, n = labels.shape
    k = counts.shape[1]
    pos = torch.arange(n, device=labels.device).expand(g, n)
    first = torch.full((g, k), n, dtype=torch.int64, device=labels.device)
    first.scatter_reduce_(1, labels, pos, "amin")
    score = cost.masked_fill(first.gather(1, labels) == pos, NEG_INF)
    cand = score.topk(e_max, dim=1).indices  # [G, E] distinct points
    empty_ids = torch.sort((counts > 0).to(torch.int8), dim=1, stable=True).indices[:, :e_max]
    valid = torch.arange(e_max, device=labels.device) < n_empty.unsqueeze(1)
    return labels.scatter(1, cand, torch.where(valid, empty_ids, labels.gather(1, cand)))


def _sqdist(score: torch.Tensor, x_sq: torch.Tensor, spherical: bool) -> torch.Tensor:
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
    return _sqdist(out, x_sq, spherical)


def _kmeanspp(
    xw, x_sq, k: int, w, gen, ws=None, spherical: bool = False, backend: str | None = None
) -> torch.Tensor:
    """Batched k-means++ seeding: [G, k, D] fp32 centres drawn from the points xw [G, N, D].

    The first centre is drawn ∝ w; then each round draws ``step = ⌈(k−1)/PP_ROUNDS⌉`` distinct
    centres ∝ w·D² (Gumbel-top-b, i.e. sequential sampling without replacement from the same D²)
    and refreshes D² with one chunked matmul against only the new centres. Total matmul work is
    one assignment pass (N·k·D); the rest is O(G·N) per round.
    """
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
            near = _min_sqdist(xw, x_sq, _gather_rows(xw, new), ws, spherical)
            d2 = near if d2 is None else torch.minimum(d2, near, out=d2)
    return _gather_rows(xw, idx)


def _kmeanspp_native(xw, x_sq, k: int, logw, gen, spherical: bool, step: int, idx) -> torch.Tensor:
    """:func:`_kmeanspp` on the native kernels: the same rounds and random draws, with each
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
            cb = _gather_rows(xw, new)
            half = None if spherical else 0.5 * (cb * cb).sum(-1)
            best = assign(xw, cb, half_sq=half, backend="native")[1]
            u = torch.rand(x_sq.shape, generator=gen, device=x_sq.device)
            off = 1.0 if spherical else 0.0
            native_kmeans.pp_keys(best, x_sq, off, d2, filled == 0, u, logw, keys)
        filled += b
    return _gather_rows(xw, idx)


def _inertia(xw, c, labels, w, ws: torch.Tensor) -> torch.Tensor:
    """[G] fp64 Σ w·‖x − c_label‖², a workspace-sized chunk of points at a time."""
    g, n, d = xw.shape
    rows = max(1, min(n, ws.numel() // (g * d)))
    total = torch.zeros(g, dtype=torch.float64, device=xw.device)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        diff = ws[: g * (n1 - n0) * d].view(g, n1 - n0, d)
        idx = labels[:, n0:n1].unsqueeze(-1).expand(-1, -1, d)
        torch.gather(c, 1, idx, out=diff)
        dist = diff.sub_(xw[:, n0:n1]).square_().sum(-1)
        if w is not None:
            dist.mul_(w[:, n0:n1])
        total += dist.sum(1, dtype=torch.float64)
    return total
