"""Centroid log-scores in PyTorch: one batched matmul over every centroid, the clusters outside
a subset masked out (on CPU, cheaper than gathering them). Centroids of any float dtype (bf16:
the index's default) are upcast to fp32 first: the result is the fp32 score of the stored
centroids."""

from __future__ import annotations

import math

import torch

from .. import NEG_INF


def centroid_logits(q: torch.Tensor, centroids: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [B, Hkv, G, M, D]`` · ``centroids [Hkv, K, D]`` → ``[B, Hkv, G, M, K]`` fp32 logits
    (both upcast to fp32)."""
    b, hkv, g, m, d = q.shape
    rows = q.to(torch.float32).reshape(b, hkv, g * m, d)
    logits = torch.matmul(rows, centroids.to(torch.float32).transpose(-1, -2)).mul_(scale)
    return logits.view(b, hkv, g, m, -1)


def reduce_scores(
    logits: torch.Tensor,
    log_counts: torch.Tensor,
    reduce: str,
    extra_log_den: torch.Tensor | None = None,
    per_row: bool = False,
):
    """``[B, Hkv, G, M, K]`` scaled logits and ``[B, Hkv, K]`` log sizes → ``[B, Hkv, K]`` scores.

    ``-inf`` log sizes mark clusters that are empty or not scored; ``extra_log_den``
    ``[B, Hkv, G, M]`` is log mass added to each row's denominator (pruned regions). With
    ``per_row``, also each row's own scores ``[B, Hkv, M, K]`` (reduced over G, not over M).
    """
    lc = log_counts[:, :, None, None, :]
    log_den = torch.logsumexp(logits + lc, dim=-1)  # [B, Hkv, G, M]
    if extra_log_den is not None:
        log_den = torch.logaddexp(log_den, extra_log_den)
    s = (logits - log_den[..., None]).masked_fill(torch.isneginf(lc).expand_as(logits), NEG_INF)
    m = logits.shape[3]
    block = torch.logsumexp(s, dim=3) - math.log(m) if m > 1 else s[:, :, :, 0]  # mean over rows
    if not per_row:
        return _reduce_heads(block, reduce, dim=2), None
    return _reduce_heads(block, reduce, dim=2), _reduce_heads(s, reduce, dim=2)


def _reduce_heads(s: torch.Tensor, reduce: str, dim: int) -> torch.Tensor:
    if reduce == "max":
        return s.amax(dim=dim)
    return torch.logsumexp(s, dim=dim) - math.log(s.shape[dim])


def log_mass(logits: torch.Tensor, log_counts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, G, M]``: per query row, ``log Σ_{c in mask} N_c exp(logit_c)``, for logits
    ``[B, Hkv, G, M, K]``, log sizes ``[Hkv, K]`` and the clusters ``mask [B, Hkv, K]``."""
    lc = log_counts[None].masked_fill(~mask, NEG_INF)[:, :, None, None, :]
    return torch.logsumexp(logits + lc, dim=-1)
