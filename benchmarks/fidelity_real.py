"""Fidelity on a real pretrained model: squeezed attention against dense, through the product path.

    python benchmarks/fidelity_real.py                          # SmolLM2-135M, 4K, the defaults
    python benchmarks/fidelity_real.py --lengths 2048 4096 8192 --dtypes fp32 bf16 \\
        --budgets 0.05 0.1 0.2 --variant flat='{"l1_ratio": null}'
    squeeze bench fidelity ...                                  # the same script

For every context length, dtype and text sample (CPython's documentation and standard-library
source, or ``--text-file``), each configuration is compiled once (budgets share the clusters) and
measured in the same process as dense attention (the same model over a prefilled
``DynamicCache``):

* continuation perplexity of the next ``--cont`` tokens, teacher-forced one token per forward
  through ``ctx.cache()`` (decode) and as one block (prefill), with KL(dense ‖ squeezed) and
  top-1 agreement;
* passkey retrieval and a multi-key variant (several named keys, one asked), in filler and in
  real text, at random depths: keys found by dense and by squeezed;
* greedy agreement with dense on questions about the documents: the first differing token;
* per layer and KV head, the share of dense softmax mass on the keys read (``--mass``);
* the cost: clustered fraction read, centroids scored and ``bytes_fraction`` (K/V bytes read plus
  centroid bytes scored, over the context's dense K/V bytes).

Prints a table, writes JSON and a plot of perplexity ratio against ``bytes_fraction``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

# Spinning OpenMP workers get preempted on a shared machine (several times slower per step);
# passive waiting costs nothing when idle. Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity_lib as lib

import squeeze
from squeeze.apps.models import load_model
from squeeze.patches.hf import observe

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
QUESTIONS = [
    "\n\nQuestion: What is the text above about? Answer in one sentence.\nAnswer:",
    "\n\nQuestion: Quote the first line of the text above.\nAnswer:",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="demo (SmolLM2-135M-Instruct) or a path")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1])
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a SqueezeConfig variant, e.g. flat='{\"l1_ratio\": null}'",
    )
    p.add_argument("--sources", nargs="+", default=["docs", "code"], choices=list(lib.SOURCES))
    p.add_argument("--text-file", action="append", default=[], help="more text (UTF-8)")
    p.add_argument("--samples", type=int, default=1, help="contexts per source and length")
    p.add_argument("--cont", type=int, default=128, help="continuation tokens scored")
    p.add_argument("--regimes", nargs="+", default=["decode", "prefill"])
    p.add_argument("--needles", type=int, default=2, help="passkey trials per kind and length")
    p.add_argument("--questions", type=int, default=1, help="agreement questions per sample")
    p.add_argument("--mass", action="store_true", help="mass on keys read, per layer and head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default="benchmarks/results/fidelity_real.json")
    p.add_argument("--plot", default="benchmarks/results/fidelity_real.png")
    return p.parse_args(argv)


def variants(args) -> dict[str, dict]:
    """``{name: SqueezeConfig fields}``: the defaults, then each ``--variant``."""
    out = {"default": {}}
    for spec in args.variant:
        name, _, fields = spec.partition("=")
        out[name] = json.loads(fields)
    return out


def machine() -> dict:
    import transformers

    return {
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(), "torch": torch.__version__,
        "transformers": transformers.__version__, "squeeze": squeeze.__version__,
    }  # fmt: skip


def compiled(model, ctx_ids, fields, budgets):
    """``{budget: SqueezedContext}`` sharing one compile (clusters and K/V)."""
    base = squeeze.compile(model, ctx_ids, squeeze.SqueezeConfig(**fields), progress=False)
    return {b: base.with_config(budget=b) for b in budgets}


def perplexity_rows(model, sample, fields, budgets, args, meta):
    """Rows of perplexity results for one text sample under one configuration."""
    cont = sample.cont
    dense_cache = lib.dense_prefix(model, sample.ctx)
    dense = lib.block_logp(model, lib.dense_copy(dense_cache), cont)
    rows = []
    t0 = time.perf_counter()
    ctxs = compiled(model, sample.ctx, fields, budgets)
    compile_s = time.perf_counter() - t0
    for budget, ctx in ctxs.items():
        for regime in args.regimes:
            ctx.reset_stats()
            probe = lib.MassProbe(ctx) if args.mass and regime == "decode" else None
            run = lib.stepwise_logp if regime == "decode" else lib.block_logp
            t0 = time.perf_counter()
            if probe is None:
                logp = run(model, ctx.cache(), cont)
            else:
                with observe(probe):
                    logp = run(model, ctx.cache(), cont)
            s = ctx.stats()
            row = {
                **meta, "task": "perplexity", "regime": regime, "budget": budget,
                **lib.compare(dense, logp, cont[1:]),
                "clustered_fraction": s["clustered_fraction"], "kv_fraction": s["kv_fraction"],
                "bytes_fraction": s["bytes_fraction"],
                "centroids_per_call": s["centroids_scored"] / max(1, _calls(s)),
                "compile_s": compile_s, "run_s": time.perf_counter() - t0,
            }  # fmt: skip
            if probe is not None:
                row["mass"] = probe.table()
            rows.append(row)
    return rows


def _calls(stats) -> int:
    return sum(v["calls"] for v in stats["layers"].values())


def needle_rows(model, tok, n_tokens, fields, budgets, args, meta):
    """Passkey and multi-key retrieval: found by dense, found by squeezed, per task."""
    rng = random.Random(args.seed + n_tokens)
    haystack = lib.pydoc_text()
    kinds = [(1, None), (1, haystack), (4, None), (4, haystack)]
    rows = []
    for trial in range(args.needles):
        for keys, hay in kinds:
            task = lib.needle_task(tok, n_tokens, rng, keys=keys, haystack=hay)
            dense_cache = lib.dense_prefix(model, task.ctx)
            dense = tok.decode(lib.dense_generate(model, dense_cache, task.ctx, task.question, 10))
            for budget, ctx in compiled(model, task.ctx, fields, budgets).items():
                got = tok.decode(ctx.generate(task.question, max_new_tokens=10, do_sample=False))
                rows.append({
                    **meta, "task": task.label.split("@")[0], "where": task.label,
                    "trial": trial, "budget": budget, "dense_found": task.answer in dense,
                    "found": task.answer in got, "answer": task.answer,
                })  # fmt: skip
    return rows


def agreement_rows(model, tok, sample, fields, budgets, args, meta):
    """Greedy answers to questions about the document: first token where squeezed leaves dense."""
    rows = []
    ctxs = compiled(model, sample.ctx, fields, budgets)
    dense_cache = lib.dense_prefix(model, sample.ctx)
    for question in QUESTIONS[: args.questions]:
        q = torch.tensor(tok(question, add_special_tokens=False).input_ids, dtype=torch.int64)
        want = lib.dense_generate(model, lib.dense_copy(dense_cache), sample.ctx, q, 32)
        for budget, ctx in ctxs.items():
            got = ctx.generate(q, max_new_tokens=32, do_sample=False, eos_token_id=None).tolist()
            rows.append({
                **meta, "task": "agreement", "budget": budget,
                "first_difference": lib.first_difference(want, got), "of": len(want),
            })  # fmt: skip
    return rows


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": machine(), "args": vars(args), "rows": []}
    for dtype in args.dtypes:
        model, tok = load_model(args.model, dtype=DTYPES[dtype])
        texts = {name: lib.SOURCES[name]() for name in args.sources}
        texts.update({Path(f).name: Path(f).read_text(encoding="utf-8") for f in args.text_file})
        for n in args.lengths:
            for vname, fields in variants(args).items():
                meta = {"dtype": dtype, "length": n, "variant": vname, "config": fields}
                for label, text in texts.items():
                    samples = lib.text_samples(tok, text, label, n, args.cont, args.samples,
                                               args.seed)  # fmt: skip
                    for sample in samples:
                        m = {**meta, "text": sample.label}
                        results["rows"] += perplexity_rows(model, sample, fields, args.budgets,
                                                           args, m)  # fmt: skip
                        if args.questions:
                            results["rows"] += agreement_rows(model, tok, sample, fields,
                                                              args.budgets, args, m)  # fmt: skip
                        _progress(results["rows"])
                if args.needles:
                    results["rows"] += needle_rows(model, tok, n, fields, args.budgets, args, meta)
                    _progress(results["rows"])
    return results


def _progress(rows) -> None:
    r = rows[-1]
    print(f"  .. {r['dtype']} {r['length']} {r['variant']} {r['task']} done", flush=True)


def summarize(rows) -> list[dict]:
    """One line per (dtype, length, variant, budget): the means over texts and trials."""
    keys = sorted({(r["dtype"], r["length"], r["variant"], r["budget"]) for r in rows},
                  key=str)  # fmt: skip
    out = []
    for dtype, n, variant, budget in keys:
        sel = [r for r in rows if (r["dtype"], r["length"], r["variant"], r["budget"])
               == (dtype, n, variant, budget)]  # fmt: skip
        line = {"dtype": dtype, "length": n, "variant": variant, "budget": budget}
        for regime in ("decode", "prefill"):
            pp = [r for r in sel if r["task"] == "perplexity" and r["regime"] == regime]
            if pp:
                line[f"{regime}_ratio"] = max(r["ppl_ratio"] for r in pp)
                line[f"{regime}_kl"] = sum(r["kl"] for r in pp) / len(pp)
                line[f"{regime}_read"] = sum(r["clustered_fraction"] for r in pp) / len(pp)
                line[f"{regime}_bytes"] = sum(r["bytes_fraction"] for r in pp) / len(pp)
        needles = [r for r in sel if r["task"].startswith(("passkey", "multikey"))]
        if needles:
            line["needles_dense"] = sum(r["dense_found"] for r in needles)
            line["needles"] = sum(r["found"] for r in needles)
            line["needles_lost"] = sum(r["dense_found"] and not r["found"] for r in needles)
            line["needles_of"] = len(needles)
        agree = [r for r in sel if r["task"] == "agreement"]
        if agree:
            line["agree_first_diff"] = sum(r["first_difference"] for r in agree) / len(agree)
        out.append(line)
    return out


def print_table(summary) -> None:
    head = (f"{'dtype':5} {'N':>5} {'variant':12} {'budget':>6} {'dec ppl×':>8} {'dec KL':>7} "
            f"{'pre ppl×':>8} {'read':>6} {'bytes':>6} {'needles':>9} {'agree':>6}")  # fmt: skip
    print(head)
    for s in summary:
        needles = f"{s.get('needles', '-')}/{s.get('needles_dense', '-')}"
        print(
            f"{s['dtype']:5} {s['length']:>5} {s['variant']:12} {s['budget']:>6.2f} "
            f"{s.get('decode_ratio', float('nan')):>8.3f} {s.get('decode_kl', float('nan')):>7.4f} "
            f"{s.get('prefill_ratio', float('nan')):>8.3f} "
            f"{s.get('decode_read', s.get('prefill_read', float('nan'))):>6.3f} "
            f"{s.get('decode_bytes', s.get('prefill_bytes', float('nan'))):>6.3f} "
            f"{needles:>9} {s.get('agree_first_diff', float('nan')):>6.1f}"
        )
    print("dec/pre ppl×: worst text's perplexity ratio to dense; read: clustered fraction; "
          "bytes: bytes_fraction; needles: found by squeezed / found by dense; agree: mean "
          "first differing greedy token of 32")  # fmt: skip


def plot(summary, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(s["dtype"], s["length"], s["variant"]) for s in summary}, key=str):
        pts = sorted(
            (s["decode_bytes"], s["decode_ratio"], s["budget"])
            for s in summary
            if (s["dtype"], s["length"], s["variant"]) == key and "decode_ratio" in s
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=" ".join(map(str, key)))
            if key[2] == "default":
                for x, y, b in pts:
                    if abs(b - 0.1) < 1e-9:
                        ax.plot([x], [y], "k*", markersize=12)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_xlabel("bytes_fraction (K/V read + centroids scored, of dense)")
    ax.set_ylabel("decode perplexity / dense (worst text)")
    ax.set_xlim(left=0)
    ax.legend(fontsize=7)
    ax.set_title("SmolLM2-135M: the Pareto front (★ default at budget 0.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    results["summary"] = summarize(results["rows"])
    print_table(results["summary"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    plot(results["summary"], args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
