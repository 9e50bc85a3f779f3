"""Reused per-thread scratch buffers: allocating a fresh output page-faults it in, reusing one
does not (see the CPU performance notes in the design). Keep allocations out of the decode step.
Also the keys of data cached on a tensor (:func:`version`) and the fp32 copy cached so
(:func:`as_f32`)."""

from __future__ import annotations

import threading

import torch

#: bytes; larger scratch is allocated per call, not kept
CACHE_MAX = 64 << 20
_local = threading.local()


def buffer(name: str, numel: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A reused per-thread flat buffer of at least ``numel`` elements (page faults only on growth)."""
    device = torch.device(device or "cpu")
    nbytes = numel * dtype.itemsize
    if nbytes > CACHE_MAX:
        return torch.empty(numel, dtype=dtype, device=device)
    cache = _local.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, int(1.25 * (buf.numel() if buf is not None else 0))),
                          dtype=dtype, device=device)  # fmt: skip
        cache[key] = buf
    return buf[:numel]


def version(t: torch.Tensor) -> int:
    """``t``'s in-place version counter, the key of data cached on a tensor (packed centroids).
    Inference tensors keep no counter; they count as never changed (``0``): an in-place write
    to one is possible only inside ``torch.inference_mode``, which squeeze never does to an
    index."""
    return 0 if t.is_inference() else t._version


def as_f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32: itself, or an upcast copy made once and cached on it (the sink keys are
    stored in the centroids' dtype, bf16 by default, and scored on every decode step)."""
    if t.dtype == torch.float32:
        return t
    hit = getattr(t, "_squeeze_f32", None)
    if hit is None or hit[0] != version(t):
        hit = (version(t), t.to(torch.float32))
        t._squeeze_f32 = hit
    return hit[1]
