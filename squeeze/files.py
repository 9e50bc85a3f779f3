"""Index and compiled-context files: safetensors tensors plus a JSON header. Never pickle.

**Index files** (format ``"squeeze-index"``, version 2; version 1 is still read): the header
(safetensors metadata key ``"squeeze"``) holds the format version, each layer's config, caller
metadata, a SHA-256 of every tensor (of its dtype, shape and bytes; version 1: its bytes) and,
when saved with a key, an HMAC signature (:mod:`squeeze.signing`). Layer ``i``'s tensors are
``layers.{i}.<name>``, its calibration ``layers.{i}.calibration.<curve>``.

Reading a file we did not write is safe: the header is parsed against a schema
(:mod:`squeeze.header_schema`), every digest is verified, the signature when a key is given,
and every layer is checked against the index table (:mod:`squeeze.index_schema`: dtypes,
shapes that agree, offsets, positions, finite values, the config against the tensors). The
file loads and means what it says, or :class:`~squeeze.errors.IndexFileError` names the
problem. The digests detect accidents (a truncated copy, a flipped bit), not adversaries; the
signature does. Files are written atomically (:func:`squeeze.tensor_files.write`).

:func:`save_indexes` writes any objects with a :class:`~squeeze.index.ClusterIndex`'s fields;
:func:`read_indexes` gives back each layer's fields (:func:`squeeze.index.load_indexes` makes
them indexes).

**Compiled-context files** (``"squeeze-hf-context"``): an index file whose metadata is the
context header (:func:`context_header`: model class and fingerprints, the context's token ids
and hash, the config, which layers are squeezed and which dense) with a digest of its own. Format
version 2 stores each dense layer (one squeeze does not cover: the model's own attention over
the context) as a :class:`DenseLayer` record, tensors ``dense.{layer}.keys`` / ``.values``;
version 1 files, which stored them as one-cluster index layers after the squeezed ones, are
still read. The header is checked against the tensors: every layer holds ``context_len``
rows, the layers agree on KV heads and head size (and with the model config of the header).

**Fingerprints** (:mod:`squeeze.fingerprints`, re-exported here): what a context file must
match before it is used.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import header_schema, hugepages, index_schema, signing, tensor_files
from .calibration import Calibration
from .config import SqueezeConfig
from .errors import IndexFileError
from .fingerprints import (  # noqa: F401  (re-exported: the context header's fingerprints)
    FINGERPRINT_FIELDS,
    check_model,
    config_fields,
    config_fingerprint,
    context_digest,
    metadata_digest,
    weights_fingerprint,
)

FORMAT = "squeeze-index"
FORMAT_VERSION = 2
FORMAT_VERSIONS = (1, 2)  # read
CONTEXT_FORMAT = "squeeze-hf-context"
CONTEXT_VERSION = 2
CONTEXT_VERSIONS = (1, 2)  # read
#: contexts up to this many tokens keep their ids in the file header
MAX_IDS_IN_HEADER = 1 << 20
TENSORS = (
    "keys", "values", "positions", "centroids", "offsets", "l1_centroids", "l1_offsets", "spread",
    "l1_spread", "value_means",
)  # fmt: skip
CURVES = index_schema.CURVES
_LAYER_TENSOR = re.compile(r"layers\.(\d+)\.(.+)")

# ----------------------------------------------------------------------------- index files


def save_indexes(
    path: str | os.PathLike,
    indexes: list,
    metadata: dict[str, Any] | None = None,
    records: dict[str, torch.Tensor] | None = None,
    *,
    key: bytes | str | None = None,
) -> None:
    """Write one index per layer to ``path`` (atomically: :func:`squeeze.tensor_files.write`).

    ``records``: further named tensors stored and checksummed beside the layers. ``key``
    (else ``$SQUEEZE_INDEX_KEY``): sign the file (:mod:`squeeze.signing`).
    """
    if not indexes:
        raise ValueError("indexes must hold at least one ClusterIndex")
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, index in enumerate(indexes):
        for name in TENSORS:
            t = getattr(index, name)
            if t is not None:
                tensors[f"layers.{i}.{name}"] = t.detach().contiguous().cpu()
        cal = index.calibration
        for curve in CURVES if cal is not None else ():
            if getattr(cal, curve) is not None:
                tensors[f"layers.{i}.calibration.{curve}"] = getattr(cal, curve).contiguous()
        layers.append({"config": index.config.to_dict()})
    for name, t in (records or {}).items():
        tensors[name] = t.detach().contiguous().cpu()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layers": layers,
        "metadata": metadata or {},
        "sha256": {name: tensor_files.digest(t) for name, t in tensors.items()},
    }
    header = json.loads(json.dumps(header))  # what a reader parses is what is signed
    secret = signing.resolve_key(key)
    if secret is not None:
        header[signing.FIELD] = signing.sign(header, secret)
    tensor_files.write(path, tensors, {"squeeze": json.dumps(header, sort_keys=True)})


def read_header(path: str | os.PathLike, key: bytes | str | None = None) -> dict[str, Any]:
    """The JSON header of an index file, parsed against its schema and, with a key (``key``,
    else ``$SQUEEZE_INDEX_KEY``), its signature verified; tensors not read."""
    header = peek_header(path)
    signing.verify(header, signing.resolve_key(key), str(path))
    return header


def peek_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header parsed against its schema, the signature not checked (for tools that
    describe a file: ``squeeze info``)."""
    path = Path(path)
    if path.is_dir():
        raise IndexFileError(f"{path} is a directory, not an index file")
    if not path.exists():
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
    header = header_schema.parse_json(meta["squeeze"], str(path))
    return header_schema.check_index_header(header, str(path), FORMAT, FORMAT_VERSIONS)


