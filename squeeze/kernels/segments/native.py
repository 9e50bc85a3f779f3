"""Merged row segments on the native C kernel (``kernels/native/segments.c``, CPU): one pass over
the mask, the compact CSR of the PyTorch reference, and the rows of each group with it."""

from __future__ import annotations

import ctypes

import torch

from .. import native


class _Kernel:
    """The typed ctypes function of the loaded library."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self.fn = lib.squeeze_segments
        self.fn.argtypes = [p, p, i64, i64, i64, p, p, p, p, i64]
        self.fn.restype = i64


def segments_native(mask: torch.Tensor, offsets: torch.Tensor):
    """``(seg_ptr, seg_start, seg_end, lengths [B, Hkv])`` int64 for ``mask [B, Hkv, C]`` and
    ``offsets [Hkv, C + 1]`` (shapes checked by the caller)."""
    b, hkv, c = mask.shape
    mask = mask.to(torch.bool).contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    cap = b * hkv * ((c + 1) // 2)
    ptr = torch.empty(b * hkv + 1, dtype=torch.int64)
    start = torch.empty(cap, dtype=torch.int64)
    end = torch.empty(cap, dtype=torch.int64)
    lengths = torch.empty(b, hkv, dtype=torch.int64)
    s = native.bind("segments", _Kernel).fn(
        mask.data_ptr(), offsets.data_ptr(), b, hkv, c,
        ptr.data_ptr(), start.data_ptr(), end.data_ptr(), lengths.data_ptr(), cap,
    )  # fmt: skip
    if s < 0:
        raise RuntimeError(f"native segments failed with code {s}")
    return ptr, start[:s], end[:s], lengths
