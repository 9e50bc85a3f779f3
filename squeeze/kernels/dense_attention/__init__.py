"""Dense attention over the tail (question and generated tokens), returning its log-sum-exp.

The M query rows are the last M of the tail tokens and attend causally among themselves
(bottom-right aligned): with T tail tokens, row ``m`` sees tail keys ``0 .. T - M + m``. A ragged
batch (vLLM: each request its own tail length) passes ``lengths``: batch row ``b`` has
``lengths[b]`` real keys, the rest padding. Query heads are packed per KV head, so the tail K/V
are read once per KV head. ``reference.py`` (PyTorch matmul-softmax, fp32 math, any device; its
checks are its callers', which validate the whole call) is the oracle, and runs on accelerators.
On CPU a block of rows runs on torch's flash kernel (:func:`_flash_cpu`), and a decode step (one
row per head, M = 1: nothing to mask causally) on the native sparse-attention kernel, every
(batch row, KV head) one segment of the tail: one call without BLAS, whose thread pool would
otherwise wake for a few thousand products (half a millisecond per layer at 2 threads with
passive waiting).
"""

from __future__ import annotations

import functools

import torch

from .. import FLASH_CPU, NEG_INF
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
    if q.device.type == "cpu" and FLASH_CPU is not None and q.shape[2] > 0 and k.shape[2] > 0:
        out, lse = _flash_cpu(q, k, v, m, scale, lengths)
    else:
        out, lse = dense_reference(q, k, v, m, scale, lengths)
    return (out, lse) if prior is None else merge_attention(*prior, out, lse)


def _flash_cpu(q, k, v, m, scale, lengths):
    """A block of rows (a question's prefill) on CPU: torch's flash kernel, which returns the
    LSE, the causal alignment and the ragged lengths as an additive mask (``[R, T]``, or
    ``[B, 1, R, T]`` with lengths), in the inputs' dtype when they share one (bf16: the kernel's
    AMX path; its output rounded to bf16 once, as the context's gather path rounds its own),
    else fp32. About 5x faster than the matmul-softmax reference at 2048 x 512 in fp32 and 16x
    in bf16, the scores never materialised."""
    dtype = q.dtype if q.dtype == k.dtype == v.dtype else torch.float32
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    t = k.shape[2]
    rows = torch.arange(q.shape[2]) % m
    j = torch.arange(t)
    if lengths is None:
        hidden = j[None, :] > (t - m + rows)[:, None]  # [R, T]
    else:
        last = lengths.to(torch.int64)[:, None] - m + rows[None, :]  # [B, R]: last key seen
        hidden = (j[None, None, :] > last[:, :, None])[:, None]  # [B, 1, R, T]
    mask = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, NEG_INF)
    out, lse = FLASH_CPU(q, k, v, 0.0, False, attn_mask=mask, scale=scale)[:2]
    return out.to(torch.float32), lse


def _one_segment_each(q, k, v, scale, lengths, b, hkv, prior):
    """The tail of a decode step on the native kernel: ``k, v [B·Hkv, T, D]``, segment
    ``[0, lengths[b])`` (or ``[0, T)``) for each (batch row, KV head); ``prior`` merged."""
    n = b * hkv
    ptr, start = _one_each(n)
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


@functools.lru_cache(maxsize=64)
def _one_each(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ptr, start)`` of one segment starting at row 0 for each of ``n`` heads, made once per
    ``n`` (the kernel only reads them; the ends change as the tail grows)."""
    return torch.arange(n + 1, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
