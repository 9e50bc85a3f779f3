"""The estimated zone: skipped clusters attended through their summaries instead of dropped.

A selection reads some clusters' keys and drops the rest, and the dropped clusters still hold
softmax mass: most of it in those ranked just below the cut. With ``SqueezeConfig.estimate_zone
= z``, per (batch row, KV head) the ``ceil(z · n)`` best-scoring clusters the lookup did not
select (``n`` selected, at least one) are attended as if each of its ``N`` keys had the logit
of its estimator (``q·c·scale``, plus ``scale²·|q|²·σ²/2`` with the spread estimator) and its
value were the cluster's mean value (``ClusterIndex.value_means``):

    lse_e = log Σ_j N_j exp(l_j),    out_e = Σ_j softmax_j(l_j + log N_j) · v̄_j

over the zone ``j``, merged with the sparse attention's ``(out, lse)`` by log-sum-exp. The keys
of the zone are not read; its centroids were already scored, its mean values are read (one row
of D per cluster, counted as a centroid each). RetroInfer (arXiv 2505.02922) calls it the
estimated zone. At the full budget nothing is skipped and nothing is estimated.

The clusters are ranked by the lookup's level-2 scores (a block of rows: each cluster's best
row). The work is the kernel operation :func:`squeeze.kernels.zone_estimate.zone_estimate`
(C on CPU, PyTorch elsewhere).
"""

from __future__ import annotations

import torch

from .index import ClusterIndex
from .kernels.zone_estimate import zone_estimate
from .lookup import Lookup


def ranking(found: Lookup) -> torch.Tensor | None:
    """``[B, Hkv, K]`` fp32: the scores the zone is ranked by (``-inf``: not scored), or
    ``None`` when the lookup kept none (the full budget)."""
    s = found.scores
    if s is None:
        return None
    return s.block if s.rows is None else s.rows.amax(2)


def apply(
    found: Lookup, q: torch.Tensor, index: ClusterIndex, scale: float,
    out: torch.Tensor, lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The sparse attention ``(out [B, Hkv, G·M, D], lse [B, Hkv, G·M])`` of the query block
    ``q [B, Hkv, G, M, D]`` with the layer's zone merged in, and the clusters estimated (an
    int64 scalar tensor; ``None`` with no zone: ``estimate_zone`` 0, or the full budget)."""
    multiple = index.config.estimate_zone
    key = ranking(found) if multiple > 0 else None
    if key is None:
        return out, lse, None
    out, lse, counts = zone_estimate(
        q, index.centroids, index.score_spread, index.log_counts, index.require_value_means(),
        key, found.mask, multiple, scale, out, lse,
    )  # fmt: skip
    return out, lse, counts.sum()
