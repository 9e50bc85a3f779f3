"""ClusterIndex: one layer of one fixed context, clustered, stored in cluster order and calibrated.

Layout of the stored context (per KV head, ``N = n_clustered + window`` rows)::

    rows [0, n_clustered)      clustered keys/values, level-2 cluster after level-2 cluster,
                               level-2 clusters grouped by their level-1 parent
    rows [n_clustered, N)      the window (last ``cfg.window`` context tokens), original order

Attention over keys does not depend on their order once RoPE is applied, so the reordering is
exact, and a selected cluster is a contiguous segment ``offsets[h, c] : offsets[h, c + 1]``.
The window is the extra, always-selected segment ``c = K``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibration import Calibration, calibrate
from .config import SqueezeConfig
from .kmeans import kmeans
from .validation import check_finite, check_same_device, check_tensor


@dataclass
class ClusterIndex:
    """The clustered context of one attention layer.

    Attributes:
        keys, values: ``[Hkv, N, D]`` post-RoPE context K/V in the layout above, input dtype.
        positions: ``[Hkv, N]`` int64, the context position of every stored row.
        centroids: ``[Hkv, K, D]`` float32 level-2 centroids: means of the raw keys of each cluster.
        offsets: ``[Hkv, K + 2]`` int64 CSR row offsets; ``offsets[h, K] = n_clustered`` and
            ``offsets[h, K + 1] = N`` (the window segment).
        l1_centroids: ``[Hkv, K1, D]`` float32 level-1 centroids, or ``None`` for one level.
        l1_offsets: ``[Hkv, K1 + 1]`` int64: the level-2 children of level-1 cluster ``i`` are
            clusters ``l1_offsets[h, i] : l1_offsets[h, i + 1]``; ``None`` for one level.
        calibration: thresholds per budget (threshold mode), or ``None`` (top-k mode).
        config: the configuration it was built with; ``budget``/``mode`` may be changed later
            with :meth:`with_config`.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    centroids: torch.Tensor
    offsets: torch.Tensor
    l1_centroids: torch.Tensor | None
    l1_offsets: torch.Tensor | None
    calibration: Calibration | None
    config: SqueezeConfig
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- shape facts -------------------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[2]

    @property
    def n_context(self) -> int:
        """Context tokens held, clustered and window."""
        return self.keys.shape[1]

    @property
    def n_clustered(self) -> int:
        return self.n_context - self.window

    @property
    def window(self) -> int:
        if "window" not in self._derived:  # a host read: once, not on every decode step
            self._derived["window"] = int(self.offsets[0, -1] - self.offsets[0, -2])
        return self._derived["window"]

    @property
    def num_clusters(self) -> int:
        """Level-2 clusters per KV head."""
        return self.centroids.shape[1]

    @property
    def levels(self) -> int:
        return 1 if self.l1_centroids is None else 2

    @property
    def device(self) -> torch.device:
        return self.keys.device

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
    def l1_parent(self) -> torch.Tensor:
        """``[Hkv, K]`` int64 level-1 parent of each level-2 cluster (requires two levels)."""
        if "l1_parent" not in self._derived:
            k = torch.arange(self.num_clusters, device=self.device).expand(self.num_kv_heads, -1)
            parent = torch.searchsorted(
                self.l1_offsets[:, 1:].contiguous(), k.contiguous(), right=True
            )
            self._derived["l1_parent"] = parent
        return self._derived["l1_parent"]

    def save(self, path, metadata: dict | None = None) -> None:
        """Write this index to ``path`` (safetensors + JSON header, see :mod:`squeeze.serialization`)."""
        from .serialization import save_indexes

        save_indexes(path, [self], metadata)

    @classmethod
    def load(cls, path, device=None) -> ClusterIndex:
        """Read a single-layer index file written by :meth:`save`."""
        from .serialization import IndexFileError, load_indexes

        indexes, _ = load_indexes(path, device)
        if len(indexes) != 1:
            raise IndexFileError(
                f"{path} holds {len(indexes)} layers; use "
                "squeeze.serialization.load_indexes for multi-layer files"
            )
        return indexes[0]

    def with_config(self, **changes) -> ClusterIndex:
        """The same clusters under changed online settings (``budget``, ``l1_budget``, ``mode``).

        Thresholds for a new budget come from the stored calibration curve. Settings that the
        clusters or the calibration depend on are refused: see :meth:`recalibrate`.
        """
        fixed = {
            "centroid_ratio",
            "l1_ratio",
            "window",
            "metric",
            "kmeans_iters",
            "seed",
            "gqa_reduce",
        }
        bad = sorted(fixed & set(changes))
        if bad:
            raise ValueError(
                f"{bad} are fixed when the index is built; rebuild to change them "
                "(gqa_reduce: use recalibrate)"
            )
        cfg = self.config.replace(**changes)
        if cfg.mode == "threshold" and self.calibration is None:
            raise ValueError(
                "this index was built in top-k mode without calibration queries; "
                "use recalibrate(queries) to use mode='threshold'"
            )
        return self._replace(cfg, self.calibration)

    def recalibrate(self, queries: torch.Tensor, **changes) -> ClusterIndex:
        """The same clusters, calibrated anew on window ``queries [Hq, W, D]`` with ``changes``
        (online settings and ``gqa_reduce``) applied."""
        fixed = {"centroid_ratio", "l1_ratio", "window", "metric", "kmeans_iters", "seed"}
        bad = sorted(fixed & set(changes))
        if bad:
            raise ValueError(f"{bad} are fixed when the index is built; rebuild to change them")
        check_tensor("queries", queries, 3, layout="[Hq, W, D]")
        check_same_device(index=self.keys, queries=queries)
        check_finite(queries=queries)
        if queries.shape[-1] != self.head_dim or queries.shape[0] % self.num_kv_heads:
            raise ValueError(
                f"queries must be [Hq, W, {self.head_dim}] with Hq a multiple of "
                f"{self.num_kv_heads}, got {tuple(queries.shape)}"
            )
        index = self._replace(self.config.replace(**changes), None)
        index.calibration = calibrate(index, queries)
        return index

    def _replace(self, cfg: SqueezeConfig, calibration: Calibration | None) -> ClusterIndex:
        return ClusterIndex(
            self.keys,
            self.values,
            self.positions,
            self.centroids,
            self.offsets,
            self.l1_centroids,
            self.l1_offsets,
            calibration,
            cfg,
            self._derived,
        )


