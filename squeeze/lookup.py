"""Centroid lookup: which level-2 clusters each KV head reads for a given query block.

Every cluster ``c`` gets the paper's estimate of one of its keys' attention weight,

    S_c(q) = exp(q·c·scale) / Σ_j N_j · exp(q·c_j·scale),

computed in log space (finite for logits of 1e4, fp16 keys and empty clusters). A block of M
query rows shares one selection per KV head: S is averaged over the rows (as in the paper) and
reduced over the query heads of the GQA group (``cfg.gqa_reduce``). A cluster is kept when its
log-score reaches the calibrated threshold (threshold mode; a block of M > 1 rows reads as many
tokens as its rows would on average, see :func:`_decide`) or when it is among the best clusters
of its head that together hold ``budget`` of the tokens (top-k mode).

Hierarchical lookup: level-1 centroids are scored first; only the level-2 children of kept
level-1 clusters are scored, and the softmax denominator uses the level-1 centroids for the
pruned regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .index import ClusterIndex
from .kernels.backend import use_triton
from .kernels.centroid_scores import centroid_logits, centroid_scores, reduce_scores

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Lookup:
    """Result of one lookup.

    Attributes:
        mask: ``[B, Hkv, K + 1]`` bool: selected level-2 clusters; the last column is the window,
            always selected.
        centroids_scored: int64 scalar tensor: centroids scored, counting one per (batch row,
            KV head, centroid): a whole query group is scored against a centroid at once.
    """

    mask: torch.Tensor
    centroids_scored: torch.Tensor


def log_scores(
    q: torch.Tensor,
    centroids: torch.Tensor,
    log_counts: torch.Tensor,
    scale: float,
    reduce: str,
    extra_log_den: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log attention-weight estimates of every cluster, shared by a query group.

    Args:
        q: ``[B, Hkv, G, M, D]`` queries (any float dtype; math in fp32).
        centroids: ``[Hkv, K, D]`` float32 centroids.
        log_counts: ``[Hkv, K]`` log cluster sizes; ``-inf`` marks an empty cluster: it gets
            score ``-inf`` and adds nothing to the denominator.
        scale: softmax scale.
        reduce: ``"max"`` or ``"mean"`` over the G heads of a group.
        extra_log_den: ``[B, Hkv, G, M]`` log of mass added to the denominator (pruned regions).
    Returns:
        ``[B, Hkv, K]`` float32 log-scores (see :mod:`squeeze.kernels.centroid_scores`).
    """
    return centroid_scores(q, centroids, log_counts, scale, reduce, extra_log_den=extra_log_den)


def topk_mask(
    scores: torch.Tensor, counts: torch.Tensor, target: torch.Tensor | float
) -> torch.Tensor:
    """Best clusters per (batch row, head) until ``target`` tokens are covered.

    Args:
        scores: ``[B, Hkv, K]`` log-scores (``-inf`` never chosen before finite ones).
        counts: ``[Hkv, K]`` int64 tokens per cluster.
        target: tokens to cover, a float or a ``[B, Hkv, 1]`` tensor.
    Returns:
        ``[B, Hkv, K]`` bool; a cluster is kept while the tokens before it fall short of target.
    """
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    sorted_counts = torch.gather(counts.expand_as(scores), -1, order)
    before = sorted_counts.cumsum(-1) - sorted_counts
    keep_sorted = before < target
    mask = torch.empty_like(keep_sorted)
    mask.scatter_(-1, order, keep_sorted)
    return mask


def select(q: torch.Tensor, index: ClusterIndex, scale: float) -> Lookup:
    """Select the clusters read for the query block ``q [B, Hkv, G, M, D]``."""
    # CUDA: kernels/lookup_triton.py, threshold fused (a multi-row block in threshold mode, once
    # per question, takes the PyTorch path: its cut needs every row's own scores)
    if not _block_threshold(q, index.config) and use_triton("lookup", q.device):
        from .kernels.lookup_triton import select_triton

        return select_triton(q, index, scale)
    cfg = index.config
    b = q.shape[0]
    counts = index.counts
    log_counts = index.log_counts
    n_clustered = index.n_clustered
    if cfg.budget >= 1.0:
        mask = torch.ones(
            b, index.num_kv_heads, index.num_clusters, dtype=torch.bool, device=q.device
        )
        scored = torch.tensor(0, dtype=torch.int64)
    elif index.levels == 1:
        s = centroid_scores(
            q, index.centroids, log_counts, scale, cfg.gqa_reduce, per_row=_block_threshold(q, cfg)
        )
        mask = _decide(s, counts, n_clustered, cfg.budget, index, level=2)
        scored = torch.tensor(b * index.num_kv_heads * index.num_clusters, dtype=torch.int64)
    else:
        mask, scored = _select_hierarchical(q, index, scale, log_counts)
    window = torch.ones(b, index.num_kv_heads, 1, dtype=torch.bool, device=q.device)
    return Lookup(torch.cat([mask, window], dim=-1), scored)


