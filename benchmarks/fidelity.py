"""Fidelity of squeezed attention inside a transformers model, against dense attention.

A tiny random Llama (built locally, nothing downloaded) compiles one context per index shape
(one or two levels) × GQA aggregation (max or mean); every (budget, mode) runs on the same
clusters (``SqueezedContext.with_config``). The queries and K/V of random questions are captured
from a dense forward over [context, question], and each layer's squeezed attention is compared
with dense attention on them:

- ``rel_err``: ‖out − out_dense‖ / ‖out_dense‖ per (query, head), averaged;
- ``mass``: share of the dense softmax mass on the keys read (selected clusters, window, tail);
- ``read``: share of the clustered context keys read (what ``budget`` targets).

Two regimes: ``decode`` (every question token alone, as a decode step: M = 1, its causal tail)
and ``prefill`` (the question block at once: M rows share one selection).

    python benchmarks/fidelity.py                  # prints a table, writes benchmarks/results/
    python benchmarks/fidelity.py --init-std 0.02  # transformers' default init: flat attention

Random weights give flatter attention than trained models: the numbers compare settings with each
other, they do not predict accuracy on a trained model.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

import squeeze
from squeeze import lookup
from squeeze.patches.hf import compile

BUDGETS = (0.05, 0.1, 0.2)
MODES = ("threshold", "topk")
_captured: dict[int, tuple] = {}


def _probe(module, query, key, value, attention_mask, **kwargs):
    """Dense sdpa that records each layer's post-RoPE q/k/v and scale."""
    _captured[module.layer_idx] = (
        query.detach(),
        key.detach(),
        value.detach(),
        kwargs.get("scaling"),
    )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def build_model(args) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=args.vocab,
        max_position_embeddings=65536,
        initializer_range=args.init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).eval()


def capture(model, context, question):
    """Per layer: question queries [1, Hq, Tq, D], context K/V [1, Hkv, N, D], tail K/V, scale."""
    AttentionInterface.register("fidelity_probe", _probe)
    saved = model.config._attn_implementation_internal
    model.config._attn_implementation_internal = "fidelity_probe"
    try:
        _captured.clear()
        with torch.no_grad():
            model(torch.cat([context, question])[None], past_key_values=DynamicCache())
    finally:
        model.config._attn_implementation_internal = saved
    n, t = context.numel(), question.numel()
    return {
        i: (q[:, :, -t:], k[:, :, :n], v[:, :, :n], k[:, :, n:], v[:, :, n:], s)
        for i, (q, k, v, s) in _captured.items()
    }


def dense(q, k_ctx, v_ctx, k_tail, v_tail, scale):
    """Dense attention of the last M tail queries: output and per-key probabilities."""
    g = q.shape[1] // k_ctx.shape[1]
    k = torch.cat([k_ctx, k_tail], 2).repeat_interleave(g, 1)
    v = torch.cat([v_ctx, v_tail], 2).repeat_interleave(g, 1)
    m, t, n = q.shape[2], k_tail.shape[2], k_ctx.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    hidden = torch.arange(t)[None, :] > (torch.arange(m) + t - m)[:, None]
    s[..., n:] = s[..., n:].masked_fill(hidden, float("-inf"))
    p = s.softmax(-1)
    return p @ v, p


def row_clusters(index) -> torch.Tensor:
    """``[Hkv, N]`` cluster of each stored row (``K``: the window segment)."""
    rows = torch.arange(index.n_context).expand(index.num_kv_heads, -1).contiguous()
    return torch.searchsorted(index.offsets[:, 1:].contiguous(), rows, right=True)


