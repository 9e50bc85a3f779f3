"""build_index / build_indexes: cluster a context's keys, store K/V in cluster order, calibrate.

One batched k-means (:func:`squeeze.kmeans`) runs over every (layer, KV head) group at once; a
two-level index clusters the level-2 centroids again (weighted by their sizes) and orders the
level-2 clusters by parent, so that siblings are adjacent rows. k-means, the spreads and the
level-1 clustering run on the fp32 centroids; only then are the centroids of both levels rounded
to ``cfg.centroid_dtype``, once (the index stores and scores them so). The result's layout is
:mod:`squeeze.index`'s; the thresholds come from :func:`squeeze.calibration.calibrate`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import hugepages
from .calibration import calibrate
from .config import SqueezeConfig
from .index import ClusterIndex
from .index_schema import CENTROID_DTYPES, check_layer
from .kernels.centroid_update import centroid_update
from .kmeans import kmeans
from .validation import check_finite, check_same_device, check_tensor


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


@dataclass(frozen=True)
class _Layout:
    """The clusters of every (layer, KV head) group ``G = L·Hkv``, in storage order."""

    positions: torch.Tensor  # [G, N] context position of every stored row
    centroids: torch.Tensor  # [G, K, D] cfg.centroid_dtype
    offsets: torch.Tensor  # [G, K + 2]
    l1_centroids: torch.Tensor | None  # [G, K1, D] cfg.centroid_dtype
    l1_offsets: torch.Tensor | None  # [G, K1 + 1]
    spread: torch.Tensor  # [G, K]
    l1_spread: torch.Tensor | None  # [G, K1]


def _build(keys, values, cfg, queries) -> list[ClusterIndex]:
    cfg = _check(keys, values, cfg, queries)
    n_layers, hkv, n, d = keys.shape
    clustered = keys[:, :, cfg.sinks : n - cfg.window].reshape(n_layers * hkv, -1, d)
    layout = _cluster(clustered, n, cfg)
    indexes = []
    for layer in range(n_layers):
        sl = slice(layer * hkv, (layer + 1) * hkv)
        pos = layout.positions[sl]
        ordered_keys, ordered = (_in_cluster_order(x[layer], pos) for x in (keys, values))
        offsets = layout.offsets[sl].contiguous()
        index = ClusterIndex(
            keys=ordered_keys,
            values=ordered,
            positions=pos.contiguous(),
            centroids=hugepages.backed(layout.centroids[sl].contiguous()),
            offsets=offsets,
            l1_centroids=_rows(layout.l1_centroids, sl),
            l1_offsets=_rows(layout.l1_offsets, sl),
            calibration=None,
            config=cfg,
            spread=_rows(layout.spread, sl),
            l1_spread=_rows(layout.l1_spread, sl),
            value_means=hugepages.backed(
                cluster_means(ordered, offsets).to(layout.centroids.dtype)
            ),
        )
        if queries is not None:
            index = dataclasses.replace(index, calibration=calibrate(index, queries[layer]))
        check_layer(vars(index), f"build_index: layer {layer}", ValueError)
        indexes.append(index)
    return indexes


def _in_cluster_order(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x [Hkv, N, D]`` rows in the order ``pos [Hkv, N]``, on CPU in huge pages (the decode
    step reads scattered segments of them: :mod:`squeeze.hugepages`)."""
    idx = pos[..., None].expand(-1, -1, x.shape[-1])
    if x.device.type != "cpu":
        return torch.gather(x, 1, idx)
    return torch.gather(x, 1, idx, out=hugepages.empty(idx.shape, x.dtype))


def _check(keys, values, cfg, queries) -> SqueezeConfig:
    """The configuration, after checking every argument against it (raises naming the problem)."""
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
    if n - cfg.dense_tokens < 1:
        raise ValueError(
            f"keys hold {n} context tokens, not more than sinks + window = {cfg.sinks} + "
            f"{cfg.window}: nothing left to cluster"
        )
    return cfg


