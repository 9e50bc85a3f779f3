"""SqueezeConfig: every knob of the offline clustering and the online selection, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODES = ("threshold", "topk")
ESTIMATORS = ("spread", "centroid")
METRICS = ("cosine", "l2")
GQA_REDUCTIONS = ("max", "mean")
CENTROID_DTYPES = ("bfloat16", "float32")
#: level-2 clusters per level-1 cluster of the default two-level index (0.05 / 0.01)
L1_FANOUT = 5


def l1_ratio_for(centroid_ratio: float, levels: int) -> float | None:
    """The ``l1_ratio`` of a ``levels``-level index with ``centroid_ratio``: ``centroid_ratio /
    L1_FANOUT`` for two levels (the defaults' rule), ``None`` for one."""
    if levels not in (1, 2):
        raise ValueError(f"levels must be 1 or 2, got {levels!r}")
    return centroid_ratio / L1_FANOUT if levels == 2 else None


@dataclass(frozen=True)
class SqueezeConfig:
    """How a fixed context is clustered and how queries select its clusters.

    Attributes:
        centroid_ratio: level-2 clusters per clustered token (0.05 → one centroid per 20 keys).
        l1_ratio: level-1 clusters per clustered token, clustered from the level-2 centroids;
            ``None`` (the default) builds a single-level index. Must be below ``centroid_ratio``.
            A level-1 lookup prunes whole regions on the estimate of a coarse centroid; on
            SmolLM2 at a 10% budget it costs more perplexity than its cheaper lookup saves
            (README, fidelity), so the default scores every level-2 centroid.
        window: the last ``window`` context tokens are never clustered, are always attended, and
            their queries calibrate the threshold.
        sinks: the first ``sinks`` context tokens are never clustered and always attended too.
            Pretrained models park much of their attention on the first few tokens whatever they
            say ("attention sinks", StreamingLLM); in a cluster of ordinary keys a sink is read
            only when its cluster's centroid scores well, and missing it costs more than any
            other key (on SmolLM2-135M, 4 sinks take a 10% budget's perplexity from 1.6-1.8x
            dense to within 2%: README, fidelity).
        budget: target fraction of the clustered keys one query reads, in (0, 1]. ``1.0`` selects
            every cluster and reproduces dense attention exactly.
        l1_budget: fraction of the clustered keys that survive the level-1 lookup; ``None`` uses
            ``min(1, max(0.5, 4 * budget))`` (the paper keeps 50% at level 1; narrower level-1
            budgets lose softmax mass, see the README's fidelity table). At least ``budget``.
        mode: ``"threshold"`` (one calibrated threshold per layer, shared by its heads, as in the
            paper) or ``"topk"`` (per KV head, best clusters until ``budget`` of the tokens).
        metric: k-means metric, ``"cosine"`` (the paper) or ``"l2"``.
        gqa_reduce: how the query heads of one KV head's group combine their cluster scores:
            ``"max"`` keeps a cluster any head needs, ``"mean"`` averages.
        estimator: how a cluster's keys' attention is estimated from its summary. ``"centroid"``
            (the paper): ``exp(q·c·scale)`` for each of its N keys. ``"spread"``: the mean of
            ``exp(q·k·scale)`` over the cluster to second order, ``exp(q·c·scale + scale²·|q|²·
            σ²/2)`` with ``σ²`` the cluster's mean squared distance to its centroid per dimension
            (one float per cluster, stored in the index). A needle in a wide cluster is what the
            centroid averages away; its cluster's spread keeps it in the running (README,
            fidelity: on SmolLM2 it halves the KL to dense on code at a 10% budget).
        sink_mass: the sinks' exact attention mass joins every cluster score's denominator, so
            that a score estimates the share of the query's whole attention (sinks included)
            that one of the cluster's keys holds, not its share among the clustered keys. A head
            that parks most of its attention on the sinks then reads few clusters, and the
            budget goes to the heads and queries whose attention the clustered keys hold (the
            threshold stays one per layer, calibrated on the same scores). The sink keys are
            scored beside the centroids (``sinks`` more per KV head, counted in
            ``bytes_fraction``). On SmolLM2 at equal keys read it lowers the KL to dense by
            a third on code (README, fidelity). No effect without sinks.
        block_rows: query rows that share one read. A longer block of queries (a prefill of
            the question, a teacher-forced continuation) is cut into blocks of ``block_rows``
            rows, all looked up at once; every row makes the decision it would make alone, and
            its block reads the union of its rows' selections, once. Each row thus attends at
            least what it would decoded alone; larger blocks read fewer K/V bytes in all and do
            more arithmetic per row. On SmolLM2 at a 10% budget, teacher-forcing 128 tokens of
            code after a 4K context as one prefill block costs 1.3% perplexity in blocks of 16
            (2.1% in blocks of 4, 2.2% row by row, 5.0% with the rule before, one shared
            selection of one row's size per 4 rows), reading 29% of the clustered keys per
            block and 2.6 times the context's K/V bytes in all, against 4.5 for the old rule
            (README, fidelity).
        estimate_zone: the skipped clusters whose mass is estimated instead of dropped, as a
            multiple of the clusters selected (``0``: none). Per (batch row, KV head) the lookup
            ranks the clusters it did not select by their scores; the best ``estimate_zone``
            times as many as it selected (at least one) each add
            ``N·exp(q·c·scale + spread term)`` of attention on the cluster's mean value (the
            index's ``value_means``), merged with the sparse attention's output by log-sum-exp
            (RetroInfer's estimated zone). Its K/V are not read; its mean values are, one row of
            D per estimated cluster (counted in ``centroids_scored`` and ``bytes_fraction``).
            The clusters just below the threshold hold most of the mass the selection drops: on
            SmolLM2 (six 4K texts, fp32 decode) the mean KL to dense at a 10% budget is 0.0049
            without it, 0.0040 at ``0.25``, 0.0038 at ``0.5`` and 0.0037 at ``1.0``; at 5%
            0.0123, 0.0105, 0.0096 and 0.0090 (README, Choices). ``0.25`` keeps most of the gain
            for a quarter of the work: on the native kernel a 64K decode call (Hq=32, Hkv=8,
            D=128, one thread) cost 0-0.8 ms more in five of six quiet runs and 1.6-2 ms in one
            (fp32 5.9-6.7x dense against 6.9-7.1x without the zone).
        kmeans_iters: Lloyd iterations at most.
        seed: seed of the k-means++ initialisation.
        centroid_dtype: the dtype of the stored centroids, both levels: ``"bfloat16"`` (the
            default) or ``"float32"``. k-means runs in fp32; its centroids are rounded to this
            dtype once, at build, stored so in the index file, and read so by every scoring
            backend, which computes in fp32 (products, sums, softmax): a score is the fp32
            score of the rounded centroids (a relative rounding of at most 2^-9 per element in
            bf16). The spreads and log sizes stay fp32. Why: cost. Every scored centroid is read
            (``bytes_fraction``, :class:`squeeze.attention.SqueezeStats`), and with bf16 K/V an
            fp32 centroid of D floats costs as many bytes as a whole key + value row: at a 5%
            centroid ratio and a 10% budget the lookup reads half as many bytes as the K/V it
            selects; bf16 centroids halve that. Index files written before this field existed
            hold fp32 centroids and load as ``"float32"`` (:data:`ADDED_FIELDS`).
    """

    centroid_ratio: float = 0.05
    l1_ratio: float | None = None
    window: int = 100
    sinks: int = 4
    budget: float = 0.1
    l1_budget: float | None = None
    mode: str = "threshold"
    metric: str = "cosine"
    gqa_reduce: str = "max"
    estimator: str = "spread"
    sink_mass: bool = True
    block_rows: int = 16
    estimate_zone: float = 0.25
    kmeans_iters: int = 20
    seed: int = 0
    centroid_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _check_fraction("centroid_ratio", self.centroid_ratio)
        if self.l1_ratio is not None:
            _check_fraction("l1_ratio", self.l1_ratio)
            if self.l1_ratio >= self.centroid_ratio:
                raise ValueError(
                    f"l1_ratio={self.l1_ratio} must be below centroid_ratio={self.centroid_ratio}: "
                    "level 1 clusters the level-2 centroids"
                )
        if isinstance(self.window, bool) or not isinstance(self.window, int):
            raise TypeError(f"window must be an int, got {type(self.window).__name__}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int):
            raise TypeError(f"sinks must be an int, got {type(self.sinks).__name__}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        _check_fraction("budget", self.budget)
        if self.l1_budget is not None:
            _check_fraction("l1_budget", self.l1_budget)
            if self.l1_budget < self.budget:
                raise ValueError(
                    f"l1_budget={self.l1_budget} must be >= budget={self.budget}: level 1 only "
                    "narrows the clusters that level 2 may choose from"
                )
        _check_choice("mode", self.mode, MODES)
        _check_choice("metric", self.metric, METRICS)
        _check_choice("gqa_reduce", self.gqa_reduce, GQA_REDUCTIONS)
        _check_choice("estimator", self.estimator, ESTIMATORS)
        if not isinstance(self.sink_mass, bool):
            raise TypeError(f"sink_mass must be a bool, got {type(self.sink_mass).__name__}")
        if isinstance(self.block_rows, bool) or not isinstance(self.block_rows, int):
            raise TypeError(f"block_rows must be an int, got {type(self.block_rows).__name__}")
        if self.block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {self.block_rows}")
        if isinstance(self.estimate_zone, bool) or not isinstance(self.estimate_zone, (int, float)):
            raise TypeError(
                f"estimate_zone must be a float >= 0, got {type(self.estimate_zone).__name__}"
            )
        if not 0.0 <= float(self.estimate_zone) < float("inf"):
            raise ValueError(f"estimate_zone must be a finite float >= 0, got {self.estimate_zone}")
        if isinstance(self.kmeans_iters, bool) or not isinstance(self.kmeans_iters, int):
            raise TypeError(f"kmeans_iters must be an int, got {type(self.kmeans_iters).__name__}")
        if self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        _check_choice("centroid_dtype", self.centroid_dtype, CENTROID_DTYPES)

    @property
    def levels(self) -> int:
        """1 for a flat index, 2 when level-1 clusters are built."""
        return 1 if self.l1_ratio is None else 2

    @property
    def dense_tokens(self) -> int:
        """Context tokens never clustered and always attended: ``sinks + window``."""
        return self.sinks + self.window

    @property
    def effective_l1_budget(self) -> float:
        """The level-1 budget actually used (see ``l1_budget``)."""
        if self.l1_budget is not None:
            return self.l1_budget
        return min(1.0, max(0.5, 4.0 * self.budget))

    def replace(self, **changes: Any) -> SqueezeConfig:
        """A copy with ``changes`` applied and validated (``budget`` can change after build)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SqueezeConfig:
        """The config ``to_dict`` wrote. A field added after the file was written takes the
        value that reproduces what that file holds (:data:`ADDED_FIELDS`), not today's default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown SqueezeConfig fields {unknown}; known fields are {sorted(known)}"
            )
        return cls(**{**ADDED_FIELDS, **data})


#: fields added to SqueezeConfig after the first file format, with the value that means "as
#: before the field existed"
ADDED_FIELDS: dict[str, Any] = {
    "sinks": 0, "estimator": "centroid", "centroid_dtype": "float32", "sink_mass": False,
    "estimate_zone": 0.0,
}  # fmt: skip


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(value).__name__}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
