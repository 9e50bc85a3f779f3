"""The subprocess of the index-file fuzz test (``test_fuzz_files.py``); not a test module.

Reads one file path per line on stdin; for each, loads it with squeeze and runs one attention
call, checks what it got against an independent reading of the same file (plain safetensors and
the format's rules written out again here, with numpy), and prints one JSON line:

    {"outcome": "refused" | "loaded" | "raw", "verdict": "valid" | "invalid", "problems": [...]}

``problems`` lists what is wrong: a raw exception, a non-finite output, a loaded file the
independent reading finds invalid, a refused file it finds valid, an output that does not agree
with dense attention over the file's own K/V. A crash (a signal) ends the process: the test
sees the pipe close and reports the example.
"""

from __future__ import annotations

import json
import sys
import traceback

import numpy as np
import torch
from file_tools import raw
from reference import dense_reference

import squeeze
from squeeze import IndexFileError

KNOWN = (
    "keys", "values", "positions", "centroids", "offsets", "l1_centroids", "l1_offsets", "spread",
    "l1_spread", "value_means",
)  # fmt: skip
CURVES = ("budgets", "log_thresholds", "l1_log_thresholds")
FP16_MAX = 65504.0


def independent_verdict(path) -> list[str]:
    """The format's rules, applied to the raw file: the list of what is wrong (empty: valid)."""
    try:
        header, tensors = raw(path)
    except Exception as err:  # not even readable by safetensors / json
        return [f"unreadable: {err}"]
    bad = []
    if not isinstance(header, dict) or header.get("format") != "squeeze-index":
        return ["not a squeeze index header"]
    if type(header.get("format_version")) is not int or header["format_version"] not in (1, 2):
        return ["format version"]
    if set(header) - {"format", "format_version", "layers", "metadata", "sha256", "signature"}:
        bad.append("unknown header fields")
    if not isinstance(header.get("metadata"), dict) or not isinstance(header.get("sha256"), dict):
        bad.append("metadata / sha256 not objects")
    layers = header.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        return [*bad, "layers"]
    if set(layers[0]) != {"config"} or not isinstance(layers[0]["config"], dict):
        return [*bad, "layer entry"]
    try:
        cfg = squeeze.SqueezeConfig(**layers[0]["config"])
    except (TypeError, ValueError) as err:
        return [*bad, f"config: {err}"]
    return bad + _tensor_problems(cfg, tensors)


def _tensor_problems(cfg, tensors: dict) -> list[str]:
    t = {}
    for name, x in tensors.items():
        short = name.removeprefix("layers.0.").removeprefix("calibration.")
        if not name.startswith("layers.0.") or short not in KNOWN + CURVES:
            return [f"unexpected tensor {name}"]
        t[short] = x
    levels = 1 if cfg.l1_ratio is None else 2
    need = {"positions", "centroids", "offsets"}
    if levels == 2:
        need |= {"l1_centroids", "l1_offsets"}
    if cfg.mode == "threshold" or "budgets" in t:
        need |= {"budgets", "log_thresholds"} | ({"l1_log_thresholds"} if levels == 2 else set())
    if "keys" in t or "values" in t:
        need |= {"keys", "values"}
    if cfg.estimate_zone > 0 or "value_means" in t:
        need.add("value_means")  # the estimated zone attends them; optional otherwise
    if cfg.estimator == "spread" or "spread" in t:
        need |= {"spread"} | ({"l1_spread"} if levels == 2 else set())
    if set(t) != need:
        return [f"tensors {sorted(t)} are not {sorted(need)}"]
    stored = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.centroid_dtype]
    want = {
        "positions": (torch.int64,), "offsets": (torch.int64,), "l1_offsets": (torch.int64,),
        "centroids": (stored,), "l1_centroids": (stored,), "value_means": (stored,),
        "spread": (torch.float32,), "l1_spread": (torch.float32,),
        "keys": (torch.float32, torch.bfloat16, torch.float16),
        "values": (torch.float32, torch.bfloat16, torch.float16),
        **dict.fromkeys(CURVES, (torch.float64,)),
    }  # fmt: skip
    for name, x in t.items():
        if x.dtype not in want[name]:
            return [f"{name} dtype {x.dtype}"]
    if "keys" in t and t["keys"].dtype != t["values"].dtype:
        return ["keys and values of different dtypes"]
    return _shape_problems(cfg, t) or _value_problems(cfg, t)


