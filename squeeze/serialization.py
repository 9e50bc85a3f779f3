"""Index files: safetensors tensors plus a JSON header. Never pickle.

The header (safetensors metadata key ``"squeeze"``) holds the format version, the config, each
layer's scalar facts, caller metadata (model fingerprint, context hash) and a SHA-256 of every
tensor's bytes, so a truncated or altered file is refused with :class:`IndexFileError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .calibration import Calibration
from .config import SqueezeConfig
from .errors import IndexFileError
from .index import ClusterIndex

FORMAT = "squeeze-index"
FORMAT_VERSION = 1
_TENSORS = ("keys", "values", "positions", "centroids", "offsets", "l1_centroids", "l1_offsets")


def save_indexes(
    path: str | os.PathLike, indexes: list[ClusterIndex], metadata: dict[str, Any] | None = None
) -> None:
    """Write one index per layer to ``path`` (written to a temporary file, then renamed)."""
    if not indexes:
        raise ValueError("indexes must hold at least one ClusterIndex")
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, index in enumerate(indexes):
        for name in _TENSORS:
            t = getattr(index, name)
            if t is not None:
                tensors[f"layers.{i}.{name}"] = t.detach().contiguous().cpu()
        cal = index.calibration
        if cal is not None:
            tensors[f"layers.{i}.calibration.budgets"] = cal.budgets.contiguous()
            tensors[f"layers.{i}.calibration.log_thresholds"] = cal.log_thresholds.contiguous()
            if cal.l1_log_thresholds is not None:
                tensors[f"layers.{i}.calibration.l1_log_thresholds"] = (
                    cal.l1_log_thresholds.contiguous()
                )
        layers.append({"config": index.config.to_dict()})
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layers": layers,
        "metadata": metadata or {},
        "sha256": {name: _digest(t) for name, t in tensors.items()},
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"squeeze": json.dumps(header, sort_keys=True)})
    os.replace(tmp, path)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of an index file, checked for format and version (tensors not read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise IndexFileError(
            f"{path} is not a readable index file (truncated or corrupt header): {err}"
        ) from err
    if "squeeze" not in meta:
        raise IndexFileError(f"{path} is a safetensors file but not a squeeze index")
    try:
        header = json.loads(meta["squeeze"])
    except json.JSONDecodeError as err:
        raise IndexFileError(f"{path}: the squeeze header is not valid JSON ({err})") from err
    if header.get("format") != FORMAT:
        raise IndexFileError(f"{path}: unknown format {header.get('format')!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise IndexFileError(
            f"{path}: format version {header.get('format_version')} is not "
            f"supported by this squeeze (reads version {FORMAT_VERSION})"
        )
    return header


def load_indexes(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
) -> tuple[list[ClusterIndex], dict[str, Any]]:
    """Read ``path`` back: ``(indexes, metadata)``; every tensor's checksum is verified."""
    path = Path(path)
    header = read_header(path)
    expected = header["sha256"]
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                raise IndexFileError(
                    f"{path}: tensor list does not match the header "
                    f"(missing {sorted(set(expected) - names)}, "
                    f"unexpected {sorted(names - set(expected))})"
                )
            for name in sorted(names):
                tensors[name] = f.get_tensor(name)
    except IndexFileError:
        raise
    except Exception as err:
        raise IndexFileError(f"{path}: tensor data unreadable (truncated file?): {err}") from err
    for name, t in tensors.items():
        if _digest(t) != expected[name]:
            raise IndexFileError(
                f"{path}: checksum mismatch in tensor {name!r}: the file was "
                "altered or corrupted after it was written"
            )
    indexes = []
    for i, layer in enumerate(header["layers"]):

        def raw(name: str, i: int = i) -> torch.Tensor | None:
            return tensors.get(f"layers.{i}.{name}")

        cal = None
        if raw("calibration.budgets") is not None:
            cal = Calibration(
                raw("calibration.budgets"),
                raw("calibration.log_thresholds"),
                raw("calibration.l1_log_thresholds"),
            )
        fields = {name: raw(name) for name in _TENSORS}
        if device is not None:
            fields = {k: None if v is None else v.to(device) for k, v in fields.items()}
        indexes.append(
            ClusterIndex(**fields, calibration=cal, config=SqueezeConfig.from_dict(layer["config"]))
        )
    return indexes, header["metadata"]


def _digest(t: torch.Tensor) -> str:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.data).hexdigest()
