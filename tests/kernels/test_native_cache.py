"""The native build cache (issue 14, defects 4 and 6): a library planted where the cache would look
is never loaded, a failed build is retried when the compiler changes or after a while, and an
empty or unloadable cached library is rebuilt once, then falls back with a log line.

The builds use the smallest library (``centroid_scores.c``, about a second to compile).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from squeeze.kernels import native
from squeeze.kernels.native import cache

LIB = "centroid_scores"
CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None or not native.available(LIB), reason="no C compiler")

EVIL = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("SQUEEZE_TEST_PLANTED"), "w");
    if (f) { fputs("constructor ran", f); fclose(f); }
}
int squeeze_centroid_scores_info(void) { return 4; }
"""


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process state with no library loaded and no private fallback directory yet."""
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_reasons", {})
    monkeypatch.setattr(native, "_bound", {})
    monkeypatch.setattr(cache, "_session", [])
    monkeypatch.setenv("SQUEEZE_TEST_PLANTED", str(tmp_path / "planted-ran"))
    from squeeze import logs

    monkeypatch.setattr(logs, "_seen", set())
    return tmp_path


def _key_name(tmp_path, monkeypatch) -> str:
    """The file name the cache uses for LIB here (built once in a scratch cache)."""
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "scratch"))
    assert native.load(LIB) is not None
    names = sorted(p.name for p in (tmp_path / "scratch" / "native").glob(f"{LIB}-*.so"))
    native._libs.clear()
    return names[0]


def _replace(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` as a new file: the library this process has mapped from the old
    one must not be truncated under it (a SIGBUS later, at exit), so never write it in place."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(0o700)
    os.replace(tmp, path)


def _plant(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    src = directory.parent / "evil.c"
    src.write_text(EVIL)
    subprocess.run([CC, "-shared", "-fPIC", str(src), "-o", str(directory / name)], check=True)
    return directory / name


@pytest.mark.parametrize("how", ["group-writable", "foreign-owned", "symlink"])
def test_planted_library_in_an_untrusted_cache_is_never_loaded(fresh, monkeypatch, how):
    name = _key_name(fresh, monkeypatch)
    root = fresh / "shared"
    planted = _plant(root / "native", name)
    if how == "group-writable":
        os.chmod(root / "native", 0o775)
    elif how == "foreign-owned":
        if os.geteuid() != 0:
            pytest.skip("chown needs root")
        os.chown(root / "native", 65534, 65534)
        os.chmod(root / "native", 0o755)
    else:
        (root / "real").mkdir()
        shutil.move(str(root / "native"), str(root / "real" / "native"))
        os.symlink(root / "real" / "native", root / "native")
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(root))
    lib = native.load(LIB)
    assert not (fresh / "planted-ran").exists()  # the planted constructor never ran
    assert lib is not None and lib.squeeze_centroid_scores_info() >> 16 in (4, 8, 16)  # VL
    built = Path(cache._session[0])  # built in this process's private directory instead
    assert (built / name).is_file() and (os.stat(built).st_mode & 0o777) == 0o700
    assert planted.exists()


def test_no_predictable_fallback_when_the_cache_is_unwritable(fresh, monkeypatch):
    """The old fallback, $TMPDIR/squeeze-native-<uid>, is never used, even when planted."""
    name = _key_name(fresh, monkeypatch)
    tmpdir = fresh / "tmp"
    _plant(tmpdir / f"squeeze-native-{os.getuid()}", name)
    os.chmod(tmpdir / f"squeeze-native-{os.getuid()}", 0o700)
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    blocker = fresh / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(blocker))  # cache_dir() cannot be created
    assert native.load(LIB) is not None
    assert not (fresh / "planted-ran").exists()
    session = Path(cache._session[0])
    assert session.parent == tmpdir and session.name != f"squeeze-native-{os.getuid()}"


def test_planted_file_in_our_own_cache_is_replaced(fresh, monkeypatch):
    """A file in the private cache that is not this user's to trust (group-writable) is
    removed and rebuilt, not loaded."""
    name = _key_name(fresh, monkeypatch)
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(fresh / "mine"))
    planted = _plant(fresh / "mine" / "native", name)
    os.chmod(fresh / "mine" / "native", 0o700)
    os.chmod(planted, 0o777)
    assert native.load(LIB) is not None
    assert not (fresh / "planted-ran").exists()
    assert (planted.stat().st_mode & 0o022) == 0


def _fake_cc(path: Path, body: str) -> str:
    path.write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then echo fake-cc 1.0; exit 0; fi\n{body}\n'
    )
    path.chmod(0o755)
    return str(path)


def test_failed_build_is_retried_after_a_compiler_change(fresh, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(fresh / "c"))
    cc = _fake_cc(fresh / "cc", "echo 'cc: broken' >&2; exit 1")
    monkeypatch.setenv("CC", cc)
    assert native.load(LIB) is None and "broken" in native._reasons[LIB]
    markers = list((fresh / "c" / "native").glob("*.failed"))
    assert markers
    native._libs.clear()
    assert native.load(LIB) is None  # the same compiler: not retried while the marker is recent
    # the same path and --version, another compiler behind it (a fixed installation)
    time.sleep(0.01)
    _fake_cc(fresh / "cc", f'exec {CC} "$@"')
    native._libs.clear()
    assert native.load(LIB) is not None


def test_failed_build_is_retried_after_a_while(fresh, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(fresh / "c"))
    assert native.load(LIB) is not None
    so = next((fresh / "c" / "native").glob(f"{LIB}-*.so"))  # the first flag variant's
    marker = so.with_suffix(".failed")
    so.unlink()
    marker.write_text("a failure a moment ago")
    native._libs.clear()
    assert native.load(LIB) is not None and not so.exists()  # skipped: reduced flags instead
    old = time.time() - cache.RETRY_AFTER_S - 60
    os.utime(marker, (old, old))
    native._libs.clear()
    assert native.load(LIB) is not None and so.exists() and not marker.exists()


def test_empty_cached_library_is_rebuilt(fresh, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(fresh / "c"))
    assert native.load(LIB) is not None
    so = next((fresh / "c" / "native").glob(f"{LIB}-*.so"))
    _replace(so, b"")
    native._libs.clear()
    lib = native.load(LIB)
    assert lib is not None and so.stat().st_size > 0


def test_unloadable_library_is_rebuilt_once_then_falls_back(fresh, monkeypatch, caplog):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(fresh / "c"))
    assert native.load(LIB) is not None
    so = next((fresh / "c" / "native").glob(f"{LIB}-*.so"))
    _replace(so, b"not ELF")
    calls = []

    def broken_compiler(cc, flags, src, out):
        calls.append(out)
        _replace(out, b"still not ELF")

    monkeypatch.setattr(cache, "compile_to", broken_compiler)
    native._libs.clear()
    with caplog.at_level(logging.INFO, logger="squeeze"):
        assert native.load(LIB) is None
    assert calls == [so]  # rebuilt once, then given up
    lines = [r for r in caplog.records if "after a rebuild" in r.getMessage()]
    assert len(lines) == 1 and "PyTorch reference" in lines[0].getMessage()
    assert "after a rebuild" in native.unavailable_reason(LIB)


def test_loaded_through_the_checked_descriptor(fresh, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(fresh / "c"))
    lib = native.load(LIB)
    assert isinstance(lib, ctypes.CDLL)
    if os.path.isdir("/proc/self/fd"):
        assert lib._name.startswith("/proc/self/fd/")
    assert (os.stat(fresh / "c" / "native").st_mode & 0o777) == 0o700
