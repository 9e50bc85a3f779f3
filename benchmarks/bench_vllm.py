"""vLLM serving benchmark: N concurrent questions over one shared context, with and without the
squeeze plugin. Reports requests per second and time per output token (TPOT).

    python benchmarks/bench_vllm.py                                  # tiny random Llama, 16K context, CPU
    python benchmarks/bench_vllm.py --model /models/Llama-3.1-8B-Instruct --context-len 32768 \\
        --dtype bfloat16 --questions 32                              # a real model (e.g. on a GPU)

Each configuration runs in a fresh subprocess (one engine). The context is compiled once with
``squeeze.compile`` (transformers, on the GPU when there is one) and served with
``additional_config={"squeeze": {...}}``; the context's first prefill fills vLLM's prefix cache
before timing, in both configurations. Per configuration two timed batches run, with 1 and with
``--max-tokens`` new tokens; ``TPOT = (t_K - t_1) / (K - 1)`` is the decode time per step of the
whole batch, and req/s is ``N / t_K``. The stock run is vLLM with no plugin configuration.
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def prepare(args, work: Path) -> tuple[str, str, list[int]]:
    """The model directory, the compiled context file and the context ids."""
    import torch

    import squeeze

    gen = torch.Generator().manual_seed(args.seed)
    if args.model is None:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from vllm_tiny import save_tiny_llama

        model_dir = work / "tiny"
        overrides = json.loads(args.tiny_config) if args.tiny_config else {}
        overrides.setdefault("max_position_embeddings", max(32768, 2 * args.context_len))
        model = save_tiny_llama(model_dir, **overrides)
        vocab = model.config.vocab_size
    else:
        import transformers

        model_dir = Path(args.model)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, args.dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev)
        vocab = model.config.vocab_size
    ids = torch.randint(3, min(vocab, 30000), (args.context_len,), generator=gen).tolist()
    path = work / "context.sqz"
    cfg = squeeze.SqueezeConfig(budget=args.budget)
    t0 = time.perf_counter()
    squeeze.compile(model, torch.tensor(ids), cfg, progress=False).save(path)
    print(f"compiled a {args.context_len}-token context in {time.perf_counter() - t0:.1f} s")
    del model
    return str(model_dir), str(path), ids


def run_engine(args, model_dir: str, context: str | None, prompts_path: Path) -> dict:
    """One engine in a subprocess (``--_engine``); returns its timings."""
    cmd = [sys.executable, __file__, "--_engine", str(prompts_path), "--model", model_dir]
    cmd += ["--dtype", args.dtype, "--max-tokens", str(args.max_tokens)]
    cmd += ["--budget", str(args.budget), "--repeats", str(args.repeats)] + (
        ["--_context", context] if context else []
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if out.returncode:
        sys.exit(f"engine failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def engine_main(args) -> None:
    from vllm import LLM, SamplingParams

    job = json.loads(Path(args._engine).read_text())
    kwargs = dict(model=args.model, dtype=args.dtype, max_model_len=job["max_model_len"], seed=0)
    kwargs["enforce_eager"] = True
    if args._context:
        kwargs["additional_config"] = {
            "squeeze": {"contexts": [args._context], "budget": args.budget, "log_interval_s": 0}
        }
    llm = LLM(**kwargs)
    prompts = [{"prompt_token_ids": job["context"] + q} for q in job["questions"]]
    # the context's first prefill (stock) fills the prefix cache; then one untimed batch warms
    # every path (the squeezed prefill and decode included)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    if args._context:
        from squeeze.patches.vllm import stats

        stats.reset()
    times = {}
    for k in (1, args.max_tokens):
        params = SamplingParams(max_tokens=k, temperature=0, ignore_eos=True)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - t0)
            assert all(len(o.outputs[0].token_ids) == k for o in outs)
        times[k] = best
    result = {"t1": times[1], "tk": times[args.max_tokens]}
    if args._context:
        s = stats.snapshot()
        result.update(kv_fraction=s.kv_fraction, clustered_fraction=s.clustered_fraction)
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model directory (default: a tiny random Llama)")
    p.add_argument(
        "--tiny-config",
        help='JSON overrides of the tiny Llama, e.g. \'{"num_key_value_heads": 8, '
        '"num_attention_heads": 32, "head_dim": 128, "hidden_size": 1024}\'',
    )
    p.add_argument("--context-len", type=int, default=16384)
    p.add_argument("--questions", type=int, default=16, help="concurrent requests")
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timed batches per setting (best kept)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per engine")
    p.add_argument("--out", default="results/bench_vllm.json")
    p.add_argument("--_engine", help=argparse.SUPPRESS)
    p.add_argument("--_context", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._engine:
        engine_main(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, context, ids = prepare(args, work)
        import torch

        gen = torch.Generator().manual_seed(args.seed + 1)
        questions = [
            torch.randint(3, 500, (args.question_len,), generator=gen).tolist()
            for _ in range(args.questions)
        ]
        job = {
            "context": ids,
            "questions": questions,
            "max_model_len": args.context_len + args.question_len + args.max_tokens + 16,
        }
        prompts_path = work / "job.json"
        prompts_path.write_text(json.dumps(job))
        stock = run_engine(args, model_dir, None, prompts_path)
        squeezed = run_engine(args, model_dir, context, prompts_path)
    rows = []
    for name, r in (("stock vLLM", stock), (f"squeeze budget={args.budget}", squeezed)):
        tpot = (r["tk"] - r["t1"]) / max(args.max_tokens - 1, 1)
        rows.append(
            {"config": name, "req_per_s": args.questions / r["tk"], "tpot_ms": 1e3 * tpot, **r}
        )
    print(
        f"\n{args.questions} concurrent questions x {args.max_tokens} tokens over a "
        f"{args.context_len}-token context, {args.dtype}, {model_dir if args.model else 'tiny Llama'}"
    )
    print(f"{'config':<24} {'req/s':>8} {'TPOT ms':>9} {'keys read':>10}")
    for r in rows:
        frac = f"{100 * r['kv_fraction']:.1f}%" if "kv_fraction" in r else "100%"
        print(f"{r['config']:<24} {r['req_per_s']:>8.2f} {r['tpot_ms']:>9.1f} {frac:>10}")
    ratio = rows[0]["tpot_ms"] / rows[1]["tpot_ms"]
    print(
        f"TPOT speedup (stock / squeeze): {ratio:.2f}x; "
        f"req/s ratio: {rows[1]['req_per_s'] / rows[0]['req_per_s']:.2f}x"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "machine": platform.processor() or platform.machine(),
                "rows": rows,
                "tpot_speedup": ratio,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