def _shape_problems(cfg, t: dict) -> list[str]:
    c, p = t["centroids"].shape, t["positions"].shape
    if len(c) != 3 or len(p) != 2 or min(c) < 1 or min(p) < 1 or p[0] != c[0]:
        return ["centroids / positions shapes"]
    h, k, d = c
    n = p[1]
    shapes = {
        "offsets": (h, k + 2), "keys": (h, n, d), "values": (h, n, d), "spread": (h, k),
        "value_means": (h, k, d),
    }  # fmt: skip
    if "l1_centroids" in t:
        k1 = t["l1_centroids"].shape[1] if t["l1_centroids"].dim() == 3 else -1
        shapes.update(l1_centroids=(h, k1, d), l1_offsets=(h, k1 + 1), l1_spread=(h, k1))
        if k1 < 1:
            return ["l1 shape"]
    if "budgets" in t:
        pts = t["budgets"].shape
        if len(pts) != 1 or pts[0] < 1:
            return ["budgets shape"]
        shapes.update(dict.fromkeys(CURVES, pts))
    return [
        f"{name} shape" for name, s in shapes.items() if name in t and tuple(t[name].shape) != s
    ]


def _csr_ok(rows: np.ndarray, last: int) -> bool:
    return bool((rows[:, 0] == 0).all() and (np.diff(rows, axis=1) >= 0).all()) and bool(
        (rows[:, -1] == last).all()
    )


def _value_problems(cfg, t: dict) -> list[str]:
    bad = []
    n = t["positions"].shape[1]
    for name in ("keys", "values", "centroids", "l1_centroids", "value_means"):
        if name in t:
            x = t[name].to(torch.float64).numpy()
            if not (np.isfinite(x).all() and np.abs(x).max() <= FP16_MAX):
                bad.append(f"{name} values")
    for name in ("spread", "l1_spread"):
        if name in t:
            x = t[name].to(torch.float64).numpy()
            if not (np.isfinite(x).all() and np.abs(x).max() <= FP16_MAX and (x >= 0).all()):
                bad.append(f"{name} values")
    pos = t["positions"].numpy()
    if not all(np.array_equal(np.sort(row), np.arange(n)) for row in pos):
        bad.append("positions not a permutation")
    off = t["offsets"].numpy()
    dense = min(cfg.sinks + cfg.window, n)
    if n - dense < 1 or not _csr_ok(off[:, :-1], n - dense) or not (off[:, -1] == n).all():
        bad.append("offsets")
    if "l1_offsets" in t and not _csr_ok(t["l1_offsets"].numpy(), t["centroids"].shape[1]):
        bad.append("l1_offsets")
    if "budgets" in t:
        b = t["budgets"].numpy()
        if not (
            np.isfinite(b).all() and (b > 0).all() and (b <= 1).all() and (np.diff(b) > 0).all()
        ):
            bad.append("budgets")
        for curve in CURVES[1:]:
            if curve in t:
                y = t[curve].numpy()
                if np.isnan(y).any() or (y == np.inf).any() or (np.diff(y) > 0).any():
                    bad.append(curve)
    return bad


def run_one(path: str) -> dict:
    problems: list[str] = []
    verdict = independent_verdict(path)
    try:
        (index,), _ = squeeze.load_indexes(path)
    except IndexFileError as err:
        if not verdict:
            problems.append(f"refused a valid file: {err}")
        return {
            "outcome": "refused",
            "verdict": "invalid" if verdict else "valid",
            "problems": problems,
        }
    except Exception as err:
        return {
            "outcome": "raw",
            "verdict": str(verdict),
            "problems": [f"raw {type(err).__name__}: {err}"],
        }
    if verdict:
        problems.append(f"loaded a file the independent reading refuses: {verdict}")
        return {"outcome": "loaded", "verdict": "invalid", "problems": problems}
    problems += _attend(path, index)
    return {"outcome": "loaded", "verdict": "valid", "problems": problems}


def _attend(path, index) -> list[str]:
    """One attention call at the stored budget (finite) and at budget 1 (equal to dense
    attention over the file's own K/V, read independently)."""
    _, tensors = raw(path)
    if "layers.0.keys" not in tensors:  # a valid index whose K/V the caller supplies
        return []
    gen = torch.Generator().manual_seed(0)
    hkv, _, d = tensors["layers.0.keys"].shape
    q = torch.randn(1, 2 * hkv, 1, d, generator=gen)
    k_tail, v_tail = torch.randn(2, 1, hkv, 2, d, generator=gen)
    problems = []
    try:
        out = squeeze.squeezed_attention(q, index, k_tail, v_tail)
        if not torch.isfinite(out).all():
            problems.append("non-finite output")
        every = index.with_config(budget=1.0, l1_budget=None)
        full = squeeze.squeezed_attention(q, every, k_tail, v_tail)
    except Exception as err:
        return [f"raw {type(err).__name__} in attention: {err}"]
    keys = tensors["layers.0.keys"].float()
    values = tensors["layers.0.values"].float()
    want = dense_reference(q, keys, values, k_tail, v_tail)
    tol = 1e-2 if tensors["layers.0.keys"].dtype == torch.float32 else 5e-2
    atol = tol * max(1.0, float(values.abs().max()))
    if not torch.allclose(full.double(), want, rtol=tol, atol=atol):
        problems.append("budget 1.0 differs from dense attention over the file's K/V")
    return problems


def main() -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        try:
            result = run_one(line.strip())
        except Exception:
            result = {"outcome": "raw", "verdict": "?", "problems": [traceback.format_exc()]}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
