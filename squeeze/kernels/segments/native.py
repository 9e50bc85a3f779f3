"""Merged row segments on the native C kernel (``kernels/native/segments.c``, CPU): one pass over
the mask, the compact CSR of the PyTorch reference, and the rows of each group with it; and the
gather of the rows the segments cover, one copy per segment."""

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
        i32 = ctypes.c_int32
        self.gather = lib.squeeze_gather_segments
        self.gather.argtypes = [p, i64, i64, i64, p, p, p, i64, p, p, i32]
        self.gather.restype = None


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


def gather_rows_native(x, seg_ptr, seg_start, seg_end, counts, out):
    """:func:`squeeze.kernels.segments.gather_rows` on one ``memcpy`` per segment (``x``
    contiguous, the segments checked by the caller)."""
    hkv, n, d = x.shape
    counts = counts.to(torch.int64)
    first = (torch.cumsum(counts, 0) - counts).contiguous()
    seg_ptr, seg_start, seg_end = (t.contiguous() for t in (seg_ptr, seg_start, seg_end))
    threads = 1 if out.numel() * out.element_size() < native.SERIAL_BYTES else None
    native.bind("segments", _Kernel).gather(
        x.data_ptr(), d * x.element_size(), hkv, n,
        seg_ptr.data_ptr(), seg_start.data_ptr(), seg_end.data_ptr(), counts.numel(),
        first.data_ptr(), out.data_ptr(), threads or torch.get_num_threads(),
    )  # fmt: skip
    return out
