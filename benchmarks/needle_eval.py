"""Needle retrieval accuracy of the shipped model: dense attention against squeezed attention.

    python benchmarks/needle_eval.py                       # 1K, 2K, 4K; 200 questions each
    python benchmarks/needle_eval.py --lengths 4096 --contexts 2 --questions 50

For every context length, ``--contexts`` fresh contexts (seeds the training never drew: it uses
numpy's generator seeded 0, these use 7_000_000 + length * 100 + i) each get ``--questions``
questions about distinct keys. Exact match of the answer token with dense attention (the model's
own sdpa) and with squeezed attention at each budget; the context is compiled once and every
budget reuses its clusters. Per layer, on ``--fidelity`` decode steps per context:

- ``mass``: share of the dense softmax mass on the keys squeezed attention reads;
- ``rel_err``: relative error of the layer's attention output;
- ``read``: share of the clustered keys read (what the budget targets);
- ``found_kv0``, ``found_kv1``: share of decode steps whose lookup read the answer's record (the
  value token that follows the asked key: the one key the retrieval head must see), per KV head.
  Layer 1 KV head 0 carries the retrieval head: where it misses, the answer is lost.

Prints a table and writes JSON (default benchmarks/results/needle_eval.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import squeeze
from squeeze import lookup
from squeeze.apps import demo
from squeeze.apps.models import load_model
from squeeze.config import l1_ratio_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity  # benchmarks/fidelity.py: dense reference and mass kept


def layer_fidelity(index, cap, source: int) -> tuple[float, ...]:
    """(mass, rel_err, read, found per KV head...) of one decode step on one layer, from
    :func:`demo.decode_inputs`; ``source``: the context position of the answer's record."""
    q, kc, vc, kt, vt, scale = cap
    ref, p = fidelity.dense(q, kc, vc, kt, vt, scale)
    rows = fidelity.row_clusters(index)
    err, mass, read = fidelity.evaluate(index, rows, q, kt, vt, scale, ref, p)
    b, hq, m, d = q.shape
    hkv = index.num_kv_heads
    found = lookup.select(q.reshape(b, hkv, hq // hkv, m, d), index, scale)
    keep = torch.zeros(hkv, index.n_context, dtype=torch.bool)  # original positions read
    keep.scatter_(1, index.positions, torch.gather(found.mask[0], 1, rows))
    return (mass, err, read, *keep[:, source].float().tolist())


def eval_length(model, tok, n_tokens, args) -> dict:
    budgets = args.budgets
    hits = {"dense": 0, **{b: 0 for b in budgets}}
    read = {b: [] for b in budgets}
    fid = {b: {} for b in budgets}  # budget -> layer -> [(mass, err, read)]
    total = 0
    for c in range(args.contexts):
        seed = 7_000_000 + n_tokens * 100 + c
        task = demo.make_task(tok, n_tokens, args.questions, seed)
        dense = demo.dense_answers(model, task.context_ids, task.questions)
        hits["dense"] += sum(int(p == a) for p, a in zip(dense, task.answers, strict=True))
        total += len(task.answers)
        cfg = squeeze.SqueezeConfig(
            budget=0.1,
            window=args.window,
            mode=args.mode,
            centroid_ratio=args.centroid_ratio,
            l1_ratio=l1_ratio_for(args.centroid_ratio, args.levels),
        )
        ctx = squeeze.compile(model, task.context_ids, cfg, progress=False)
        caps = [
            (demo.decode_inputs(model, task.context_ids, q), src)
            for q, src in zip(task.questions[: args.fidelity], task.sources, strict=False)
        ]
        for b in budgets:
            view = ctx.with_config(budget=b)
            pred = demo.squeezed_answers(view, task.questions)
            hits[b] += sum(int(p == a) for p, a in zip(pred, task.answers, strict=True))
            read[b].append(view.stats()["kv_fraction"])
            for cap, src in caps:
                for li, ix in view.indexes.items():
                    fid[b].setdefault(li, []).append(layer_fidelity(ix, cap[li], src))
        squeeze.unpatch(model)
    mean = statistics.mean
    return {
        "n_tokens": n_tokens,
        "questions": total,
        "dense": hits["dense"] / total,
        "squeezed": {str(b): hits[b] / total for b in budgets},
        "kv_fraction": {str(b): mean(read[b]) for b in budgets},
        "layers": {
            str(b): {
                str(li): {
                    "mass": mean(x[0] for x in v),
                    "rel_err": mean(x[1] for x in v),
                    "read": mean(x[2] for x in v),
                    **{f"found_kv{h}": mean(x[3 + h] for x in v) for h in range(len(v[0]) - 3)},
                }
                for li, v in fid[b].items()
            }
            for b in budgets
        },
    }


def print_table(results, budgets) -> None:
    head = "| context | questions | dense |" + "".join(
        f" squeezed {b:.0%} (keys read) |" for b in budgets
    )
    print(head)
    print("|---" * (3 + len(budgets)) + "|")
    for r in results:
        cells = "".join(
            f" {r['squeezed'][str(b)]:.1%} ({r['kv_fraction'][str(b)]:.1%}) |" for b in budgets
        )
        print(f"| {r['n_tokens']} | {r['questions']} | {r['dense']:.1%} |{cells}")
    print()
    print("per-layer fidelity (decode step of the question's last token):")
    print(
        "| context | budget | layer | softmax mass kept | rel. error | clustered keys read "
        "| answer's record read (KV head 0 / 1) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for b in budgets:
            for li, f in r["layers"][str(b)].items():
                found = " / ".join(f"{f[k]:.0%}" for k in sorted(f) if k.startswith("found_kv"))
                print(
                    f"| {r['n_tokens']} | {b:.0%} | {li} | {f['mass']:.4f} | {f['rel_err']:.4f}"
                    f" | {f['read']:.1%} | {found} |"
                )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help='default: squeeze.demo_model("needle")')
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--budgets", default="0.05,0.1,0.2")
    p.add_argument("--contexts", type=int, default=4)
    p.add_argument("--questions", type=int, default=50, help="per context")
    p.add_argument("--fidelity", type=int, default=25, help="decode steps per context")
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--mode", default="threshold", choices=("threshold", "topk"))
    p.add_argument("--centroid-ratio", type=float, default=0.05)
    p.add_argument("--levels", type=int, default=2, choices=(1, 2))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default="benchmarks/results/needle_eval.json")
    args = p.parse_args(argv)
    args.budgets = [float(x) for x in args.budgets.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or squeeze.demo_model("needle")
    model, tok = load_model(path)
    t0 = time.time()
    results = []
    for n in (int(x) for x in args.lengths.split(",")):
        results.append(eval_length(model, tok, n, args))
        r = results[-1]
        print(f"{n} tokens: dense {r['dense']:.1%}, squeezed {r['squeezed']}", flush=True)
    print()
    print_table(results, args.budgets)
    out = {
        "model": str(path),
        "mode": args.mode,
        "window": args.window,
        "centroid_ratio": args.centroid_ratio,
        "levels": args.levels,
        "contexts": args.contexts,
        "questions_per_context": args.questions,
        "seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "command": "python benchmarks/needle_eval.py " + " ".join(argv or sys.argv[1:]),
        "results": results,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
