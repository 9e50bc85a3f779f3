"""Index and compiled-context files: safetensors tensors plus a JSON header. Never pickle.

**Index files** (format ``"squeeze-index"`` v1): the header (safetensors metadata key
``"squeeze"``) holds the format version, each layer's config, caller metadata and a SHA-256 of
every tensor's bytes, so a truncated or altered file is refused with
:class:`~squeeze.errors.IndexFileError`. Layer ``i``'s tensors are ``layers.{i}.<name>``, its
calibration ``layers.{i}.calibration.<curve>``. :func:`save_indexes` writes any objects with a
:class:`~squeeze.index.ClusterIndex`'s fields; :func:`read_indexes` gives back each layer's
fields (:func:`squeeze.index.load_indexes` makes them indexes).

**Compiled-context files** (``"squeeze-hf-context"``): an index file whose metadata is the
context header (:func:`context_header`: model class and fingerprints, the context's token ids
and hash, the config, which layers are squeezed and which dense) with a digest of its own. Format
version 2 stores each dense layer (one squeeze does not cover: the model's own attention over
the context) as a :class:`DenseLayer` record, tensors ``dense.{layer}.keys`` / ``.values``;
version 1 files, which stored them as one-cluster index layers after the squeezed ones, are
still read.

**Fingerprints**: what a context file must match before it is used: the model's
architecture-relevant config fields and the first values of every parameter
(:func:`check_model`), and the context's token ids (:func:`context_digest`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .calibration import Calibration
from .config import SqueezeConfig
from .errors import IndexFileError, ModelMismatchError

FORMAT = "squeeze-index"
FORMAT_VERSION = 1
CONTEXT_FORMAT = "squeeze-hf-context"
CONTEXT_VERSION = 2
CONTEXT_VERSIONS = (1, 2)  # read
#: contexts up to this many tokens keep their ids in the file header
MAX_IDS_IN_HEADER = 1 << 20
TENSORS = (
    "keys", "values", "positions", "centroids", "offsets", "l1_centroids", "l1_offsets", "spread",
    "l1_spread",
)  # fmt: skip
CURVES = ("budgets", "log_thresholds", "l1_log_thresholds")

# ----------------------------------------------------------------------------- index files


def save_indexes(
    path: str | os.PathLike,
    indexes: list,
    metadata: dict[str, Any] | None = None,
    records: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write one index per layer to ``path`` (a temporary file, then renamed).

    ``records``: further named tensors stored and checksummed beside the layers.
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


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, tensors)`` of an index file, every tensor's checksum verified."""
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
    return header, tensors


def read_indexes(path: str | os.PathLike, device=None) -> tuple[list[dict], dict[str, Any]]:
    """``(layers, metadata)``: each layer's :class:`~squeeze.index.ClusterIndex` fields."""
    header, tensors = read_tensors(path)
    return _layer_fields(header, tensors, device), header["metadata"]


def _layer_fields(header: dict, tensors: dict, device) -> list[dict]:
    layers = []
    for i, layer in enumerate(header["layers"]):
        fields = {name: tensors.get(f"layers.{i}.{name}") for name in TENSORS}
        if device is not None:
            fields = {k: None if v is None else v.to(device) for k, v in fields.items()}
        curves = [tensors.get(f"layers.{i}.calibration.{c}") for c in CURVES]
        fields["calibration"] = None if curves[0] is None else Calibration(*curves)
        fields["config"] = SqueezeConfig.from_dict(layer["config"])
        layers.append(fields)
    return layers


def _digest(t: torch.Tensor) -> str:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.data).hexdigest()


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


def save_context(path, header: dict, indexes: list, dense: dict[int, DenseLayer]) -> None:
    """Write a compiled context: its squeezed layers' indexes and its dense layers' records."""
    records = {}
    for i, d in dense.items():
        records[f"dense.{i}.keys"] = d.keys[0]
        records[f"dense.{i}.values"] = d.values[0]
    save_indexes(path, indexes, header, records)


def read_context_header(path: str | os.PathLike) -> dict[str, Any]:
    """The context header of a compiled-context file, checked (format, version, digest)."""
    meta = read_header(path).get("metadata") or {}
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
    if meta.get("digest") != metadata_digest(meta):
        raise IndexFileError(f"{path}: the header was altered after it was written")
    return meta


