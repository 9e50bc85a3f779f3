"""End to end on a real model: HF ``generate`` dense against squeezed over a long real-text context.

    python benchmarks/bench_e2e.py                       # SmolLM2-135M, 8K tokens, 32 new tokens
    python benchmarks/bench_e2e.py --threads 1 2 --pairs 7
    squeeze bench e2e --smoke --json /tmp/e2e.json      # the same script, tiny sizes

The context is ``--context`` tokens of CPython's documentation (``fidelity_lib.pydoc_text``, cut
so that context, question and answer fit the model's positions: 8141 of 8192 on SmolLM2), the
question one sentence after it. Dense is the plain model (``sdpa``, ``squeeze.unpatch``) over a
``DynamicCache`` holding the context (the K/V the compile captured, in position order; with
``--dense-prefill`` a dense forward of the context), copied before each run (not timed);
squeezed is ``ctx = squeeze.compile(model, ids, SqueezeConfig(budget=...))`` and
``ctx.generate(question)``. Both generate ``--new-tokens`` greedy tokens (EOS suppressed), in
``--pairs`` interleaved pairs (alternating which runs first) at each ``--threads`` count.

Measured per run, then summarised as the median of the per-pair ratios with their min-max:

* end-to-end tokens/s: new tokens over the ``generate`` wall time (the question's forward over
  the cached context included), and the median decode step (one token's forward);
* attention time per decode step over all layers: the wall time of the attention function
  transformers calls (``sdpa`` dense, ``squeeze`` squeezed), summed over the layers of a step;
* the per-layer overhead of the patched attention: a squeezed call's wall time minus the time
  inside its pipeline stages (lookup, segments, sparse attention, tail attention and merge); of it,
  the input checks, the mask check and the stats are timed too (``e2e_timers``);
* as a reference, attention as functions on the last decode step's real queries and K/V: the
  best GQA-packed dense (matmul or SDPA) against ``squeeze.squeezed_attention``, all layers,
  without the HF wrapper (``--no-functions`` skips it).

Targets (issue 13): attention per step >= 4x lower, tokens/s >= 1.3x, overhead <= 30 us per layer
call. Prints a table and writes JSON (machine before and after, per row the cores other
processes kept busy; the table warns when the load average exceeds the thread count).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

# Spinning OpenMP workers get preempted on a shared machine; passive waiting costs nothing when
# idle and applies to dense and squeezed alike. Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import e2e_timers
import fidelity_lib as lib

import squeeze

QUESTION = "\n\nQuestion: What is the text above about? Answer in one sentence.\nAnswer:"
TARGETS = {"attention_speedup": 4.0, "e2e_speedup": 1.3, "overhead_us": 30.0}
SMOKE = dict(context=512, new_tokens=4, pairs=5, fn_rounds=5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="demo", help="demo (SmolLM2-135M-Instruct) or a path")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--context", type=int, default=8192, help="context tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--pairs", type=int, default=5, help="interleaved dense/squeezed pairs")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch thread counts, each timed (default: torch's)")  # fmt: skip
    p.add_argument("--fn-rounds", type=int, default=7, help="rounds of the function reference")
    p.add_argument("--no-functions", action="store_true", help="skip the function reference")
    p.add_argument("--dense-prefill", action="store_true",
                   help="fill the dense cache with a dense forward (default: the compile's K/V)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="where in the text the context starts")
    p.add_argument("--smoke", action="store_true", help=f"tiny sizes: {SMOKE}")
    p.add_argument("--json", default=None, help="default benchmarks/results/e2e[_smoke].json")
    args = p.parse_args(argv)
    if args.smoke:
        given = {a.split("=")[0][2:].replace("-", "_") for a in (argv or sys.argv[1:])}
        for key, value in SMOKE.items():
            if key not in given:
                setattr(args, key, value)
    args.threads = args.threads or [torch.get_num_threads()]
    args.json = args.json or f"benchmarks/results/e2e{'_smoke' if args.smoke else ''}.json"
    return args


def setup(args):
    """``(model, ctx, dense prefix cache, context ids [N], question ids [Q], setup timings)``."""
    from squeeze.apps.models import load_model

    model_path = squeeze.demo_model() if args.model == "demo" else args.model
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    model, tok = load_model(model_path, dtype=dtype)
    question = torch.tensor(tok(QUESTION, add_special_tokens=False).input_ids)
    # context + question + answer within the model's positions (SmolLM2-135M: 8192)
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    n_ctx = min(args.context, limit - question.numel() - args.new_tokens)
    sample = lib.text_samples(tok, lib.pydoc_text(), "docs", n_ctx, 0, 1, args.seed)[0]
    t0 = time.perf_counter()
    cfg = squeeze.SqueezeConfig(budget=args.budget)
    ctx = squeeze.compile(model, sample.ctx, cfg, progress=False)
    timings = {"compile_s": time.perf_counter() - t0, **ctx.stats()["timings"]}
    squeeze.unpatch(model)
    t0 = time.perf_counter()
    prefix = lib.dense_prefix(model, sample.ctx) if args.dense_prefill else dense_cache(ctx)
    timings["dense_cache_s"] = time.perf_counter() - t0
    return model, ctx, prefix, sample.ctx, question, timings


def dense_cache(ctx):
    """A ``DynamicCache`` holding the context's K/V as a dense prefill leaves them: the K/V the
    compile captured, put back in position order (squeezed layers store theirs in cluster order).
    """
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=ctx.model.config)
    for i in range(ctx.num_layers):
        if i in ctx.indexes:
            ix = ctx.indexes[i]
            where = ix.positions[..., None].expand_as(ix.keys)
            k = torch.empty_like(ix.keys).scatter_(1, where, ix.keys)
            v = torch.empty_like(ix.values).scatter_(1, where, ix.values)
        else:
            k, v = ctx.dense[i].keys[0], ctx.dense[i].values[0]
        cache.update(k[None], v[None], i)
    return cache


class Runner:
    """Runs one dense or squeezed ``generate`` with the timers installed, and summarises it."""

    def __init__(self, model, ctx, prefix, ctx_ids, question, new_tokens):
        self.model, self.ctx, self.prefix = model, ctx, prefix
        self.full = torch.cat([ctx_ids, question])[None]
        self.question, self.new = question, new_tokens
        self.attn = e2e_timers.AttentionTimer()
        self.steps = e2e_timers.StepTimer(model)
        eos = model.generation_config.eos_token_id
        self.pad = eos if isinstance(eos, int) else (eos or [0])[0]

    @torch.no_grad()
    def run(self, kind: str, new_tokens: int | None = None) -> dict:
        n_new = new_tokens or self.new
        kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        if kind == "dense":
            squeeze.unpatch(self.model)
            cache = copy.deepcopy(self.prefix)
        else:
            squeeze.patch(self.model)
            self.ctx.reset_stats()
        self.attn.install()
        self.steps.install()
        try:
            t0 = time.perf_counter()
            if kind == "dense":
                out = self.model.generate(
                    input_ids=self.full, past_key_values=cache, pad_token_id=self.pad, **kw
                )
                tokens = out[0, self.full.shape[1] :]
            else:
                tokens = self.ctx.generate(self.question, **kw)
            wall = time.perf_counter() - t0
        finally:
            self.steps.uninstall()
            self.attn.uninstall()
        if tokens.numel() != n_new:
            raise RuntimeError(f"{kind} generated {tokens.numel()} tokens, not {n_new}")
        return summarise(kind, wall, tokens, self.attn.take(), self.steps.take())


def summarise(kind, wall, tokens, calls, forwards) -> dict:
    """One run's figures from its attention calls and forwards."""
    steps = [s for n, s in forwards if n == 1]
    decode = [c for c in calls if c.rows == 1]
    per_step = sum(c.seconds for c in decode) / max(1, len(steps))
    out = {
        "kind": kind,
        "wall_s": wall,
        "tokens": tokens.tolist(),
        "tokens_per_s": tokens.numel() / wall,
        "first_forward_ms": forwards[0][1] * 1e3 if forwards else None,
        "decode_steps": len(steps),
        "decode_step_ms": statistics.median(steps) * 1e3 if steps else None,
        "attention_calls_per_step": len(decode) / max(1, len(steps)),
        "attention_ms_per_step": per_step * 1e3,
    }
    if kind == "squeezed" and decode:
        out["overhead_us_per_call"] = statistics.median(c.overhead_s for c in decode) * 1e6
        out["overhead_us_mean"] = statistics.mean(c.overhead_s for c in decode) * 1e6
        names = (*e2e_timers.KERNELS, *e2e_timers.BOOKKEEPING)
        out["stages_us_per_call"] = {
            k: statistics.mean(c.stages.get(k, 0.0) for c in decode) * 1e6 for k in names
        }
        out["wall_us_per_call"] = statistics.mean(c.seconds for c in decode) * 1e6
    return out


