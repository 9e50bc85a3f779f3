"""Run one in-process vLLM engine on a job file and write the results as JSON (used by the
engine tests in a subprocess, so every engine gets a fresh process and a hard time limit).

    python tests/vllm_run.py job.json out.json

job: ``{"model": dir, "additional_config": {...} | null, "warm": [[ids]], "prompts": [[ids]],
"max_tokens": int, "max_model_len": int, "dtype": str}``. ``warm`` prompts run first (they fill the prefix
cache), then all ``prompts`` in one ``generate`` call (one batch: mixed requests share steps).
out: ``{"tokens": [[ids]], "cached": [int], "stats": {...}}``; on failure the exception text
goes to stderr and the exit code is 3.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main(job_path: str, out_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=job["model"],
        dtype=job.get("dtype", "float32"),
        enforce_eager=True,
        max_model_len=job.get("max_model_len", 2048),
        seed=0,
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

    stats.reset()
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
    s = stats.snapshot()
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "cached": [o.num_cached_tokens for o in outs],
        "stats": {**vars(s), "kv_fraction": s.kv_fraction, "clustered": s.clustered_fraction},
    }
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
