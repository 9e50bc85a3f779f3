"""Squeezed attention of requests on one context, over vLLM's paged cache.

A thin adapter over the core: ``lookup.select`` picks clusters, ``lookup.segments`` turns them
into row segments of the cluster-ordered layout, ``sparse_attention`` reads those segments, the
tokens after the context (question and generated tokens) go through ``dense_attention`` and
``merge_attention`` joins the two.

Two ways to read the selected context rows:

* :func:`squeezed_batch_copy` (the fast path): a :class:`ContextCopy` holds this layer's context
  K/V in cluster order, gathered ONCE from vLLM's paged cache (:func:`take_copy`), so the
  selected segments are contiguous rows, exactly as in ``squeeze.squeezed_attention``. The copy
  covers the context positions before ``tail_start = min(full blocks, N - window)``: those lie
  in full blocks, which prefix caching shares between requests. The rest of the context (the
  window and the last partial block, which each request recomputes into a block of its own) is
  read per request from the paged cache together with the question and generated tokens.
* :func:`squeezed_batch` (the fallback): the index's ``positions`` map the selected rows to
  context positions, the request's block table maps positions to cache slots, and the rows are
  gathered from the paged cache on every call (slow on CPU, where a block's keys are stored
  transposed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import lookup
from ...index import ClusterIndex
from ...kernels.dense_attention import dense_attention
from ...kernels.merge import merge_attention
from ...kernels.segments import segments
from ...kernels.sparse_attention import sparse_attention
from .kv_layout import slots


@dataclass(frozen=True)
class Read:
    """What one call read: context keys read / present (window included) and the same over the
    clustered keys, summed over KV heads."""

    keys_read: int
    keys_total: int
    clustered_read: int
    clustered_total: int


def selected_rows(seg_ptr, seg_start, seg_end, groups: int):
    """Expand CSR segments into ``(group [R], row [R])`` int64, in segment order.

    ``groups`` is the number of CSR groups (``B * Hkv``); the segments of group ``i`` are
    ``seg_ptr[i] : seg_ptr[i + 1]``.
    """
    lengths = seg_end - seg_start
    dev = lengths.device
    group_of_seg = torch.repeat_interleave(
        torch.arange(groups, device=dev), seg_ptr[1:] - seg_ptr[:-1]
    )
    total = int(lengths.sum())
    seg_of_row = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=dev), lengths, output_size=total
    )
    first_row = torch.cumsum(lengths, 0) - lengths  # row index where each segment starts
    row = seg_start[seg_of_row] + (torch.arange(total, device=dev) - first_row[seg_of_row])
    return group_of_seg[seg_of_row], row


def squeezed_batch(
    q: torch.Tensor,
    index: ClusterIndex,
    layout,
    block_rows: torch.Tensor,
    seq_lens: list[int],
    scale: float,
) -> tuple[torch.Tensor, list[Read]]:
    """Attention output of the last ``M`` tokens of ``B`` requests on the same context.

    Args:
        q: ``[B, M, Hq, D]`` queries; request ``b``'s rows are its positions
            ``seq_lens[b] - M .. seq_lens[b] - 1``, all at or after the context's end
            ``N = index.n_context``.
        index: this layer's index over this rank's ``Hkv`` KV heads (``positions`` used).
        layout: a ``kv_layout`` reader of this layer's paged cache (its K/V are already written
            for the step's tokens).
        block_rows: ``[B, max_blocks]`` int block table rows of the requests.
        seq_lens: tokens of each request so far, this step's included.
        scale: softmax scale.
    Returns:
        ``out [B, M, Hq, D]`` float32 and one :class:`Read` per request.
    """
    b, m, hq, d = q.shape
    hkv, n, dev = index.num_kv_heads, index.n_context, q.device
    g = hq // hkv
    qg = q.permute(0, 2, 1, 3).reshape(b, hkv, g, m, d)  # query head j reads KV head j // g
    packed = qg.reshape(b, hkv, g * m, d)

    found = lookup.select(qg, index, scale)
    seg_ptr, seg_start, seg_end = segments(found.mask, index.offsets)
    owner, row = selected_rows(seg_ptr, seg_start, seg_end, b * hkv)  # owner = b * Hkv + h
    per = torch.bincount(owner, minlength=b * hkv).view(b, hkv)  # rows per (request, head)
    # head h's buffer holds request 0's rows, then request 1's, ...
    col_start = torch.cumsum(per, 0) - per  # [B, Hkv]
    first = torch.cumsum(per.view(-1), 0) - per.view(-1)
    col = col_start.view(-1)[owner] + (torch.arange(owner.numel(), device=dev) - first[owner])
    head, req = owner % hkv, owner // hkv
    width = max(int(per.sum(0).max()), 1)
    pos = index.positions[head, row]
    blk = torch.zeros(hkv, width, dtype=torch.int64, device=dev)
    off = torch.zeros(hkv, width, dtype=torch.int64, device=dev)
    blk[head, col] = block_rows[req, pos // layout.block_size].to(torch.int64)
    off[head, col] = pos % layout.block_size
    k_ctx, v_ctx = layout.gather(blk, off)
    out_ctx, lse_ctx = sparse_attention(
        packed,
        k_ctx,
        v_ctx,
        torch.arange(b * hkv + 1, dtype=torch.int64, device=dev),
        col_start.reshape(-1),
        (col_start + per).reshape(-1),
        scale=scale,
    )

    outs, lses = [], []
    for i in range(b):
        tail_pos = torch.arange(n, seq_lens[i], dtype=torch.int64, device=dev).expand(hkv, -1)
        k_tail, v_tail = layout.gather(*slots(block_rows[i], tail_pos, layout.block_size))
        o, lse = dense_attention(packed[i : i + 1], k_tail[None], v_tail[None], m, scale)
        outs.append(o)
        lses.append(lse)
    out, _ = merge_attention(out_ctx, lse_ctx, torch.cat(outs), torch.cat(lses))
    out = out.view(b, hq, m, d).permute(0, 2, 1, 3)

    window, n_clustered = index.window, index.n_clustered
    reads = [Read(r, hkv * n, r - hkv * window, hkv * n_clustered) for r in per.sum(1).tolist()]
    return out, reads


@dataclass
class ContextCopy:
    """One layer's context K/V in cluster order, read once from the paged cache.

    Attributes:
        keys, values: ``[Hkv, tail_start, D]`` in the cache dtype: per KV head, the index's
            cluster-ordered rows whose context position is before ``tail_start`` (each head has
            exactly ``tail_start`` of them; the order of the index is kept).
        offsets: ``[Hkv, K + 2]`` the index's cluster offsets into these rows (the window
            segment, and any rows at or after ``tail_start``, are left out: read per request).
        tail_start: first context position read per request from the paged cache.
        block_ids: ``[ceil(tail_start / block_size)]`` int64, the blocks the copy was read from;
            a request whose block table starts with other blocks does not use the copy.
    """

    keys: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    tail_start: int
    block_ids: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def matches(self, block_rows: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: which requests' block tables hold the copy's blocks."""
        nb = self.block_ids.numel()
        return (block_rows[:, :nb].to(torch.int64) == self.block_ids).all(1)


