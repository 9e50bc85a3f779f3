"""Centroid log-scores of a query group, over all clusters or only over runs of them.

``centroid_scores`` is the scoring half of the centroid lookup (the decision half, threshold or
top-k, stays in :mod:`squeeze.lookup`). For each KV head and cluster ``c`` it returns

    log S_c = reduce_g  log mean_m  exp(q_gm·c·scale) / (Σ_j N_j exp(q_gm·c_j·scale) + extra_gm)

over the clusters it scores (``-inf`` elsewhere and for empty clusters).

Backends (``backend=`` or ``$SQUEEZE_BACKEND``):
  * ``"native"``: ``csrc/centroid_scores.c`` (CPU, fp32 centroids, at most
    :data:`NATIVE_MAX_ROWS` packed query rows), on centroids packed one per SIMD lane
    (:func:`packed_centroids`, cached). It reads only the clusters inside the given runs: with a
    hierarchical index, the pruned level-2 centroids are never touched.
  * ``"torch"``: one batched matmul over every centroid, then the clusters outside the runs are
    masked out (on CPU, cheaper than gathering them); the reference.
"""

from __future__ import annotations

import ctypes
import math
import os

import torch

from . import native
from .backend import log_once

NEG_INF = float("-inf")
NATIVE_MAX_ROWS = 4096  # packed query rows G·M per KV head (scratch: rows × K floats per thread)


