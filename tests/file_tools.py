"""Crafting index files the way an attacker would, for the file-safety tests (not a test module).

:func:`rewrite` reads a file with plain safetensors, lets a test change its squeeze header and
its tensors, recomputes every digest (the per-tensor SHA-256 values, and the context header's
own digest) exactly as the format defines them, and writes the result: a file whose checksums
all verify, whatever it now says. Nothing here calls squeeze, so the digests are an independent
reading of the format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def raw(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(squeeze header, tensors)`` of a file, read with safetensors only (nothing checked)."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["squeeze"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safe_open handle)
    return header, tensors


def tensor_digest(t: torch.Tensor, version: int) -> str:
    """A tensor's digest in index format ``version`` (2: over dtype, shape and bytes)."""
    h = hashlib.sha256()
    if version >= 2:
        h.update(f"{DTYPE_NAMES[t.dtype]}{list(t.shape)}\0".encode())
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def metadata_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write(path, header: dict | str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` with the squeeze header ``header`` (a dict, or raw text) as is."""
    text = header if isinstance(header, str) else json.dumps(header, sort_keys=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), {"squeeze": text})
    return Path(path)


def resign(header: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """``header`` with every digest recomputed for ``tensors`` (and the signature dropped)."""
    header = dict(header)
    header.pop("signature", None)
    version = header.get("format_version", 1)
    version = version if isinstance(version, int) else 1
    header["sha256"] = {name: tensor_digest(t, version) for name, t in tensors.items()}
    meta = header.get("metadata")
    if isinstance(meta, dict) and "digest" in meta:
        header["metadata"] = {**meta, "digest": metadata_digest(meta)}
    return header


def rewrite(src, dst, header_fn=None, tensors_fn=None, sign: bool = True) -> Path:
    """Copy ``src`` to ``dst`` through ``header_fn(header)`` and ``tensors_fn(tensors)`` (each
    edits in place or returns a replacement), the digests recomputed when ``sign``."""
    header, tensors = raw(src)
    if tensors_fn is not None:
        tensors = tensors_fn(tensors) or tensors
    if header_fn is not None:
        header = header_fn(header) or header
    if sign:
        header = resign(header, tensors)
    return write(dst, header, tensors)
