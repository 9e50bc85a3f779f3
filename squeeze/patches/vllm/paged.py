"""Squeezed attention of requests on one context, over vLLM's paged cache.

A thin adapter over the core: ``lookup.select`` picks clusters, ``lookup.segments`` turns them
into row segments of the cluster-ordered layout, the index's ``positions`` map those rows to
context positions and the request's block table maps positions to cache slots; the selected
rows are gathered and read by ``sparse_attention``; the tokens after the context (question and
generated tokens) go through ``dense_attention``; ``merge_attention`` joins the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import lookup
from ...index import ClusterIndex
from ...kernels.dense_attention import dense_attention
from ...kernels.merge import merge_attention
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
    seg_ptr, seg_start, seg_end = lookup.segments(found.mask, index.offsets)
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
