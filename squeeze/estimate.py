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

One PyTorch implementation for every device: the zone is small (about as many clusters as are
selected), its rows copied out of fp32 copies of the centroids (the lookup's, with the spread
as one more dimension) and of the mean values, each made once per index and cached on it,
then two batched matmuls.
"""

from __future__ import annotations

import torch

from .index import ClusterIndex
from .kernels import NEG_INF
from .kernels.centroid_scores import with_spread
from .kernels.scratch import as_f32
from .lookup import Lookup


def zone(found: Lookup, multiple: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The clusters to estimate: ``(ids [B, Hkv, Z] int64, valid [B, Hkv, Z] bool)``, or ``None``
    when there are none.

    Ranked per (batch row, KV head) by the lookup's level-2 scores (a block of rows: each
    cluster's best row), the selected and the unscored clusters excluded; a head keeps its
    first ``ceil(multiple · max(1, selected))`` of them. (A host synchronisation: ``Z``.)
    """
    s = found.scores
    if s is None or multiple <= 0:
        return None
    key = s.block if s.rows is None else s.rows.amax(2)  # [B, Hkv, K]
    selected = found.mask[..., :-1]
    key = key.masked_fill(selected, NEG_INF)
    want = torch.ceil(multiple * selected.sum(-1).clamp(min=1).to(torch.float32))  # [B, Hkv]
    z = min(key.shape[-1], int(want.max()))
    if z == 0:
        return None
    best, ids = key.topk(z, dim=-1)
    rank = torch.arange(z, device=key.device)
    valid = (rank < want[..., None]) & torch.isfinite(best)
    return ids, valid


def estimate(
    q: torch.Tensor, index: ClusterIndex, ids: torch.Tensor, valid: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The zone's attention: ``out [B, Hkv, G·M, D]`` float32 and ``lse [B, Hkv, G·M]`` float32
    (``-inf`` and 0 for a row without a valid cluster).

    Args:
        q: ``[B, Hkv, G, M, D]`` queries.
        index: the layer's :class:`ClusterIndex`, with ``value_means``.
        ids, valid: ``[B, Hkv, Z]`` from :func:`zone`.
        scale: softmax scale.
    """
    b, hkv, g, m = q.shape[:4]
    value_means = index.require_value_means()
    k = index.num_clusters
    z = ids.shape[-1]
    flat = (ids + k * torch.arange(hkv, device=ids.device)[None, :, None]).flatten()

    def pick(t: torch.Tensor) -> torch.Tensor:  # [Hkv, K, ...] -> [B, Hkv, Z, ...] (row copies)
        return t.reshape(hkv * k, *t.shape[2:]).index_select(0, flat).view(b, hkv, z, *t.shape[2:])

    spread = index.score_spread
    if spread is None:
        qf, cent = q.to(torch.float32), as_f32(index.centroids)
    else:  # the spread term as one more dimension, on the lookup's cached fp32 centroids
        qf, cent = with_spread(q, index.centroids, spread, scale)
    rows = qf.reshape(b, hkv, g * m, qf.shape[-1])
    logit = torch.matmul(rows, pick(cent).transpose(-1, -2)).mul_(scale)  # [B, Hkv, G·M, Z]
    logit.add_(pick(index.log_counts).masked_fill(~valid, NEG_INF)[:, :, None, :])
    lse = torch.logsumexp(logit, dim=-1)  # [B, Hkv, G·M]
    weights = torch.exp(logit - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.matmul(weights, pick(as_f32(value_means))), lse
