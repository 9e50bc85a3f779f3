"""Squeezed attention of requests on one context, over vLLM's paged cache: K/V sources only.

The algorithm is the core's: :func:`squeeze.attention.context_attention` (lookup → segments →
sparse attention → stats) over a context K/V source this module supplies, merged by LSE with
dense attention over a ragged tail read from the paged cache. Two sources:

* :class:`ContextCopy` (the fast path): this layer's context K/V in cluster order, gathered ONCE
  from vLLM's paged cache (:func:`take_copy`), so the selected segments are contiguous rows, as
  in ``squeeze.squeezed_attention``. The copy covers the context positions of its full blocks,
  ``tail_start = (N // block_size) * block_size``, window rows included: those blocks are
  shared between requests by prefix caching. The rest of the context (its last partial block,
  which each request recomputes into a block of its own) is read per request with the question
  and generated tokens, in the tail.
* :class:`GatheredContext` (the fallback): the index's ``positions`` map the selected rows to
  context positions, the requests' block tables map positions to cache slots, and the rows are
  gathered from the paged cache on every call (slow on CPU, where a block's keys are stored
  transposed). Its tail starts at the context's end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...attention import SqueezeStats, context_attention
from ...index import ClusterIndex
from ...kernels.dense_attention import dense_attention
from ...kernels.segments import expand_rows, group_lengths
from .copies import copy_positions
from .kv_layout import RowIndex, slots


@dataclass
class ContextCopy:
    """One layer's context K/V in cluster order, read once from the paged cache.

    Attributes:
        keys, values: ``[Hkv, tail_start, D]`` in the cache dtype: per KV head, the index's
            cluster-ordered rows whose context position is before ``tail_start`` (each head has
            exactly ``tail_start`` of them; the order of the index is kept).
        offsets: ``[Hkv, K + 2]`` the index's cluster offsets into these rows (the rows at or
            after ``tail_start``, clustered or window, are left out: read per request).
        tail_start: first context position read per request from the paged cache.
        block_ids: ``[tail_start / block_size]`` int64, the blocks the copy was read from;
            a request whose block table starts with other blocks does not use the copy.
        generation: the ``copies.Source`` generation it was taken for (0: none).
    """

    keys: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    tail_start: int
    block_ids: torch.Tensor
    generation: int = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def matches(self, block_rows: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: which requests' block tables hold the copy's blocks."""
        nb = self.block_ids.numel()
        return (block_rows[:, :nb].to(torch.int64) == self.block_ids).all(1)

    def read(self, seg_ptr, seg_start, seg_end, blocks: int = 1):
        """The selected segments are rows of the copy itself (:class:`squeeze.attention.ContextKV`)."""
        return self.keys, self.values, seg_ptr, seg_start, seg_end