def _select_hierarchical(q, index: ClusterIndex, scale: float, log_counts):
    """Level 1, then only the level-2 children of the kept level-1 clusters.

    Level-2 clusters are stored grouped by level-1 parent, so the children of the kept level-1
    clusters are contiguous runs of centroids; only those runs are scored (the PyTorch
    reference computes every logit with one matmul and masks the rest out, which on CPU costs
    less than a gather).
    """
    cfg = index.config
    b, hkv = q.shape[:2]
    l1_counts = index.l1_counts
    log_l1 = index.l1_log_counts
    per_row = _block_threshold(q, cfg)
    logits1 = centroid_logits(q, index.l1_centroids, scale)
    s1 = reduce_scores(logits1, log_l1[None], cfg.gqa_reduce, per_row=per_row)
    keep1 = _decide(s1, l1_counts, index.n_clustered, cfg.effective_l1_budget, index, level=1)
    children = torch.gather(keep1, 2, index.l1_parent.expand(b, -1, -1))  # [B, Hkv, K]
    runs = segments(keep1, index.l1_offsets)  # children as ranges of level-2 clusters
    # the pruned level-1 regions still hold softmax mass: estimate it with their centroids
    pruned = log_l1[None].masked_fill(keep1, NEG_INF)[:, :, None, None, :]
    extra = torch.logsumexp(logits1 + pruned, dim=-1)
    s = centroid_scores(
        q, index.centroids, log_counts, scale, cfg.gqa_reduce,
        scored=children, runs=runs, extra_log_den=extra, per_row=per_row,
    )  # fmt: skip
    mask = _decide(s, index.counts, index.n_clustered, cfg.budget, index, level=2) & children
    scored = b * hkv * index.l1_centroids.shape[1] + children.sum()
    return mask, scored.to(torch.int64)


def _block_threshold(q: torch.Tensor, cfg) -> bool:
    """Whether a multi-row block is cut in threshold mode (the decision then needs row scores)."""
    return cfg.mode == "threshold" and q.shape[3] > 1 and cfg.budget < 1.0


def _decide(s, counts, n_clustered: int, budget: float, index: ClusterIndex, level: int):
    """The kept clusters ``[B, Hkv, K]`` bool, from scores ``s`` (or ``(block, rows)`` scores).

    Threshold mode cuts at the calibrated threshold. A block of M > 1 rows shares one selection:
    it reads as many tokens as its rows would read on average, each row cut at the threshold on
    its own scores, taking the clusters with the best block scores. (Cutting the block's
    averaged scores at a threshold calibrated on single queries would read far less: averaging
    over rows dilutes every score.) Top-k mode reads ``budget`` of the tokens.
    """
    if isinstance(s, tuple):
        s, rows = s
    else:
        rows = None
    if budget >= 1.0:
        return torch.ones_like(s, dtype=torch.bool)
    if index.config.mode == "topk":
        return topk_mask(s, counts, budget * n_clustered)
    threshold = index.calibration.threshold(budget, level=level)
    if rows is None:
        return s >= threshold
    tokens = torch.where(rows >= threshold, counts[None, :, None, :], 0).sum(-1)  # [B, Hkv, M]
    return topk_mask(s, counts, tokens.to(torch.float32).mean(-1, keepdim=True))


def segments(mask: torch.Tensor, offsets: torch.Tensor):
    """Turn selected clusters into merged row segments of the cluster-ordered K/V (or, given
    ``l1_offsets``, selected level-1 clusters into runs of their level-2 children).

    Args:
        mask: ``[B, Hkv, C]`` bool (C = K + 1 with the window column).
        offsets: ``[Hkv, C + 1]`` int64 CSR row offsets.
    Returns:
        ``(seg_ptr [B*Hkv + 1], seg_start [S], seg_end [S])`` int64: the segments of (b, h) are
        ``seg_ptr[b*Hkv + h] : seg_ptr[b*Hkv + h + 1]``; adjacent selected clusters are merged,
        so S counts contiguous runs. On the Triton path each (b, h) owns ``ceil(C / 2)`` entries
        instead, the unused ones empty ``[0, 0)`` (no host sync; the same segments once the
        empty ones are dropped).
    """
    if use_triton("segments", mask.device):
        from .kernels.lookup_triton import segments_triton

        return segments_triton(mask, offsets)
    b, hkv, _c = mask.shape
    empty = (offsets[:, 1:] == offsets[:, :-1])[None]
    run = mask | empty  # an empty cluster costs nothing and must not break a run
    pad = torch.zeros(b, hkv, 1, dtype=torch.bool, device=mask.device)
    starts = run & ~torch.cat([pad, run[..., :-1]], dim=-1)
    ends = run & ~torch.cat([run[..., 1:], pad], dim=-1)
    bs, hs, cs = starts.nonzero(as_tuple=True)
    ce = ends.nonzero(as_tuple=True)[2]
    seg_start = offsets[hs, cs]
    seg_end = offsets[hs, ce + 1]
    keep = seg_end > seg_start
    seg_start, seg_end, flat = seg_start[keep], seg_end[keep], (bs * hkv + hs)[keep]
    per_head = torch.bincount(flat, minlength=b * hkv)
    seg_ptr = torch.zeros(b * hkv + 1, dtype=torch.int64, device=mask.device)
    seg_ptr[1:] = per_head.cumsum(0)
    return seg_ptr, seg_start, seg_end