def copy_tail_start(n: int, window: int, block_size: int) -> int:
    """First context position a :class:`ContextCopy` leaves to the per-request read: the end of
    the last full block, or the window's start if earlier."""
    return min((n // block_size) * block_size, n - window)


def take_copy(index: ClusterIndex, layout, block_row: torch.Tensor, chunk: int = 4096):
    """Read a :class:`ContextCopy` of one layer out of the paged cache through ``block_row``
    (a request on the context whose context blocks are written); ``None`` when the context has
    no full block before its window."""
    hkv, n = index.num_kv_heads, index.n_context
    tail_start = copy_tail_start(n, index.window, layout.block_size)
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
    nb = -(-tail_start // layout.block_size)
    return ContextCopy(
        torch.cat(ks, 1).contiguous(),
        torch.cat(vs, 1).contiguous(),
        offsets,
        tail_start,
        block_row[:nb].to(torch.int64).clone(),
    )


def tails_attention(
    packed: torch.Tensor,
    layout,
    block_rows: torch.Tensor,
    start: int,
    seq_lens: list[int],
    m: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``B`` requests over their positions ``start .. seq_lens[b] - 1``
    (read from the paged cache), in one gather and one masked attention for the whole batch:
    ``squeeze.kernels.dense_attention.dense_attention`` per request, with the shorter requests'
    keys padded and masked.

    Args:
        packed: ``[B, Hkv, G * M, D]`` packed queries (row ``g * M + i`` is query ``i``), request
            ``b``'s queries being its last ``M`` positions.
    Returns:
        ``out [B, Hkv, G * M, D]`` float32 and ``lse [B, Hkv, G * M]`` float32.
    """
    b, hkv, r, _d = packed.shape
    dev, bs = packed.device, layout.block_size
    ends = torch.tensor(seq_lens, dtype=torch.int64, device=dev)
    lens = ends - start  # [B] keys per request, each >= M
    t = int(lens.max())
    j = torch.arange(t, dtype=torch.int64, device=dev)
    pos = torch.minimum(start + j[None, :], ends[:, None] - 1)  # padding repeats a real slot
    blk = block_rows.to(torch.int64).gather(1, pos // bs)
    flat_blk = blk.reshape(1, -1).expand(hkv, -1)
    flat_off = (pos % bs).reshape(1, -1).expand(hkv, -1)
    k, v = layout.gather(flat_blk, flat_off)  # [Hkv, B * T, D]
    k = k.view(hkv, b, t, -1).transpose(0, 1).to(torch.float32)
    v = v.view(hkv, b, t, -1).transpose(0, 1).to(torch.float32)
    scores = torch.matmul(packed.to(torch.float32), k.transpose(-1, -2)) * scale  # [B,Hkv,R,T]
    rows = torch.arange(r, device=dev) % m
    last = lens[:, None] - m + rows[None, :]  # [B, R] last key each query row sees
    hidden = j[None, None, :] > last[:, :, None]  # [B, R, T]
    scores = scores.masked_fill(hidden[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs, v), lse


def squeezed_batch_copy(
    q: torch.Tensor,
    index: ClusterIndex,
    copy: ContextCopy,
    layout,
    block_rows: torch.Tensor,
    seq_lens: list[int],
    scale: float,
) -> tuple[torch.Tensor, list[Read]]:
    """:func:`squeezed_batch` reading the context's selected clusters from ``copy`` (contiguous
    segments, no gather) and positions ``copy.tail_start ..`` from the paged cache.

    Every request of ``block_rows`` must hold the copy's blocks (``copy.matches``). The keys
    read are the selected clusters' rows before ``tail_start`` plus every context position from
    ``tail_start`` (the window, and on CPU up to ``block_size - window - 1`` clustered rows of
    the last partial block, which are read whether selected or not).
    """
    b, m, hq, d = q.shape
    hkv, n, dev = index.num_kv_heads, index.n_context, q.device
    g = hq // hkv
    qg = q.permute(0, 2, 1, 3).reshape(b, hkv, g, m, d)  # query head j reads KV head j // g
    packed = qg.reshape(b, hkv, g * m, d)

    found = lookup.select(qg, index, scale)
    seg_ptr, seg_start, seg_end = segments(found.mask, copy.offsets)
    out_ctx, lse_ctx = sparse_attention(
        packed, copy.keys, copy.values, seg_ptr, seg_start, seg_end, scale=scale
    )

    out_tail, lse_tail = tails_attention(
        packed, layout, block_rows, copy.tail_start, seq_lens, m, scale
    )
    out, _ = merge_attention(out_ctx, lse_ctx, out_tail, lse_tail)
    out = out.view(b, hq, m, d).permute(0, 2, 1, 3)

    lengths = seg_end - seg_start
    owner = torch.repeat_interleave(
        torch.arange(b * hkv, device=dev), seg_ptr[1:] - seg_ptr[:-1], output_size=lengths.numel()
    )
    per = torch.zeros(b * hkv, dtype=torch.int64, device=dev).index_add_(0, owner, lengths)
    always = hkv * (n - copy.tail_start)
    window, n_clustered = index.window, index.n_clustered
    reads = [
        Read(r + always, hkv * n, r + always - hkv * window, hkv * n_clustered)
        for r in per.view(b, hkv).sum(1).tolist()
    ]
    return out, reads


def squeezed_request(
    q: torch.Tensor,
    index: ClusterIndex,
    layout,
    block_row: torch.Tensor,
    seq_len: int,
    scale: float,
) -> tuple[torch.Tensor, Read]:
    """One request: :func:`squeezed_batch` with ``B = 1``; ``q [M, Hq, D]`` → ``out [M, Hq, D]``."""
    out, reads = squeezed_batch(q[None], index, layout, block_row[None], [seq_len], scale)
    return out[0], reads[0]