def read_context(path: str | os.PathLike, device=None):
    """``(header, {layer: index fields}, {layer: DenseLayer})`` of a compiled-context file."""
    meta = read_context_header(path)
    header, tensors = read_tensors(path)
    layers = _layer_fields(header, tensors, device)
    squeezed, entries = meta["squeezed_layers"], meta["dense_layers"]
    stored = len(squeezed) + (len(entries) if meta["format_version"] == 1 else 0)
    if len(layers) != stored:
        raise IndexFileError(f"{path}: {len(layers)} layers stored, header lists {stored}")
    dense = {}
    for j, entry in enumerate(entries):
        if meta["format_version"] == 1:  # a one-cluster index layer after the squeezed ones
            keys, values = layers[len(squeezed) + j]["keys"], layers[len(squeezed) + j]["values"]
        else:
            keys, values = (tensors.get(f"dense.{entry['layer']}.{n}") for n in ("keys", "values"))
            if keys is None or values is None:
                raise IndexFileError(f"{path}: dense layer {entry['layer']} has no K/V record")
            keys, values = (t if device is None else t.to(device) for t in (keys, values))
        dense[entry["layer"]] = DenseLayer(
            entry["kind"], keys[None], values[None], entry["sliding_window"], entry["reason"]
        )
    return meta, dict(zip(squeezed, layers, strict=False)), dense


# ----------------------------------------------------------------------------- fingerprints

#: config fields that change the keys/values a model computes for a given context
FINGERPRINT_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
    "partial_rotary_factor", "rms_norm_eps", "layer_norm_eps", "hidden_act",
    "hidden_activation", "attention_bias", "qkv_bias", "sliding_window", "layer_types",
    "query_pre_attn_scalar", "attn_logit_softcapping", "use_qk_norm",
)  # fmt: skip


def config_fields(model) -> dict[str, Any]:
    """The fingerprinted fields of the model's decoder config (absent ones are ``None``)."""
    cfg = model.config.get_text_config(decoder=True).to_dict()
    return {name: cfg.get(name) for name in FINGERPRINT_FIELDS}


def config_fingerprint(model) -> str:
    """SHA-256 (hex, 16 chars) of the architecture-relevant config fields."""
    blob = json.dumps(config_fields(model), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_fingerprint(model, per_tensor: int = 32) -> str:
    """SHA-256 (hex, 16 chars) of every parameter's name, shape and first ``per_tensor`` values.

    Values are rounded to bf16 first, so casting the model between fp32/bf16/fp16 keeps the
    fingerprint, while other weights (another checkpoint, a fine-tune) change it. Cheap: it
    reads ``per_tensor`` values per tensor. ``model`` is anything with ``named_parameters()``
    and ``config`` (the vLLM plugin passes a checkpoint directory's stand-in).
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        head = p.detach().reshape(-1)[:per_tensor].to(torch.bfloat16).to(torch.float32).cpu()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(head.numpy().tobytes())
    return h.hexdigest()[:16]


def context_digest(ids: torch.Tensor) -> str:
    """SHA-256 (hex) of the context token ids as little-endian int64."""
    return hashlib.sha256(
        ids.to(torch.int64).cpu().contiguous().numpy().astype("<i8").tobytes()
    ).hexdigest()


def metadata_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``meta`` (without its own ``"digest"`` key)."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_model(meta: dict[str, Any], model, path) -> None:
    """Raise :class:`~squeeze.errors.ModelMismatchError` when ``meta`` was compiled for
    another model."""
    mine = config_fingerprint(model)
    if meta.get("config_fingerprint") != mine:
        theirs = meta.get("config_fields") or {}
        ours = config_fields(model)
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ModelMismatchError(
            f"{path} was compiled for another model: file config fingerprint "
            f"{meta.get('config_fingerprint')}, this model's {mine} (fields differing: {diff})"
        )
    mine_w = weights_fingerprint(model)
    if meta.get("weights_fingerprint") != mine_w:
        raise ModelMismatchError(
            f"{path} was compiled for a model with the same config but other weights: file weights "
            f"fingerprint {meta.get('weights_fingerprint')}, this model's {mine_w}"
        )