@dataclass
class GatheredContext:
    """The selected context rows of ``B`` requests, gathered from the paged cache per call.

    Attributes:
        index: this layer's index over this rank's KV heads (``positions`` used).
        layout: a ``kv_layout`` reader of this layer's paged cache.
        block_rows: ``[B, max_blocks]`` int block table rows of the requests.
    """

    index: ClusterIndex
    layout: object
    block_rows: torch.Tensor

    @property
    def offsets(self) -> torch.Tensor:
        return self.index.offsets

    @property
    def tail_start(self) -> int:
        return self.index.n_context

    def read(self, seg_ptr, seg_start, seg_end, blocks: int = 1):
        """Gather the rows of every (batch row, head)'s segments: head ``h``'s buffer holds batch
        row 0's rows, then row 1's, ...; each (batch row, head) reads one segment of it. Batch
        row ``b'`` is a query block of request ``b' // blocks``."""
        hkv, dev, bs = self.index.num_kv_heads, seg_ptr.device, self.layout.block_size
        owner, row = expand_rows(seg_ptr, seg_start, seg_end)  # owner = b * Hkv + h
        per = group_lengths(seg_ptr, seg_start, seg_end).view(-1, hkv)  # rows per (batch row, head)
        col_start = torch.cumsum(per, 0) - per  # [B, Hkv]
        first = torch.cumsum(per.view(-1), 0) - per.view(-1)
        col = col_start.view(-1)[owner] + (torch.arange(owner.numel(), device=dev) - first[owner])
        head, req = owner % hkv, owner // hkv // blocks
        width = max(int(per.sum(0).max()), 1)
        pos = self.index.positions[head, row]
        blk = torch.zeros(hkv, width, dtype=torch.int64, device=dev)
        off = torch.zeros(hkv, width, dtype=torch.int64, device=dev)
        blk[head, col] = self.block_rows[req, pos // bs].to(torch.int64)
        off[head, col] = pos % bs
        keys, values = self.layout.gather(blk, off)
        ptr = torch.arange(per.numel() + 1, dtype=torch.int64, device=dev)
        return keys, values, ptr, col_start.reshape(-1), (col_start + per).reshape(-1)


def squeezed_rows(
    q: torch.Tensor,
    index: ClusterIndex,
    source: ContextCopy | GatheredContext,
    layout,
    block_rows: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    tail: TailIndex | None = None,
) -> tuple[torch.Tensor, SqueezeStats]:
    """Attention output of the last ``M`` tokens of ``B`` requests on the same context.

    Args:
        q: ``[B, M, Hq, D]`` queries; request ``b``'s rows are its positions
            ``seq_lens[b] - M .. seq_lens[b] - 1``, all at or after the context's end.
        index: this layer's index over this rank's ``Hkv`` KV heads.
        source: where the selected context rows are read (a copy every request holds the
            blocks of, ``copy.matches``; or a gather).
        layout: a ``kv_layout`` reader of this layer's paged cache (its K/V are already written
            for the step's tokens).
        block_rows: ``[B, max_blocks]`` int block table rows of the requests.
        seq_lens: tokens of each request so far, this step's included.
        scale: softmax scale.
        tail: ``tail_index(layout, block_rows, source.tail_start, seq_lens)``, when the caller
            computed it once for several layers.
    Returns:
        ``out [B, M, Hq, D]`` float32 and the stats: the keys read are the selected clusters'
        rows in the source plus every context position from ``source.tail_start`` (read with
        the tail: for a copy, the positions of the context's last partial block, up to
        ``block_size - 1`` of them, read whether selected or not).
    """
    b, m, hq, d = q.shape
    hkv = index.num_kv_heads
    qg = q.permute(0, 2, 1, 3).reshape(b, hkv, hq // hkv, m, d)  # query head j reads KV head j // g
    out_ctx, lse_ctx, stats = context_attention(qg, index, scale, kv=source)
    if tail is None:
        tail = tail_index(layout, block_rows, source.tail_start, seq_lens)
    k_tail, v_tail = layout.take(tail.rows)
    out, _ = dense_attention(
        qg.reshape(b, hkv, -1, d), k_tail, v_tail, m, scale, tail.lengths, (out_ctx, lse_ctx)
    )
    out = out.view(b, hq, m, d).permute(0, 2, 1, 3)
    return out, stats.plus(index.n_context - source.tail_start)


@dataclass(frozen=True)
class TailIndex:
    """Where ``B`` requests' positions ``start .. seq_lens[b] - 1`` sit in the paged cache.

    Attributes:
        rows: the ``kv_layout.RowIndex`` of ``k, v [B, Hkv, T, D]`` (the longest request's T;
            the shorter ones padded by repeating a real slot).
        lengths: ``[B]`` int64 each request's real keys, or ``None`` when all have T.
    """

    rows: RowIndex
    lengths: torch.Tensor | None


def tail_index(layout, block_rows: torch.Tensor, start: int, seq_lens: list[int]) -> TailIndex:
    """The :class:`TailIndex` of ``B`` requests (``block_rows [B, max_blocks]``) in ``layout``'s
    cache shape: one computation serves every layer of a step."""
    hkv, dev, bs = layout.num_kv_heads, block_rows.device, layout.block_size
    ends = torch.tensor(seq_lens, dtype=torch.int64, device=dev)
    lengths = ends - start
    b, t = len(seq_lens), max(seq_lens) - start
    j = torch.arange(t, dtype=torch.int64, device=dev)
    pos = torch.minimum(start + j[None, :], ends[:, None] - 1)  # padding repeats a real slot
    blk = block_rows.to(torch.int64).gather(1, pos // bs)
    shape = (b, hkv, t)
    rows = layout.index(blk[:, None].expand(shape), (pos % bs)[:, None].expand(shape))
    return TailIndex(rows, None if min(seq_lens) == max(seq_lens) else lengths)


def take_copy(
    index: ClusterIndex, layout, block_row: torch.Tensor, chunk: int = 4096, generation: int = 0
):
    """Read a :class:`ContextCopy` of one layer out of the paged cache through ``block_row``
    (a request on the context whose context blocks are written); ``None`` when the context has
    no full block."""
    hkv, n = index.num_kv_heads, index.n_context
    tail_start = copy_positions(n, layout.block_size)
    if tail_start <= 0:
        return None
    pos = index.positions.to(torch.int64)
    keep = pos < tail_start  # [Hkv, N]; positions are a permutation of 0..N-1 per head
    rows = keep.nonzero()[:, 1].view(hkv, tail_start)  # row-major: cluster order kept per head
    kpos = pos.gather(1, rows)
    ks, vs = [], []
    for t0 in range(0, tail_start, chunk):  # bounded index temporaries
        k, v = layout.gather(*slots(block_row, kpos[:, t0 : t0 + chunk], layout.block_size))
        ks.append(k)
        vs.append(v)
    kept_before = torch.zeros(hkv, n + 1, dtype=torch.int64, device=pos.device)
    kept_before[:, 1:] = torch.cumsum(keep, 1)
    offsets = kept_before.gather(1, index.offsets.to(torch.int64)).to(index.offsets.dtype)
    nb = tail_start // layout.block_size
    return ContextCopy(
        torch.cat(ks, 1).contiguous(),
        torch.cat(vs, 1).contiguous(),
        offsets,
        tail_start,
        block_row[:nb].to(torch.int64).clone(),
        generation,
    )
