"""Native (C) backend of the k-means kernels: fused GEMM + argmax assignment and cluster sums.

The C code is ``csrc/kmeans.c``, built and cached by :mod:`squeeze.kernels.native`. The PyTorch
references live in :mod:`squeeze.kernels.assign` and :mod:`squeeze.kernels.centroid_update`,
which dispatch here through :func:`select_backend`:

  * ``backend="native"``: the C kernels (CPU tensors only; raises where they cannot run);
  * ``backend="torch"``: the PyTorch references;
  * ``None`` (auto): ``$SQUEEZE_BACKEND`` if it names a backend that can run here, else native for
    CPU tensors when the kernel builds, else torch. A native kernel that cannot be built is logged
    once (by :mod:`squeeze.kernels.native`), and so is an unusable ``$SQUEEZE_BACKEND``.

Both kernels accumulate in fp32 whatever the input dtype, so fp16 points of norm > 256 are safe.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from squeeze.kernels import native
from squeeze.kernels.backend import use_triton

logger = logging.getLogger("squeeze")

BACKENDS = ("native", "torch")
_DT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_logged: set[str] = set()


class _Kernel:
    """The loaded ``csrc/kmeans.c``: typed ctypes functions and what the build supports."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        self.assign = lib.squeeze_kmeans_assign
        self.assign.argtypes = [p, i64, i64, i64, i64, p, p, i64, i64, p, p, i64, i32]
        self.assign.restype = i64
        self.sums = lib.squeeze_kmeans_sums
        self.sums.argtypes = [p, i32, i64, i64, i64, p, p, i64, p, p, p, i32]
        self.sums.restype = i64
        self.pp_keys = lib.squeeze_kmeans_pp_keys
        self.pp_keys.argtypes = [p, p, ctypes.c_float, p, i32, p, p, p, i64, i32]
        self.pp_keys.restype = None
        lib.squeeze_kmeans_info.restype = i32
        info = lib.squeeze_kmeans_info()
        self.dtypes = tuple(dt for dt, code in _DT_CODES.items() if info & (1 << code))
        self.panel = (info >> 8) & 0xFF  # centroids per register block (NC)


def _native_kernel() -> _Kernel | None:
    return native.bind("kmeans", _Kernel)


def native_reason(x: torch.Tensor) -> str | None:
    """Why the native kernels cannot take points ``x``, or None."""
    if x.device.type != "cpu":
        return f"the native k-means kernels are CPU-only (tensors on {x.device})"
    kernel = _native_kernel()
    if kernel is None:
        return f"native kernel unavailable ({native.unavailable_reason('kmeans')})"
    if x.dtype not in (*kernel.dtypes, torch.float64):
        return f"the native k-means kernels were built without {x.dtype} support"
    return None