def read_tensors(
    path: str | os.PathLike, key: bytes | str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, tensors)`` of an index file, every tensor's digest verified."""
    path = Path(path)
    header = read_header(path, key)
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
            for name in sorted(names):  # the large ones in huge pages: squeeze.hugepages
                tensors[name] = hugepages.backed(f.get_tensor(name))
    except IndexFileError:
        raise
    except Exception as err:
        raise IndexFileError(f"{path}: tensor data unreadable (truncated file?): {err}") from err
    typed = header["format_version"] >= 2
    for name, t in tensors.items():
        if tensor_files.digest(t, typed) != expected[name]:
            raise IndexFileError(
                f"{path}: checksum mismatch in tensor {name!r}: the file was "
                "altered or corrupted after it was written"
            )
    return header, tensors


def read_indexes(
    path: str | os.PathLike, device=None, key: bytes | str | None = None
) -> tuple[list[dict], dict[str, Any]]:
    """``(layers, metadata)``: each layer's :class:`~squeeze.index.ClusterIndex` fields,
    checked (:mod:`squeeze.index_schema`)."""
    header, tensors = read_tensors(path, key)
    layers = _layer_fields(path, header, tensors, range(len(header["layers"])))
    return [_to(fields, device) for fields in layers], header["metadata"]


def _layer_fields(path, header: dict, tensors: dict, checked) -> list[dict]:
    """Every layer's fields; those of the layers in ``checked`` validated as indexes."""
    n_layers = len(header["layers"])
    known = set(TENSORS) | {f"calibration.{c}" for c in CURVES}
    for name in tensors:
        m = _LAYER_TENSOR.fullmatch(name)
        if m and (int(m.group(1)) >= n_layers or m.group(2) not in known):
            raise IndexFileError(f"{path}: unexpected tensor {name!r}")
    layers = []
    for i, layer in enumerate(header["layers"]):
        fields: dict[str, Any] = {name: tensors.get(f"layers.{i}.{name}") for name in TENSORS}
        curves = [tensors.get(f"layers.{i}.calibration.{c}") for c in CURVES]
        fields["calibration"] = None if curves[0] is None else Calibration(*curves)
        fields["config"] = header_schema.parse_config(layer["config"], f"{path}: layer {i}")
        if i in checked:
            stored = {**fields, "calibration": Calibration(*curves)}  # every stored curve
            index_schema.check_layer(stored, f"{path}: layer {i}")
        layers.append(fields)
    return layers


def _to(fields: dict, device) -> dict:
    if device is None:
        return fields
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}


# ----------------------------------------------------------------------------- context files


@dataclass(frozen=True)
class DenseLayer:
    """A layer squeeze does not cover: the model's own cache layer, prefilled with the context.

    Attributes:
        kind: ``"full"`` (all context tokens) or ``"sliding"`` (the last ``sliding_window - 1``).
        keys, values: ``[1, Hkv, n, D]`` post-RoPE context K/V, original order.
        sliding_window: the window of a sliding layer, else ``None``.
        reason: why squeeze does not cover the layer.
    """

    kind: str
    keys: torch.Tensor
    values: torch.Tensor
    sliding_window: int | None
    reason: str