def build_index(
    keys: torch.Tensor,
    values: torch.Tensor,
    cfg: SqueezeConfig | None = None,
    *,
    queries: torch.Tensor | None = None,
) -> ClusterIndex:
    """Cluster one layer's context.

    Args:
        keys, values: ``[Hkv, N, D]`` post-RoPE context K/V (fp32, fp16 or bf16).
        cfg: the configuration (defaults to ``SqueezeConfig()``).
        queries: ``[Hq, W, D]`` queries of the window tokens (``Hq`` a multiple of ``Hkv``);
            required in threshold mode, where they calibrate the thresholds.
    """
    check_tensor("keys", keys, 3, layout="[Hkv, N, D]")
    check_tensor("values", values, 3, layout="[Hkv, N, D]")
    if queries is not None:
        check_tensor("queries", queries, 3, layout="[Hq, W, D]")
    return _build(keys[None], values[None], cfg, None if queries is None else queries[None])[0]


def build_indexes(
    keys: torch.Tensor,
    values: torch.Tensor,
    cfg: SqueezeConfig | None = None,
    *,
    queries: torch.Tensor | None = None,
) -> list[ClusterIndex]:
    """Cluster several layers at once: one batched k-means over all (layer, KV head) groups.

    Args:
        keys, values: ``[L, Hkv, N, D]`` post-RoPE context K/V.
        queries: ``[L, Hq, W, D]`` window queries, or ``None`` in top-k mode.
    Returns:
        one :class:`ClusterIndex` per layer.
    """
    check_tensor("keys", keys, 4, layout="[L, Hkv, N, D]")
    check_tensor("values", values, 4, layout="[L, Hkv, N, D]")
    if queries is not None:
        check_tensor("queries", queries, 4, layout="[L, Hq, W, D]")
    return _build(keys, values, cfg, queries)


