"""Threshold calibration from the window queries.

Each window query is scored as a decode query would be (one per position, its GQA group
reduced as online, the sinks' mass in its denominators with ``sink_mass``, by
:func:`squeeze.kernels.centroid_scores.centroid_scores`, the kernel the lookup scores with),
giving one log-score per (query, KV head, cluster). Pooling all of them,
weighted by cluster size, the threshold for a budget ``b`` is the score above which a fraction
``b`` of the (query, key) pairs lies: on the calibration queries, one query reads ``b`` of the
clustered keys on average, which is what ``budget`` promises.

The paper instead averages S over the window queries first and takes the quantile of the
averaged scores; averaging flattens the heavy-tailed per-query scores, so single queries then
read a fraction that can be far from the budget. The pooled quantile keeps the paper's estimator,
its one threshold per layer shared by all heads, and its log-space-safe computation, but targets
the budget a decode query actually reads.

One curve (budget → log-threshold) is stored per level, so the budget can change after the
index is built without recalibrating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .kernels import NEG_INF
from .kernels.centroid_scores import centroid_scores, sink_log_mass

#: budgets at which the calibration curve is tabulated (log-spaced from 0.1% to 100%)
GRID_POINTS = 129


@dataclass(frozen=True)
class Calibration:
    """Budget → log-threshold curves.

    Attributes:
        budgets: ``[P]`` float64 ascending budgets in (0, 1].
        log_thresholds: ``[P]`` float64 level-2 log-thresholds (non-increasing).
        l1_log_thresholds: ``[P]`` float64 level-1 log-thresholds, or ``None`` for one level.
    """

    budgets: torch.Tensor
    log_thresholds: torch.Tensor
    l1_log_thresholds: torch.Tensor | None = None
    #: thresholds already read off the curves, per (budget, level): a lookup reads one per step
    _read: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def threshold(self, budget: float, level: int = 2) -> float:
        """Log-threshold for ``budget`` (linear in log-budget between grid points)."""
        key = (budget, level)
        if key not in self._read:
            self._read[key] = self._interpolate(budget, level)
        return self._read[key]

    def _interpolate(self, budget: float, level: int) -> float:
        curve = self.log_thresholds if level == 2 else self.l1_log_thresholds
        if curve is None:
            raise ValueError("this index has no level-1 calibration")
        if budget >= 1.0:
            return NEG_INF
        x = math.log(budget)
        xs = torch.log(self.budgets)
        i = int(torch.searchsorted(xs, torch.tensor([x], dtype=xs.dtype)).clamp(1, len(xs) - 1))
        x0, x1, y0, y1 = float(xs[i - 1]), float(xs[i]), float(curve[i - 1]), float(curve[i])
        if x <= x0:
            return y0
        if not math.isfinite(y0) or not math.isfinite(y1):
            return y0 if x - x0 < x1 - x else y1
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def calibrate(index, queries: torch.Tensor) -> Calibration:
    """Calibrate ``index`` (a :class:`~squeeze.index.ClusterIndex`, thresholds aside) with its
    window queries ``[Hq, W, D]`` (any float dtype)."""
    cfg = index.config
    hkv = index.num_kv_heads
    hq, w, d = queries.shape
    # every window query as a decode step: batch W, group G, one row
    q = queries.reshape(hkv, hq // hkv, w, d).permute(2, 0, 1, 3)[:, :, :, None, :]
    scale = d**-0.5
    extra = [cfg.budget] + ([cfg.effective_l1_budget] if index.levels == 2 else [])
    grid = torch.unique(
        torch.cat(
            [
                torch.logspace(-3, 0, GRID_POINTS, dtype=torch.float64),
                torch.tensor(extra, dtype=torch.float64),
            ]
        )
    )
    counts = index.counts
    sinks = sink_log_mass(q, index.score_sinks, scale)  # every sink precedes every window query
    s2 = centroid_scores(
        q, index.centroids, index.log_counts, scale, cfg.gqa_reduce, spread=index.score_spread,
        extra_log_den=sinks,
    ).block  # fmt: skip
    curve2 = _pooled_quantiles(s2, counts, grid)
    curve1 = None
    if index.levels == 2:
        l1_counts = index.l1_counts
        s1 = centroid_scores(
            q, index.l1_centroids, index.l1_log_counts, scale, cfg.gqa_reduce,
            spread=index.score_l1_spread, extra_log_den=sinks,
        ).block  # fmt: skip
        curve1 = _pooled_quantiles(s1, l1_counts, grid)
    return Calibration(grid, curve2, curve1)


def _pooled_quantiles(scores: torch.Tensor, counts: torch.Tensor, budgets: torch.Tensor):
    """Log-thresholds at which a ``budgets`` share of the (query, key) pairs is kept.

    Args:
        scores: ``[W, Hkv, K]`` log-scores (``-inf`` for empty clusters).
        counts: ``[Hkv, K]`` tokens per cluster.
        budgets: ``[P]`` float64.
    Returns:
        ``[P]`` float64: the smallest score kept at each budget (keep ``score >= threshold``).
    """
    s = scores.flatten().to(torch.float64)
    wts = counts.expand_as(scores).flatten().to(torch.float64)
    order = torch.argsort(s, descending=True, stable=True)
    s, wts = s[order], wts[order]
    covered = wts.cumsum(0) / wts.sum()
    # first position whose cumulative share reaches the budget (tiny slack for round-off)
    pos = torch.searchsorted(covered, budgets.to(s.device) - 1e-12).clamp(max=len(s) - 1)
    return s[pos].cpu()
