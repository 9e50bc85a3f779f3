"""Dense attention over the tail (question and generated tokens), returning its log-sum-exp.

The M query rows are the last M of the tail tokens and attend causally among themselves
(bottom-right aligned): with T tail tokens, row ``m`` sees tail keys ``0 .. T - M + m``. A ragged
batch (vLLM: each request its own tail length) passes ``lengths``: batch row ``b`` has
``lengths[b]`` real keys, the rest padding. Query heads are packed per KV head, so the tail K/V
are read once per KV head. One backend: ``reference.py`` (PyTorch, any device; its checks are
its callers', which validate the whole call). A decode step on CPU (one row per head, M = 1:
nothing to mask causally) runs on the native sparse-attention kernel instead, every (batch row,
KV head) one segment of the tail: one call without BLAS, whose thread pool would otherwise wake
for a few thousand products (half a millisecond per layer at 2 threads with passive waiting).
"""

from __future__ import annotations

import torch

from .. import sparse_attention as sparse
from ..merge import merge_attention
from .reference import dense_reference


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    m: int,
    scale: float,
    lengths: torch.Tensor | None = None,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal dense attention with LSE, merged with a ``prior`` attention of the same rows.

    Args:
        q: ``[B, Hkv, G * M, D]`` packed queries, row ``g * M + i`` is query ``i`` of head ``g``.
        k, v: ``[B, Hkv, T, D]`` tail keys/values, ``T >= M``.
        m: the number of query rows per head (M).
        scale: softmax scale.
        lengths: ``[B]`` int64 real keys per batch row (``M <= lengths[b] <= T``; the keys after
            them are padding, never attended), or ``None``: all T.
        prior: ``(out [B, Hkv, G * M, D], lse [B, Hkv, G * M])`` float32, the same rows'
            attention over other keys (the context's selected clusters), or ``None``.
    Returns:
        ``out [B, Hkv, G * M, D]`` float32 and ``lse [B, Hkv, G * M]`` float32: the attention
        over the tail keys and the prior's, as :func:`squeeze.kernels.merge.merge_attention`
        gives (on the native kernel the merge is its last pass: no separate call).
    """
    if m == 1 and q.device.type == "cpu" and q.shape[2] > 0:
        b, hkv, t, d = k.shape
        heads = k.reshape(b * hkv, t, d)  # every (batch row, KV head) a head of its own
        if sparse.select_backend(q.reshape(1, b * hkv, -1, d), heads) == "native":
            v = v.reshape(b * hkv, t, d)
            return _one_segment_each(q, heads, v, scale, lengths, b, hkv, prior)
    out, lse = dense_reference(q, k, v, m, scale, lengths)
    return (out, lse) if prior is None else merge_attention(*prior, out, lse)


def _one_segment_each(q, k, v, scale, lengths, b, hkv, prior):
    """The tail of a decode step on the native kernel: ``k, v [B·Hkv, T, D]``, segment
    ``[0, lengths[b])`` (or ``[0, T)``) for each (batch row, KV head); ``prior`` merged."""
    n = b * hkv
    ptr = torch.arange(n + 1, dtype=torch.int64)
    start = torch.zeros(n, dtype=torch.int64)
    if lengths is None:
        end = torch.full((n,), k.shape[1], dtype=torch.int64)
    else:
        end = lengths.to(torch.int64).repeat_interleave(hkv)
    r, d = q.shape[2], q.shape[3]
    if prior is not None:
        prior = (prior[0].reshape(1, n, r, d), prior[1].reshape(1, n, r))
    out, lse = sparse.native.sparse_attention_native(
        q.reshape(1, n, r, d), k, v, ptr, start, end, scale, prior
    )
    return out.view(b, hkv, -1, q.shape[-1]), lse.view(b, hkv, -1)
