"""Run one in-process vLLM engine on a job file and write the results as JSON (used by the
engine tests in a subprocess, so every engine gets a fresh process and a hard time limit).

    python tests/vllm_run.py job.json out.json

job: ``{"model": dir, "additional_config": {...} | null, "warm": [[ids]], "prompts": [[ids]],
"waves": [[[ids]]], "max_tokens": int, "max_model_len": int, "dtype": str, "engine": {...}}``.
``warm`` prompts run first (they fill the prefix cache), then all ``prompts`` in one ``generate``
call (one batch: mixed requests share steps), then each wave of ``waves`` in one call of its own;
``engine`` holds more ``LLM`` arguments (e.g. ``num_gpu_blocks_override``); ``pause_s``: seconds
to wait before each wave.
out: ``{"tokens": [[ids]], "cached": [int], "stats": {...}, "waves": [{"tokens", "cached",
"stats"}]}``, the stats of each call on their own; on failure the exception text goes to stderr
and the exit code is 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_engine(
    tmp: Path,
    name: str,
    job: dict,
    expect_ok: bool = True,
    plugin: bool = True,
    timeout: float = 300,
    env: dict | None = None,
):
    """Run ``job`` in a fresh subprocess; its results (``expect_ok``) or the finished process.
    ``plugin=False``: vLLM without the plugin registered at all (``SQUEEZE_VLLM_DISABLE``)."""
    job_path, out_path = tmp / f"{name}.job.json", tmp / f"{name}.out.json"
    job_path.write_text(json.dumps(job))
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": str(HERE.parent),
        "SQUEEZE_VLLM_DISABLE": str(int(not plugin)),
    }
    cmd = [
        "nice",
        "-n",
        "5",
        sys.executable,
        str(HERE / "vllm_run.py"),
        str(job_path),
        str(out_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**json.loads(out_path.read_text()), "log": proc.stdout + proc.stderr}


def main(job_path: str, out_path: str) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(job_path) as f:
        job = json.load(f)
    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=job["model"],
        dtype=job.get("dtype", "float32"),
        enforce_eager=True,
        max_model_len=job.get("max_model_len", 2048),
        seed=0,
        **job.get("engine", {}),
    )
    if job.get("additional_config"):
        kwargs["additional_config"] = job["additional_config"]
    try:
        llm = LLM(**kwargs)
    except Exception as err:
        traceback.print_exc()
        print(f"ENGINE START FAILED: {err}", file=sys.stderr)
        return 3
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)
    if job.get("warm"):
        llm.generate([{"prompt_token_ids": p} for p in job["warm"]], params, use_tqdm=False)
    from squeeze.patches.vllm import stats

    def run(prompts):
        stats.reset()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        s = stats.snapshot()
        return {
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "cached": [o.num_cached_tokens for o in outs],
            "stats": {**vars(s), "kv_fraction": s.kv_fraction, "clustered": s.clustered_fraction},
        }

    result = run(job["prompts"]) if job.get("prompts") else {}
    result["waves"] = []
    for w in job.get("waves", []):
        time.sleep(job.get("pause_s", 0))
        result["waves"].append(run(w))
    result["squeeze_file"] = __import__("squeeze").__file__
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