def _cluster(groups: torch.Tensor, n: int, cfg: SqueezeConfig) -> _Layout:
    """Cluster ``groups [G, N_c, D]`` (the keys of context positions ``sinks .. n - window``) and
    lay the clusters out: level-2 clusters grouped by level-1 parent, then the dense rows (the
    sinks and the window, in context order; ``n`` rows in all)."""
    g, n_clustered, d = groups.shape
    dev = groups.device
    k2 = min(n_clustered, max(1, round(cfg.centroid_ratio * n_clustered)))
    l2 = kmeans(groups, k2, metric=cfg.metric, iters=cfg.kmeans_iters, seed=cfg.seed)
    centroids, counts, labels = l2.centroids, l2.counts, l2.labels
    sq = _squared_residuals(groups, labels, centroids)  # [G, K2] fp64
    l1_spread = None
    if cfg.l1_ratio is not None:
        k1 = min(k2, max(1, round(cfg.l1_ratio * n_clustered)))
        l1 = kmeans(
            centroids, k1, metric=cfg.metric, iters=cfg.kmeans_iters, seed=cfg.seed,
            weights=counts.to(torch.float32),
        )  # fmt: skip
        # order level-2 clusters by parent so that siblings are adjacent rows
        order = torch.sort(l1.labels, dim=1, stable=True).indices  # [G, K2] old cluster ids
        flat = l1.labels + k1 * torch.arange(g, device=dev)[:, None]
        l1_sizes = torch.bincount(flat.flatten(), minlength=g * k1).view(-1, k1)
        l1_offsets, l1_centroids = _csr(l1_sizes), l1.centroids
        # a level-1 region's keys around its centroid: each child's own residuals plus its size
        # times its centroid's distance to the parent's (the cross terms sum to zero)
        parent_c = torch.gather(l1.centroids, 1, l1.labels[..., None].expand(-1, -1, d))
        between = counts.double() * ((centroids - parent_c).double() ** 2).sum(-1)
        sq1 = torch.zeros(g, k1, dtype=torch.float64, device=dev)
        sq1.scatter_add_(1, l1.labels, sq + between)
        tokens1 = torch.zeros(g, k1, dtype=torch.int64, device=dev)
        tokens1.scatter_add_(1, l1.labels, counts)
        l1_spread = _spread(sq1, tokens1, d)
    else:
        order = torch.arange(k2, device=dev).expand(g, -1)
        l1_offsets = l1_centroids = None
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(k2, device=dev).expand_as(order))
    centroids = torch.gather(centroids, 1, order[..., None].expand(-1, -1, d))
    spread = _spread(torch.gather(sq, 1, order), torch.gather(counts, 1, order), d)
    counts = torch.gather(counts, 1, order)
    token_order = torch.sort(torch.gather(rank, 1, labels), dim=1, stable=True).indices  # [G, Nc]
    end = torch.full((g, 1), n, device=dev, dtype=torch.int64)  # the dense segment's end
    offsets = torch.cat([_csr(counts), end], dim=1)
    dense_pos = torch.cat(
        [torch.arange(cfg.sinks, device=dev), torch.arange(n - cfg.window, n, device=dev)]
    ).expand(g, -1)
    positions = torch.cat([token_order + cfg.sinks, dense_pos], dim=1)  # [G, N]
    stored = CENTROID_DTYPES[cfg.centroid_dtype]  # rounded once, after every fp32 use
    centroids = centroids.to(stored)
    l1_centroids = None if l1_centroids is None else l1_centroids.to(stored)
    return _Layout(positions, centroids, offsets, l1_centroids, l1_offsets, spread, l1_spread)


def _squared_residuals(groups, labels, centroids) -> torch.Tensor:
    """``[G, K]`` float64: per cluster, the sum of its keys' squared distances to its centroid
    (one group at a time: no ``[G, N, D]`` temporary)."""
    g, k = centroids.shape[:2]
    out = torch.zeros(g, k, dtype=torch.float64, device=centroids.device)
    for i in range(g):
        diff = groups[i].to(torch.float32) - centroids[i][labels[i]]
        out[i].index_add_(0, labels[i], (diff * diff).sum(-1).double())
    return out


def cluster_means(rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[Hkv, K, D]`` float32: the mean of each cluster's rows (``rows [Hkv, N, D]`` in cluster
    order, ``offsets [Hkv, K + 2]``); zero for an empty cluster. k-means' own centroid update
    (:func:`squeeze.kernels.centroid_update.centroid_update`: fp32 sums), over all the rows, the
    dense ones as one more cluster that is dropped (so the rows are read in place)."""
    hkv = rows.shape[0]
    k = offsets.shape[1] - 2
    sizes = (offsets[:, 1:] - offsets[:, :-1]).flatten()  # [Hkv·(K + 1)], the dense rows last
    ids = torch.arange(k + 1, device=rows.device).expand(hkv, k + 1).flatten()
    labels = torch.repeat_interleave(ids, sizes).view(hkv, -1)  # each row's cluster
    means, _ = centroid_update(rows, labels, k + 1)
    return means[:, :k].contiguous()


def _spread(sq: torch.Tensor, counts: torch.Tensor, d: int) -> torch.Tensor:
    """``σ²/2`` per cluster, float32: half the mean squared residual per dimension (0 if empty)."""
    return (sq / (2.0 * d * counts.clamp(min=1).double())).to(torch.float32)


def _rows(t: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if t is None else t[sl].contiguous()


def _csr(sizes: torch.Tensor) -> torch.Tensor:
    """``[G, K]`` sizes → ``[G, K + 1]`` int64 offsets starting at 0."""
    zero = torch.zeros(sizes.shape[0], 1, dtype=torch.int64, device=sizes.device)
    return torch.cat([zero, sizes.to(torch.int64).cumsum(1)], dim=1)
