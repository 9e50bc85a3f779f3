"""safetensors files, written safely and read with every tensor's digest verified.

:func:`write` streams the tensors into a fresh temporary file of the target's directory
(``mkstemp``: a unique name, created exclusively, so concurrent writers never share one and a
planted symlink is never followed), fsyncs it and renames it over the target with
``os.replace`` (atomic: a reader sees the old file or the new one, whole); on any failure the
temporary file is removed. The file is then given the mode a plain ``open`` would give it.

:func:`digest` is a tensor's SHA-256: over its bytes (index format 1), or over its dtype, its
shape and its bytes (``typed``, format 2), so that a file's header cannot reinterpret the bytes
of a signed tensor under another dtype or shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

#: safetensors dtype names of the tensors squeeze writes
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def _bytes(t: torch.Tensor):
    """The tensor's bytes as a flat uint8 numpy array (no copy for a contiguous CPU tensor)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def digest(t: torch.Tensor, typed: bool = True) -> str:
    """SHA-256 (hex) of ``t``'s bytes, preceded by its dtype and shape when ``typed``."""
    h = hashlib.sha256()
    if typed:
        h.update(f"{DTYPE_NAMES.get(t.dtype, str(t.dtype))}{list(t.shape)}\0".encode())
    h.update(_bytes(t).data)
    return h.hexdigest()


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write ``tensors`` and string ``metadata`` as a safetensors file at ``path``, atomically.

    Raises ``FileNotFoundError`` naming the directory when it does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which squeeze does not store")
    order = sorted(
        tensors, key=lambda n: (-tensors[n].element_size(), n)
    )  # aligned, as safetensors
    entries: dict = {"__metadata__": metadata}
    start = 0
    for name in order:
        t = tensors[name]
        end = start + t.numel() * t.element_size()
        entries[name] = {
            "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [start, end],
        }  # fmt: skip
        start = end
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for name in order:
                f.write(memoryview(_bytes(tensors[name])))
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_dir(path.parent)


def _sync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: not every platform opens directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
