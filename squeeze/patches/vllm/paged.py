"""Squeezed attention of one request's queries over vLLM's paged cache.

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


def selected_rows(seg_ptr, seg_start, seg_end, hkv: int):
    """Expand one batch row's CSR segments into ``(head [R], row [R])`` int64, head-major."""
    lengths = seg_end - seg_start
    head_of_seg = torch.repeat_interleave(
        torch.arange(hkv, device=lengths.device), seg_ptr[1:] - seg_ptr[:-1]
    )
    dev = lengths.device
    total = int(lengths.sum())
    seg_of_row = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=dev), lengths, output_size=total
    )
    first_row = torch.cumsum(lengths, 0) - lengths  # row index where each segment starts
    row = seg_start[seg_of_row] + (torch.arange(total, device=dev) - first_row[seg_of_row])
    return head_of_seg[seg_of_row], row


def squeezed_request(
    q: torch.Tensor,
    index: ClusterIndex,
    layout,
    block_row: torch.Tensor,
    seq_len: int,
    scale: float,
) -> tuple[torch.Tensor, Read]:
    """Attention output of the last ``M`` tokens of a request whose prompt starts with the context.

    Args:
        q: ``[M, Hq, D]`` queries of positions ``seq_len - M .. seq_len - 1``, all at or after
            the context's end ``N = index.n_context``.
        index: this layer's index over this rank's ``Hkv`` KV heads (``positions`` used).
        layout: a ``kv_layout`` reader of this layer's paged cache (its K/V are already written
            for the step's tokens).
        block_row: ``[max_blocks]`` int block table row of the request.
        seq_len: tokens of the request so far, this step's included.
        scale: softmax scale.
    Returns:
        ``out [M, Hq, D]`` float32 and a :class:`Read`.
    """
    m, hq, d = q.shape
    hkv, n, dev = index.num_kv_heads, index.n_context, q.device
    g = hq // hkv
    qg = q.permute(1, 0, 2).reshape(1, hkv, g, m, d)  # query head j reads KV head j // g
    packed = qg.reshape(1, hkv, g * m, d)

    found = lookup.select(qg, index, scale)
    seg_ptr, seg_start, seg_end = lookup.segments(found.mask, index.offsets)
    head, row = selected_rows(seg_ptr, seg_start, seg_end, hkv)
    per_head = torch.bincount(head, minlength=hkv)
    width = int(per_head.max()) if head.numel() else 0
    col = torch.arange(head.numel(), device=dev) - (torch.cumsum(per_head, 0) - per_head)[head]
    pos = torch.zeros(hkv, max(width, 1), dtype=torch.int64, device=dev)
    pos[head, col] = index.positions[head, row]
    blk, off = slots(block_row, pos, layout.block_size)
    k_ctx, v_ctx = layout.gather(blk, off)
    zero = torch.zeros(hkv, dtype=torch.int64, device=dev)
    out_ctx, lse_ctx = sparse_attention(
        packed,
        k_ctx,
        v_ctx,
        torch.arange(hkv + 1, dtype=torch.int64, device=dev),
        zero,
        per_head,
        scale=scale,
    )

    tail_pos = torch.arange(n, seq_len, dtype=torch.int64, device=dev).expand(hkv, -1)
    blk, off = slots(block_row, tail_pos, layout.block_size)
    k_tail, v_tail = layout.gather(blk, off)
    out_tail, lse_tail = dense_attention(packed, k_tail[None], v_tail[None], m, scale)
    out, _ = merge_attention(out_ctx, lse_ctx, out_tail, lse_tail)
    out = out.view(hq, m, d).permute(1, 0, 2)

    read = int(per_head.sum())
    window = index.window
    return out, Read(read, hkv * n, read - hkv * window, hkv * index.n_clustered)