def _build(keys, values, cfg, queries) -> list[ClusterIndex]:
    cfg = cfg if cfg is not None else SqueezeConfig()
    if not isinstance(cfg, SqueezeConfig):
        raise TypeError(f"cfg must be a SqueezeConfig, got {type(cfg).__name__}")
    if values.shape != keys.shape:
        raise ValueError(
            f"values shape {tuple(values.shape)} must equal keys shape {tuple(keys.shape)}"
        )
    n_layers, hkv, n, d = keys.shape
    if queries is not None:
        if queries.shape[0] != n_layers:
            raise ValueError(f"queries hold {queries.shape[0]} layers, keys {n_layers}")
        if queries.shape[-1] != d:
            raise ValueError(f"queries head_dim {queries.shape[-1]} must equal keys head_dim {d}")
        if queries.shape[1] % hkv:
            raise ValueError(
                f"queries have Hq={queries.shape[1]} heads, not a multiple of the keys' Hkv={hkv}"
            )
        if queries.shape[2] < 1:
            raise ValueError("queries must hold at least one window query (W >= 1)")
    elif cfg.mode == "threshold":
        raise ValueError(
            "queries (the window queries) are required in threshold mode: they "
            "calibrate the threshold; pass them or use mode='topk'"
        )
    check_same_device(keys=keys, values=values, queries=queries)
    check_finite(keys=keys, values=values, queries=queries)
    n_clustered = n - cfg.window
    if n_clustered < 1:
        raise ValueError(
            f"keys hold {n} context tokens, not more than window={cfg.window}: "
            "nothing left to cluster"
        )

    groups = keys[:, :, :n_clustered].reshape(n_layers * hkv, n_clustered, d)
    k2 = min(n_clustered, max(1, round(cfg.centroid_ratio * n_clustered)))
    l2 = kmeans(groups, k2, metric=cfg.metric, iters=cfg.kmeans_iters, seed=cfg.seed)
    centroids, counts, labels = l2.centroids, l2.counts, l2.labels

    if cfg.l1_ratio is not None:
        k1 = min(k2, max(1, round(cfg.l1_ratio * n_clustered)))
        l1 = kmeans(
            centroids,
            k1,
            metric=cfg.metric,
            iters=cfg.kmeans_iters,
            seed=cfg.seed,
            weights=counts.to(torch.float32),
        )
        # order level-2 clusters by parent so that siblings are adjacent rows
        order = torch.sort(l1.labels, dim=1, stable=True).indices  # [G, K2] old cluster ids
        l1_sizes = torch.bincount(
            (
                l1.labels + k1 * torch.arange(l1.labels.shape[0], device=keys.device)[:, None]
            ).flatten(),
            minlength=l1.labels.shape[0] * k1,
        ).view(-1, k1)
        l1_offsets = _csr(l1_sizes)
        l1_centroids = l1.centroids
    else:
        order = torch.arange(k2, device=keys.device).expand(n_layers * hkv, -1)
        l1_offsets = l1_centroids = None
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(k2, device=keys.device).expand_as(order))
    centroids = torch.gather(centroids, 1, order[..., None].expand(-1, -1, d))
    counts = torch.gather(counts, 1, order)
    token_order = torch.sort(torch.gather(rank, 1, labels), dim=1, stable=True).indices  # [G, Nc]

    offsets = torch.cat(
        [_csr(counts), torch.full((counts.shape[0], 1), n, device=keys.device, dtype=torch.int64)],
        dim=1,
    )
    window_pos = torch.arange(n_clustered, n, device=keys.device).expand(token_order.shape[0], -1)
    positions = torch.cat([token_order, window_pos], dim=1)  # [G, N]

    indexes = []
    for layer in range(n_layers):
        sl = slice(layer * hkv, (layer + 1) * hkv)
        pos = positions[sl]
        gather_idx = pos[..., None].expand(-1, -1, d)
        index = ClusterIndex(
            keys=torch.gather(keys[layer], 1, gather_idx),
            values=torch.gather(values[layer], 1, gather_idx),
            positions=pos.contiguous(),
            centroids=centroids[sl].contiguous(),
            offsets=offsets[sl].contiguous(),
            l1_centroids=None if l1_centroids is None else l1_centroids[sl].contiguous(),
            l1_offsets=None if l1_offsets is None else l1_offsets[sl].contiguous(),
            calibration=None,
            config=cfg,
        )
        if queries is not None:
            index.calibration = calibrate(index, queries[layer])
        indexes.append(index)
    return indexes


def _csr(sizes: torch.Tensor) -> torch.Tensor:
    """``[G, K]`` sizes → ``[G, K + 1]`` int64 offsets starting at 0."""
    zero = torch.zeros(sizes.shape[0], 1, dtype=torch.int64, device=sizes.device)
    return torch.cat([zero, sizes.to(torch.int64).cumsum(1)], dim=1)
