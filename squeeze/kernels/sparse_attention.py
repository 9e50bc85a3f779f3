"""Sparse attention over selected token segments of a cluster-ordered context, with its LSE.

The context's keys/values of one layer are stored per KV head in cluster order, ``k, v [Hkv, N, D]``,
so a selection of clusters is a list of contiguous ``[start, end)`` token segments per KV head, given
in CSR form: the segments of (batch ``b``, KV head ``h``) are
``seg_start/seg_end[seg_ptr[b * Hkv + h] : seg_ptr[b * Hkv + h + 1]]``. The queries of one KV head's
GQA group (and the M question rows) are packed as rows, ``q [B, Hkv, R, D]``. No mask: every context
key precedes the queries. The result comes with its log-sum-exp, to be merged with a dense tail.

Backends (``backend=`` or ``$SQUEEZE_BACKEND``):
  * ``"native"``: the C kernel in ``csrc/sparse_attention.c`` (CPU; K/V fp32, bf16, and fp16 where
    the compiler has ``_Float16``), reading the selected rows in place. Auto for CPU when R is small.
  * ``"torch"``: gather the selected rows of each KV head into a reused buffer (one ``index_select``)
    and run attention per (b, h) on them (the CPU flash kernel, which returns the LSE; matmul +
    softmax elsewhere). Auto for large R (prefill) and for non-CPU tensors.
  * ``"triton"``: the Triton flash kernel in ``sparse_attention_triton.py`` (flash-decoding chunks
    balanced across heads, GQA group packed as tile rows). Auto for CUDA tensors; on CPU tensors
    only when forced, under ``TRITON_INTERPRET=1``. Rules shared with the other ops: ``backend.py``.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading

import torch

from squeeze.kernels import backend as _backend
from squeeze.kernels import native
from squeeze.kernels.sparse_attention_indexed import attend_index_lists
from squeeze.validation import check_same_device, check_tensor

logger = logging.getLogger("squeeze")

QK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# auto: the native kernel up to this many packed rows R (per K/V dtype), gather + flash above.
# Crossovers measured at Hkv=8, D=128, N=32K, 10% selected (2-core Sapphire Rapids, where torch's
# bf16 flash kernel uses AMX): fp32 ~200 rows, bf16 ~32, fp16 ~48.
NATIVE_MAX_ROWS = {torch.float32: 128, torch.bfloat16: 24, torch.float16: 32}
NATIVE_MIN_CHUNK = 128  # fewest tokens per parallel work chunk in the native kernel
_KV_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_BUFFER_CACHE_MAX = 64 << 20  # bytes; larger scratch is allocated per call, not kept
_local = threading.local()
_logged: set[str] = set()


def sparse_attention(
    q, k, v, seg_ptr, seg_start, seg_end, *, scale=None, backend=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed queries over the selected segments of each KV head.

    Args:
        q: ``[B, Hkv, R, D]`` fp32 / bf16 / fp16 packed query rows.
        k, v: ``[Hkv, N, D]`` context keys / values in cluster order, one dtype (fp32 / bf16 / fp16).
        seg_ptr: ``[B * Hkv + 1]`` int64 CSR offsets into ``seg_start`` / ``seg_end``.
        seg_start, seg_end: ``[S]`` int64 token ranges ``[start, end)`` into ``k[h]`` / ``v[h]``;
            the segments of one (b, h) are disjoint (overlaps would be counted twice); empty
            segments are allowed.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``None`` (auto), ``"torch"``, ``"native"`` or ``"triton"``.
    Returns:
        ``out [B, Hkv, R, D]`` float32 and ``lse [B, Hkv, R]`` float32 (natural log of the sum of
        ``exp(scale * q.k)``); a (b, h) without keys gives ``out`` 0 and ``lse`` -inf.
    """
    scale = _check_inputs(q, k, v, seg_ptr, seg_start, seg_end, scale, values=False)
    name = select_backend(q, k, backend=backend)
    if not (name == "triton" and q.device.type == "cuda"):  # no host sync in a CUDA decode step
        _check_segments(seg_ptr, seg_start, seg_end, k.shape[1])
    return _IMPLS[name](q, k, v, seg_ptr, seg_start, seg_end, scale)


