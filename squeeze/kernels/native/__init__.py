"""Build and load the native (C) kernels of this folder with the system C compiler.

The C sources sit beside this module: ``sparse_attention.c``, ``centroid_scores.c`` and
``kmeans.c``, sharing the SIMD helpers of ``simd.h``. ``load(name)`` compiles ``<name>.c`` once into
a shared library cached under ``$SQUEEZE_CACHE_DIR`` (default ``~/.cache/squeeze/``), keyed by a
hash of the sources, the flags, the compiler's version and the CPU (the build uses
``-march=native``), and opens it with ctypes. When no compiler is found or the build fails,
``load`` returns ``None``; ``available`` and ``unavailable_reason`` report why without raising
(:mod:`squeeze.kernels.dispatch` logs it once, when an operation falls back). A failed build is
remembered beside the libraries (``*.failed``); delete the cache directory to retry.

``bind(name, make)`` types a library's functions once; ``build_info(name)`` says what a library
was built for (the element types it reads, its SIMD width): the facts the dispatcher's capability
table defers to the build. ``DTYPE_CODES`` are the element-type codes of the C side (``DT_*``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("squeeze")

CSRC = Path(__file__).resolve().parent
#: element-type codes of the C kernels (``DT_*`` in ``simd.h``)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BASE_FLAGS = ("-O3", "-fno-math-errno", "-std=gnu11", "-shared", "-fPIC")
# Tried in order until one builds. OpenMP: the libgomp loaded with torch is shared, not a second one.
FLAG_VARIANTS = (("-march=native", "-fopenmp"), ("-march=native",), ("-fopenmp",), ())

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}
_bound: dict[tuple[str, object], tuple[ctypes.CDLL, object]] = {}
_reasons: dict[str, str] = {}


def cache_dir() -> Path:
    """Directory of the compiled libraries: ``$SQUEEZE_CACHE_DIR/native`` or ``~/.cache/squeeze/native``."""
    root = os.environ.get("SQUEEZE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "squeeze"
    )
    return Path(root) / "native"


def _writable_cache_dir() -> Path:
    """``cache_dir()``, or a per-user temp directory when that cannot be written."""
    out = cache_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if os.access(out, os.W_OK):
            return out
    except OSError:
        pass
    uid = getattr(os, "getuid", lambda: 0)()
    fallback = Path(tempfile.gettempdir()) / f"squeeze-native-{uid}"
    logger.info("squeeze: %s is not writable, building native kernels in %s", out, fallback)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cpu_fingerprint() -> str:
    """The CPU model and feature flags: ``-march=native`` code must not move to another CPU."""
    lines = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features", "CPU part")):
                    lines.append(line.strip())
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        pass
    return "\n".join(lines)


def _build(name: str) -> ctypes.CDLL:
    src = CSRC / f"{name}.c"
    source = b"\0".join([src.read_bytes()] + [h.read_bytes() for h in sorted(CSRC.glob("*.h"))])
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
    version = subprocess.run(
        [cc, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    out_dir = _writable_cache_dir()
    errors = []
    for extra in FLAG_VARIANTS:
        flags = (*BASE_FLAGS, *extra)
        key = hashlib.sha256(
            b"\0".join(
                [source, " ".join(flags).encode(), version.encode(), _cpu_fingerprint().encode()]
            )
        ).hexdigest()[:20]
        so = out_dir / f"{name}-{key}.so"
        failed = so.with_suffix(".failed")  # remembers a failed build of this exact key
        if failed.exists():
            errors.append(failed.read_text())
            continue
        if not so.exists():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=out_dir)
            os.close(fd)
            cmd = [cc, *flags, str(src), "-o", tmp, "-lm"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if proc.returncode == 0:
                    os.replace(tmp, so)  # atomic: concurrent builders each rename a whole file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            if proc.returncode != 0:
                errors.append(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")
                failed.write_text(errors[-1])
                continue
        if errors:  # built, but only with reduced flags (no OpenMP: single-threaded)
            logger.warning(
                "squeeze: native kernel %r built with %s only: %s", name, " ".join(flags), errors[0]
            )
        return ctypes.CDLL(str(so))
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
        dtypes: element types its kernels read (fp16 only where the compiler has ``_Float16``).
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
    "centroid_scores": lambda i: BuildInfo((torch.float32,), i),
    "kmeans": lambda i: BuildInfo(_coded_dtypes(i), (i >> 16) & 0xFF, (i >> 8) & 0xFF),
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
