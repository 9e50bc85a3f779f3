"""Dense attention over the tail (question and generated tokens), returning its log-sum-exp.

The M query rows are the last M of the tail tokens and attend causally among themselves
(bottom-right aligned): with T tail tokens, row ``m`` sees tail keys ``0 .. T - M + m``. A ragged
batch (vLLM: each request its own tail length) passes ``lengths``: batch row ``b`` has
``lengths[b]`` real keys, the rest padding. Query heads are packed per KV head, so the tail K/V
are read once per KV head. One backend: ``reference.py`` (PyTorch, any device; its checks are
its callers', which validate the whole call).
"""

from __future__ import annotations

import torch

from .reference import dense_reference


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    m: int,
    scale: float,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal dense attention with LSE.

    Args:
        q: ``[B, Hkv, G * M, D]`` packed queries, row ``g * M + i`` is query ``i`` of head ``g``.
        k, v: ``[B, Hkv, T, D]`` tail keys/values, ``T >= M``.
        m: the number of query rows per head (M).
        scale: softmax scale.
        lengths: ``[B]`` int64 real keys per batch row (``M <= lengths[b] <= T``; the keys after
            them are padding, never attended), or ``None``: all T.
    Returns:
        ``out [B, Hkv, G * M, D]`` float32 and ``lse [B, Hkv, G * M]`` float32.
    """
    return dense_reference(q, k, v, m, scale, lengths)
