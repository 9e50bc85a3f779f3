"""Centroid log-scores on the native C kernel (``kernels/native/centroid_scores.c``, CPU).

The centroids are packed one per SIMD lane in their own dtype (:func:`packed_centroids`, cached
on the centroid tensor: fp32, or bf16 widened to fp32 in the kernel), the spreads beside them in
fp32 (:func:`packed_spread`); the kernel reads only the clusters inside the given runs, so with
a hierarchical index the pruned level-2 centroids are never touched.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .. import NEG_INF, native
from ..dispatch import CENTROID_DTYPES  # the element types the kernel reads (DT_F32, DT_BF16)
from ..scratch import as_f32, buffer, version

ROW_BLOCK = 4  # query rows per register block in the C kernel (RB)


class _Kernel:
    """The typed ctypes function of the loaded library."""

    def __init__(self, lib: ctypes.CDLL):
        p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        self.fn = lib.squeeze_centroid_scores
        self.fn.argtypes = [
            p, ctypes.c_float, p, i32, p,  # q, scale, packed centroids, their type, spread
            p, p, p, p, p,  # log sizes, run_ptr, run_start, run_end, extra
            i64, i64, i64, i64, i64, i64, i32,  # BH, Hkv, K, G, M, D, reduce_mean
            p, p, p, i64, i32, i64,  # out, rows, scratch, scratch floats, threads, n_runs
        ]  # fmt: skip
        self.fn.restype = i64


class _SinkKernel:
    """The typed ctypes function of the sinks' log mass."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self.fn = lib.squeeze_sink_log_mass
        # q, scale, keys, BH, Hkv, R, S, D, out
        self.fn.argtypes = [p, ctypes.c_float, p, i64, i64, i64, i64, i64, p]
        self.fn.restype = None


def sink_log_mass_native(q: torch.Tensor, sink_keys: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`squeeze.kernels.centroid_scores.sink_log_mass` on the C loop (CPU): ``q [B, Hkv,
    G, M, D]``, ``sink_keys [Hkv, S, D]`` → ``[B, Hkv, G, M]`` float32."""
    b, hkv, g, m, d = q.shape
    qs = q.to(torch.float32).contiguous()  # read only: the kernel scales
    keys = as_f32(sink_keys).contiguous()
    out = torch.empty(b, hkv, g, m, dtype=torch.float32)
    native.bind("centroid_scores", _SinkKernel).fn(
        qs.data_ptr(), scale, keys.data_ptr(), b * hkv, hkv, g * m, keys.shape[1], d,
        out.data_ptr(),
    )  # fmt: skip
    return out


def packed_centroids(centroids: torch.Tensor) -> torch.Tensor:
    """``[Hkv, K, D]`` fp32 or bf16 → ``[Hkv, Kp / VL, D, VL]`` in the same dtype: VL centroids
    per block, one per SIMD lane (Kp = K rounded up to VL, zero padding). Built once per
    centroid tensor and cached on it (an in-place change of the centroids rebuilds it)."""
    hit = getattr(centroids, "_squeeze_packed", None)
    if hit is not None and hit[0] == version(centroids):
        return hit[1]
    vl = native.build_info("centroid_scores").vector_width
    hkv, k, d = centroids.shape
    kp = -(-k // vl) * vl
    padded = torch.zeros(hkv, kp, d, dtype=centroids.dtype)
    padded[:, :k] = centroids
    out = padded.view(hkv, kp // vl, vl, d).transpose(2, 3).contiguous()
    centroids._squeeze_packed = (version(centroids), out)
    return out


def packed_spread(spread: torch.Tensor, kp: int) -> torch.Tensor:
    """``[Hkv, K]`` spreads → ``[Hkv, Kp]`` fp32, zero padding; cached on ``spread`` as the
    centroids' packing is."""
    hit = getattr(spread, "_squeeze_packed", None)
    if hit is not None and hit[0] == version(spread) and hit[1].shape[1] == kp:
        return hit[1]
    out = torch.zeros(spread.shape[0], kp, dtype=torch.float32)
    out[:, : spread.shape[1]] = spread
    spread._squeeze_packed = (version(spread), out)
    return out


def centroid_scores_native(
    q, centroids, log_counts, scale, reduce, runs, extra, per_row=False, spread=None
):
    """``(block [B, Hkv, K], rows [B, Hkv, M, K] or None)`` fp32; ``runs``: ``(ptr, start, end)``
    CSR cluster ranges to score per (batch row, head), or ``None`` for all; ``spread``:
    ``[Hkv, K]`` fp32 ``σ²/2`` added as ``scale²·|q|²·spread`` to every logit, or ``None``."""
    b, hkv, g, m, d = q.shape
    k = centroids.shape[1]
    if centroids.shape != (hkv, k, d) or centroids.dtype not in CENTROID_DTYPES:
        raise ValueError(
            f"centroids must be fp32 or bf16 [{hkv}, K, {d}], got {centroids.dtype} "
            f"{tuple(centroids.shape)}"
        )
    if spread is not None and spread.shape != (hkv, k):
        raise ValueError(f"spread must be [{hkv}, {k}], got {tuple(spread.shape)}")
    r = g * m
    rp = -(-r // ROW_BLOCK) * ROW_BLOCK
    qs = q.reshape(b * hkv, r, d).to(torch.float32).contiguous()  # the kernel scales and pads
    c = packed_centroids(centroids)
    sp = None if spread is None else packed_spread(spread, c.shape[1] * c.shape[3])
    lc = log_counts.to(torch.float32).contiguous()
    if runs is None:
        ptr, start, end = _every_cluster(b * hkv, k)
    else:
        ptr, start, end = (t.to(torch.int64).contiguous() for t in runs)
    ex = None if extra is None else extra.to(torch.float32).contiguous()
    out = torch.empty(b, hkv, k, dtype=torch.float32)
    rows = torch.full((b, hkv, m, k), NEG_INF) if per_row else None
    threads = max(1, min(torch.get_num_threads(), b * hkv))
    if b * centroids.numel() * centroids.element_size() < native.SERIAL_BYTES:
        threads = 1  # waking a sleeping OpenMP worker costs more than scoring this many
    dq = d + (spread is not None)
    per_thread = (rp + g) * c.shape[1] * c.shape[3] + rp * dq
    scratch = buffer("centroid_scores", threads * per_thread, torch.float32)
    rc = native.bind("centroid_scores", _Kernel).fn(
        qs.data_ptr(), scale, c.data_ptr(), native.DTYPE_CODES[centroids.dtype],
        None if sp is None else sp.data_ptr(), lc.data_ptr(),
        ptr.data_ptr(), start.data_ptr(), end.data_ptr(),
        None if ex is None else ex.data_ptr(),
        b * hkv, hkv, k, g, m, d, int(reduce == "mean"),
        out.data_ptr(), None if rows is None else rows.data_ptr(),
        scratch.data_ptr(), scratch.numel(), threads, start.numel(),
    )  # fmt: skip
    if rc == -2:
        raise ValueError(f"cluster runs out of bounds: each must lie in [0, K = {k}]")
    if rc != 0:
        raise RuntimeError(f"native centroid_scores failed with code {rc}")
    return out, rows


@functools.cache
def _every_cluster(bh: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The runs scoring every cluster, one per (batch row, head): ``(ptr, start, end)``, made
    once per shape (the kernel only reads them)."""
    ptr = torch.arange(bh + 1, dtype=torch.int64)
    return ptr, torch.zeros(bh, dtype=torch.int64), torch.full((bh,), k, dtype=torch.int64)
