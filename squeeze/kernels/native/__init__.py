"""Build and load the native (C) kernels of this folder with the system C compiler.

The C sources sit beside this module: ``sparse_attention.c``, ``centroid_scores.c``,
``segments.c``, ``finite.c``, ``kmeans.c`` and ``zone_estimate.c``, sharing the SIMD helpers of
``simd.h``.
``load(name)`` compiles ``<name>.c`` once into a shared library cached under
``$SQUEEZE_CACHE_DIR`` (default ``~/.cache/squeeze/``), keyed by a hash of the sources, the
flags, the compiler and the CPU (the build uses ``-march=native``), and
opens it with ctypes. The cache is private and checked before anything is loaded from it,
builds are atomic, failed builds are retried when something changes or after a while, and a
broken cached library is rebuilt once: :mod:`squeeze.kernels.native.cache`. When no compiler is
found or the build fails, ``load`` returns ``None``; ``available`` and ``unavailable_reason``
report why without raising (:mod:`squeeze.kernels.dispatch` logs it once, when an operation
falls back).

``bind(name, make)`` types a library's functions once; ``build_info(name)`` says what a library
was built for (the element types it reads, its SIMD width): the facts the dispatcher's capability
table defers to the build. ``DTYPE_CODES`` are the element-type codes of the C side (``DT_*``).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cache
from .cache import cache_dir  # noqa: F401  (the public name of the cache directory)

logger = logging.getLogger("squeeze")

CSRC = Path(__file__).resolve().parent
#: element-type codes of the C kernels (``DT_*`` in ``simd.h``)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: bytes a kernel call reads below which it runs on one thread (the sparse-attention and centroid
#: kernels): waking a sleeping OpenMP worker (passive waiting) costs about 75 us on a 2-core VM,
#: more than this much work on one core
SERIAL_BYTES = 1 << 20
BASE_FLAGS = ("-O3", "-fno-math-errno", "-std=gnu11", "-shared", "-fPIC")
# Tried in order until one builds. OpenMP: the libgomp loaded with torch is shared, not a second one.
FLAG_VARIANTS = (("-march=native", "-fopenmp"), ("-march=native",), ("-fopenmp",), ())

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}
_bound: dict[tuple[str, object], tuple[ctypes.CDLL, object]] = {}
_reasons: dict[str, str] = {}


def _build(name: str) -> ctypes.CDLL:
    src = CSRC / f"{name}.c"
    source = b"\0".join([src.read_bytes()] + [h.read_bytes() for h in sorted(CSRC.glob("*.h"))])
    found = cache.compiler()
    if found is None:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
    cc, identity = found
    out_dir = cache.private_dir()
    errors = []
    for extra in FLAG_VARIANTS:
        flags = (*BASE_FLAGS, *extra)
        so = out_dir / f"{name}-{cache.build_key(source, flags, identity)}.so"
        failed = so.with_suffix(".failed")  # a failed build of this exact key, while recent
        error = cache.recent_failure(failed)
        if error is not None:
            errors.append(error)
            continue
        lib, why = cache.load_checked(so)
        if lib is None and why != "not built":
            logger.info("squeeze: cached native kernel %s %s; rebuilding it", so, why)
            so.unlink(missing_ok=True)
        if lib is None:
            error = cache.compile_to(cc, flags, src, so)
            if error is not None:
                errors.append(error)
                failed.write_text(error)
                continue
            lib, why = cache.load_checked(so)
            if lib is None:
                failed.write_text(f"{so} {why}, after a rebuild")
                logger.warning(
                    "squeeze: native kernel %r %s after a rebuild; using the PyTorch reference",
                    name, why,
                )  # fmt: skip
                raise RuntimeError(f"{so} {why}, after a rebuild")
        failed.unlink(missing_ok=True)
        if errors:  # built, but only with reduced flags (no OpenMP: single-threaded)
            logger.warning(
                "squeeze: native kernel %r built with %s only: %s", name, " ".join(flags), errors[0]
            )
        return lib
    raise RuntimeError("\n".join(errors))


def load(name: str) -> ctypes.CDLL | None:
    """The compiled ``<name>.c`` as a ctypes library, or ``None`` (see :func:`unavailable_reason`)."""
    with _lock:
        if name not in _libs:
            try:
                _libs[name] = _build(name)
            except Exception as exc:  # no compiler, failed build, unwritable cache, ...
                _libs[name] = None
                _reasons[name] = f"{type(exc).__name__}: {exc}"
        return _libs[name]


def state() -> int:
    """Changes when the loaded libraries are forgotten (a fresh registry): decisions that
    depend on which libraries load (:mod:`squeeze.kernels.dispatch`) key on it."""
    return id(_libs)


def bind(name: str, make):
    """``make(lib)`` for the compiled ``<name>.c`` (an object holding its typed ctypes
    functions), made once per loaded library and ``make``; ``None`` when the library is
    unavailable."""
    lib = load(name)
    if lib is None:
        return None
    hit = _bound.get((name, make))
    if hit is None or hit[0] is not lib:
        hit = _bound[name, make] = (lib, make(lib))
    return hit[1]


@dataclass(frozen=True)
class BuildInfo:
    """What a native library was built for.

    Attributes:
        dtypes: element types its kernels read (K/V, centroids or points; fp16 only where the
            compiler has ``_Float16``).
        vector_width: floats per SIMD vector (``VL``); some kernels need ``D % vector_width == 0``.
        panel: centroids per register block of the k-means assignment (``NC``; 0 elsewhere).
    """

    dtypes: tuple[torch.dtype, ...]
    vector_width: int
    panel: int = 0


def _coded_dtypes(info: int) -> tuple[torch.dtype, ...]:
    return tuple(dt for dt, code in DTYPE_CODES.items() if info & (1 << code))


#: how each library's ``squeeze_<name>_info()`` encodes its build
_DECODE = {
    "sparse_attention": lambda i: BuildInfo(_coded_dtypes(i), i >> 16),
    "centroid_scores": lambda i: BuildInfo(_coded_dtypes(i), i >> 16),
    "kmeans": lambda i: BuildInfo(_coded_dtypes(i), (i >> 16) & 0xFF, (i >> 8) & 0xFF),
    "segments": lambda i: BuildInfo(_coded_dtypes(i), i >> 16),
    "finite": lambda i: BuildInfo(_coded_dtypes(i), i >> 16),
    "zone_estimate": lambda i: BuildInfo(_coded_dtypes(i), i >> 16),
}


def _read_info(name: str):
    def make(lib: ctypes.CDLL) -> BuildInfo:
        fn = getattr(lib, f"squeeze_{name}_info")
        fn.restype = ctypes.c_int32
        return _DECODE[name](int(fn()))

    return make


_INFO_READERS = {name: _read_info(name) for name in _DECODE}


def build_info(name: str) -> BuildInfo | None:
    """What the compiled ``<name>.c`` was built for; ``None`` when it is unavailable."""
    return bind(name, _INFO_READERS[name])


def available(name: str = "sparse_attention") -> bool:
    """Whether ``<name>.c`` compiles and loads on this machine (builds it on first call)."""
    return load(name) is not None


def unavailable_reason(name: str = "sparse_attention") -> str | None:
    """Why ``load(name)`` returned ``None``; ``None`` if the library is available."""
    load(name)
    return _reasons.get(name)