def centroid_logits(q: torch.Tensor, centroids: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [B, Hkv, G, M, D]`` · ``centroids [Hkv, K, D]`` → ``[B, Hkv, G, M, K]`` fp32 logits."""
    b, hkv, g, m, d = q.shape
    rows = q.to(torch.float32).reshape(b, hkv, g * m, d)
    logits = torch.matmul(rows, centroids.transpose(-1, -2)).mul_(scale)
    return logits.view(b, hkv, g, m, -1)


def reduce_scores(
    logits: torch.Tensor,
    log_counts: torch.Tensor,
    reduce: str,
    extra_log_den: torch.Tensor | None = None,
    per_row: bool = False,
):
    """``[B, Hkv, G, M, K]`` scaled logits and ``[B, Hkv, K]`` log sizes → ``[B, Hkv, K]`` scores.

    ``-inf`` log sizes mark clusters that are empty or not scored; ``extra_log_den``
    ``[B, Hkv, G, M]`` is log mass added to each row's denominator (pruned regions). With
    ``per_row``, also each row's own scores ``[B, Hkv, M, K]`` (reduced over G, not over M).
    """
    lc = log_counts[:, :, None, None, :]
    log_den = torch.logsumexp(logits + lc, dim=-1)  # [B, Hkv, G, M]
    if extra_log_den is not None:
        log_den = torch.logaddexp(log_den, extra_log_den)
    s = (logits - log_den[..., None]).masked_fill(torch.isneginf(lc).expand_as(logits), NEG_INF)
    m = logits.shape[3]
    block = torch.logsumexp(s, dim=3) - math.log(m) if m > 1 else s[:, :, :, 0]  # mean over rows
    if not per_row:
        return _reduce_heads(block, reduce, dim=2)
    return _reduce_heads(block, reduce, dim=2), _reduce_heads(s, reduce, dim=2)


def _reduce_heads(s: torch.Tensor, reduce: str, dim: int) -> torch.Tensor:
    if reduce == "max":
        return s.amax(dim=dim)
    return torch.logsumexp(s, dim=dim) - math.log(s.shape[dim])


def centroid_scores(
    q: torch.Tensor,
    centroids: torch.Tensor,
    log_counts: torch.Tensor,
    scale: float,
    reduce: str,
    *,
    scored: torch.Tensor | None = None,
    runs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    extra_log_den: torch.Tensor | None = None,
    per_row: bool = False,
    backend: str | None = None,
):
    """Log-scores ``[B, Hkv, K]`` fp32 of the clusters each (batch row, KV head) scores.

    Args:
        q: ``[B, Hkv, G, M, D]`` queries (any float dtype; math in fp32).
        centroids: ``[Hkv, K, D]`` float32.
        log_counts: ``[Hkv, K]`` float32 log cluster sizes (``-inf`` for empty clusters).
        scale: softmax scale.
        reduce: ``"max"`` or ``"mean"`` over the G query heads of a KV head.
        scored: ``[B, Hkv, K]`` bool, the clusters to score (``None``: all).
        runs: the same set as CSR cluster ranges ``(ptr [B·Hkv + 1], start [S], end [S])``;
            required with ``scored`` (the native kernel reads only these ranges).
        extra_log_den: ``[B, Hkv, G, M]`` fp32 log mass added to the denominators, or ``None``.
        per_row: also return each query row's scores ``[B, Hkv, M, K]`` (reduced over G only).
        backend: ``None`` (auto), ``"torch"`` or ``"native"``.
    """
    if (scored is None) != (runs is None):
        raise ValueError("scored and runs must be given together")
    if _use_native(q, centroids, backend):
        return _native(q, centroids, log_counts, scale, reduce, runs, extra_log_den, per_row)
    lc = log_counts[None] if scored is None else log_counts[None].masked_fill(~scored, NEG_INF)
    return reduce_scores(centroid_logits(q, centroids, scale), lc, reduce, extra_log_den, per_row)


# ----------------------------------------------------------------------------- dispatch


def _use_native(q, centroids, backend) -> bool:
    choice = backend or os.environ.get("SQUEEZE_BACKEND") or None
    if choice not in (None, "torch", "native", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'native', got {choice!r}")
    if choice in ("torch", "triton"):  # no Triton scoring kernel of its own: the matmul path
        return False
    reason = _native_reason(q, centroids)
    if reason is not None and choice == "native" and backend is not None:
        raise RuntimeError(f"backend='native' cannot run: {reason}")
    if reason is not None:
        log_once(f"centroid_scores:{reason}", f"centroid scores use the PyTorch path ({reason})")
    return reason is None


def _native_reason(q, centroids) -> str | None:
    if q.device.type != "cpu":
        return f"the native kernel is CPU-only (tensors on {q.device})"
    if centroids.dtype != torch.float32:
        return f"centroids are {centroids.dtype}, the native kernel reads fp32"
    if q.shape[2] * q.shape[3] > NATIVE_MAX_ROWS:
        return f"more than {NATIVE_MAX_ROWS} query rows per KV head (prefill block)"
    if _kernel() is None:
        return f"native kernel unavailable ({native.unavailable_reason('centroid_scores')})"
    return None


class _Kernel:
    """The loaded C kernel: its typed ctypes function and the SIMD width it was built for."""

    def __init__(self, lib: ctypes.CDLL):
        p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        self.fn = lib.squeeze_centroid_scores
        self.fn.argtypes = [
            p,
            p,
            p,
            p,
            p,
            p,
            p,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i32,
            p,
            p,
            p,
            i64,
            i32,
        ]
        self.fn.restype = i64
        lib.squeeze_centroid_scores_info.restype = i32
        self.vector_width = int(lib.squeeze_centroid_scores_info())


def _kernel() -> _Kernel | None:
    return native.bind("centroid_scores", _Kernel)


ROW_BLOCK = 4  # query rows per register block in the C kernel (RB)


def packed_centroids(centroids: torch.Tensor) -> torch.Tensor:
    """``[Hkv, K, D]`` fp32 → ``[Hkv, Kp / VL, D, VL]``: VL centroids per block, one per SIMD lane
    (Kp = K rounded up to VL, zero padding). Built once per centroid tensor and cached on it (an
    in-place change of the centroids rebuilds it)."""
    hit = getattr(centroids, "_squeeze_packed", None)
    if hit is not None and hit[0] == centroids._version:
        return hit[1]
    vl = _kernel().vector_width
    hkv, k, d = centroids.shape
    kp = -(-k // vl) * vl
    padded = torch.zeros(hkv, kp, d, dtype=torch.float32)
    padded[:, :k] = centroids
    out = padded.view(hkv, kp // vl, vl, d).transpose(2, 3).contiguous()
    centroids._squeeze_packed = (centroids._version, out)
    return out


def _native(q, centroids, log_counts, scale, reduce, runs, extra, per_row=False):
    b, hkv, g, m, d = q.shape
    k = centroids.shape[1]
    r = g * m
    rp = -(-r // ROW_BLOCK) * ROW_BLOCK
    qs = torch.zeros(b * hkv, rp, d, dtype=torch.float32)
    qs[:, :r] = q.reshape(b * hkv, r, d)
    qs.mul_(scale)
    c = packed_centroids(centroids)
    lc = log_counts.to(torch.float32).contiguous()
    if runs is None:  # every cluster: one run per (batch row, head)
        ptr = torch.arange(b * hkv + 1, dtype=torch.int64)
        start = torch.zeros(b * hkv, dtype=torch.int64)
        end = torch.full((b * hkv,), k, dtype=torch.int64)
    else:
        ptr, start, end = (t.to(torch.int64).contiguous() for t in runs)
    ex = None if extra is None else extra.to(torch.float32).contiguous()
    out = torch.empty(b, hkv, k, dtype=torch.float32)
    rows = torch.full((b, hkv, m, k), NEG_INF) if per_row else None
    threads = max(1, min(torch.get_num_threads(), b * hkv))
    scratch = torch.empty(threads * (rp + g) * c.shape[1] * c.shape[3], dtype=torch.float32)
    rc = _kernel().fn(
        qs.data_ptr(), c.data_ptr(), lc.data_ptr(),
        ptr.data_ptr(), start.data_ptr(), end.data_ptr(),
        None if ex is None else ex.data_ptr(),
        b * hkv, hkv, k, g, m, d, int(reduce == "mean"),
        out.data_ptr(), None if rows is None else rows.data_ptr(),
        scratch.data_ptr(), scratch.numel(), threads,
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"native centroid_scores failed (scratch {rc} floats needed)")
    return (out, rows) if per_row else out
