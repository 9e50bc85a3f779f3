"""The JSON headers of index and compiled-context files, parsed against a schema.

Headers come from files we may not have written, so they are parsed defensively: the text is
bounded in size, its nesting depth is measured without recursion before :func:`json.loads`
sees it, ``NaN``/``Infinity`` literals and duplicate keys are refused, and every field is
type-checked. Every problem is an :class:`~squeeze.errors.IndexFileError` naming the file and
the field; nothing raw (``KeyError``, ``TypeError``, ``RecursionError``) escapes.

:func:`check_index_header` checks the index header (:mod:`squeeze.files`),
:func:`check_context_header` the compiled-context header its metadata holds, and
:func:`check_context_tensors` that header against the file's tensors (each index layer itself
is :mod:`squeeze.index_schema`'s). :func:`parse_config` makes a header's config a
:class:`~squeeze.config.SqueezeConfig`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from . import index_schema
from .config import SqueezeConfig
from .errors import IndexFileError

#: largest header text read (the context header holds up to 2**20 token ids)
MAX_HEADER_BYTES = 64 << 20
#: deepest nesting of JSON arrays and objects accepted (our headers nest 4 deep)
MAX_DEPTH = 32
#: most layers one file may hold
MAX_LAYERS = 4096
HEX64 = re.compile(r"[0-9a-f]{64}")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def parse_json(text: str, where: str) -> Any:
    """``json.loads(text)`` for an untrusted header: bounded size and depth, no ``NaN`` or
    ``Infinity``, no duplicate keys."""
    if not isinstance(text, str):
        raise IndexFileError(f"{where}: the header is not text")
    if len(text) > MAX_HEADER_BYTES:
        raise IndexFileError(f"{where}: the header is {len(text)} bytes, over {MAX_HEADER_BYTES}")
    depth = deepest = 0
    for ch in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            raise IndexFileError(f"{where}: the header nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, over-long ints, our hooks
        raise IndexFileError(f"{where}: the header is not valid JSON ({err})") from err


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


# ----------------------------------------------------------------------------- field checks


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def field(obj: dict, key: str, kind, where: str, *, optional: bool = False) -> Any:
    """``obj[key]``, checked to be a ``kind`` (a type, a tuple of them, or ``"int"``)."""
    if key not in obj:
        if optional:
            return None
        raise IndexFileError(f"{where}: header field {key!r} is missing")
    value = obj[key]
    if value is None and optional:
        return None
    ok = is_int(value) if kind == "int" else isinstance(value, kind)
    if not ok:
        name = "int" if kind == "int" else getattr(kind, "__name__", str(kind))
        raise IndexFileError(
            f"{where}: header field {key!r} must be {name}, got {type(value).__name__}"
        )
    return value


def expect(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise IndexFileError(f"{where}: {message}")


def only_keys(obj: dict, allowed: set, where: str) -> None:
    extra = sorted(set(obj) - allowed)
    expect(not extra, where, f"unexpected header fields {extra}")


# ----------------------------------------------------------------------------- index header

INDEX_KEYS = {"format", "format_version", "layers", "metadata", "sha256", "signature"}


def check_index_header(header: Any, where: str, fmt: str, versions: tuple[int, ...]) -> dict:
    """The index header: its format and version, one ``{"config": {...}}`` per layer, a
    metadata object, a SHA-256 per tensor, an optional signature."""
    expect(isinstance(header, dict), where, "the squeeze header must be a JSON object")
    fmt_got = header.get("format")
    expect(fmt_got == fmt, where, f"unknown format {fmt_got!r}")
    version = field(header, "format_version", "int", where)
    expect(
        version in versions,
        where,
        f"format version {version} is not supported by this squeeze (reads versions "
        f"{list(versions)})",
    )
    only_keys(header, INDEX_KEYS if version >= 2 else INDEX_KEYS - {"signature"}, where)
    layers = field(header, "layers", list, where)
    expect(0 < len(layers) <= MAX_LAYERS, where, f"must list 1..{MAX_LAYERS} layers")
    for i, layer in enumerate(layers):
        at = f"{where}: layer {i}"
        expect(isinstance(layer, dict), at, "header entry must be a JSON object")
        only_keys(layer, {"config"}, at)
        field(layer, "config", dict, at)
    field(header, "metadata", dict, where)
    digests = field(header, "sha256", dict, where)
    for name, value in digests.items():
        expect(
            isinstance(value, str) and HEX64.fullmatch(value) is not None,
            where,
            f"sha256 of {name!r} must be 64 hex digits",
        )
    sig = field(header, "signature", str, where, optional=True)
    expect(sig is None or HEX64.fullmatch(sig) is not None, where, "signature must be 64 hex")
    return header


# ----------------------------------------------------------------------------- context header

CONTEXT_FIELDS = {
    "format": str, "format_version": "int", "squeeze_version": str,
    "transformers_version": str, "model_class": str, "config_fingerprint": str,
    "config_fields": dict, "weights_fingerprint": str, "num_layers": "int",
    "squeezed_layers": list, "dense_layers": list, "context_len": "int", "config": dict,
    "digest": str,
}  # fmt: skip
DENSE_KINDS = ("full", "sliding")


def check_context_header(meta: dict, where: str) -> dict:
    """The compiled-context header: every field typed, the layers ``0 .. num_layers - 1``
    each listed once (squeezed or dense), the token ids as long as ``context_len``."""
    for key, kind in CONTEXT_FIELDS.items():
        field(meta, key, kind, where)
    only_keys(meta, set(CONTEXT_FIELDS) | {"context_sha256", "context_ids"}, where)
    ids = field(meta, "context_ids", list, where, optional=True)
    sha = field(meta, "context_sha256", str, where, optional=True)
    n = meta["context_len"]
    expect(n >= 1, where, f"context_len must be >= 1, got {n}")
    expect(sha is None or HEX64.fullmatch(sha) is not None, where, "context_sha256 not hex")
    if ids is not None:
        expect(len(ids) == n, where, f"context_ids hold {len(ids)} ids, context_len says {n}")
        expect(
            all(type(x) is int and 0 <= x < 1 << 62 for x in ids),
            where,
            "context_ids must be non-negative integer token ids",
        )
        expect(sha is not None, where, "context_ids are given without their context_sha256")
    layers = meta["num_layers"]
    expect(1 <= layers <= MAX_LAYERS, where, f"num_layers must be in 1..{MAX_LAYERS}")
    squeezed = meta["squeezed_layers"]
    expect(all(is_int(i) for i in squeezed), where, "squeezed_layers must be layer numbers")
    dense = [
        _dense_entry(e, f"{where}: dense_layers[{j}]") for j, e in enumerate(meta["dense_layers"])
    ]
    listed = squeezed + [e["layer"] for e in dense]
    expect(
        sorted(listed) == list(range(layers)),
        where,
        f"squeezed_layers {squeezed} and dense layers {[e['layer'] for e in dense]} must list "
        f"each of the num_layers={layers} layers exactly once",
    )
    return meta


def _dense_entry(entry: Any, where: str) -> dict:
    expect(isinstance(entry, dict), where, "must be a JSON object")
    only_keys(entry, {"layer", "kind", "sliding_window", "reason"}, where)
    field(entry, "layer", "int", where)
    kind = field(entry, "kind", str, where)
    expect(kind in DENSE_KINDS, where, f"kind must be one of {DENSE_KINDS}, got {kind!r}")
    window = field(entry, "sliding_window", "int", where, optional=True)
    if kind == "sliding":
        expect(
            window is not None and window >= 1, where, "a sliding layer needs sliding_window >= 1"
        )
    else:
        expect(window is None, where, "a full layer has no sliding_window")
    field(entry, "reason", str, where)
    return entry


def parse_config(data: Any, where: str) -> SqueezeConfig:
    """A header's config object as a :class:`SqueezeConfig` (``IndexFileError`` if invalid)."""
    if not isinstance(data, dict):
        raise IndexFileError(f"{where}: config must be a JSON object, got {type(data).__name__}")
    try:
        return SqueezeConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise IndexFileError(f"{where}: invalid config: {err}") from err


