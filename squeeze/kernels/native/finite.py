"""The typed function of ``finite.c``: whether a contiguous CPU float tensor holds only finite
values, read in one pass over its bits (:func:`squeeze.validation.all_finite`)."""

from __future__ import annotations

import ctypes
import logging

import torch

from ...logs import log_once
from . import bind, unavailable_reason

#: the exponent bits of each float format: all of them set means inf or NaN
EXPONENT_BITS = {
    torch.float32: 0x7F800000,
    torch.bfloat16: 0x7F80,
    torch.float16: 0x7C00,
    torch.float64: 0x7FF0000000000000,
}


class _Kernel:
    def __init__(self, lib: ctypes.CDLL):
        self.fn = lib.squeeze_all_finite
        self.fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint64]
        self.fn.restype = ctypes.c_int32


def all_finite(t: torch.Tensor) -> bool | None:
    """Whether contiguous CPU ``t`` (fp32, bf16, fp16, fp64) is all finite; ``None`` when the
    library is unavailable or ``t`` is not such a tensor."""
    bits = EXPONENT_BITS.get(t.dtype)
    if bits is None or not t.is_contiguous():
        return None
    kernel = bind("finite", _Kernel)
    if kernel is None:
        log_once(
            "squeeze", ("finite", "unavailable"),
            "squeeze: native finite check unavailable (%s); numpy checks the inputs",
            unavailable_reason("finite"), level=logging.INFO,
        )  # fmt: skip
        return None
    return kernel.fn(t.data_ptr(), t.numel(), t.element_size(), bits) == 1
