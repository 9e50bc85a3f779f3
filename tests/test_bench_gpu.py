"""benchmarks/bench_gpu.py --smoke runs end to end under the interpreter and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"


@pytest.mark.slow
def test_bench_gpu_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_gpu_smoke.json").read_text())
    sections = {row["section"] for row in result["rows"]}
    assert sections == {"decode", "prefill", "kmeans", "kmeans-7B-all-layers"}
    assert proc.stdout.strip().splitlines()[-1].startswith("kmeans-7B-all-layers")  # table last
