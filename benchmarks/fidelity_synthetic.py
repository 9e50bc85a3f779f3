"""Fidelity of squeezed attention against dense attention.

    python benchmarks/fidelity_synthetic.py --json benchmarks/results/fidelity_synthetic.json

For each configuration (budget × mode × levels × GQA reduction) it reports, averaged over decode
queries and heads:
  - rel_err: ||out − dense|| / ||dense|| of the attention output;
  - mass: the share of the true softmax mass (over the context) that falls on the keys read;
  - read: the share of the clustered keys read.

The data here are synthetic: keys from a Gaussian mixture per KV head, and queries that each
point at a few keys of the context, a different target per query head of a GQA group, so that
attention is peaked the way retrieval heads are. It exercises the selection logic; the tiny-model
version of this table belongs to the Hugging Face integration.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

import squeeze
from squeeze import lookup


def synthetic(hkv, g, n, d, n_queries, window, generator, sharpness=3.0):
    """keys/values ``[Hkv, N, D]``, window queries ``[Hq, W, D]``, decode queries ``[Q, Hq, D]``."""
    modes = torch.randn(hkv, 512, d, generator=generator) * 1.2
    which = torch.randint(0, 512, (hkv, n), generator=generator)
    keys = torch.gather(modes, 1, which[..., None].expand(-1, -1, d))
    keys += torch.randn(hkv, n, d, generator=generator)
    values = torch.randn(hkv, n, d, generator=generator)

    def queries(count):
        # each query head points at a key of its KV head, plus noise
        target = torch.randint(0, n, (hkv * g, count), generator=generator)
        base = keys.repeat_interleave(g, 0)
        picked = torch.gather(base, 1, target[..., None].expand(-1, -1, d))
        return sharpness * picked + torch.randn(hkv * g, count, d, generator=generator) * 2.0

    return keys, values, queries(window), queries(n_queries).transpose(0, 1)


def evaluate(index, keys, values, qs):
    """Mean rel_err, mass and read over decode queries ``qs [Q, Hq, D]``."""
    hkv, n, d = keys.shape
    q = qs[:, :, None, :]  # [Q, Hq, 1, D] as a batch of decode steps
    nq, hq = qs.shape[:2]
    g = hq // hkv
    tail = torch.zeros(nq, hkv, 1, d)  # a neutral tail key (score 0) so T >= M
    out, stats = squeeze.squeezed_attention(
        q, index, tail, torch.zeros_like(tail), return_stats=True
    )
    kx = keys.repeat_interleave(g, 0)
    vx = values.repeat_interleave(g, 0)
    s = torch.einsum("qhd,hnd->qhn", qs, kx) * d**-0.5
    s_tail = torch.zeros(nq, hq, 1)
    p = torch.softmax(torch.cat([s, s_tail], -1), -1)
    dense = torch.einsum("qhn,hnd->qhd", p[..., :n], vx)
    # which context positions were read, per (query, query head)
    found = lookup.select(q.reshape(nq, hkv, g, 1, d), index, d**-0.5)
    read = torch.zeros(nq, hkv, n, dtype=torch.bool)
    sizes = index.offsets[:, 1:] - index.offsets[:, :-1]
    for h in range(hkv):
        row_cluster = torch.repeat_interleave(torch.arange(sizes.shape[1]), sizes[h])
        sel_rows = found.mask[:, h][:, row_cluster]  # [Q, N] in stored order
        read[:, h, index.positions[h]] = sel_rows
    read = read.repeat_interleave(g, 1)
    ctx_mass = p[..., :n].sum(-1)
    mass = (p[..., :n] * read).sum(-1) / ctx_mass
    err = (out[:, :, 0] - dense).norm(dim=-1) / dense.norm(dim=-1)
    return float(err.mean()), float(mass.mean()), stats.clustered_fraction


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/fidelity_synthetic.json")
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    keys, values, wq, qs = synthetic(
        args.kv_heads, args.group, args.n, args.dim, args.queries, 100, gen
    )
    rows = []
    built = {}
    for levels, mode, reduce in itertools.product([1, 2], ["threshold", "topk"], ["max", "mean"]):
        cfg = squeeze.SqueezeConfig(
            l1_ratio=0.01 if levels == 2 else None, mode=mode, gqa_reduce=reduce
        )
        key = levels
        if key not in built:
            built[key] = squeeze.build_index(keys, values, cfg, queries=wq)
        calibrated = built[key].recalibrate(wq, mode=mode, gqa_reduce=reduce)
        for budget in args.budgets:
            index = calibrated.with_config(budget=budget)
            err, mass, read = evaluate(index, keys, values, qs)
            rows.append(
                dict(
                    levels=levels,
                    mode=mode,
                    gqa_reduce=reduce,
                    budget=budget,
                    rel_err=err,
                    mass=mass,
                    read=read,
                )
            )
            print(
                f"levels={levels} {mode:9} {reduce:4} budget={budget:.2f}  rel_err={err:.4f} "
                f"mass={mass:.4f} read={read:.3f}",
                flush=True,
            )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
