"""The estimated zone on the native C kernel (``kernels/native/zone_estimate.c``, CPU): the
zone chosen by a partial selection (no sort of the skipped clusters), its logits and mean values
read in place from the index's own centroid and value tensors (no gathered copies), and the merge
into the sparse attention's output, in one call."""

from __future__ import annotations

import ctypes

import torch

from .. import native
from ..scratch import buffer


class _Kernel:
    """The typed ctypes function of the loaded library."""

    def __init__(self, lib: ctypes.CDLL):
        p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
        self.fn = lib.squeeze_zone_estimate
        self.fn.argtypes = [
            p, f32, p, i32, p, p, p, p,  # q, scale, centroids, their type, spread, lc, vm, key
            p, i64, f32,  # mask, its columns, multiple
            i64, i64, i64, i64, i64,  # BH, Hkv, K, R, D
            p, p, p, p, i64, i32,  # out, lse, counts, scratch, scratch floats, threads
        ]  # fmt: skip
        self.fn.restype = i64


def zone_estimate_native(
    q, centroids, spread, log_counts, value_means, key, mask, multiple, scale, out, lse
):
    """See :func:`squeeze.kernels.zone_estimate.zone_estimate`: ``out`` and ``lse`` merged in
    place when they are contiguous fp32 (else into fp32 copies, returned)."""
    b, hkv, g, m, d = q.shape
    k = centroids.shape[1]
    r = g * m
    qs = q.reshape(b * hkv, r, d).to(torch.float32).contiguous()  # read only: the kernel scales
    c, vm = centroids.contiguous(), value_means.contiguous()
    sp = None if spread is None else spread.to(torch.float32).contiguous()
    lc = log_counts.to(torch.float32).contiguous()
    key = key.to(torch.float32).contiguous()
    mask = mask.to(torch.bool).contiguous()
    if out.dtype != torch.float32 or not out.is_contiguous():
        out = out.to(torch.float32).contiguous()
    if lse.dtype != torch.float32 or not lse.is_contiguous():
        lse = lse.to(torch.float32).contiguous()
    counts = torch.empty(b, hkv, dtype=torch.int64)
    # the zone is about `multiple` times the selected clusters: at the budgets used (at most a
    # quarter of the tokens), at most a quarter of each table's rows times `multiple` are read
    read = b * 2 * c.numel() * c.element_size() * min(1.0, multiple) / 4
    threads = 1 if read < native.SERIAL_BYTES else max(1, min(torch.get_num_threads(), b * hkv))
    call = native.bind("zone_estimate", _Kernel).fn
    args = (
        qs.data_ptr(), scale, c.data_ptr(), native.DTYPE_CODES[c.dtype],
        None if sp is None else sp.data_ptr(), lc.data_ptr(), vm.data_ptr(), key.data_ptr(),
        mask.data_ptr(), mask.shape[-1], multiple, b * hkv, hkv, k, r, d,
        out.data_ptr(), lse.data_ptr(), counts.data_ptr(),
    )  # fmt: skip
    need = threads * _per_thread(k, r, d)
    scratch = buffer("zone_estimate", need, torch.float32)
    rc = call(*args, scratch.data_ptr(), scratch.numel(), threads)
    if rc != 0:
        raise RuntimeError(f"native zone_estimate failed with code {rc} (scratch {need} floats)")
    return out, lse, counts


def _per_thread(k: int, r: int, d: int) -> int:
    """Scratch floats per thread, as the kernel counts them: the zone's ids (two floats each)
    and ordered keys, the logits ``[Rp, Kp]``, the scaled rows ``[Rp, D + 1]``, the weighted
    sums ``[Rp, D]`` and log-sum-exps ``[R]`` (``Rp``: R rounded up to the row block of 4; ``Kp``:
    K to the vector width)."""
    vl = native.build_info("zone_estimate").vector_width
    rp, kp = -(-r // 4) * 4, -(-k // vl) * vl
    return 3 * k + rp * kp + rp * (d + 1) + rp * d + r
