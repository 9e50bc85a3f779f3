"""Flash k-means front end: batched Lloyd iterations over G independent problems.

Each iteration is a chunked assignment (:mod:`squeeze.kernels.assign`, the N×K distance matrix is
never built) followed by a sorted centroid update (:mod:`squeeze.kernels.centroid_update`). The
groups (layers × KV heads) run together in batched matmuls; each stops on its own once converged.
The k-means++ seeding is :mod:`squeeze.kmeanspp`; one backend choice
(:func:`squeeze.kernels.assign.choose_backend`) serves a whole call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import NEG_INF
from .kernels.assign import CHUNK_K, TILE_BYTES, assign, choose_backend, default_chunk_n, reassign
from .kernels.centroid_update import CHUNK_BYTES, centroid_update, sort_labels
from .kmeanspp import gather_rows, kmeanspp, sqdist
from .validation import check_int, check_same_device, check_tensor

METRICS = ("cosine", "l2")
INITS = ("k-means++", "random")
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
        init: ``"k-means++"`` (batched, :mod:`squeeze.kmeanspp`: one uniform centre, then
            ~``PP_ROUNDS`` rounds, each
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
            PyTorch reference); see :mod:`squeeze.kernels.dispatch`. One choice serves the
            whole call.

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
    run = _setup(x, k, metric, weights, chunk_size, backend)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    c = _initial_centroids(run, init, init_c, gen)
    c, labels, counts, order, n_iter = _lloyd(run, c, iters, tol)
    inertia = _inertia(run.xw, c, labels, run.w, run.ws)
    if run.spherical:  # the raw means: the normalised working copy is dropped first
        run.xw = None
        c, _ = centroid_update(
            x, labels, k, weights=run.w, sorted_labels=order, chunk_rows=run.chunk_rows,
            workspace=run.ws, backend=run.backend,
        )  # fmt: skip
    return KMeansResult(centroids=c, labels=labels, counts=counts, inertia=inertia, n_iter=n_iter)


@dataclass
class _Run:
    """The fixed pieces of one :func:`kmeans` call."""

    xw: torch.Tensor | None  # [G, N, D] fp32 working points (unit rows when spherical)
    x_sq: torch.Tensor  # [G, N] their squared norms
    w: torch.Tensor | None  # [G, N] fp32 weights
    k: int
    spherical: bool
    backend: str  # of the assignment and the update
    chunk_n: int
    chunk_k: int
    chunk_rows: int
    ws: torch.Tensor  # one fp32 scratch: score tiles, update chunks, seeding tiles


def _setup(x, k, metric, weights, chunk_size, backend) -> _Run:
    g, n, d = x.shape
    spherical = metric == "cosine"
    xw, x_sq = _working_copy(x, spherical)
    chunk_k = min(k, CHUNK_K)
    chunk_n = min(n, chunk_size or default_chunk_n(g, chunk_k, n))
    chunk_rows = min(g * n, max(1, CHUNK_BYTES // (4 * d)))
    ws = torch.empty(
        max(g * chunk_n * chunk_k, chunk_rows * d), dtype=torch.float32, device=x.device
    )
    w = None if weights is None else weights.to(torch.float32)
    be = choose_backend(x, backend)
    return _Run(xw, x_sq, w, k, spherical, be, chunk_n, chunk_k, chunk_rows, ws)


def _initial_centroids(run: _Run, init, init_c, gen) -> torch.Tensor:
    """[G, k, D] fp32 starting centroids (unit rows when spherical)."""
    xw = run.xw
    g, n, d = xw.shape
    if init_c is not None:
        c = init_c.to(torch.float32)
    elif init == "random":
        idx = torch.rand(g, n, generator=gen, device=xw.device).topk(run.k, dim=1).indices
        c = gather_rows(xw, idx)
    else:
        c = kmeanspp(xw, run.x_sq, run.k, run.w, gen, run.ws, run.spherical, run.backend)
    if run.spherical:  # unit centroids (a zero row becomes e_0): the score is then x̂·ĉ alone
        c = _unit(c, torch.eye(1, d, device=xw.device).expand_as(c))
    return c


def _lloyd(run: _Run, c: torch.Tensor, iters: int, tol: float):
    """Lloyd iterations from centroids ``c``: ``(centroids, labels, counts, sorted labels or
    None, n_iter)``. Each group stops on its own, frozen once converged."""
    g = run.x_sq.shape[0]
    k, dev = run.k, c.device
    reuse = run.backend == "native" and REUSE_SCORES
    labels: torch.Tensor | None = None
    prev = torch.full((g,), float("inf"), dtype=torch.float64, device=dev)
    active = torch.ones(g, dtype=torch.bool, device=dev)
    n_iter = torch.zeros(g, dtype=torch.int64, device=dev)
    n_active = g
    last = None  # (centroids, offsets, labels, scores) of the last assignment
    for it in range(iters):
        half = None if run.spherical else 0.5 * (c * c).sum(-1)
        new, score = _assign_step(run, c, half, active, n_active == g, last)
        if reuse:
            last = (c, half, new, score.clone())
        cost = sqdist(score, run.x_sq, run.spherical)  # ‖x − c‖² to the best centroid
        if run.w is not None:
            cost.mul_(run.w)
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
        order = sort_labels(labels, k) if run.backend != "native" else None
        means, counts = centroid_update(
            run.xw, labels, k, weights=run.w, sorted_labels=order, chunk_rows=run.chunk_rows,
            workspace=run.ws, backend=run.backend,
        )  # fmt: skip
        if run.spherical:
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
    return c, labels, counts, order, n_iter


def _assign_step(run: _Run, c, half, active, everyone: bool, last):
    """Labels and best scores ``[G, N]`` of the running groups (the others' are overwritten
    by the caller's kept labels)."""
    xw, be = run.xw, run.backend
    g, n = run.x_sq.shape
    kw = dict(chunk_n=run.chunk_n, chunk_k=run.chunk_k, workspace=run.ws, backend=be)
    if last is not None:  # native: score only what moved
        groups = active.nonzero().flatten().tolist()
        return reassign(xw, c, half, last, groups, chunk_n=run.chunk_n, backend=be)
    if everyone:
        return assign(xw, c, half_sq=half, **kw)
    new = torch.zeros(g, n, dtype=torch.int64, device=xw.device)
    score = torch.zeros(g, n, dtype=torch.float32, device=xw.device)
    for i in active.nonzero().flatten().tolist():  # only the groups still running
        h = None if half is None else half[i : i + 1]
        new[i : i + 1], score[i : i + 1] = assign(xw[i : i + 1], c[i : i + 1], half_sq=h, **kw)
    return new, score


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
