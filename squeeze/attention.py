"""squeezed_attention: sparse attention over the selected context clusters, dense over the tail."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import lookup
from .index import ClusterIndex
from .kernels.dense_attention import dense_attention
from .kernels.merge import merge_attention
from .kernels.segments import group_lengths, segments
from .kernels.sparse_attention import sparse_attention
from .validation import check_finite, check_same_device, check_tensor


@dataclass(frozen=True)
class SqueezeStats:
    """What one call read. The tensors stay on the device of the call; the fractions read them
    (a host synchronisation on CUDA) only when asked for.

    Attributes:
        keys_read: ``[B, Hkv]`` int64 context keys read per batch row and KV head (window included).
        centroids_scored_t: int64 scalar tensor: centroids scored, one per (batch row, KV head,
            centroid).
        n_context, window: the index's context length and dense window.
    """

    keys_read: torch.Tensor
    centroids_scored_t: torch.Tensor
    n_context: int
    window: int

    @property
    def kv_fraction(self) -> float:
        """Share of the context's keys read (selected clusters plus the window), averaged over
        batch rows and KV heads."""
        return float(self.keys_read.sum()) / (self.keys_read.numel() * self.n_context)

    @property
    def clustered_fraction(self) -> float:
        """Share of the clustered keys read: the quantity ``budget`` targets."""
        rows_heads = self.keys_read.numel()
        clustered = float(self.keys_read.sum()) - rows_heads * self.window
        return clustered / (rows_heads * (self.n_context - self.window))

    @property
    def centroids_scored(self) -> int:
        return int(self.centroids_scored_t)


def squeezed_attention(
    q: torch.Tensor,
    index: ClusterIndex,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    scale: float | None = None,
    return_stats: bool = False,
):
    """Attention of the tail queries over [fixed context, tail], reading only selected clusters.

    Args:
        q: ``[B, Hq, M, D]`` queries of the last M tail tokens (Hq a multiple of the index's Hkv).
        index: the context's :class:`ClusterIndex` for this layer.
        k_tail, v_tail: ``[B, Hkv, T, D]`` K/V of the tokens after the context (question and
            generated tokens), ``T >= M``; the M queries attend causally among them.
        scale: softmax scale, default ``D ** -0.5``.
        return_stats: also return a :class:`SqueezeStats`.
    Returns:
        ``out [B, Hq, M, D]`` in ``q.dtype`` (and the stats when asked). With ``budget=1.0``
        it equals dense attention over ``[context, tail]`` to round-off.
    """
    b, hq, m, d, hkv, _t = _check(q, index, k_tail, v_tail)
    scale = d**-0.5 if scale is None else float(scale)
    g = hq // hkv
    qg = q.reshape(b, hkv, g, m, d)  # query head j reads KV head j // g

    found = lookup.select(qg, index, scale)
    seg_ptr, seg_start, seg_end = segments(found.mask, index.offsets)
    packed = qg.reshape(b, hkv, g * m, d)
    out_ctx, lse_ctx = sparse_attention(
        packed, index.keys, index.values, seg_ptr, seg_start, seg_end, scale=scale
    )
    out_tail, lse_tail = dense_attention(packed, k_tail, v_tail, m, scale)
    out, _ = merge_attention(out_ctx, lse_ctx, out_tail, lse_tail)
    out = out.view(b, hq, m, d).to(q.dtype)
    if not return_stats:
        return out
    return out, _stats(found, seg_ptr, seg_start, seg_end, index, b)


def _stats(found: lookup.Lookup, seg_ptr, seg_start, seg_end, index: ClusterIndex, b: int):
    per = group_lengths(seg_ptr, seg_start, seg_end)
    return SqueezeStats(
        keys_read=per.view(b, index.num_kv_heads),
        centroids_scored_t=torch.as_tensor(found.centroids_scored),
        n_context=index.n_context,
        window=index.window,
    )


def _check(q, index, k_tail, v_tail):
    if not isinstance(index, ClusterIndex):
        raise TypeError(f"index must be a ClusterIndex, got {type(index).__name__}")
    check_tensor("q", q, 4, layout="[B, Hq, M, D]")
    check_tensor("k_tail", k_tail, 4, layout="[B, Hkv, T, D]")
    check_tensor("v_tail", v_tail, 4, layout="[B, Hkv, T, D]")
    check_same_device(q=q, index=index.keys, k_tail=k_tail, v_tail=v_tail)
    if (
        q.device.type == "cpu"
    ):  # a value check syncs the host: skipped in an accelerator decode step
        check_finite(q=q)
    b, hq, m, d = q.shape
    hkv = index.num_kv_heads
    if d != index.head_dim:
        raise ValueError(f"q head_dim {d} does not match the index head_dim {index.head_dim}")
    if hq % hkv:
        raise ValueError(f"q has Hq={hq} heads, not a multiple of the index's Hkv={hkv}")
    if k_tail.shape != v_tail.shape:
        raise ValueError(f"k_tail {tuple(k_tail.shape)} and v_tail {tuple(v_tail.shape)} differ")
    tb, th, t, td = k_tail.shape
    if (tb, th, td) != (b, hkv, d):
        raise ValueError(f"k_tail must be [B={b}, Hkv={hkv}, T, D={d}], got {tuple(k_tail.shape)}")
    if t < m:
        raise ValueError(f"k_tail holds T={t} tokens, fewer than the M={m} queries (T >= M)")
    if m < 1:
        raise ValueError("q must hold at least one query row (M >= 1)")
    return b, hq, m, d, hkv, t
