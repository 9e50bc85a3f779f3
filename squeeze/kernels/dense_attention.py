"""Dense attention over the tail (question and generated tokens), returning its log-sum-exp.

The M query rows are the last M of the T tail tokens and attend causally among themselves
(bottom-right aligned): row ``m`` sees tail keys ``0 .. T - M + m``. Query heads are packed per
KV head, so the tail K/V are read once per KV head.
"""

from __future__ import annotations

import torch


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal dense attention with LSE, PyTorch (any device).

    Args:
        q: ``[B, Hkv, G * M, D]`` packed queries, row ``g * M + i`` is query ``i`` of head ``g``.
        k, v: ``[B, Hkv, T, D]`` tail keys/values, ``T >= M``.
        m: the number of query rows per head (M).
        scale: softmax scale.
    Returns:
        ``out [B, Hkv, G * M, D]`` float32 and ``lse [B, Hkv, G * M]`` float32.
    """
    t = k.shape[2]
    scores = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) * scale
    if m > 1:
        rows = torch.arange(q.shape[2], device=q.device) % m
        hidden = torch.arange(t, device=q.device)[None, :] > (t - m + rows)[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs, v.to(torch.float32)), lse