def context_header(
    model,
    *,
    indexes: dict[int, Any],
    dense: dict[int, DenseLayer],
    context_ids: torch.Tensor | None,
    n_context: int,
    config: SqueezeConfig,
    versions: dict[str, str],
) -> dict[str, Any]:
    """The header of a compiled-context file, with its digest (``versions``: of squeeze and
    transformers)."""
    ids = context_ids
    meta = {
        "format": CONTEXT_FORMAT,
        "format_version": CONTEXT_VERSION,
        "squeeze_version": versions["squeeze"],
        "transformers_version": versions["transformers"],
        "model_class": type(model).__name__,
        "config_fingerprint": config_fingerprint(model),
        "config_fields": config_fields(model),
        "weights_fingerprint": weights_fingerprint(model),
        "num_layers": len(indexes) + len(dense),
        "squeezed_layers": list(indexes),
        "dense_layers": [
            {"layer": i, "kind": d.kind, "sliding_window": d.sliding_window, "reason": d.reason}
            for i, d in dense.items()
        ],
        "context_len": n_context,
        "context_sha256": None if ids is None else context_digest(ids),
        "context_ids": ids.tolist()
        if ids is not None and ids.numel() <= MAX_IDS_IN_HEADER
        else None,
        "config": config.to_dict(),
    }
    meta = json.loads(json.dumps(meta, default=str))  # the digest covers what a reader sees
    meta["digest"] = metadata_digest(meta)
    return meta


def save_context(
    path, header: dict, indexes: list, dense: dict[int, DenseLayer], *, key=None
) -> None:
    """Write a compiled context: its squeezed layers' indexes and its dense layers' records
    (signed with ``key``, else ``$SQUEEZE_INDEX_KEY``, when there is one)."""
    records = {}
    for i, d in dense.items():
        records[f"dense.{i}.keys"] = d.keys[0]
        records[f"dense.{i}.values"] = d.values[0]
    save_indexes(path, indexes, header, records, key=key)


def read_context_header(path: str | os.PathLike, key=None) -> dict[str, Any]:
    """The context header of a compiled-context file, checked (format, version, schema,
    digest; the signature with a key)."""
    meta = read_header(path, key)["metadata"]
    if meta.get("format") != CONTEXT_FORMAT:
        raise IndexFileError(
            f"{path} is a squeeze index but not a compiled transformers "
            f"context (format {meta.get('format')!r})"
        )
    if meta.get("format_version") not in CONTEXT_VERSIONS:
        raise IndexFileError(
            f"{path}: context format version {meta.get('format_version')} "
            f"is not supported (this squeeze reads {list(CONTEXT_VERSIONS)})"
        )
    header_schema.check_context_header(meta, str(path))
    if meta["digest"] != metadata_digest(meta):
        raise IndexFileError(f"{path}: the header was altered after it was written")
    if meta["context_ids"] is not None and meta["context_sha256"] != context_digest(
        torch.tensor(meta["context_ids"], dtype=torch.int64)
    ):
        raise IndexFileError(f"{path}: context_sha256 is not the hash of context_ids")
    return meta


def read_context(path: str | os.PathLike, device=None, key=None):
    """``(header, {layer: index fields}, {layer: DenseLayer})`` of a compiled-context file,
    the header checked against the tensors."""
    meta = read_context_header(path, key)
    header, tensors = read_tensors(path, key)
    squeezed, entries = meta["squeezed_layers"], meta["dense_layers"]
    v1 = meta["format_version"] == 1
    stored = len(squeezed) + (len(entries) if v1 else 0)
    if len(header["layers"]) != stored:
        raise IndexFileError(
            f"{path}: {len(header['layers'])} layers stored, header lists {stored}"
        )
    layers = _layer_fields(path, header, tensors, range(len(squeezed)))
    expected = (
        set() if v1 else {f"dense.{e['layer']}.{n}" for e in entries for n in ("keys", "values")}
    )
    extra = sorted(n for n in tensors if not n.startswith("layers.") and n not in expected)
    if extra:
        raise IndexFileError(f"{path}: unexpected tensors {extra}")
    dense = {}
    for j, entry in enumerate(entries):
        if v1:  # a one-cluster index layer after the squeezed ones
            keys, values = layers[len(squeezed) + j]["keys"], layers[len(squeezed) + j]["values"]
        else:
            keys, values = (tensors.get(f"dense.{entry['layer']}.{n}") for n in ("keys", "values"))
        d = DenseLayer(entry["kind"], keys, values, entry["sliding_window"], entry["reason"])
        dense[entry["layer"]] = d
    header_schema.check_context_tensors(path, meta, layers[: len(squeezed)], dense)
    dense = {
        i: DenseLayer(d.kind, _on(d.keys, device)[None], _on(d.values, device)[None],
                      d.sliding_window, d.reason)
        for i, d in dense.items()
    }  # fmt: skip
    indexes = [_to(fields, device) for fields in layers[: len(squeezed)]]
    return meta, dict(zip(squeezed, indexes, strict=True)), dense


def _on(t: torch.Tensor, device) -> torch.Tensor:
    return t if device is None else t.to(device)