def select_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """``"native"`` or ``"torch"`` for points ``x``: explicit, ``$SQUEEZE_BACKEND``, or automatic.

    An explicit ``backend="native"`` that cannot run raises ``RuntimeError`` (``ValueError`` for
    non-CPU tensors).
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {list(BACKENDS)}, got {backend!r}")
        if backend == "native":
            reason = native_reason(x)
            if reason is not None:
                raise (ValueError if x.device.type != "cpu" else RuntimeError)(
                    f"backend='native' cannot run: {reason}"
                )
        return backend
    env = os.environ.get("SQUEEZE_BACKEND", "").strip().lower()
    if env:
        if env not in ("torch", "native", "triton"):
            raise ValueError(f"$SQUEEZE_BACKEND must be torch, native or triton, got {env!r}")
        if env == "torch" or (env == "native" and native_reason(x) is None):
            return env
        _log_once(f"env:{env}", f"$SQUEEZE_BACKEND={env} cannot run the k-means kernels here; auto")
    if x.device.type == "cpu":
        reason = native_reason(x)
        if reason is None:
            return "native"
        if _native_kernel() is not None:  # else native.load has logged why, once
            _log_once(f"auto:{reason}", f"k-means uses the PyTorch path: {reason}")
    return "torch"


def kernel_backend(op: str, x: torch.Tensor, backend: str | None = None) -> str:
    """``"triton"``, ``"native"`` or ``"torch"``: what k-means kernel ``op`` runs for points ``x``.

    ``backend="triton"`` forces Triton (raises where it cannot run), ``"native"`` / ``"torch"``
    force those; ``None``: Triton for CUDA tensors or under ``$SQUEEZE_BACKEND=triton`` where it
    can run (:func:`squeeze.kernels.backend.use_triton`), else :func:`select_backend`.
    """
    if backend not in (None, "triton", *BACKENDS):
        raise ValueError(f"backend must be None or one of {['triton', *BACKENDS]}, got {backend!r}")
    if backend in (None, "triton") and use_triton(op, x.device, backend):
        return "triton"
    return select_backend(x, None if backend == "triton" else backend)


def assign(
    x: torch.Tensor, centroids: torch.Tensor, half_sq: torch.Tensor | None, chunk_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Native :func:`squeeze.kernels.assign.assign`: labels [G, N] int64, best score [G, N] fp32.

    Non-fp32 points are converted ``chunk_n`` rows at a time (fp32 points are read in place).
    Extra memory: the packed centroids ([G, K, D] fp32, K rounded up to the panel width) and,
    for non-fp32 x, one [G, chunk_n, D] fp32 chunk.
    """
    kernel = _native_kernel()
    g, n, d = x.shape
    k = centroids.shape[1]
    nc = kernel.panel
    kb = -(-k // nc)
    cp = torch.zeros(g, kb * nc, d, dtype=torch.float32)
    cp[:, :k] = centroids
    cpack = cp.view(g, kb, nc, d).transpose(2, 3).contiguous()  # [G, KB, D, NC]
    del cp
    half = torch.full((g, kb * nc), float("inf"), dtype=torch.float32)
    if half_sq is None:
        half[:, :k] = 0.0
    else:
        half[:, :k] = half_sq
    labels = torch.empty(g, n, dtype=torch.int64)
    best = torch.empty(g, n, dtype=torch.float32)
    threads = torch.get_num_threads()
    fp32 = x.dtype == torch.float32 and x.stride(2) == 1 and x.stride(1) == d
    step = n if fp32 else max(1, chunk_n)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        part = x[:, n0:n1] if fp32 else x[:, n0:n1].to(torch.float32).contiguous()
        rc = kernel.assign(
            part.data_ptr(), g, n1 - n0, d, part.stride(0), cpack.data_ptr(), half.data_ptr(),
            kb, k - (kb - 1) * nc, labels[:, n0:].data_ptr(), best[:, n0:].data_ptr(), n, threads,
        )  # fmt: skip
        if rc != 0:
            raise MemoryError(f"native k-means assign failed with code {rc}")
    return labels, best


def cluster_sums(
    x: torch.Tensor, labels: torch.Tensor, k: int, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native cluster sums: sums [G, k, D] fp32, totals [G, k] fp32 and counts [G, k] int64.

    ``sums`` are Σ w'·x over each cluster's members and ``totals`` Σ w', with w' = w, or 1 for all
    members of a cluster whose weights sum to 0 (and everywhere without weights).
    """
    kernel = _native_kernel()
    g, n, d = x.shape
    if x.dtype == torch.float64 or x.dtype not in kernel.dtypes:
        x = x.to(torch.float32)
    x = x.contiguous()
    labels = labels.contiguous()
    w = None if weights is None else weights.to(torch.float32).contiguous()
    sums = torch.empty(g, k, d, dtype=torch.float32)
    totals = torch.empty(g, k, dtype=torch.float32)
    counts = torch.empty(g, k, dtype=torch.int64)
    rc = kernel.sums(
        x.data_ptr(), _DT_CODES[x.dtype], g, n, d, labels.data_ptr(),
        None if w is None else w.data_ptr(), k, sums.data_ptr(), totals.data_ptr(),
        counts.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc == -2:
        raise ValueError(f"labels must lie in [0, k) = [0, {k})")
    if rc != 0:
        raise RuntimeError(f"native k-means cluster sums failed with code {rc}")
    return sums, totals, counts


def pp_keys(
    best: torch.Tensor | None,
    x_sq: torch.Tensor,
    offset: float,
    d2: torch.Tensor,
    first: bool,
    u: torch.Tensor,
    logw: torch.Tensor | None,
    keys: torch.Tensor,
) -> None:
    """One k-means++ round's elementwise work in one pass, in place (all [G, N] fp32 contiguous).

    With ``best`` (best scores against the new centres): ``d2`` becomes (``first``: is set to)
    the squared distance ``max(x_sq + offset − 2·best, 0)`` where smaller. Then the Gumbel keys of
    the next draw: ``keys = log(d2) + logw − log(−log(u))`` (no ``log(d2)`` term without ``best``,
    no ``logw`` term without weights).
    """
    _native_kernel().pp_keys(
        None if best is None else best.data_ptr(), x_sq.data_ptr(), offset, d2.data_ptr(),
        int(first), u.data_ptr(), None if logw is None else logw.data_ptr(), keys.data_ptr(),
        x_sq.numel(), torch.get_num_threads(),
    )  # fmt: skip


def _log_once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning("squeeze: %s", message)
