"""The native kernels' build cache: a private directory, atomic builds, retried failures, and
libraries loaded only from files this user wrote.

* **The directory** is ``$SQUEEZE_CACHE_DIR/native`` (default ``~/.cache/squeeze/native``),
  created ``0700``. Before a library is loaded from it, it must be a real directory (not a
  symlink), owned by this user and not writable by group or others; a readable one is tightened
  to ``0700``. One that fails, or cannot be created, is not used: this process builds into a
  fresh private ``mkdtemp`` directory instead (removed at exit), and says why once. There is
  no predictable shared fallback.
* **A library** is opened without following symlinks and checked (a regular, non-empty file
  owned by this user, not writable by group or others) and then loaded through
  ``/proc/self/fd`` where that exists, so the file checked is the file loaded.
* **A build** writes a temporary file of the directory and renames it over the library
  (atomic: concurrent builders each rename a whole file). Its key hashes the sources, the
  flags, the compiler (path, size, modification time and ``--version``) and the CPU.
* **A failed build** leaves ``<name>-<key>.failed`` holding the error: a changed source, flag
  set or compiler is another key and is built; the same key is retried after
  :data:`RETRY_AFTER_S`. A cached library that is empty or does not load is removed and
  rebuilt once; when the rebuilt one does not load either, the kernel is unavailable (one log
  line; the dispatcher falls back to the PyTorch reference).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from ...logs import log_once

logger = logging.getLogger("squeeze")

#: seconds after which a failed build of the same sources, flags and compiler is tried again
RETRY_AFTER_S = 3600.0
_session: list[Path] = []  # this process's private fallback directory, made on first need
_open_fds: list[int] = []  # fds of loaded libraries: their /proc/self/fd names stay unique


def cache_dir() -> Path:
    """Directory of the compiled libraries: ``$SQUEEZE_CACHE_DIR/native`` or ``~/.cache/squeeze/native``."""
    root = os.environ.get("SQUEEZE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "squeeze"
    )
    return Path(root) / "native"


def _euid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def untrusted(directory: Path) -> str | None:
    """Why ``directory`` must not hold libraries this process loads, or ``None``; a directory
    only others can read is tightened to ``0700``."""
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        return "it is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    uid = _euid()
    if uid is not None and st.st_uid != uid:
        return f"it is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)
    if not os.access(directory, os.W_OK | os.X_OK):
        return "it is not writable"
    return None


def private_dir() -> Path:
    """:func:`cache_dir` when it is private (created ``0700``), else this process's own
    temporary directory."""
    out = cache_dir()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(out, 0o700)
        problem = untrusted(out)
    except OSError as err:
        problem = f"it cannot be created ({err.strerror or err})"
    if problem is None:
        return out
    if not _session:
        _session.append(Path(tempfile.mkdtemp(prefix="squeeze-native-")))
        atexit.register(shutil.rmtree, _session[0], ignore_errors=True)
    log_once(
        logger, ("native-cache", str(out)),
        "squeeze: not using the native build cache %s (%s); building in %s for this process",
        out, problem, _session[0], level=logging.INFO,
    )  # fmt: skip
    return _session[0]


def compiler() -> tuple[str, str] | None:
    """``(path, identity)`` of the C compiler (``$CC``, cc, gcc, clang): the identity hashes
    its real path, size, modification time and ``--version``."""
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(cand) if cand else None
        if path:
            real = os.path.realpath(path)
            st = os.stat(real)
            version = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=30
            ).stdout.strip()
            return path, f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{version}"
    return None


def cpu_fingerprint() -> str:
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


def build_key(source: bytes, flags: tuple[str, ...], compiler_id: str) -> str:
    parts = [source, " ".join(flags).encode(), compiler_id.encode(), cpu_fingerprint().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def recent_failure(marker: Path) -> str | None:
    """The error a failed build left in ``marker``, while it is younger than RETRY_AFTER_S."""
    try:
        st = os.lstat(marker)
        if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime > RETRY_AFTER_S:
            return None
        return marker.read_text(errors="replace")
    except OSError:
        return None


def compile_to(cc: str, flags: tuple[str, ...], src: Path, so: Path) -> str | None:
    """Build ``src`` into ``so`` (a temporary file of its directory, renamed over it); the
    error text, or ``None``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{so.stem}-", suffix=".so", dir=so.parent)
    os.close(fd)
    cmd = [cc, *flags, str(src), "-o", tmp, "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}"
        os.chmod(tmp, 0o700)
        os.replace(tmp, so)
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return f"`{' '.join(cmd)}` failed: {err}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checked(so: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)``, or ``(None, why)`` for a missing, foreign, writable-by-others,
    empty or unloadable file. The file is opened once, checked, and loaded by its descriptor."""
    try:
        fd = os.open(so, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, "not built"
    except OSError as err:
        return None, f"cannot be opened ({err.strerror or err})"
    st = os.fstat(fd)
    uid = _euid()
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif uid is not None and st.st_uid != uid:
        why = f"is owned by uid {st.st_uid}, not by this user"
    elif st.st_mode & 0o022:
        why = "is writable by group or others"
    elif st.st_size == 0:
        why = "is empty"
    if why is None:
        by_fd = f"/proc/self/fd/{fd}"
        try:
            lib = ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(so))
            _open_fds.append(fd)
            return lib, None
        except OSError as err:
            why = f"does not load ({err})"
    os.close(fd)
    return None, why
