"""The CPU benchmarks' smoke modes run and write the reproducibility record (no timing asserted).

Each JSON must hold the machine before and after (load average, threads, CPU model, versions),
and every speedup row the median of at least 5 interleaved pairs with its spread, the thread
count and ``bytes_fraction``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _check_meta(meta: dict, stdout: str) -> None:
    for when in ("before", "after"):
        m = meta[when]
        assert len(m["load_avg"]) == 3 and all(x >= 0 for x in m["load_avg"])
        assert m["threads"] >= 1 and m["cpu"] and m["logical_cpus"] >= 1
        assert m["torch"] and m["squeeze"] and "transformers" in m
    assert "load_warning" in meta
    if meta["load_warning"]:
        assert meta["load_warning"] in stdout


def _check_speedup(r: dict) -> None:
    assert r["pairs"] >= 5
    assert r["speedup_min"] <= r["speedup_q1"] <= r["speedup"] <= r["speedup_q3"]
    assert r["speedup_q3"] <= r["speedup_max"]


def test_load_warning_compares_load_with_threads():
    busy = {"before": {"load_avg": [0.4, 0, 0]}, "after": {"load_avg": [2.6, 0, 0]}}
    assert "exceeds 2 thread" in benchlib.load_warning(busy, 2)
    assert benchlib.load_warning(busy, 3) is None


def test_speedup_is_the_median_of_the_pair_ratios():
    s = benchlib.speedup([4.0, 6.0, 9.0, 2.0, 8.0], [1.0, 2.0, 3.0, 1.0, 1.0])
    assert s["speedup"] == 3.0 and s["speedup_min"] == 2.0 and s["speedup_max"] == 8.0
    assert s["pairs"] == 5


def test_interleaved_alternates_the_order():
    seen = []
    times = benchlib.interleaved({"a": lambda: seen.append("a"), "b": lambda: seen.append("b")},
                                 rounds=3, min_sample_s=0.0, before=lambda: None)  # fmt: skip
    assert [len(t) for t in times.values()] == [3, 3]
    assert seen[2:] == ["a", "b", "b", "a", "a", "b"]  # after one warm-up call each


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "cpu.json"
    args = [str(BENCH / "bench_cpu.py"), "--smoke", "--threads", "1", "2", "--json", str(out)]
    has_faiss = importlib.util.find_spec("faiss") is not None
    if not has_faiss:
        args += ["--only", "decode", "--only", "prefill"]
    proc = _run(args)
    result = json.loads(out.read_text())
    _check_meta(result["meta"], proc.stdout)
    rows = result["rows"]
    timed = [r for r in rows if r["case"] in ("decode", "prefill")]
    assert {(r["case"], r["dtype"], r["threads"]) for r in timed} == {
        (c, d, t) for c in ("decode", "prefill") for d in ("fp32", "bf16") for t in (1, 2)
    }
    for r in timed:
        _check_speedup(r)
        assert 0 < r["bytes_fraction"] <= 1 and r["dense_impl"] in r["dense_all_ms"]
        assert len(r["dense_times_ms"]) == len(r["squeezed_times_ms"]) == r["pairs"]
        assert r["config"]["sinks"] == 4 and r["config"]["levels"] == 1  # the defaults
        assert "other_cores" in r and "load_avg_1m" in r
    if has_faiss:
        (km,) = [r for r in rows if r["case"] == "kmeans"]
        assert "other_cores" in km and km["ours_s"] > 0
    assert "speedup [min-max]" in proc.stdout


def test_bench_sparse_attention_smoke(tmp_path):
    out = tmp_path / "sparse.json"
    script = str(BENCH / "bench_sparse_attention.py")
    proc = _run([script, "--smoke", "--threads", "1", "--dtype", "fp32", "--json", str(out)])
    result = json.loads(out.read_text())
    _check_meta(result["meta"], proc.stdout)
    assert {r["kind"] for r in result["rows"]} == {"decode", "prefill"}
    for r in result["rows"]:
        _check_speedup(r)
        assert r["threads"] == 1 and 0 < r["bytes_fraction"] <= 1


@pytest.mark.slow
def test_bench_e2e_smoke_through_the_cli(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "e2e.json"
    proc = _run(["-m", "squeeze", "bench", "e2e", "--smoke", "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    meta = result["meta"]
    _check_meta(meta, proc.stdout)
    assert meta["layers"] == 30 and meta["context"] == 512
    gen, fns = result["rows"]
    assert gen["case"] == "generate" and fns["case"] == "functions"
    for key in ("e2e", "attention", "decode_step"):
        _check_speedup(gen[key])
    assert gen["overhead_us_per_call"] > 0 and 0 < gen["bytes_fraction"] <= 1
    assert set(gen["stages_us_per_call"]) >= {"lookup", "sparse", "tail", "stats"}
    for run in gen["runs"]["dense"] + gen["runs"]["squeezed"]:
        assert run["decode_steps"] == meta["new_tokens"] - 1
        assert run["attention_calls_per_step"] == 30
    _check_speedup(fns)
    assert "attention ms/step (HF)" in proc.stdout