def pairs_row(runner: Runner, args) -> dict:
    """Warm-up, then ``args.pairs`` interleaved pairs at the current thread count."""
    runner.run("dense", 2)
    runner.run("squeezed", 2)
    runs = {"dense": [], "squeezed": []}
    load = os.getloadavg()[0]
    with benchlib.Interference() as busy:
        for i in range(args.pairs):
            for kind in ("dense", "squeezed") if i % 2 == 0 else ("squeezed", "dense"):
                runs[kind].append(runner.run(kind))
    d, s = runs["dense"], runs["squeezed"]
    stats = runner.ctx.stats()
    row = {
        "case": "generate",
        "threads": torch.get_num_threads(),
        "e2e": benchlib.speedup([r["wall_s"] for r in d], [r["wall_s"] for r in s]),
        "decode_step": benchlib.speedup([r["decode_step_ms"] for r in d],
                                        [r["decode_step_ms"] for r in s]),
        "attention": benchlib.speedup([r["attention_ms_per_step"] for r in d],
                                      [r["attention_ms_per_step"] for r in s]),
        "overhead_us_per_call": statistics.median(r["overhead_us_per_call"] for r in s),
        "overhead_us_range": [min(r["overhead_us_per_call"] for r in s),
                              max(r["overhead_us_per_call"] for r in s)],
        "stages_us_per_call": {k: statistics.median(r["stages_us_per_call"][k] for r in s)
                               for k in s[0]["stages_us_per_call"]},
        "same_tokens": d[0]["tokens"] == s[0]["tokens"],
        "first_difference": lib.first_difference(d[0]["tokens"], s[0]["tokens"]),
        "bytes_fraction": stats["bytes_fraction"],
        "kv_fraction": stats["kv_fraction"],
        "clustered_fraction": stats["clustered_fraction"],
        "load_avg_1m": load,
        "runs": runs,
    }  # fmt: skip
    for key in ("tokens_per_s", "decode_step_ms", "attention_ms_per_step", "wall_s"):
        row[f"dense_{key}"] = statistics.median(r[key] for r in d)
        row[f"squeezed_{key}"] = statistics.median(r[key] for r in s)
    row["other_cores"] = busy.cores
    return row


