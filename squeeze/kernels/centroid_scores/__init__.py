"""Centroid log-scores of a query group: the scoring half of the centroid lookup.

The decision half (thresholds, top-k, levels, children) is :mod:`squeeze.lookup`'s. For each
KV head and cluster ``c`` :func:`centroid_scores` returns

    log S_c = reduce_g  log mean_m  exp(q_gm·c·scale) / (Σ_j N_j exp(q_gm·c_j·scale) + extra_gm)

over the clusters it scores (``-inf`` elsewhere and for empty clusters), and on request the
primitives the lookup builds on: the cut ``log S_c >= threshold`` (fused on Triton), each query
row's own scores, and the log softmax mass of a subset of the clusters (the level-2 denominator's
estimate for pruned level-1 regions).

The centroids are fp32 or bf16 (the index's ``centroid_dtype``); every backend reads them in
that dtype and computes in fp32, so a score is the fp32 score of the stored centroids. The
spreads (``σ²/2``) and log sizes are fp32.

Backends (``backend=`` or ``$SQUEEZE_BACKEND``; capabilities in :mod:`squeeze.kernels.dispatch`):
  * ``"native"`` (``native.py``): CPU, fp32 or bf16 centroids, at most 4096 packed query rows,
    on centroids packed one per SIMD lane; it reads only the clusters inside the subset's runs;
  * ``"torch"`` (``reference.py``): the centroids upcast to fp32, one batched matmul over every
    centroid, the clusters outside the subset masked out; every output;
  * ``"triton"`` (``triton.py``): CUDA; the denominators, then the scores with the cut fused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import NEG_INF, dispatch
from ..scratch import as_f32, version
from ..segments import segments
from . import native, reference


@dataclass(frozen=True)
class Subset:
    """The clusters to score per (batch row, KV head): the members of some kept groups, each
    group a contiguous range of clusters (a hierarchical index's kept level-1 clusters and
    their level-2 children).

    Attributes:
        mask: ``[B, Hkv, K]`` bool, the clusters to score.
        groups: ``[B, Hkv, K1]`` bool, the kept groups.
        group_offsets: ``[Hkv, K1 + 1]`` int64: group ``i`` holds clusters
            ``group_offsets[h, i] : group_offsets[h, i + 1]``.
    """

    mask: torch.Tensor
    groups: torch.Tensor
    group_offsets: torch.Tensor

    def runs(self):
        """The subset as CSR cluster ranges ``(ptr [B·Hkv + 1], start [S], end [S])``."""
        return segments(self.groups, self.group_offsets)


@dataclass(frozen=True)
class Scores:
    """What :func:`centroid_scores` computed.

    Attributes:
        block: ``[B, Hkv, K]`` fp32 log-scores of the query block (its M rows averaged).
        rows: ``[B, Hkv, M, K]`` fp32 each row's own scores (reduced over G only), or ``None``.
        keep: ``[B, Hkv, K]`` bool ``block >= cut``, or ``None`` without a cut.
        log_mass: with ``log_mass=True``, a function of ``mask [B, Hkv, K]`` bool giving, per
            query row, ``log Σ_{c in mask} N_c exp(q·c·scale)`` ``[B, Hkv, G, M]`` fp32.
    """

    block: torch.Tensor
    rows: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    log_mass: Callable[[torch.Tensor], torch.Tensor] | None = None


def centroid_scores(
    q: torch.Tensor,
    centroids: torch.Tensor,
    log_counts: torch.Tensor,
    scale: float,
    reduce: str,
    *,
    subset: Subset | None = None,
    extra_log_den: torch.Tensor | None = None,
    per_row: bool = False,
    cut: float | None = None,
    log_mass: bool = False,
    spread: torch.Tensor | None = None,
    backend: str | None = None,
) -> Scores:
    """Log-scores of the clusters each (batch row, KV head) scores.

    Args:
        q: ``[B, Hkv, G, M, D]`` queries (any float dtype; math in fp32).
        centroids: ``[Hkv, K, D]`` float32 or bfloat16 (the native and Triton kernels read
            these two; the reference any float dtype), read in their dtype, math in fp32.
        log_counts: ``[Hkv, K]`` float32 log cluster sizes (``-inf`` for empty clusters).
        scale: softmax scale.
        reduce: ``"max"`` or ``"mean"`` over the G query heads of a KV head.
        subset: the clusters to score (``None``: all).
        extra_log_den: ``[B, Hkv, G, M]`` fp32 log mass added to the denominators, or ``None``.
        per_row: also each query row's scores (:attr:`Scores.rows`).
        cut: also the mask ``block >= cut`` (:attr:`Scores.keep`).
        log_mass: also :attr:`Scores.log_mass`.
        spread: ``[Hkv, K]`` float32 per-cluster ``σ²/2``: every logit becomes
            ``q·c·scale + scale²·|q|²·spread`` (the ``"spread"`` estimator, see
            :class:`squeeze.SqueezeConfig`), or ``None``.
        backend: ``None`` (automatic), ``"torch"``, ``"native"`` or ``"triton"``.
    """
    _check_shapes(q, centroids, log_counts, subset, extra_log_den, spread)
    g, m = q.shape[2], q.shape[3]
    outputs = tuple(name for name, on in (("per_row", per_row), ("log_mass", log_mass)) if on)
    name = dispatch.choose(
        "centroid_scores", q.device, dtype=centroids.dtype, rows=g * m, outputs=outputs,
        backend=backend,
    )  # fmt: skip
    if name == "triton":
        return _triton(q, centroids, log_counts, scale, reduce, subset, extra_log_den, cut, spread)
    if name == "native":
        runs = None if subset is None else subset.runs()
        block, rows = native.centroid_scores_native(
            q, centroids, log_counts, scale, reduce, runs, extra_log_den, per_row, spread
        )
        return Scores(block, rows, None if cut is None else block >= cut)
    if spread is not None:
        q, centroids = with_spread(q, centroids, spread, scale)
    lc = log_counts[None] if subset is None else log_counts[None].masked_fill(~subset.mask, NEG_INF)
    logits = reference.centroid_logits(q, centroids, scale)
    block, rows = reference.reduce_scores(logits, lc, reduce, extra_log_den, per_row)
    mass = (lambda mask: reference.log_mass(logits, log_counts, mask)) if log_mass else None
    return Scores(block, rows, None if cut is None else block >= cut, mass)


def _check_shapes(q, centroids, log_counts, subset, extra, spread) -> None:
    """The shapes every backend relies on (O(1): no values read)."""
    if q.dim() != 5 or centroids.dim() != 3:
        raise ValueError(
            f"q must be [B, Hkv, G, M, D] and centroids [Hkv, K, D], got {tuple(q.shape)} and "
            f"{tuple(centroids.shape)}"
        )
    b, hkv, g, m, d = q.shape
    k = centroids.shape[1]
    if centroids.shape != (hkv, k, d):
        raise ValueError(f"centroids must be [Hkv={hkv}, K, D={d}], got {tuple(centroids.shape)}")
    if log_counts.shape != (hkv, k):
        raise ValueError(f"log_counts must be [{hkv}, {k}], got {tuple(log_counts.shape)}")
    if spread is not None and spread.shape != (hkv, k):
        raise ValueError(f"spread must be [{hkv}, {k}], got {tuple(spread.shape)}")
    if extra is not None and extra.shape != (b, hkv, g, m):
        raise ValueError(f"extra_log_den must be [{b}, {hkv}, {g}, {m}], got {tuple(extra.shape)}")
    if subset is not None:
        k1 = subset.group_offsets.shape[-1] - 1
        if (
            subset.mask.shape != (b, hkv, k)
            or subset.groups.shape != (b, hkv, k1)
            or subset.group_offsets.shape != (hkv, k1 + 1)
        ):
            raise ValueError(
                f"subset must be mask [{b}, {hkv}, {k}], groups [{b}, {hkv}, K1], "
                f"group_offsets [{hkv}, K1 + 1]"
            )


def sink_log_mass(
    q: torch.Tensor, sink_keys: torch.Tensor | None, scale: float, *, backend: str | None = None
) -> torch.Tensor | None:
    """``[B, Hkv, G, M]`` float32 log of each query row's exact mass on the sink keys,
    ``log Σ_s exp(q·k_s·scale)`` (an ``extra_log_den`` for :func:`centroid_scores`), or ``None``
    for no sink keys. On CPU a C loop computes it where :func:`centroid_scores` runs natively:
    torch's ``exp`` and ``log`` on a decode step's few floats would wake MKL's thread pool
    (about 75 us at 2 threads with passive OpenMP waiting, against a few us of work).

    Args:
        q: ``[B, Hkv, G, M, D]`` queries, any float dtype.
        sink_keys: ``[Hkv, S, D]`` any float dtype (computed in fp32), or ``None``.
        backend: ``None`` (as :func:`centroid_scores` would choose) or a backend of
            :func:`centroid_scores`; any but ``"native"`` computes in PyTorch.
    """
    if sink_keys is None:
        return None
    b, hkv, g, m, d = q.shape
    name = dispatch.choose(
        "centroid_scores", q.device, dtype=sink_keys.dtype, head_dim=d, rows=g * m, backend=backend
    )
    if name == "native":
        return native.sink_log_mass_native(q, sink_keys, scale)
    keys = as_f32(sink_keys)
    # a broadcast product and a sum, not a batched matmul, whose BLAS would wake its pool too
    rows = q.to(torch.float32).transpose(0, 1).reshape(hkv, b * g * m, 1, d)
    logits = (rows * keys[:, None]).sum(-1).view(hkv, b, g, m, -1).transpose(0, 1) * scale
    return torch.logsumexp(logits, dim=-1)


def with_spread(q: torch.Tensor, centroids: torch.Tensor, spread: torch.Tensor, scale: float):
    """The spread term as one more dimension, so the reference scores it unchanged:
    ``[q, |q|²·scale] · [c, spread] · scale = q·c·scale + scale²·|q|²·spread`` (the native and
    Triton kernels take the spread beside the centroids, in fp32, whatever the centroids' dtype).

    Returns ``q [B, Hkv, G, M, D + 1]`` fp32 and ``centroids [Hkv, K, D + 1]`` fp32, the
    centroids upcast (built once per centroid tensor and cached on it, like the native
    kernel's packing)."""
    qf = q.to(torch.float32)
    norm = qf.square().sum(-1, keepdim=True).mul_(scale)
    hit = getattr(centroids, "_squeeze_with_spread", None)
    key = (version(centroids), version(spread))
    if hit is None or hit[0] is not spread or hit[1] != key:
        aug = torch.cat([centroids.to(torch.float32), spread.to(torch.float32)[..., None]], -1)
        hit = (spread, key, aug)
        centroids._squeeze_with_spread = hit
    return torch.cat([qf, norm], -1), hit[2]


def _triton(q, centroids, log_counts, scale, reduce, subset, extra, cut, spread) -> Scores:
    from . import triton as kernels

    b, hkv, g, m, d = q.shape
    rows = q.reshape(b, hkv, g * m, d)
    lc = log_counts[None].expand(b, -1, -1)
    if subset is not None:
        lc = lc.masked_fill(~subset.mask, NEG_INF)
    ex = None if extra is None else extra.reshape(b, hkv, g * m)
    den = kernels.log_den(rows, centroids, lc, scale, ex, spread)
    block, keep = kernels.scores(rows, centroids, lc, den, scale, g, reduce, cut, spread)

    def mass(mask: torch.Tensor) -> torch.Tensor:
        outside = log_counts[None].expand(b, -1, -1).masked_fill(~mask, NEG_INF)
        return kernels.log_den(rows, centroids, outside, scale, spread=spread).view(b, hkv, g, m)

    return Scores(block, None, keep, mass)
