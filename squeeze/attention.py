"""The runtime pipeline: the context half once, and squeezed_attention on top of it.

:func:`context_attention` is the context half every integration runs: the centroid lookup
(:func:`squeeze.lookup.select`), the selected clusters as row segments
(:func:`squeeze.kernels.segments.segments`), sparse attention over them
(:func:`squeeze.kernels.sparse_attention.sparse_attention`) and what was read
(:class:`SqueezeStats`). Its caller supplies the tail: :func:`squeezed_attention` (and through it
the Hugging Face patch) runs dense attention over the tokens after the context and merges the
two by log-sum-exp; the vLLM plugin does the same with its ragged tail from the paged cache.

Where the context's K/V are read is a :class:`ContextKV`: the index's own
(:func:`index_kv`), or one the caller supplies (the vLLM plugin's cluster-ordered copy of its
paged cache, or a gather from it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from . import estimate, lookup
from .index import ClusterIndex
from .kernels.dense_attention import dense_attention
from .kernels.segments import segments_with_lengths
from .kernels.sparse_attention import sparse_attention
from .validation import check_finite, check_same_device, check_scale, check_tensor


@dataclass(frozen=True)
class SqueezeStats:
    """What one call read. The tensors stay on the device of the call; the fractions read them
    (a host synchronisation on CUDA) only when asked for.

    Attributes:
        keys_read: ``[B, Hkv]`` int64 context keys read per batch row and KV head (the dense
            rows, sinks and window, included).
        centroids_scored_t: int64 scalar tensor: centroids scored, one per (batch row, KV head,
            centroid), the sink keys of ``sink_mass`` included.
        n_context, n_dense: the index's context length and its dense rows (sinks and window).
        key_bytes: bytes one context key costs to read: its key and value rows.
        centroid_bytes: bytes one scored centroid costs to read, in the dtype the index stores
            (``cfg.centroid_dtype``): ``D * element size``, plus 4 (the fp32 spread) when the
            lookup scores its spread (:attr:`squeeze.ClusterIndex.centroid_bytes`).
        selections: lookups of the call: a block of M query rows is cut into
            ``ceil(M / cfg.block_rows)`` blocks with a selection each. ``keys_read`` and
            ``centroids_scored_t`` sum over them; the fractions of keys read are per selection,
            ``bytes_fraction`` counts every byte of every selection.
    """

    keys_read: torch.Tensor
    centroids_scored_t: torch.Tensor
    n_context: int
    n_dense: int
    key_bytes: int = 0
    centroid_bytes: int = 0
    selections: int = 1

    @property
    def kv_fraction(self) -> float:
        """Share of the context's keys read (selected clusters plus the dense rows), averaged over
        batch rows, KV heads and selections."""
        per_selection = self.keys_read.numel() * self.selections
        return float(self.keys_read.sum()) / (per_selection * self.n_context)

    @property
    def clustered_fraction(self) -> float:
        """Share of the clustered keys read: the quantity ``budget`` targets."""
        per_selection = self.keys_read.numel() * self.selections
        clustered = float(self.keys_read.sum()) - per_selection * self.n_dense
        return clustered / (per_selection * (self.n_context - self.n_dense))

    @property
    def centroids_scored(self) -> int:
        return int(self.centroids_scored_t)

    @property
    def bytes_fraction(self) -> float:
        """The honest cost: (K/V bytes read + centroid bytes scored) over the context's dense
        K/V bytes, averaged over batch rows and KV heads. Every selection's reads count: a
        block cut into several selections may cost more than its clustered fraction says."""
        dense = self.keys_read.numel() * self.n_context * self.key_bytes
        read = float(self.keys_read.sum()) * self.key_bytes
        return (read + self.centroids_scored * self.centroid_bytes) / dense

    def plus(self, keys: int) -> SqueezeStats:
        """The same, with ``keys`` more read per batch row, KV head and selection (context rows
        a caller attends outside the segments, as the vLLM copy's per-request tail)."""
        return dataclasses.replace(self, keys_read=self.keys_read + keys * self.selections)


class ContextKV(Protocol):
    """Where the context half reads the context's K/V.

    Attributes:
        offsets: ``[Hkv, K + 2]`` int64 row offsets of the index's clusters (and window) in
            these K/V: the lookup's selection becomes segments of these rows.
    """

    offsets: torch.Tensor

    def read(self, seg_ptr, seg_start, seg_end, blocks: int = 1):
        """``(keys, values, seg_ptr, seg_start, seg_end)``: ``[Hkv, N', D]`` K/V holding the
        selected rows, and the segments that address them there. The segments' batch row
        ``b'`` is the query block ``b' % blocks`` of the caller's batch row ``b' // blocks``
        (:func:`context_attention` looks up every block of a long query block at once)."""
        ...


@dataclass(frozen=True)
class ClusterOrderedKV:
    """Context K/V stored in cluster order, every cluster a contiguous run of rows.

    Attributes:
        keys, values: ``[Hkv, N', D]``.
        offsets: ``[Hkv, K + 2]`` int64 cluster row offsets into them.
    """

    keys: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor

    def read(self, seg_ptr, seg_start, seg_end, blocks: int = 1):
        return self.keys, self.values, seg_ptr, seg_start, seg_end


def index_kv(index: ClusterIndex) -> ClusterOrderedKV:
    """The index's own K/V (``ValueError`` for an index whose K/V the caller supplies)."""
    if index.keys is None or index.values is None:
        raise ValueError(
            "index holds no K/V (they are supplied by the caller): pass kv= to context_attention"
        )
    return ClusterOrderedKV(index.keys, index.values, index.offsets)


def context_attention(
    q: torch.Tensor, index: ClusterIndex, scale: float, kv: ContextKV | None = None
) -> tuple[torch.Tensor, torch.Tensor, SqueezeStats]:
    """The context half: lookup → segments → sparse attention → stats.

    A block of more than ``index.config.block_rows`` query rows is cut into blocks of that many
    rows, each with its own selection (below the full budget), all looked up and read in one
    call.

    Args:
        q: ``[B, Hkv, G, M, D]`` queries, grouped by the KV head they read (checked by callers).
        index: the context's :class:`ClusterIndex` for this layer.
        scale: softmax scale.
        kv: where the context's K/V are read; ``None``: the index's own.
    Returns:
        ``out [B, Hkv, G·M, D]`` float32 and ``lse [B, Hkv, G·M]`` float32 over the selected
        context keys (rows packed as ``g·M + m``), and a :class:`SqueezeStats`.
    """
    b, hkv, g, m, d = q.shape
    kv = index_kv(index) if kv is None else kv
    step = index.config.block_rows
    if m <= step or index.config.budget >= 1.0:
        return _context_block(q, index, scale, kv)
    # every block at once, as batch rows b * blocks + i; the last block is padded by repeating
    # its last row, which changes neither its union nor its rows' outputs
    blocks = -(-m // step)
    pad = blocks * step - m
    if pad:
        q = torch.cat([q, q[:, :, :, -1:].expand(b, hkv, g, pad, d)], dim=3)
    qb = q.view(b, hkv, g, blocks, step, d).permute(0, 3, 1, 2, 4, 5)
    out, lse, stats = _context_block(
        qb.reshape(b * blocks, hkv, g, step, d), index, scale, kv, blocks
    )
    out = out.view(b, blocks, hkv, g, step, d).permute(0, 2, 3, 1, 4, 5)
    lse = lse.view(b, blocks, hkv, g, step).permute(0, 2, 3, 1, 4)
    out = out.reshape(b, hkv, g, blocks * step, d)[:, :, :, :m].reshape(b, hkv, g * m, d)
    lse = lse.reshape(b, hkv, g, blocks * step)[:, :, :, :m].reshape(b, hkv, g * m)
    stats = dataclasses.replace(
        stats, keys_read=stats.keys_read.view(b, blocks, hkv).sum(1), selections=blocks
    )
    return out, lse, stats


def _context_block(q, index: ClusterIndex, scale: float, kv: ContextKV, blocks: int = 1):
    """:func:`context_attention` for blocks of at most ``block_rows`` rows, one selection each
    (``blocks`` of them per caller's batch row, see :meth:`ContextKV.read`)."""
    b, hkv, g, m, d = q.shape
    found = lookup.select(q, index, scale)
    seg_ptr, seg_start, seg_end, lengths = segments_with_lengths(found.mask, kv.offsets)
    keys, values, *read = kv.read(seg_ptr, seg_start, seg_end, blocks)
    out, lse = sparse_attention(q.reshape(b, hkv, g * m, d), keys, values, *read, scale=scale)
    scored = found.centroids_scored
    # the best skipped clusters' estimate joins the sparse attention (estimate_zone > 0)
    out, lse, estimated = estimate.apply(found, q, index, scale, out, lse)
    if estimated is not None:
        scored = scored + estimated  # a mean value read per estimated cluster
    stats = SqueezeStats(
        keys_read=lengths,
        centroids_scored_t=scored,
        n_context=index.n_context,
        n_dense=index.n_dense,
        key_bytes=2 * d * keys.element_size(),
        centroid_bytes=index.centroid_bytes,
    )
    return out, lse, stats


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
    Raises:
        ValueError: on CPU, NaN or inf in ``q``, ``k_tail`` or ``v_tail``. On CUDA their
            values are not checked (a check would synchronise the host on every decode
            step): a non-finite input there gives a non-finite or zero output.
    """
    b, hq, m, d, hkv, _t = _check(q, index, k_tail, v_tail)
    scale = check_scale(scale, d)
    g = hq // hkv
    qg = q.reshape(b, hkv, g, m, d)  # query head j reads KV head j // g
    out_ctx, lse_ctx, stats = context_attention(qg, index, scale)
    packed = qg.reshape(b, hkv, g * m, d)
    out, _ = dense_attention(packed, k_tail, v_tail, m, scale, prior=(out_ctx, lse_ctx))
    out = out.view(b, hq, m, d).to(q.dtype)
    return (out, stats) if return_stats else out


def _check(q, index, k_tail, v_tail):
    if not isinstance(index, ClusterIndex):
        raise TypeError(f"index must be a ClusterIndex, got {type(index).__name__}")
    check_tensor("q", q, 4, layout="[B, Hq, M, D]")
    check_tensor("k_tail", k_tail, 4, layout="[B, Hkv, T, D]")
    check_tensor("v_tail", v_tail, 4, layout="[B, Hkv, T, D]")
    check_same_device(q=q, index=index.centroids, k_tail=k_tail, v_tail=v_tail)
    if q.device.type == "cpu":  # a value check syncs the host: not in an accelerator decode step
        check_finite(q=q, k_tail=k_tail, v_tail=v_tail)
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