# ----------------------------------------------------------------------------- header vs tensors


def check_context_tensors(path, meta: dict, layers: list[dict], dense: dict) -> None:
    """The context header (checked) against the tensors: each squeezed layer's fields (checked
    by :mod:`squeeze.index_schema`) has the header's config and ``context_len`` rows, each
    dense layer (:class:`squeeze.files.DenseLayer`) is sound, and all layers have the model
    config's KV heads and head size."""
    cfg = parse_config(meta["config"], f"{path}: header")
    n = meta["context_len"]
    heads = _model_heads(meta["config_fields"])
    for i, fields in zip(meta["squeezed_layers"], layers, strict=True):
        where = f"{path}: layer {i}"
        if fields["config"] != cfg:
            raise IndexFileError(f"{where}: config differs from the header's")
        hkv, rows = fields["positions"].shape
        if rows != n:
            raise IndexFileError(f"{where}: holds {rows} context rows, context_len is {n}")
        heads = _same_heads(where, heads, (hkv, fields["centroids"].shape[2]))
    for i, d in dense.items():
        where = f"{path}: dense layer {i}"
        index_schema.check_dense(d.keys, d.values, n, d.sliding_window, where)
        heads = _same_heads(where, heads, (d.keys.shape[0], d.keys.shape[2]))


def _model_heads(fields: dict) -> tuple:
    """``(Hkv, D)`` of a header's model config fields (``None`` where it does not say)."""
    heads, kv = fields.get("num_attention_heads"), fields.get("num_key_value_heads")
    d = fields.get("head_dim")
    if d is None and is_int(heads) and heads > 0 and is_int(fields.get("hidden_size")):
        d = fields["hidden_size"] // heads
    kv = kv if kv is not None else heads
    return tuple(x if is_int(x) else None for x in (kv, d))


def _same_heads(where: str, want: tuple, got: tuple) -> tuple:
    if any(w is not None and w != g for w, g in zip(want, got, strict=True)):
        raise IndexFileError(
            f"{where}: has {got[0]} KV heads of size {got[1]}, expected {want[0]} of size "
            f"{want[1]} (the model config of the header, and the other layers)"
        )
    return got
