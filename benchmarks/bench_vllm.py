"""vLLM serving benchmark: N concurrent questions over one shared context, stock vLLM against the
squeeze plugin, timed in interleaved pairs. Reports time per output token (TPOT) and requests/s.

    python benchmarks/bench_vllm.py --model demo --context-len 4096 8064       # SmolLM2, real text
    python benchmarks/bench_vllm.py                                            # tiny random Llama, 16K
    python benchmarks/bench_vllm.py --model /models/Llama-3.1-8B-Instruct --context-len 32768 \\
        --dtype bfloat16 --questions 32                                        # a real model (GPU)

Per context length, both engines (stock: vLLM with no plugin configuration; squeeze:
``additional_config={"squeeze": {...}}``) run at once, each in its own subprocess, idle while the
other is timed. The context is compiled once with ``squeeze.compile`` (transformers); its first
prefill fills each engine's prefix cache before timing, and one untimed batch warms every path.
Then ``--pairs`` times: a stock batch, a squeeze batch (the order alternates from pair to pair),
each timed with 1 and with ``--max-tokens`` new tokens: ``TPOT = (t_K - t_1) / (K - 1)`` is the
decode time per step of the whole batch, req/s is ``N / t_K``. The table gives the medians and the
spread (min-max) over the pairs, and the median of the per-pair TPOT ratios. The load average is
recorded with every pair: figures taken on a busy machine are flagged ``loaded``.

``--profile DIR`` runs one more 1-token and ``K``-token batch per engine under cProfile (CPU-time
clock, so waiting for a busy CPU is not counted), writes ``DIR/{stock,squeeze}-<len>-k<K>.prof``
and prints the shares by part of the decode (the difference) and of the prefill
(``vllm_profile.py``). Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = "@@bench "  # the engine's replies on stdout (vLLM logs go elsewhere)


# ------------------------------------------------------------------------------------ inputs
def load_model(args, work: Path):
    """``(model_dir, hf_model, tokenizer | None)``; ``--model demo`` is squeeze.demo_model()."""
    import torch
    import transformers

    import squeeze

    if args.model in (None, "tiny"):
        sys.path.insert(0, str(HERE.parent / "tests"))
        from vllm_tiny import save_tiny_llama

        overrides = json.loads(args.tiny_config) if args.tiny_config else {}
        overrides.setdefault("max_position_embeddings", max(32768, 2 * max(args.context_len)))
        model_dir = work / "tiny"
        return str(model_dir), save_tiny_llama(model_dir, **overrides), None
    model_dir = squeeze.demo_model() if args.model == "demo" else args.model
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, args.dtype)
    ).to(dev)
    return str(model_dir), model.eval(), transformers.AutoTokenizer.from_pretrained(model_dir)


def make_inputs(args, n: int, model, tokenizer) -> tuple[list[int], list[list[int]]]:
    """The context ids (real text for a real model: the Python docs' topics) and the questions
    (``--question-len`` ids each)."""
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    if tokenizer is None:
        vocab = model.config.vocab_size
        ids = torch.randint(3, min(vocab, 30000), (n,), generator=gen).tolist()
        return ids, [
            torch.randint(3, min(vocab, 500), (args.question_len,), generator=gen).tolist()
            for _ in range(args.questions)
        ]
    import pydoc_data.topics as topics

    names = sorted(topics.topics)
    text = "\n\n".join(topics.topics[k] for k in names)
    ids = tokenizer(text).input_ids
    if len(ids) < n:
        raise SystemExit(f"the context text has {len(ids)} tokens, fewer than {n}")
    questions = []
    for i in range(args.questions):
        q = tokenizer(
            f"\n\nQuestion {i + 1}: what does the documentation say about "
            f"'{names[(7 * i) % len(names)]}', and how is it used? Answer in detail, with examples"
            " drawn from the text above and nothing else."
        ).input_ids
        questions.append((q * 4)[: args.question_len])
    return ids[:n], questions


def compile_context(args, model, ids: list[int], path: Path) -> float:
    import torch

    import squeeze

    t0 = time.perf_counter()
    cfg = squeeze.SqueezeConfig(budget=args.budget)
    squeeze.compile(model, torch.tensor(ids), cfg, progress=False).save(path)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ engines
class Engine:
    """One engine subprocess (``--_engine``), answering commands one JSON line at a time."""

    def __init__(self, args, model_dir: str, job: Path, context: str | None, log: Path):
        cmd = [sys.executable, __file__, "--_engine", str(job), "--model", model_dir]
        cmd += ["--dtype", args.dtype, "--budget", str(args.budget)]
        cmd += ["--_context", context] if context else []
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_space_gib))
        if args.threads:  # the engine runs in-process: vLLM's core binding does not apply
            env["OMP_NUM_THREADS"] = str(args.threads)
        env["SQUEEZE_VLLM_DISABLE"] = "0" if context else "1"
        self._log = open(log, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        self.log_path = log

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            self._log.write(line)  # vLLM's log lines
        raise SystemExit(f"engine died:\n{self.log_path.read_text()[-4000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(SystemExit, BrokenPipeError):
                self.ask(op="quit")
            self.proc.wait(timeout=60)
        self._log.close()


def engine_main(args) -> None:
    """The engine subprocess: build the engine, warm it, then serve commands from stdin."""
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
    # the context's first prefill (stock) fills the prefix cache; one untimed batch warms every
    # path (the squeezed prefill and decode included)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    stats = None
    if args._context:
        from squeeze.patches.vllm import stats

        stats.reset()
    print(MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            print(MARK + "{}", flush=True)
            return
        if cmd["op"] not in ("time", "profile"):
            raise SystemExit(f"unknown command {cmd!r}")
        params = SamplingParams(max_tokens=cmd["max_tokens"], temperature=0, ignore_eos=True)
        reply: dict = {}
        if cmd["op"] == "profile":
            from vllm_profile import profiled

            with profiled(cmd["path"]):
                llm.generate(prompts, params, use_tqdm=False)
        else:
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            reply["s"] = time.perf_counter() - t0
            reply["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        if stats is not None:
            s = stats.snapshot()
            reply.update(kv_fraction=s.kv_fraction, clustered_fraction=s.clustered_fraction)
        print(MARK + json.dumps(reply), flush=True)


# ------------------------------------------------------------------------------------ timing
def timed_pair(engines: dict, order: list[str], k: int) -> dict:
    """One batch with 1 and with ``k`` new tokens per engine, in ``order``."""
    out = {}
    for name in order:
        t1 = engines[name].ask(op="time", max_tokens=1)
        tk = engines[name].ask(op="time", max_tokens=k)
        out[name] = {"t1": t1["s"], "tk": tk["s"], "tokens": tk["tokens"]}
        out[name].update({f: tk[f] for f in ("kv_fraction", "clustered_fraction") if f in tk})
    return out


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def run_length(args, model_dir: str, model, tokenizer, n: int, work: Path) -> dict:
    """Both engines on an ``n``-token context: ``--pairs`` interleaved timed pairs."""
    ids, questions = make_inputs(args, n, model, tokenizer)
    context = work / f"context-{n}-b{args.budget}-s{args.seed}.sqz"
    compile_s = None
    if context.exists():  # --work-dir: compiled by an earlier run
        print(f"reusing {context}", flush=True)
    else:
        compile_s = compile_context(args, model, ids, context)
        print(f"compiled a {n}-token context in {compile_s:.1f} s", flush=True)
    job = work / f"job-{n}.json"
    max_len = n + args.question_len + args.max_tokens + 16
    job.write_text(json.dumps({"context": ids, "questions": questions, "max_model_len": max_len}))
    engines = {}
    try:
        for name, ctx in (("stock", None), ("squeeze", str(context))):
            engines[name] = Engine(args, model_dir, job, ctx, work / f"{name}-{n}.log")
            engines[name].reply()  # the "ready" line: start-ups are not overlapped
        pairs, loads = [], []
        for p in range(args.pairs):
            order = ["stock", "squeeze"] if p % 2 == 0 else ["squeeze", "stock"]
            pairs.append(timed_pair(engines, order, args.max_tokens))
            loads.append(os.getloadavg()[0])
            print(f"  pair {p + 1}/{args.pairs}: load {loads[-1]:.2f}", flush=True)
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            for name, eng in engines.items():
                for k in (1, args.max_tokens):  # decode = the K-token batch less the 1-token one
                    path = f"{args.profile}/{name}-{n}-k{k}.prof"
                    eng.ask(op="profile", max_tokens=k, path=path)
    finally:
        for eng in engines.values():
            eng.close()
    return summarize(args, n, pairs, loads, compile_s)


def summarize(args, n: int, pairs: list[dict], loads: list[float], compile_s) -> dict:
    k, q = args.max_tokens, args.questions
    row: dict = {"context_len": n, "compile_s": compile_s, "load_avg_1min": loads}
    for name in ("stock", "squeeze"):
        tpot = [1e3 * (p[name]["tk"] - p[name]["t1"]) / max(k - 1, 1) for p in pairs]
        row[name] = {
            "tpot_ms": spread(tpot),
            "req_per_s": spread([q / p[name]["tk"] for p in pairs]),
        }
    ratios = [
        (p["stock"]["tk"] - p["stock"]["t1"]) / (p["squeeze"]["tk"] - p["squeeze"]["t1"])
        for p in pairs
    ]
    row["tpot_speedup"] = spread(ratios)
    last = pairs[-1]
    row["squeeze"]["kv_fraction"] = last["squeeze"].get("kv_fraction")
    row["squeeze"]["clustered_fraction"] = last["squeeze"].get("clustered_fraction")
    same = [
        a == b
        for x, y in zip(last["stock"]["tokens"], last["squeeze"]["tokens"], strict=True)
        for a, b in zip(x, y, strict=True)
    ]
    row["token_agreement"] = sum(same) / max(len(same), 1)
    pairs_ = zip(last["stock"]["tokens"], last["squeeze"]["tokens"], strict=True)
    first = [x[:1] == y[:1] for x, y in pairs_]
    row["first_token_agreement"] = sum(first) / max(len(first), 1)
    row["loaded"] = max(loads) > 0.5 * (os.cpu_count() or 1)
    return row


def print_table(args, model_name: str, rows: list[dict]) -> None:
    print(
        f"\n{args.questions} concurrent questions x {args.max_tokens} tokens, {args.dtype}, "
        f"{model_name}, budget {args.budget}; median (min-max) of {args.pairs} interleaved pairs"
    )
    head = f"{'context':>8} {'config':<8} {'TPOT ms':>22} {'req/s':>20} {'keys read':>10}"
    print(head + f" {'TPOT speedup':>20} {'load':>10}")
    for r in rows:
        for name in ("stock", "squeeze"):
            t, s = r[name]["tpot_ms"], r[name]["req_per_s"]
            frac = r["squeeze"]["kv_fraction"] if name == "squeeze" else 1.0
            line = f"{r['context_len']:>8} {name:<8} "
            line += f"{t['median']:>8.1f} ({t['min']:.1f}-{t['max']:.1f})".rjust(22)
            line += f"{s['median']:>7.2f} ({s['min']:.2f}-{s['max']:.2f})".rjust(21)
            line += f" {100 * frac:>9.1f}%"
            if name == "squeeze":
                x, ld = r["tpot_speedup"], r["load_avg_1min"]
                line += f"{x['median']:>6.2f}x ({x['min']:.2f}-{x['max']:.2f})".rjust(21)
                line += f" {min(ld):.1f}-{max(ld):.1f}" + (" LOADED" if r["loaded"] else "")
            print(line)
    agree = ", ".join(
        f"{r['context_len']}: {100 * r['token_agreement']:.0f}% "
        f"(first tokens {100 * r['first_token_agreement']:.0f}%)"
        for r in rows
    )
    print(f"greedy tokens equal to stock (last pair): {agree}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="'demo' (SmolLM2), 'tiny' (default: a random Llama) or a path")
    p.add_argument(
        "--tiny-config",
        help='JSON overrides of the tiny Llama, e.g. \'{"num_key_value_heads": 8, '
        '"num_attention_heads": 32, "head_dim": 128, "hidden_size": 1024}\'',
    )
    p.add_argument("--context-len", type=int, nargs="+", default=[16384])
    p.add_argument("--questions", type=int, default=16, help="concurrent requests")
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=5, help="interleaved stock/squeeze timed pairs")
    p.add_argument("--kv-space-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE per engine")
    p.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS of both engines (default: torch's, all cores); 1 on a busy "
        "machine, where every multi-threaded op waits for a second free core",
    )
    p.add_argument("--profile", help="directory: profile one batch per engine (see above)")
    p.add_argument("--work-dir", help="keep the model and compiled contexts here for reruns")
    p.add_argument("--out", default="results/bench_vllm.json")
    p.add_argument("--_engine", help=argparse.SUPPRESS)
    p.add_argument("--_context", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args._engine:
        sys.path.insert(0, str(HERE))
        engine_main(args)
        return
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, model, tokenizer = load_model(args, work)
        for n in args.context_len:
            rows.append(run_length(args, model_dir, model, tokenizer, n, work))
    name = model_dir if tokenizer is not None else "tiny random Llama"
    print_table(args, name, rows)
    if args.profile:
        from vllm_profile import print_shares

        for r in rows:
            for eng in ("stock", "squeeze"):
                base = f"{args.profile}/{eng}-{r['context_len']}"
                r[eng]["profile"] = print_shares(
                    f"{base}-k{args.max_tokens}.prof",
                    f"{base}-k1.prof",
                    f"{eng} {r['context_len']}",
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "model": name,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "engine_threads": args.threads or "default (all cores)",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
