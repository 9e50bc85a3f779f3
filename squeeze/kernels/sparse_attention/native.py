"""Sparse attention on the native C kernel (``kernels/native/sparse_attention.c``, CPU).

The kernel reads the selected K/V rows in place (fp32, bf16, fp16 where the compiler has
``_Float16``; ``D`` a multiple of the SIMD width), cuts each (b, h)'s selected tokens into chunks
of about equal length run in parallel (OpenMP), and merges the chunks by LSE. It checks the
segment bounds it relies on itself, once per call (``ValueError``).
"""

from __future__ import annotations

import ctypes

import torch

from ...logs import log_once
from .. import NEG_INF, native
from ..scratch import buffer

#: fewest tokens per parallel work chunk
MIN_CHUNK = 128


class _Kernel:
    """The typed ctypes function of the loaded library."""

    def __init__(self, lib: ctypes.CDLL):
        self.fn = lib.squeeze_sparse_attention
        p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        self.fn.argtypes = [
            p, p, p, i32, p, p, p, i64, i64, i64, i64, i64, p, p, p, i64, i32, i64, i64, i64,
            p, p,
        ]  # fmt: skip
        self.fn.restype = i64


def sparse_attention_native(q, k, v, seg_ptr, seg_start, seg_end, scale: float, prior=None):
    """Arguments as :func:`squeeze.kernels.sparse_attention.sparse_attention` (checked, and the
    dispatcher found the kernel able to take them).

    ``prior``: ``(out [B, Hkv, R, D], lse [B, Hkv, R])`` float32, a partial attention of the
    same rows over other keys (``lse`` -inf: none), merged into the result as
    :func:`squeeze.kernels.merge.merge_attention` would; or ``None``.
    """
    fn = native.bind("sparse_attention", _Kernel).fn
    B, Hkv, R, D = q.shape
    out = torch.empty(B, Hkv, R, D, dtype=torch.float32)
    lse = torch.empty(B, Hkv, R, dtype=torch.float32)
    if out.numel() == 0 or lse.numel() == 0:
        return out, lse.fill_(NEG_INF)
    p_out = p_lse = None
    if prior is not None:
        p_out, p_lse = (t.to(torch.float32).contiguous() for t in prior)
        if p_out.shape != out.shape or p_lse.shape != lse.shape:
            raise ValueError(
                f"prior must be out {tuple(out.shape)} and lse {tuple(lse.shape)}, got "
                f"{tuple(p_out.shape)} and {tuple(p_lse.shape)}"
            )
    qs = q.to(torch.float32).mul(scale).contiguous()  # fresh tensor: the scaled fp32 queries
    if not (k.is_contiguous() and v.is_contiguous()):
        log_once(
            "squeeze", "sparse_attention:contiguous",
            "squeeze: sparse_attention copies non-contiguous k / v on every call",
        )  # fmt: skip
        k, v = k.contiguous(), v.contiguous()
    seg_ptr, seg_start, seg_end = seg_ptr.contiguous(), seg_start.contiguous(), seg_end.contiguous()
    threads = torch.get_num_threads()
    scratch = buffer("native_scratch", 1 << 16, torch.float32)
    for _ in range(2):
        rc = fn(
            qs.data_ptr(), k.data_ptr(), v.data_ptr(), native.DTYPE_CODES[k.dtype],
            seg_ptr.data_ptr(), seg_start.data_ptr(), seg_end.data_ptr(),
            B, Hkv, k.shape[1], R, D, out.data_ptr(), lse.data_ptr(),
            scratch.data_ptr(), scratch.numel(), threads, MIN_CHUNK, seg_start.numel(),
            native.SERIAL_BYTES,  # K/V bytes read
            None if p_out is None else p_out.data_ptr(),
            None if p_lse is None else p_lse.data_ptr(),
        )  # fmt: skip
        if rc <= 0:
            break
        scratch = buffer("native_scratch", rc, torch.float32)  # grow, then run again
    if rc == -2:
        raise ValueError(
            f"segments out of bounds: seg_ptr must rise from 0 to {seg_start.numel()} and "
            f"every segment lie in [0, N = {k.shape[1]}] (checked by the native kernel)"
        )
    if rc != 0:
        raise RuntimeError(f"native sparse_attention failed with code {rc}")
    return out, lse
