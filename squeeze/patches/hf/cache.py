"""Cache layers: the squeezed layer (a compiled context's index + the tail) and the compile-time capture.

A transformers attention module calls ``cache.update(k, v, layer_idx)`` and then the registered
attention function with whatever ``update`` returned; the cache object itself is not passed on.
Each layer here therefore hands itself to the attention function through a thread-local slot,
keyed by layer index and checked by tensor identity (:func:`hand_off` / :func:`take`).
"""

from __future__ import annotations

import copy
import inspect
import threading

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ...index import ClusterIndex
from .stats import StatsRecorder

ATTN_NAME = "squeeze"
_local = threading.local()


def cache_kwarg(fn) -> str:
    """``"cache"`` for transformers >= 5.24 forwards, ``"past_key_values"`` before."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def hand_off(layer_idx: int, layer, key: torch.Tensor) -> None:
    """Record that ``layer`` just returned ``key`` for ``layer_idx`` (read once by :func:`take`)."""
    if not hasattr(_local, "pending"):
        _local.pending = {}
    _local.pending[layer_idx] = (layer, key)


def take(layer_idx: int | None, key: torch.Tensor):
    """The layer that returned ``key`` for ``layer_idx`` just before, or ``None``."""
    pending = getattr(_local, "pending", None)
    if not pending or layer_idx is None or layer_idx not in pending:
        return None
    layer, handed = pending.pop(layer_idx)
    if handed is key:
        return layer
    if (
        isinstance(layer, SqueezedLayer)
        and layer.keys is not None
        and layer.keys.shape == key.shape
    ):
        # the model changed the keys between cache.update and attention: attending over the tail
        # alone would be silently wrong
        raise RuntimeError(
            f"layer {layer_idx}: the attention function received keys that are not the ones the "
            "squeezed cache returned; this model transforms K/V after the cache update, which "
            "squeeze does not support"
        )
    return None  # a stale entry (an earlier forward raised between update and attention)


class SqueezedLayer(DynamicLayer):
    """One layer of a compiled context: the shared, read-only :class:`ClusterIndex` of the context
    plus this cache's own tail (question and generated tokens) in ``keys`` / ``values``.

    ``get_seq_length`` counts the context, so ``generate`` feeds only the new tokens and positions
    continue after the context. ``update`` returns the tail only; the registered attention function
    reads the context through the index.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, layer_idx: int, index: ClusterIndex, recorder: StatsRecorder, config):
        super().__init__()
        self.layer_idx = layer_idx
        self.index = index
        self.n_context = index.n_context
        self.recorder = recorder
        self._config = config  # the decoder config the attention modules read

    def __deepcopy__(self, memo):
        # the index is shared and read-only: copying a cache copies only the tail
        new = object.__new__(type(self))
        for name, value in self.__dict__.items():
            shared = name in ("index", "recorder", "_config")
            new.__dict__[name] = value if shared else copy.deepcopy(value, memo)
        return new

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if getattr(self._config, "_attn_implementation", None) != ATTN_NAME:
            raise RuntimeError(
                "this cache holds a squeezed context, but the model's attention implementation is "
                f"{getattr(self._config, '_attn_implementation', None)!r}; call squeeze.patch(model) first"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        hand_off(self.layer_idx, self, self.keys)
        return self.keys, self.values

    @property
    def tail_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.n_context + self.tail_length

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tail tokens (a positive value is a legacy absolute
        length, still used inside transformers < 5.20). The context cannot be cropped."""
        if tokens_to_remove > 0:  # legacy: the length to keep
            if tokens_to_remove >= self.get_seq_length():
                return
            tokens_to_remove = tokens_to_remove - self.get_seq_length()
        remove = -tokens_to_remove
        if remove == 0:
            return
        if remove > self.tail_length:
            raise ValueError(
                f"cannot crop {remove} tokens: only {self.tail_length} follow the "
                "compiled context, which cannot be cropped"
            )
        self.keys = self.keys[..., :-remove, :]
        self.values = self.values[..., :-remove, :]

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.tail_length:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.tail_length:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.tail_length:
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]


class SqueezedCache(Cache):
    """The cache ``SqueezedContext.cache()`` returns: squeezed layers plus the model's own layers
    for the layers squeeze does not cover (built with ``SqueezedCache(layers=...)``)."""


class CaptureStore:
    """Preallocated K/V of every capture layer, ``[S, Hkv, N, D]``, filled chunk by chunk, and the
    window queries ``[S, Hq, W, D]``: the whole context's K/V is held once, never concatenated."""

    def __init__(self, n_context: int, window: int, slots: int):
        self.n_context, self.window, self.slots = n_context, window, slots
        self.keys = self.values = self.queries = None

    def ensure(self, key: torch.Tensor) -> None:
        if self.keys is None:
            _, hkv, _, d = key.shape
            shape = (self.slots, hkv, self.n_context, d)
            self.keys = torch.empty(shape, dtype=key.dtype, device=key.device)
            self.values = torch.empty(shape, dtype=key.dtype, device=key.device)

    def ensure_queries(self, query: torch.Tensor) -> None:
        if self.queries is None:
            _, hq, _, d = query.shape
            self.queries = torch.zeros(
                self.slots, hq, self.window, d, dtype=query.dtype, device=query.device
            )

    def compact(self, slots: list[int]) -> int:
        """Move the K/V (and queries) of ``slots`` (ascending) to the front; returns their count."""
        for j, s in enumerate(slots):
            if j != s:
                for t in (self.keys, self.values, self.queries):
                    if t is not None:
                        t[j].copy_(t[s])
        return len(slots)

    def free(self) -> None:
        self.keys = self.values = self.queries = None


class CaptureLayer(DynamicLayer):
    """Compile-time layer: writes the context's post-RoPE K/V into a :class:`CaptureStore` and lets
    the attention function capture the window queries (:meth:`observe`). Attention itself stays
    the model's own during compile."""

    is_sliding = False

    def __init__(self, layer_idx: int, store: CaptureStore, slot: int):
        super().__init__()
        self.layer_idx, self.store, self.slot = layer_idx, store, slot
        self.filled = 0
        self.start = 0
        self.reason: str | None = None  # why squeeze does not cover this layer, once observed
        self.observed = False

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError(
                f"compile prefills one context (batch 1), got batch {key_states.shape[0]}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.ensure(key_states)
        c = key_states.shape[-2]
        if self.filled + c > self.store.n_context:
            raise ValueError(
                f"more tokens than the {self.store.n_context} context tokens announced"
            )
        self.start = self.filled
        self.store.keys[self.slot, :, self.filled : self.filled + c] = key_states[0]
        self.store.values[self.slot, :, self.filled : self.filled + c] = value_states[0]
        self.filled += c
        self.keys = self.store.keys[self.slot, None, :, : self.filled]
        self.values = self.store.values[self.slot, None, :, : self.filled]
        hand_off(self.layer_idx, self, self.keys)
        return self.keys, self.values

    def observe(self, query: torch.Tensor, scaling: float | None, reason: str | None) -> None:
        """Note whether squeeze covers this layer and keep the queries of the window tokens.

        The queries are stored pre-multiplied by ``scaling·√D``: calibration scores with
        ``D^-0.5``, so the stored queries reproduce the model's own softmax scale.
        """
        if not self.observed:
            self.observed, self.reason = True, reason
        if self.reason is not None or self.store.window == 0:
            return
        m, d = query.shape[2], query.shape[3]
        first = self.store.n_context - self.store.window  # first window position
        lo = max(self.start, first)
        if lo >= self.start + m:
            return
        self.store.ensure_queries(query)
        factor = 1.0 if scaling is None else float(scaling) * d**0.5
        rows = query[0, :, lo - self.start :]
        self.store.queries[self.slot, :, lo - first : lo - first + rows.shape[1]] = rows * factor

    def get_seq_length(self) -> int:
        return self.filled

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.filled + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a compile-time capture cache cannot be cropped")

    def reset(self) -> None:
        raise RuntimeError("a compile-time capture cache cannot be reset")
