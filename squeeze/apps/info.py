"""``squeeze info FILE [--verify]``: what an index or compiled-context file holds.

Without ``--verify`` only the headers are read: the squeeze header (parsed against its schema)
and the tensors' dtypes and shapes from the safetensors header, so it is fast for a file of any
size and claims nothing about the tensor data. ``--verify`` reads the whole file as a load does:
every digest, every layer's structure, the header against the tensors, and the signature when a
key is set (``$SQUEEZE_INDEX_KEY``). Compiled contexts (``squeeze compile``) and core-API index
files (``ClusterIndex.save``, ``squeeze.save_indexes``) are both described.
"""

from __future__ import annotations

from pathlib import Path

from .options import Parser


def main(argv: list[str]) -> int:
    p = Parser(prog="squeeze info", description="What an index or compiled-context file holds.")
    p.add_argument("file")
    p.add_argument(
        "--verify",
        action="store_true",
        help="read the whole file: digests, structure, signature (with $SQUEEZE_INDEX_KEY)",
    )
    a = p.parse_args(argv)
    from squeeze import files, header_schema

    header = files.peek_header(a.file)
    meta = header["metadata"]
    context = meta.get("format") == files.CONTEXT_FORMAT
    size = Path(a.file).stat().st_size
    print(f"file: {a.file} ({size / 2**20:.2f} MiB)")
    print(f"index format: {header['format']} v{header['format_version']}")
    if context:
        header_schema.check_context_header(meta, str(a.file))
        _print_context(meta)
        layers = meta["squeezed_layers"]
    else:
        layers = list(range(len(header["layers"])))
        print(f"index file (core API): {len(layers)} layers")
    signed = "signed (HMAC-SHA256)" if "signature" in header else "not signed"
    print(f"signature: {signed}")
    budgets = _verify(a.file, context) if a.verify else None
    shapes = _shapes(a.file)
    for j, i in enumerate(layers):
        cfg = header["layers"][j]["config"]
        if not context:
            print(f"  layer {i} config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
        cal = None if budgets is None else budgets[j]
        print(f"  layer {i}: {_describe(shapes, j, cfg, cal)}")
    return 0


def _print_context(meta: dict) -> None:
    print(f"context format: {meta['format']} v{meta['format_version']}")
    print(f"squeeze {meta['squeeze_version']}, transformers {meta['transformers_version']}")
    print(f"model: {meta['model_class']} (fingerprint {meta['config_fingerprint'][:12]})")
    print(f"context: {meta['context_len']} tokens, sha256 {str(meta['context_sha256'])[:16]}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in meta["config"].items()))
    print(f"layers: {meta['num_layers']} ({len(meta['squeezed_layers'])} squeezed)")
    for d in meta["dense_layers"]:
        print(f"  layer {d['layer']}: dense ({d['reason']})")


def _shapes(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name → (dtype, shape)`` of every tensor, from the safetensors header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        slices = {n: f.get_slice(n) for n in f.keys()}  # noqa: SIM118 (a safe_open handle)
        return {n: (sl.get_dtype(), tuple(sl.get_shape())) for n, sl in slices.items()}


def _describe(shapes: dict, j: int, cfg: dict, budgets) -> str:
    def shape(name):
        return shapes.get(f"layers.{j}.{name}", (None, None))

    _, pos = shape("positions")
    cen_dtype, cen = shape("centroids")
    _, l1 = shape("l1_centroids")
    kv_dtype, _ = shape("keys")
    _, points = shape("calibration.budgets")
    if pos is None or cen is None or len(pos) != 2 or len(cen) != 3:
        return "incomplete (no positions or centroids)"
    text = f"{pos[0]} KV heads x {pos[1]} keys ({cfg.get('sinks', 0)} sinks, window {cfg.get('window')}), "
    text += f"{cen[1]} clusters"
    text += "" if l1 is None else f" / {l1[1]} level-1"
    text += f" ({cen_dtype} centroids)"
    text += f", {kv_dtype or 'no K/V'}"
    if budgets is not None:
        text += f", calibrated budgets {_range(budgets)}"
    elif points is not None:
        text += f", {points[0]} calibration points"
    return text


def _verify(path, context: bool) -> list:
    """Read the file as a load does (raises naming the problem); each layer's budgets."""
    from squeeze import files

    if context:
        meta, layers, _ = files.read_context(path)
        layers = [layers[i] for i in meta["squeezed_layers"]]
    else:
        layers, _ = files.read_indexes(path)
    print(
        "verified: digests, layer structure, header against tensors; signature "
        + ("checked" if _key_set() else "not checked (no $SQUEEZE_INDEX_KEY)")
    )
    return [None if f["calibration"] is None else f["calibration"].budgets.tolist() for f in layers]


def _key_set() -> bool:
    from squeeze import signing

    return signing.resolve_key(None) is not None


def _range(xs: list[float]) -> str:
    return f"{min(xs):.3g}..{max(xs):.3g} ({len(xs)} points)" if xs else "none"