def sparse_attention_reference(
    q, k, v, seg_ptr, seg_start, seg_end, *, scale=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch oracle: expand each (b, h)'s segments to token indices, gather, fp32 softmax."""
    scale = _check_inputs(q, k, v, seg_ptr, seg_start, seg_end, scale)
    lens = (seg_end - seg_start).tolist()
    starts = seg_start.tolist()
    idx = torch.cat(
        [torch.zeros(0, dtype=torch.int64)]
        + [torch.arange(s, s + n) for s, n in zip(starts, lens, strict=True)]
    ).to(q.device)
    ptr = [0]
    for lo, hi in zip(seg_ptr[:-1].tolist(), seg_ptr[1:].tolist(), strict=True):
        ptr.append(ptr[-1] + sum(lens[lo:hi]))
    return attend_index_lists(q, k, v, ptr, idx, scale)


def select_backend(q: torch.Tensor, k: torch.Tensor, backend: str | None = None) -> str:
    """The backend ``sparse_attention`` uses for these tensors: ``"native"``, ``"torch"`` or
    ``"triton"``.

    An explicit ``backend`` that cannot run here raises; ``$SQUEEZE_BACKEND`` naming a backend that
    cannot run here is logged once and the automatic choice is used.
    """
    if backend is not None:
        if backend not in _IMPLS:
            raise ValueError(f"backend must be None or one of {sorted(_IMPLS)}, got {backend!r}")
        if backend == "native":
            _require_native(q, k)
        if backend == "triton":
            _backend.use_triton("sparse_attention", q.device, backend="triton")  # raises if not
        return backend
    env = os.environ.get("SQUEEZE_BACKEND", "").strip().lower()
    if env:
        if env not in ("torch", "native", "triton"):
            raise ValueError(f"$SQUEEZE_BACKEND must be torch, native or triton, got {env!r}")
        if env == "torch" or (env == "native" and _native_reason(q, k) is None):
            return env
        if env == "triton" and _backend.triton_reason(q.device) is None:
            return env
        _log_once(f"env:{env}", f"$SQUEEZE_BACKEND={env} cannot run sparse_attention here; auto")
    if q.device.type == "cuda" and _backend.use_triton("sparse_attention", q.device):
        return "triton"
    if q.device.type == "cpu" and q.shape[2] <= NATIVE_MAX_ROWS.get(k.dtype, 0):
        reason = _native_reason(q, k)
        if reason is None:
            return "native"
        if _native_kernel() is not None:  # else native.load has logged why, once
            _log_once(f"auto:{reason}", f"sparse_attention uses the PyTorch path: {reason}")
    return "torch"


# ----------------------------------------------------------------------------- validation


def _check_inputs(q, k, v, seg_ptr, seg_start, seg_end, scale, values=True) -> float:
    check_tensor("q", q, 4, layout="[B, Hkv, R, D]")
    check_tensor("k", k, 3, layout="[Hkv, N, D]")
    check_tensor("v", v, 3, layout="[Hkv, N, D]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in QK_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if v.dtype != k.dtype:
        raise TypeError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    if v.shape != k.shape:
        raise ValueError(
            f"v must have k's shape {tuple(k.shape)} [Hkv, N, D], got {tuple(v.shape)}"
        )
    B, Hkv, _, D = q.shape
    if k.shape[0] != Hkv:
        raise ValueError(f"k must have Hkv={Hkv} heads (q.shape[1]), got shape {tuple(k.shape)}")
    if k.shape[2] != D:
        raise ValueError(f"k must have head size D={D} (q.shape[3]), got shape {tuple(k.shape)}")
    for name, t in (("seg_ptr", seg_ptr), ("seg_start", seg_start), ("seg_end", seg_end)):
        check_tensor(name, t, 1, layout="int64", floating=False)
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor, got {t.dtype}")
    if seg_ptr.numel() != B * Hkv + 1:
        raise ValueError(
            f"seg_ptr must have B * Hkv + 1 = {B * Hkv + 1} entries, got {seg_ptr.numel()}"
        )
    if seg_end.numel() != seg_start.numel():
        raise ValueError(
            f"seg_end must have seg_start's length {seg_start.numel()}, got {seg_end.numel()}"
        )
    check_same_device(q=q, k=k, v=v, seg_ptr=seg_ptr, seg_start=seg_start, seg_end=seg_end)
    if values:
        _check_segments(seg_ptr, seg_start, seg_end, k.shape[1])
    if scale is None:
        return D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_segments(seg_ptr, seg_start, seg_end, n: int) -> None:
    """Segment values, checked without touching the kernels (numpy on CPU: ~20 us for 2k segments)."""
    cpu = seg_ptr.device.type == "cpu"
    ptr, st, en = (t.numpy() if cpu else t for t in (seg_ptr, seg_start, seg_end))
    s = st.shape[0]
    if int(ptr[0]) != 0 or int(ptr[-1]) != s or bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(
            f"seg_ptr must rise from 0 to len(seg_start) = {s}, got {seg_ptr.tolist()}"
        )
    if s and bool(((st < 0) | (en < st) | (en > n)).any()):
        bad = int(((seg_start < 0) | (seg_end < seg_start) | (seg_end > n)).nonzero()[0, 0])
        raise ValueError(
            f"segments must satisfy 0 <= seg_start <= seg_end <= N = {n}; segment {bad} is "
            f"[{int(seg_start[bad])}, {int(seg_end[bad])})"
        )


# ----------------------------------------------------------------------------- native backend


class _NativeKernel:
    """The loaded C kernel: the typed ctypes function and what the build supports."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.fn = lib.squeeze_sparse_attention
        p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        self.fn.argtypes = [p, p, p, i32, p, p, p, i64, i64, i64, i64, i64, p, p, p, i64, i32, i64]
        self.fn.restype = i64
        lib.squeeze_sparse_attention_info.restype = i32
        info = lib.squeeze_sparse_attention_info()
        self.dtypes = tuple(dt for dt, code in _KV_CODES.items() if info & (1 << code))
        self.vector_width = info >> 16


def _native_kernel() -> _NativeKernel | None:
    return native.bind("sparse_attention", _NativeKernel)


def native_dtypes() -> tuple[torch.dtype, ...]:
    """K/V dtypes the native kernel reads (fp16 needs the compiler's ``_Float16``); () if none."""
    kernel = _native_kernel()
    return kernel.dtypes if kernel is not None else ()


def native_vector_width() -> int:
    """SIMD width (floats) the native kernel was built for; D must be a multiple of it (0: none)."""
    kernel = _native_kernel()
    return kernel.vector_width if kernel is not None else 0


def _native_reason(q, k) -> str | None:
    """Why the native kernel cannot take these tensors, or None."""
    if q.device.type != "cpu":
        return f"the native kernel is CPU-only (tensors on {q.device})"
    kernel = _native_kernel()
    if kernel is None:
        return f"native kernel unavailable ({native.unavailable_reason('sparse_attention')})"
    if k.dtype not in kernel.dtypes:
        return f"the native kernel was built without {k.dtype} support"
    if k.shape[2] % kernel.vector_width != 0:
        return f"the native kernel needs D % {kernel.vector_width} == 0, got D={k.shape[2]}"
    return None


def _require_native(q, k) -> None:
    reason = _native_reason(q, k)
    if reason is not None:
        raise (ValueError if q.device.type != "cpu" else RuntimeError)(
            f"backend='native' cannot run: {reason}"
        )


def _native(q, k, v, seg_ptr, seg_start, seg_end, scale):
    fn = _native_kernel().fn
    B, Hkv, R, D = q.shape
    out = torch.empty(B, Hkv, R, D, dtype=torch.float32)
    lse = torch.empty(B, Hkv, R, dtype=torch.float32)
    if out.numel() == 0 or lse.numel() == 0:
        return out, lse.fill_(float("-inf"))
    qs = q.to(torch.float32).mul(scale).contiguous()  # fresh tensor: the scaled fp32 queries
    if not (k.is_contiguous() and v.is_contiguous()):
        _log_once("contiguous", "sparse_attention copies non-contiguous k / v on every call")
        k, v = k.contiguous(), v.contiguous()
    seg_ptr, seg_start, seg_end = seg_ptr.contiguous(), seg_start.contiguous(), seg_end.contiguous()
    threads = torch.get_num_threads()
    scratch = _buffer("native_scratch", 1 << 16, torch.float32)
    for _ in range(2):
        rc = fn(
            qs.data_ptr(), k.data_ptr(), v.data_ptr(), _KV_CODES[k.dtype],
            seg_ptr.data_ptr(), seg_start.data_ptr(), seg_end.data_ptr(),
            B, Hkv, k.shape[1], R, D, out.data_ptr(), lse.data_ptr(),
            scratch.data_ptr(), scratch.numel(), threads, NATIVE_MIN_CHUNK,
        )  # fmt: skip
        if rc <= 0:
            break
        scratch = _buffer("native_scratch", rc, torch.float32)  # grow, then run again
    if rc != 0:
        raise RuntimeError(f"native sparse_attention failed with code {rc}")
    return out, lse


# ----------------------------------------------------------------------------- torch backend


def _gather_rows(k, seg_ptr, seg_start, seg_end):
    """Rows of ``k.view(Hkv * N, D)`` selected for each (b, h), concatenated, and per-(b, h) counts."""
    Hkv, N, _ = k.shape
    bh = seg_ptr.numel() - 1
    lens = seg_end - seg_start
    seg_bh = torch.repeat_interleave(
        torch.arange(bh, device=k.device), seg_ptr[1:] - seg_ptr[:-1], output_size=lens.numel()
    )
    first = (seg_bh % Hkv) * N + seg_start  # global row of each segment's first token
    per_bh = torch.zeros(bh, dtype=torch.int64, device=k.device).index_add_(0, seg_bh, lens)
    counts = per_bh.tolist()
    total = sum(counts)
    seg_of_tok = torch.repeat_interleave(
        torch.arange(lens.numel(), device=k.device), lens, output_size=total
    )
    offset = torch.cumsum(lens, 0) - lens  # first token of each segment in the concatenation
    pos = torch.arange(total, device=k.device)
    rows = first[seg_of_tok] + (pos - offset[seg_of_tok])
    return rows, counts


def _torch(q, k, v, seg_ptr, seg_start, seg_end, scale):
    B, Hkv, R, D = q.shape
    out = torch.zeros(B * Hkv, R, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B * Hkv, R), float("-inf"), dtype=torch.float32, device=q.device)
    rows, counts = _gather_rows(k, seg_ptr, seg_start, seg_end)
    total = rows.numel()
    if total == 0 or R == 0:
        return out.view(B, Hkv, R, D), lse.view(B, Hkv, R)
    dtype = k.dtype if q.dtype == k.dtype else torch.float32
    flat_k, flat_v = k.reshape(-1, D), v.reshape(-1, D)
    kg = _buffer("gather_k", total * D, k.dtype, k.device).view(total, D)
    vg = _buffer("gather_v", total * D, k.dtype, k.device).view(total, D)
    torch.index_select(flat_k, 0, rows, out=kg)
    torch.index_select(flat_v, 0, rows, out=vg)
    kg, vg = kg.to(dtype), vg.to(dtype)
    qq = q.reshape(B * Hkv, R, D).to(dtype)
    start = 0
    for i, n in enumerate(counts):
        if n:
            o, l_ = _attend(qq[i], kg[start : start + n], vg[start : start + n], scale)
            out[i], lse[i] = o, l_
        start += n
    return out.view(B, Hkv, R, D), lse.view(B, Hkv, R)


def _attend(q, k, v, scale):
    """``q [R, D]`` over ``k, v [n, D]`` (n > 0), all one dtype: ``out [R, D]``, ``lse [R]``."""
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        o, lse = _FLASH_CPU(q[None, None], k[None, None], v[None, None], 0.0, False, scale=scale)
        return o[0, 0], lse[0, 0]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    step = max(1, (16 << 20) // max(1, k.shape[0]))  # query rows per block: ~64 MB of scores
    for r in range(0, q.shape[0], step):
        s = (q[r : r + step] @ k.T).float() * scale
        lse[r : r + step] = torch.logsumexp(s, dim=-1)
        out[r : r + step] = torch.exp(s - lse[r : r + step, None]) @ v.float()
    return out, lse


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _triton(q, k, v, seg_ptr, seg_start, seg_end, scale):
    from squeeze.kernels.sparse_attention_triton import sparse_attention_triton

    return sparse_attention_triton(q, k, v, seg_ptr, seg_start, seg_end, scale)


_IMPLS = {"torch": _torch, "native": _native, "triton": _triton}


# ----------------------------------------------------------------------------- helpers


def _buffer(name: str, numel: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A reused per-thread flat buffer of at least ``numel`` elements (page faults only on growth)."""
    device = torch.device(device or "cpu")
    nbytes = numel * dtype.itemsize
    if nbytes > _BUFFER_CACHE_MAX:
        return torch.empty(numel, dtype=dtype, device=device)
    cache = _local.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, int(1.25 * (buf.numel() if buf is not None else 0))),
                          dtype=dtype, device=device)  # fmt: skip
        cache[key] = buf
    return buf[:numel]


def _log_once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning("squeeze: %s", message)
