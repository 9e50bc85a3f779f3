"""Which paged-cache blocks each context's cluster-ordered copies are read from, and when those
copies go stale; the copies' memory, accounted per context at start-up.

Every layer keeps its own copy of a context's K/V (``paged.ContextCopy``), but all layers read
them from the same blocks, so the choice is made once per step and per context, here:

* a :class:`Source` names the blocks (``block_ids``: the context's first
  ``ceil(tail_start / block_size)`` blocks, as one request's block table holds them) and a
  ``generation``; a layer whose copy has another generation takes it again, from those blocks;
* a request is served from the copies only if its block table starts with those blocks;
* **eviction**: every step's KV writes are checked (``note_writes``, from the step's
  ``slot_mapping``). A block that holds a context position of a copy is never written while
  that holds, since full blocks are immutable; a write into one of a source's blocks means the
  block was freed and reused (evicted from the prefix cache), even if for the same tokens again.
  The source is then dropped, and the next request on the context starts a new generation from
  its own blocks: no request reads a copy whose blocks have been written since it was taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SqueezeVllmConfigError


@dataclass(frozen=True)
class Source:
    """The blocks the copies of one context are (to be) read from.

    Attributes:
        block_ids: ``[nb]`` int64 block ids of the context's first ``nb`` blocks.
        generation: increases each time a context's source changes.
    """

    block_ids: torch.Tensor
    generation: int

    def matches(self, block_rows: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: which requests' block tables start with these blocks."""
        nb = self.block_ids.numel()
        return (block_rows[:, :nb].to(torch.int64) == self.block_ids).all(1)


class Sources:
    """Per context, the current :class:`Source` (one registry per worker process)."""

    def __init__(self):
        self._current: dict[int, Source] = {}
        self._generation = 0
        self.invalidated = 0  # sources dropped because their blocks were written

    def choose(self, c: int, block_rows: torch.Tensor, nb: int) -> tuple[Source | None, list]:
        """The source of context ``c`` for a group of requests (``block_rows [B, max_blocks]``)
        and which of them it serves (``list[bool]``). Keeps the current source while a request
        holds its blocks; otherwise (none yet, dropped after a write, or recomputed elsewhere)
        a new generation from the first request's blocks. ``nb = 0``: no copy (``None``)."""
        if nb <= 0:
            return None, [False] * block_rows.shape[0]
        src = self._current.get(c)
        if src is not None:
            use = src.matches(block_rows)
            if bool(use.any()):
                return src, use.tolist()
        self._generation += 1
        src = Source(block_rows[0, :nb].to(torch.int64).clone(), self._generation)
        self._current[c] = src
        return src, src.matches(block_rows).tolist()

    def note_writes(self, slot_mapping: torch.Tensor, block_size: int) -> list[int]:
        """Drop the sources whose blocks this step writes; returns the contexts dropped."""
        if not self._current:
            return []
        slots = slot_mapping[slot_mapping >= 0].to(torch.int64)
        written = torch.unique(torch.div(slots, block_size, rounding_mode="floor"))
        dropped = [
            c for c, s in self._current.items() if bool(torch.isin(s.block_ids, written).any())
        ]
        for c in dropped:
            del self._current[c]
        self.invalidated += len(dropped)
        return dropped


def copy_positions(n: int, block_size: int) -> int:
    """Context positions a copy holds (``tail_start``): those of the full blocks, which prefix
    caching shares between requests (window rows included); the last partial block is each
    request's own and is read per request."""
    return (n // block_size) * block_size


def copy_bytes(n: int, block_size: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of one layer's copy of a context (keys and values) on one rank."""
    return 2 * kv_heads * copy_positions(n, block_size) * head_dim * itemsize


def check_copy_memory(sizes: dict[str, int], limit_mib: float | None) -> None:
    """``SqueezeVllmConfigError`` when the contexts' copies (``{path: bytes over all layers}``)
    exceed ``limit_mib`` (``None``: no limit)."""
    total = sum(sizes.values())
    if limit_mib is None or total <= limit_mib * 2**20:
        return
    each = ", ".join(f"{p}: {b / 2**20:.1f} MiB" for p, b in sizes.items())
    raise SqueezeVllmConfigError(
        f"squeeze: the cluster-ordered copies of the contexts need {total / 2**20:.1f} MiB on "
        f"this rank ({each}), over the limit copy_memory_mib={limit_mib:g}; register fewer or "
        "shorter contexts, or raise the limit (the copies live outside vLLM's KV cache budget)"
    )
