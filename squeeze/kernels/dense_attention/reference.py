"""Causal dense attention over the tail with its LSE, in PyTorch (fp32 math)."""

from __future__ import annotations

import torch

from .. import NEG_INF


def dense_reference(q, k, v, m: int, scale: float, lengths=None):
    """See :func:`squeeze.kernels.dense_attention.dense_attention`."""
    t = k.shape[2]
    scores = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) * scale
    if lengths is not None or m > 1:
        rows = torch.arange(q.shape[2], device=q.device) % m
        j = torch.arange(t, device=q.device)
        if lengths is None:
            hidden = j[None, :] > (t - m + rows)[:, None]  # [R, T]
        else:
            last = lengths.to(q.device)[:, None] - m + rows[None, :]  # [B, R]: last key seen
            hidden = (j[None, None, :] > last[:, :, None])[:, None]  # [B, 1, R, T]
        scores = scores.masked_fill(hidden, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs, v.to(torch.float32)), lse
