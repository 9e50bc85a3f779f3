"""The estimated zone in PyTorch: the zone's choice, its estimate, and the merge (one
implementation for every device; the CPU's is ``native.py``)."""

from __future__ import annotations

import torch

from .. import NEG_INF
from ..centroid_scores import with_spread
from ..merge import merge_attention
from ..scratch import as_f32


def zone(key: torch.Tensor, mask: torch.Tensor, multiple: float):
    """The clusters to estimate: ``(ids [B, Hkv, Z] int64, valid [B, Hkv, Z] bool)``, or
    ``None`` when there are none.

    Ranked per (batch row, KV head) by ``key [B, Hkv, K]`` (``-inf``: not scored), the clusters
    selected in ``mask [B, Hkv, K (+ 1)]`` excluded; a head keeps its first
    ``ceil(multiple · max(1, selected))`` of them. (A host synchronisation: ``Z``.)
    """
    k = key.shape[-1]
    selected = mask[..., :k]
    key = key.masked_fill(selected, NEG_INF)
    want = torch.ceil(multiple * selected.sum(-1).clamp(min=1).to(torch.float32))  # [B, Hkv]
    z = min(k, int(want.max()))
    if z == 0:
        return None
    best, ids = key.topk(z, dim=-1)
    rank = torch.arange(z, device=key.device)
    valid = (rank < want[..., None]) & torch.isfinite(best)
    return ids, valid


def estimate(q, centroids, spread, log_counts, value_means, ids, valid, scale: float):
    """The zone's attention: ``out [B, Hkv, G·M, D]`` float32 and ``lse [B, Hkv, G·M]`` float32
    (``-inf`` and 0 for a row without a valid cluster).

    Args:
        q: ``[B, Hkv, G, M, D]`` queries.
        centroids, value_means: ``[Hkv, K, D]``; spread ``[Hkv, K]`` fp32 or ``None``;
            log_counts ``[Hkv, K]`` fp32.
        ids, valid: ``[B, Hkv, Z]`` from :func:`zone`.
        scale: softmax scale.
    """
    b, hkv, g, m = q.shape[:4]
    k = centroids.shape[1]
    z = ids.shape[-1]
    flat = (ids + k * torch.arange(hkv, device=ids.device)[None, :, None]).flatten()

    def pick(t: torch.Tensor) -> torch.Tensor:  # [Hkv, K, ...] -> [B, Hkv, Z, ...] (row copies)
        return t.reshape(hkv * k, *t.shape[2:]).index_select(0, flat).view(b, hkv, z, *t.shape[2:])

    if spread is None:
        qf, cent = q.to(torch.float32), as_f32(centroids)
    else:  # the spread term as one more dimension, on the lookup's cached fp32 centroids
        qf, cent = with_spread(q, centroids, spread, scale)
    rows = qf.reshape(b, hkv, g * m, qf.shape[-1])
    logit = torch.matmul(rows, pick(cent).transpose(-1, -2)).mul_(scale)  # [B, Hkv, G·M, Z]
    logit.add_(pick(log_counts).masked_fill(~valid, NEG_INF)[:, :, None, :])
    lse = torch.logsumexp(logit, dim=-1)  # [B, Hkv, G·M]
    weights = torch.exp(logit - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.matmul(weights, pick(as_f32(value_means))), lse


def zone_estimate_reference(
    q, centroids, spread, log_counts, value_means, key, mask, multiple, scale, out, lse
):
    """See :func:`squeeze.kernels.zone_estimate.zone_estimate` (arguments checked there)."""
    chosen = zone(key, mask, multiple)
    if chosen is None:
        return out, lse, torch.zeros(key.shape[:2], dtype=torch.int64, device=key.device)
    ids, valid = chosen
    part = estimate(q, centroids, spread, log_counts, value_means, ids, valid, scale)
    return (*merge_attention(out, lse, *part), valid.sum(-1))