def evaluate(index, rows, q, k_tail, v_tail, scale, ref, p):
    """rel_err, mass kept and clustered fraction read for one query block, given its dense
    output ``ref`` and probabilities ``p`` over [context (original order), tail]."""
    out, stats = squeeze.squeezed_attention(q, index, k_tail, v_tail, scale, return_stats=True)
    err = ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).mean()
    b, hq, m, d = q.shape
    hkv, n = index.num_kv_heads, index.n_context
    found = lookup.select(q.reshape(b, hkv, hq // hkv, m, d), index, scale)
    keep = torch.zeros(hkv, n, dtype=torch.bool)  # original positions read (window included)
    keep.scatter_(1, index.positions, torch.gather(found.mask[0], 1, rows))
    keep = keep.repeat_interleave(hq // hkv, 0)  # [Hq, N]
    mass = (p[0, :, :, :n] * keep[:, None, :]).sum(-1) + p[0, :, :, n:].sum(-1)
    return float(err), float(mass.mean()), stats.clustered_fraction


def blocks(cap):
    """The query blocks of one question: ("prefill", whole block) and ("decode", each token),
    with their tails and dense references."""
    q, kc, vc, kt, vt, scale = cap
    out = [("prefill", q, kt, vt)]
    out += [
        ("decode", q[:, :, i : i + 1], kt[:, :, : i + 1], vt[:, :, : i + 1])
        for i in range(q.shape[2])
    ]
    return [
        (regime, q_, kt_, vt_, scale, *dense(q_, kc, vc, kt_, vt_, scale))
        for regime, q_, kt_, vt_ in out
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-context", type=int, default=2048)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--question-len", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument(
        "--init-std",
        type=float,
        default=0.1,
        help="weight init std (transformers' default 0.02 gives near-uniform attention)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/fidelity.json")
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    model = build_model(args)
    g = torch.Generator().manual_seed(args.seed + 1)
    context = torch.randint(3, args.vocab, (args.n_context,), generator=g)
    questions = [
        torch.randint(3, args.vocab, (args.question_len,), generator=g)
        for _ in range(args.questions)
    ]
    captures = [capture(model, context, q) for q in questions]
    refs = {layer: [b for cap in captures for b in blocks(cap[layer])] for layer in captures[0]}

    rows = []
    t0 = time.perf_counter()
    for levels in (1, 2):
        for reduce in ("max", "mean"):
            cfg = squeeze.SqueezeConfig(
                window=args.window, l1_ratio=None if levels == 1 else 0.01, gqa_reduce=reduce
            )
            ctx = compile(model, context, cfg, chunk_size=1024, progress=False)
            for mode in MODES:
                for budget in BUDGETS:
                    c = ctx.with_config(budget=budget, mode=mode)
                    row = {
                        "levels": levels,
                        "gqa_reduce": reduce,
                        "mode": mode,
                        "budget": budget,
                        "layers": {},
                    }
                    for layer, index in c.indexes.items():
                        acc = {"decode": [], "prefill": []}
                        rows_of = row_clusters(index)
                        for regime, q, kt, vt, scale, ref, p in refs[layer]:
                            acc[regime].append(evaluate(index, rows_of, q, kt, vt, scale, ref, p))
                        row["layers"][layer] = {
                            regime: dict(
                                zip(
                                    ("rel_err", "mass", "read"),
                                    (sum(x) / len(x) for x in zip(*vals, strict=True)),
                                    strict=True,
                                )
                            )
                            for regime, vals in acc.items()
                        }
                    rows.append(row)
    elapsed = time.perf_counter() - t0

    layers = sorted(rows[0]["layers"])
    head = (
        "levels gqa   mode      budget | "
        + " | ".join(f"L{i} err   mass   read" for i in layers)
        + " | prefill err  read"
    )
    print(
        f"decode regime per layer, prefill regime averaged over layers; N={args.n_context}, "
        f"window={args.window}, {args.questions}×{args.question_len} question tokens, "
        f"init_std={args.init_std}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = " | ".join(
            f"{r['layers'][i]['decode']['rel_err']:.4f} {r['layers'][i]['decode']['mass']:.3f} "
            f"{r['layers'][i]['decode']['read']:.3f}"
            for i in layers
        )
        pre_err = sum(r["layers"][i]["prefill"]["rel_err"] for i in layers) / len(layers)
        pre_read = sum(r["layers"][i]["prefill"]["read"] for i in layers) / len(layers)
        print(
            f"{r['levels']:>6} {r['gqa_reduce']:<5} {r['mode']:<9} {r['budget']:>6.2f} | {cells} | "
            f"{pre_err:.4f}      {pre_read:.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "fidelity",
                "args": vars(args),
                "seconds": elapsed,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out} ({elapsed:.1f}s)")


if __name__ == "__main__":
    main()
