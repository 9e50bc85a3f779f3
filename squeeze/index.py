"""ClusterIndex: one layer of one fixed context, clustered, stored in cluster order and calibrated.

The tensors of one layer and what derives from them; :mod:`squeeze.build` makes them,
:mod:`squeeze.files` stores them, :mod:`squeeze.lookup` reads them.

Layout of the stored context (per KV head, ``N = n_clustered + n_dense`` rows)::

    rows [0, n_clustered)      clustered keys/values, level-2 cluster after level-2 cluster,
                               level-2 clusters grouped by their level-1 parent
    rows [n_clustered, N)      the dense rows, in context order: the first ``cfg.sinks``
                               context tokens (attention sinks), then the last ``cfg.window``

Attention over keys does not depend on their order once RoPE is applied, so the reordering is
exact, and a selected cluster is a contiguous segment ``offsets[h, c] : offsets[h, c + 1]``.
The dense rows are the extra, always-selected segment ``c = K``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from . import files
from .calibration import Calibration, calibrate
from .config import SqueezeConfig
from .errors import IndexFileError
from .validation import check_finite, check_same_device, check_tensor

#: config fields the clusters depend on: changing them means building again
BUILD_FIELDS = frozenset({
    "centroid_ratio", "l1_ratio", "window", "sinks", "metric", "kmeans_iters", "seed",
    "centroid_dtype",
})  # fmt: skip
#: config fields the thresholds depend on: changing them means calibrating again
CALIBRATION_FIELDS = frozenset({"gqa_reduce", "estimator", "sink_mass"})


@dataclass
class ClusterIndex:
    """The clustered context of one attention layer.

    Attributes:
        keys, values: ``[Hkv, N, D]`` post-RoPE context K/V in the layout above, input dtype;
            ``None`` in an index whose K/V the caller supplies (the vLLM plugin reads them from
            its paged cache: :func:`squeeze.attention.context_attention`'s ``kv``).
        positions: ``[Hkv, N]`` int64, the context position of every stored row.
        centroids: ``[Hkv, K, D]`` level-2 centroids: means of the raw keys of each cluster (in
            fp32), stored in ``config.centroid_dtype`` (bfloat16 or float32).
        offsets: ``[Hkv, K + 2]`` int64 CSR row offsets; ``offsets[h, K] = n_clustered`` and
            ``offsets[h, K + 1] = N`` (the dense segment: sinks and window).
        l1_centroids: ``[Hkv, K1, D]`` level-1 centroids in the same dtype, or ``None`` for one
            level.
        l1_offsets: ``[Hkv, K1 + 1]`` int64: the level-2 children of level-1 cluster ``i`` are
            clusters ``l1_offsets[h, i] : l1_offsets[h, i + 1]``; ``None`` for one level.
        calibration: thresholds per budget (threshold mode), or ``None`` (top-k mode).
        config: the configuration it was built with; ``budget``/``mode`` may be changed later
            with :meth:`with_config`.
        spread: ``[Hkv, K]`` float32, per level-2 cluster half the mean squared distance of its
            keys to the centroid, per dimension (``σ²/2``: ``estimator="spread"``); ``None`` in
            indexes written before it existed (the centroid estimator is used then).
        l1_spread: ``[Hkv, K1]`` float32, the same for level-1 clusters (over all their keys).
        sink_keys: ``[Hkv, S, D]`` keys of the ``S = cfg.sinks`` attention sinks, in the
            centroids' dtype (they are scored beside them), whose mass the lookup adds to its
            denominators (``cfg.sink_mass``). Taken from ``keys`` when not given (they are the
            first dense rows), so an index whose K/V the caller supplies keeps them; ``None``
            without sinks.
        value_means: ``[Hkv, K, D]`` each level-2 cluster's mean value row (in fp32, stored in
            ``config.centroid_dtype``; zero for an empty cluster), which ``estimate_zone``
            attends in place of the cluster's values; ``None`` in indexes written before it.
    """

    keys: torch.Tensor | None
    values: torch.Tensor | None
    positions: torch.Tensor
    centroids: torch.Tensor
    offsets: torch.Tensor
    l1_centroids: torch.Tensor | None
    l1_offsets: torch.Tensor | None
    calibration: Calibration | None
    config: SqueezeConfig
    spread: torch.Tensor | None = None
    l1_spread: torch.Tensor | None = None
    sink_keys: torch.Tensor | None = None
    value_means: torch.Tensor | None = None
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.sink_keys is None and self.keys is not None and self.config.sinks > 0:
            sinks, start = min(self.config.sinks, self.n_dense), self.n_clustered
            rows = self.keys[:, start : start + sinks]
            self.sink_keys = rows.to(self.centroids.dtype).contiguous()

    # ---- shape facts -------------------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return self.centroids.shape[0]

    @property
    def head_dim(self) -> int:
        return self.centroids.shape[2]

    @property
    def n_context(self) -> int:
        """Context tokens held, clustered and dense."""
        return self.positions.shape[1]

    @property
    def n_clustered(self) -> int:
        return self.n_context - self.n_dense

    @property
    def n_dense(self) -> int:
        """Rows every query reads: the sinks and the window (the last segment)."""
        if "n_dense" not in self._derived:  # a host read: once, not on every decode step
            self._derived["n_dense"] = int(self.offsets[0, -1] - self.offsets[0, -2])
        return self._derived["n_dense"]

    @property
    def num_clusters(self) -> int:
        """Level-2 clusters per KV head."""
        return self.centroids.shape[1]

    @property
    def levels(self) -> int:
        return 1 if self.l1_centroids is None else 2

    @property
    def device(self) -> torch.device:
        return self.centroids.device

    # ---- derived tensors, computed once --------------------------------------------------------
    @property
    def counts(self) -> torch.Tensor:
        """``[Hkv, K]`` int64 tokens per level-2 cluster."""
        if "counts" not in self._derived:
            self._derived["counts"] = self.offsets[:, 1:-1] - self.offsets[:, :-2]
        return self._derived["counts"]

    @property
    def l1_counts(self) -> torch.Tensor:
        """``[Hkv, K1]`` int64 tokens per level-1 cluster (requires two levels)."""
        if "l1_counts" not in self._derived:
            rows = torch.gather(self.offsets, 1, self.l1_offsets)
            self._derived["l1_counts"] = rows[:, 1:] - rows[:, :-1]
        return self._derived["l1_counts"]

    @property
    def log_counts(self) -> torch.Tensor:
        """``[Hkv, K]`` float32 log tokens per level-2 cluster (``-inf``: empty)."""
        if "log_counts" not in self._derived:
            self._derived["log_counts"] = torch.log(self.counts.to(torch.float32))
        return self._derived["log_counts"]

    @property
    def l1_log_counts(self) -> torch.Tensor:
        """``[Hkv, K1]`` float32 log tokens per level-1 cluster (requires two levels)."""
        if "l1_log_counts" not in self._derived:
            self._derived["l1_log_counts"] = torch.log(self.l1_counts.to(torch.float32))
        return self._derived["l1_log_counts"]

    @property
    def score_spread(self) -> torch.Tensor | None:
        """``[Hkv, K]`` the spreads the lookup adds to the level-2 scores, or ``None`` (the
        centroid estimator, or an index without spreads)."""
        return self.spread if self.config.estimator == "spread" else None

    @property
    def score_l1_spread(self) -> torch.Tensor | None:
        """``[Hkv, K1]`` the same for level 1."""
        return self.l1_spread if self.config.estimator == "spread" else None

    @property
    def centroid_bytes(self) -> int:
        """Bytes one scored centroid costs to read, at either level: its D elements in the
        stored dtype (``config.centroid_dtype``), plus the fp32 spread (4 bytes) when the
        lookup scores it (:attr:`score_spread`)."""
        spread = self.score_spread
        extra = 0 if spread is None else spread.element_size()
        return self.head_dim * self.centroids.element_size() + extra

    @property
    def score_sinks(self) -> torch.Tensor | None:
        """``[Hkv, S, D]`` the sink keys whose mass joins the lookup's denominators, or ``None``
        (``sink_mass`` off, or no sinks)."""
        if not self.config.sink_mass or self.config.sinks == 0:
            return None
        if self.sink_keys is None:
            raise ValueError(
                "this index uses sink_mass but holds neither its K/V nor its sink keys"
            )
        return self.sink_keys

    @property
    def l1_parent(self) -> torch.Tensor:
        """``[Hkv, K]`` int64 level-1 parent of each level-2 cluster (requires two levels)."""
        if "l1_parent" not in self._derived:
            k = torch.arange(self.num_clusters, device=self.device).expand(self.num_kv_heads, -1)
            parent = torch.searchsorted(
                self.l1_offsets[:, 1:].contiguous(), k.contiguous(), right=True
            )
            self._derived["l1_parent"] = parent
        return self._derived["l1_parent"]

    def save(self, path, metadata: dict | None = None, *, key: bytes | str | None = None) -> None:
        """Write this index to ``path`` (safetensors + JSON header, see :mod:`squeeze.files`),
        signed with ``key`` (else ``$SQUEEZE_INDEX_KEY``) when there is one."""
        files.save_indexes(path, [self], metadata, key=key)

    @classmethod
    def load(cls, path, device=None, *, key: bytes | str | None = None) -> ClusterIndex:
        """Read a single-layer index file written by :meth:`save`, checked as
        :func:`load_indexes` checks it."""
        layers, _ = files.read_indexes(path, device, key)
        if len(layers) != 1:
            raise IndexFileError(
                f"{path} holds {len(layers)} layers; use squeeze.load_indexes for multi-layer files"
            )
        return cls(**layers[0])

    def with_config(self, **changes) -> ClusterIndex:
        """The same clusters under changed online settings (``budget``, ``l1_budget``, ``mode``,
        ``block_rows``).

        Thresholds for a new budget come from the stored calibration curve. Settings that the
        clusters or the calibration depend on are refused: see :meth:`recalibrate`.
        """
        bad = sorted((BUILD_FIELDS | CALIBRATION_FIELDS) & set(changes))
        if bad:
            raise ValueError(
                f"{bad} are fixed when the index is built; rebuild to change them "
                f"({sorted(CALIBRATION_FIELDS)}: use recalibrate)"
            )
        cfg = self.config.replace(**changes)
        if cfg.mode == "threshold" and self.calibration is None:
            raise ValueError(
                "this index was built in top-k mode without calibration queries; "
                "use recalibrate(queries) to use mode='threshold'"
            )
        if cfg.estimate_zone > 0:
            self.require_value_means()
        return dataclasses.replace(self, config=cfg)

    def require_value_means(self) -> torch.Tensor:
        """``value_means``, or ``ValueError`` naming the fix (an index written before them)."""
        if self.value_means is None:
            raise ValueError(
                "estimate_zone needs the clusters' mean values, and this index holds none "
                "(written before them): rebuild it, or keep estimate_zone=0"
            )
        return self.value_means

    def recalibrate(self, queries: torch.Tensor, **changes) -> ClusterIndex:
        """The same clusters, calibrated anew on window ``queries [Hq, W, D]`` with ``changes``
        (online settings and ``gqa_reduce``) applied."""
        bad = sorted(BUILD_FIELDS & set(changes))
        if bad:
            raise ValueError(f"{bad} are fixed when the index is built; rebuild to change them")
        check_tensor("queries", queries, 3, layout="[Hq, W, D]")
        check_same_device(index=self.centroids, queries=queries)
        check_finite(queries=queries)
        if queries.shape[-1] != self.head_dim or queries.shape[0] % self.num_kv_heads:
            raise ValueError(
                f"queries must be [Hq, W, {self.head_dim}] with Hq a multiple of "
                f"{self.num_kv_heads}, got {tuple(queries.shape)}"
            )
        cfg = self.config.replace(**changes)
        if cfg.estimator == "spread" and self.spread is None:
            raise ValueError(
                "this index holds no cluster spreads (written by an older squeeze): rebuild it "
                "to use estimator='spread', or keep estimator='centroid'"
            )
        index = dataclasses.replace(self, config=cfg, calibration=None)
        return dataclasses.replace(index, calibration=calibrate(index, queries))


def load_indexes(
    path, device=None, *, key: bytes | str | None = None
) -> tuple[list[ClusterIndex], dict]:
    """Read an index file (one index per layer): ``(indexes, metadata)``.

    The header is parsed against its schema, every tensor's digest verified, every layer
    checked (:mod:`squeeze.index_schema`); with a key (``key``, else ``$SQUEEZE_INDEX_KEY``)
    the file must carry a valid signature. Anything else raises
    :class:`~squeeze.errors.IndexFileError` naming the problem (see :mod:`squeeze.files`).
    """
    layers, metadata = files.read_indexes(path, device, key)
    return [ClusterIndex(**fields) for fields in layers], metadata
