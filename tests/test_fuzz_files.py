"""Fuzzing index files (issue 14): hypothesis mutates a valid file (shapes, dtypes, values, offsets,
positions, header fields), recomputes every digest, and a worker subprocess loads it and runs one
attention call. Every example must either load and agree with an independent reading of the
file (``fuzz_worker.py``), or be refused with ``IndexFileError``. A crash, a raw exception, a
non-finite output, or a disagreement fails the example.

One worker process runs every example (started once, restarted only after a crash), so the
test costs a few seconds for its 400 examples.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from file_tools import raw, resign, write  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from reference import make_keys  # noqa: E402

import squeeze  # noqa: E402

HERE = Path(__file__).resolve().parent
HKV, N, D, W = 2, 240, 16, 24
TENSORS = (
    "keys", "values", "positions", "centroids", "offsets", "l1_centroids", "l1_offsets",
    "calibration.budgets", "calibration.log_thresholds", "calibration.l1_log_thresholds",
    "value_means",
)  # fmt: skip
VALUES = (
    float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 65505.0, -1.0, 0.0, 1.0, 0.5,
    2.0**40, N, N - 1, N + 1, W, 3, -7,
)  # fmt: skip
DTYPES = (torch.int64, torch.int32, torch.float64, torch.float32, torch.float16, torch.bfloat16)
CONFIG_VALUES = (
    None, -1, 0, 1, 3, W, N, 10**9, 0.05, 0.5, 1.5, "x", [], {}, True, "threshold", "float32",
    "bfloat16",
)  # fmt: skip
CONFIG_KEYS = (
    "window", "l1_ratio", "centroid_ratio", "mode", "budget", "metric", "sinks", "centroid_dtype",
    "estimate_zone",
)  # fmt: skip
HEADER_KEYS = ("format", "format_version", "layers", "metadata", "sha256", "extra")

mutation = st.one_of(
    st.tuples(st.just("value"), st.sampled_from(TENSORS), st.floats(0, 1), st.sampled_from(VALUES)),
    st.tuples(st.just("swap"), st.sampled_from(TENSORS), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("shape"), st.sampled_from(TENSORS), st.integers(0, 2), st.sampled_from((-1, 1))),
    st.tuples(st.just("dtype"), st.sampled_from(TENSORS), st.sampled_from(DTYPES), st.none()),
    st.tuples(st.just("drop"), st.sampled_from(TENSORS), st.none(), st.none()),
    st.tuples(st.just("config"), st.sampled_from(CONFIG_KEYS), st.sampled_from(CONFIG_VALUES), st.none()),
    st.tuples(st.just("header"), st.sampled_from(HEADER_KEYS), st.sampled_from(CONFIG_VALUES), st.none()),
)  # fmt: skip


def apply(mut, header: dict, tensors: dict) -> None:
    kind, name, a, b = mut
    if kind == "config":
        with contextlib.suppress(LookupError, TypeError):  # no config left to change
            header["layers"][0]["config"][name] = a
        return
    if kind == "header":
        header[name] = a
        return
    key = f"layers.0.{name}"
    if key not in tensors:
        return
    t = tensors[key].clone()
    if kind == "drop":
        del tensors[key]
        return
    if kind == "dtype":
        tensors[key] = t.to(a)
        return
    if kind == "shape":
        axis = min(a, t.dim() - 1)
        size = t.shape[axis]
        t = (
            t.narrow(axis, 0, size - 1)
            if b < 0 and size > 1
            else torch.cat([t, t.narrow(axis, 0, 1)], axis)
        )
        tensors[key] = t.contiguous()
        return
    flat = t.reshape(-1)
    i = min(int(a * flat.numel()), flat.numel() - 1)
    if kind == "swap":
        j = min(int(b * flat.numel()), flat.numel() - 1)
        flat[i], flat[j] = flat[j].clone(), flat[i].clone()
    else:
        value = b
        if t.is_floating_point():  # out of the dtype's range: inf, as a file could hold
            value = torch.tensor(value, dtype=torch.float64).to(t.dtype)
        else:  # within the dtype's range (an earlier mutation may have made it int32)
            info = torch.iinfo(t.dtype)
            value = int(value) if value == value and abs(value) < 2**62 else -1
            value = max(info.min, min(info.max, value))
        flat[i] = value
    tensors[key] = t


class Worker:
    """The fuzz worker subprocess: one path in, one JSON verdict out; restarted after a crash."""

    def __init__(self):
        self.proc = None

    def ask(self, path: Path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "fuzz_worker.py")], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=60)
            self.proc = None
            return {"outcome": "crash", "problems": [f"the worker died (exit {code})"]}
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    gen = torch.Generator().manual_seed(14)
    cfg = squeeze.SqueezeConfig(
        window=W, centroid_ratio=0.1, l1_ratio=0.03, budget=0.3, kmeans_iters=3, estimate_zone=1.0
    )
    index = squeeze.build_index(
        make_keys(HKV, N, D, generator=gen), torch.randn(HKV, N, D, generator=gen), cfg,
        queries=make_keys(2 * HKV, W, D, generator=gen),
    )  # fmt: skip
    path = tmp_path_factory.mktemp("fuzz") / "good.sqz"
    index.save(path)
    return raw(path)


def test_the_original_loads_and_agrees(original, worker, tmp_path):
    header, tensors = original
    result = worker.ask(write(tmp_path / "same.sqz", header, tensors))
    assert result == {"outcome": "loaded", "verdict": "valid", "problems": []}


@settings(
    max_examples=400, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_files_load_and_agree_or_are_refused(original, worker, tmp_path, mutations):
    header = json.loads(json.dumps(original[0]))
    tensors = dict(original[1])
    for mut in mutations:
        apply(mut, header, tensors)
    with contextlib.suppress(Exception):  # a header re-signing cannot read: kept as is
        header = resign(header, tensors)
    path = write(tmp_path / "mutated.sqz", header, tensors)
    result = worker.ask(path)
    hypothesis.event(result["outcome"])  # --hypothesis-show-statistics: loaded vs refused
    assert result["outcome"] in ("loaded", "refused"), (mutations, result)
    assert not result["problems"], (mutations, result)