@torch.no_grad()
def function_row(runner: Runner, args) -> dict:
    """Attention as functions on the last decode step's queries and K/V, all layers: the best
    GQA-packed dense against ``squeezed_attention``."""
    from squeeze.patches.hf import observe

    seen = {}

    def record(module, query, key, value, scaling):
        seen[module.layer_idx] = (query, key, value, scaling)

    squeeze.patch(runner.model)
    with observe(record):
        runner.ctx.generate(runner.question, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    layers = []
    for i, (q, kt, vt, scale) in sorted(seen.items()):
        layer = runner.prefix.layers[i]
        b, hq, _, d = q.shape
        hkv = kt.shape[1]
        scale = d**-0.5 if scale is None else scale
        k_all = torch.cat([layer.keys, kt], 2).contiguous()
        v_all = torch.cat([layer.values, vt], 2).contiguous()
        layers.append((q, q.reshape(b, hkv, hq // hkv, d), k_all, v_all, kt, vt, scale, i))
    index = runner.ctx.indexes
    fns = {
        "matmul": lambda: [
            torch.matmul(torch.softmax(torch.matmul(p, k.transpose(-1, -2)) * s, -1), v)
            for _, p, k, v, _, _, s, _ in layers
        ],
        "sdpa": lambda: [
            torch.nn.functional.scaled_dot_product_attention(p, k, v, scale=s)
            for _, p, k, v, _, _, s, _ in layers
        ],
        "squeezed": lambda: [
            squeeze.squeezed_attention(q, index[i], kt, vt, s)
            for q, _, _, _, kt, vt, s, i in layers
        ],
    }
    with benchlib.Interference() as busy:
        times = benchlib.interleaved(fns, args.fn_rounds, 0.05)
    best = benchlib.best_of(times, ["matmul", "sdpa"])
    return {
        "case": "functions",
        "threads": torch.get_num_threads(),
        "layers": len(layers),
        "tail": layers[0][4].shape[2],
        "dense_impl": best,
        "dense_ms": statistics.median(times[best]) * 1e3,
        "squeezed_ms": statistics.median(times["squeezed"]) * 1e3,
        **benchlib.speedup(times[best], times["squeezed"]),
        "other_cores": busy.cores,
    }


def sparse_backend(ctx) -> str:
    """The sparse-attention backend the squeezed layers' decode steps dispatch to."""
    from squeeze.kernels.sparse_attention import select_backend

    ix = next(iter(ctx.indexes.values()))
    q = torch.zeros(1, ix.num_kv_heads, 1, ix.head_dim, dtype=ix.keys.dtype)
    return select_backend(q, ix.keys)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    meta = {"before": benchlib.machine()}
    t_start = time.perf_counter()
    model, ctx, prefix, ctx_ids, question, timings = setup(args)
    runner = Runner(model, ctx, prefix, ctx_ids, question, args.new_tokens)
    meta.update(
        model=args.model, dtype=args.dtype, context=ctx_ids.numel(), question=question.numel(),
        new_tokens=args.new_tokens, budget=args.budget, layers=ctx.num_layers, **timings,
        config=dataclasses.asdict(ctx.config), targets=TARGETS, sparse_backend=sparse_backend(ctx),
    )  # fmt: skip
    rows = []
    for threads in args.threads:
        with benchlib.num_threads(threads):
            rows.append(pairs_row(runner, args))
            if not args.no_functions:
                rows.append(function_row(runner, args))
    squeeze.unpatch(model)
    benchlib.close(meta, max(args.threads), t_start)
    benchlib.write_json(args.json, meta, rows)
    print_table(rows, meta)
    print(f"wrote {args.json} ({meta['wall_s']:.0f} s)")
    return rows


def print_table(rows: list[dict], meta: dict) -> None:
    m = meta["before"]
    print(
        f"\n{meta['model']} {meta['dtype']}, context {meta['context']} + question "
        f"{meta['question']} tokens, {meta['new_tokens']} new, budget {meta['budget']}, sparse "
        f"backend {meta['sparse_backend']}; {m['cpu']}, torch {m['torch']}, "
        f"transformers {m['transformers']}"
    )
    if meta.get("load_warning"):
        print(meta["load_warning"])
    print(f"{'thr':>3} {'measure':28} {'dense':>10} {'squeezed':>10} {'ratio [min-max]':>20} "
          f"{'target':>8}")  # fmt: skip
    t = meta["targets"]
    for r in rows:
        thr = r["threads"]
        if r["case"] == "functions":
            _line(thr, f"attention fn ms/step ({r['dense_impl']})", r["dense_ms"],
                  r["squeezed_ms"], benchlib.spread_text(r), "")  # fmt: skip
            continue
        _line(thr, "tokens/s (generate)", r["dense_tokens_per_s"], r["squeezed_tokens_per_s"],
              benchlib.spread_text(r["e2e"]), f">={t['e2e_speedup']}x")  # fmt: skip
        _line(thr, "decode step ms", r["dense_decode_step_ms"], r["squeezed_decode_step_ms"],
              benchlib.spread_text(r["decode_step"]), "")  # fmt: skip
        _line(thr, "attention ms/step (HF)", r["dense_attention_ms_per_step"],
              r["squeezed_attention_ms_per_step"], benchlib.spread_text(r["attention"]),
              f">={t['attention_speedup']}x")  # fmt: skip
        lo, hi = r["overhead_us_range"]
        _line(thr, "overhead us/layer call", None, r["overhead_us_per_call"],
              f"[{lo:.1f}-{hi:.1f}]", f"<={t['overhead_us']}")  # fmt: skip
        st = r["stages_us_per_call"]
        print("    stages us/call: " + ", ".join(f"{k} {v:.1f}" for k, v in st.items()))
        busy = r["other_cores"]
        print(
            f"    bytes_fraction {r['bytes_fraction']:.3f}, kv read {r['kv_fraction']:.3f}, "
            f"same tokens: {r['same_tokens']} (first difference at {r['first_difference']}), "
            f"cores busy outside: {'-' if busy is None else f'{busy:.2f}'}"
        )


def _line(thr, name, dense, sq, ratio, target):
    def fmt(x):
        return "" if x is None else f"{x:.2f}"

    print(f"{thr:>3} {name:28} {fmt(dense):>10} {fmt(sq):>10} {ratio:>20} {target:>8}")


if __name__ == "__main__":
    main()
