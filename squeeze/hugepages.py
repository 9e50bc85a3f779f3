"""Large CPU tensors of an index in transparent huge pages (Linux).

A decode step reads the selected clusters' K/V: a few thousand scattered segments of a few
kilobytes each, over hundreds of megabytes. With 4 KiB pages nearly every segment is a TLB miss,
and under virtualisation (nested paging) a miss walks two page tables. Backed by 2 MiB pages the
same reads miss about 500 times less often: on the 2-core VM this project is measured on, a 64K
decode call ran about 30% faster, and no longer slowed down 2-8x on its first calls after other
work had evicted the translations (README, speed). Dense attention streams its K/V in order and
gains less.

:func:`backed` returns a tensor whose data lies in a 2 MiB-aligned region advised
``MADV_HUGEPAGE`` before its first touch, so its pages fault in as huge pages where the kernel
allows (``/sys/kernel/mm/transparent_hugepage/enabled`` ``always`` or ``madvise``; with
``never``, or off Linux, or below :data:`MIN_BYTES`, the tensor is returned as it is). Only the
placement changes: values, dtype and shape are the same. :func:`empty` allocates such a tensor
for a kernel to fill (``out=``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import sys

import torch

logger = logging.getLogger("squeeze")

PAGE = 2 << 20  #: the huge page size (x86-64, and arm64 with 4 KiB base pages)
MIN_BYTES = PAGE  #: smaller tensors stay where they are (one huge page would be mostly empty)
MADV_HUGEPAGE = 14
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.cache
def _madvise():
    """libc's ``madvise``, or ``None`` where transparent huge pages cannot be had."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(THP_MODE) as f:
            if "[never]" in f.read():
                return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, contiguous, in huge pages where :func:`backed` would put it."""
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = _madvise()
    if madvise is None or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)  # fresh pages: mapped, not yet touched
    start = -raw.data_ptr() % PAGE
    if madvise(raw.data_ptr() + start, nbytes - nbytes % PAGE, MADV_HUGEPAGE) != 0:
        logger.debug("squeeze: madvise(MADV_HUGEPAGE) failed (errno %d)", ctypes.get_errno())
    out = raw[start : start + nbytes].view(dtype).view(shape)
    out._squeeze_huge = True
    return out


def backed(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a contiguous copy of it in huge pages (a large CPU tensor, where they can be
    had; see the module docstring). ``None`` passes through."""
    if t is None or t.device.type != "cpu" or t.numel() * t.element_size() < MIN_BYTES:
        return t
    if _madvise() is None or getattr(t, "_squeeze_huge", False):
        return t
    return empty(t.shape, t.dtype).copy_(t)
