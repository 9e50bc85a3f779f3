"""CPU benchmark: k-means against faiss, squeezed decode and prefill against dense attention.

    python benchmarks/bench_cpu.py                  # everything (about 10 minutes on 2 cores)
    python benchmarks/bench_cpu.py --only decode --n 65536

Speed is a ratio against the best dense attention timed in the same process on the same data:
GQA-packed (each KV head's query group packed as rows, so K/V are read once per KV head), the
faster of matmul-softmax-matmul and SDPA on that packed view. Squeezed times include the centroid
lookup, the segment building, the sparse attention, the dense tail and the merge. Prints a table
and writes JSON.
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

# Spinning OpenMP workers get preempted on a shared machine; passive waiting costs nothing when
# idle and applies to dense and squeezed alike. Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import squeeze

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timeit(fn, *, warmup=2, repeats=9, min_time=0.5):
    """Median seconds per call after warm-up (at least ``repeats`` calls or ``min_time``)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def synthetic_layer(hkv, hq, n, d, window, generator, n_modes=256):
    """Keys from a Gaussian mixture per head (cluster structure like real keys), values, and
    window queries drawn near the keys."""
    centers = torch.randn(hkv, n_modes, d, generator=generator) * 1.5
    which = torch.randint(0, n_modes, (hkv, n), generator=generator)
    keys = torch.gather(centers, 1, which[..., None].expand(-1, -1, d))
    keys += torch.randn(hkv, n, d, generator=generator)
    values = torch.randn(hkv, n, d, generator=generator)
    g = hq // hkv
    queries = keys[:, -window:].repeat_interleave(g, 0) + torch.randn(
        hq, window, d, generator=generator
    )
    return keys, values, queries


def dense_packed(q_packed, k, v, scale, mask=None):
    """Best dense GQA-packed attention: q [B, Hkv, R, D], k/v [B, Hkv, N, D]."""
    s = torch.matmul(q_packed, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def dense_sdpa(q_packed, k, v, scale, mask=None):
    return F.scaled_dot_product_attention(
        q_packed, k, v, attn_mask=None if mask is None else ~mask, scale=scale
    )


def bench_decode(n, dtype_name, budget, args, generator):
    hq, hkv, d, t = args.heads, args.kv_heads, args.dim, args.tail
    g = hq // hkv
    dtype = DTYPES[dtype_name]
    keys, values, queries = synthetic_layer(hkv, hq, n, d, args.window, generator)
    cfg = squeeze.SqueezeConfig(
        budget=budget,
        window=args.window,
        kmeans_iters=args.kmeans_iters,
        l1_ratio=args.l1_ratio,
        mode=args.mode,
    )
    t0 = time.perf_counter()
    index = squeeze.build_index(keys.to(dtype), values.to(dtype), cfg, queries=queries.to(dtype))
    build_s = time.perf_counter() - t0
    # decode queries near the window's (what threshold mode is calibrated on), cycled while timing
    n_q = 16
    qs = (queries[:, -n_q:, :] + 0.1 * torch.randn(hq, n_q, d, generator=generator)).to(dtype)
    qs = [qs[None, :, i : i + 1] for i in range(n_q)]
    q = qs[0]
    k_tail = torch.randn(1, hkv, t, d, generator=generator).to(dtype)
    v_tail = torch.randn(1, hkv, t, d, generator=generator).to(dtype)
    # dense baseline over the same keys as a real cache holds them: [context, tail]
    k_all = torch.cat([keys.to(dtype)[None], k_tail], dim=2).contiguous()
    v_all = torch.cat([values.to(dtype)[None], v_tail], dim=2).contiguous()
    packed = q.reshape(1, hkv, g, d)
    scale = d**-0.5
    dense_ms = {
        "matmul": timeit(lambda: dense_packed(packed, k_all, v_all, scale)) * 1e3,
        "sdpa": timeit(lambda: dense_sdpa(packed, k_all, v_all, scale)) * 1e3,
    }
    stats = [squeeze.squeezed_attention(x, index, k_tail, v_tail, return_stats=True)[1] for x in qs]
    cycle = iter(range(1 << 30))
    sq_ms = timeit(lambda: squeeze.squeezed_attention(qs[next(cycle) % n_q], index, k_tail, v_tail))
    sq_ms *= 1e3
    out = squeeze.squeezed_attention(q, index, k_tail, v_tail)
    ref = dense_packed(packed.float(), k_all.float(), v_all.float(), scale).reshape(out.shape)
    return _result(
        "decode", n, dtype_name, budget, cfg, dense_ms, sq_ms,
        kv_fraction=statistics.mean(x.kv_fraction for x in stats),
        clustered_fraction=statistics.mean(x.clustered_fraction for x in stats),
        centroids_scored=statistics.mean(x.centroids_scored for x in stats),
        queries=n_q,
        rel_err_vs_dense=float((out.float() - ref).norm() / ref.norm()),
        build_s=build_s,
    )  # fmt: skip


def _result(case, n, dtype_name, budget, cfg, dense_ms, sq_ms, **extra):
    """One row of the results: the best dense implementation against squeezed attention."""
    best = min(dense_ms, key=dense_ms.get)
    return {
        "case": case,
        "n": n,
        **({"m": extra.pop("m")} if "m" in extra else {}),
        "dtype": dtype_name,
        "budget": budget,
        "mode": cfg.mode,
        "levels": cfg.levels,
        "dense_ms": dense_ms[best],
        "dense_impl": best,
        "dense_all_ms": dense_ms,
        "squeezed_ms": sq_ms,
        "speedup": dense_ms[best] / sq_ms,
        **extra,
    }


def bench_prefill(n, m, dtype_name, budget, args, generator):
    hq, hkv, d = args.heads, args.kv_heads, args.dim
    g = hq // hkv
    dtype = DTYPES[dtype_name]
    keys, values, queries = synthetic_layer(hkv, hq, n, d, args.window, generator)
    cfg = squeeze.SqueezeConfig(
        budget=budget,
        window=args.window,
        kmeans_iters=args.kmeans_iters,
        l1_ratio=args.l1_ratio,
        mode=args.mode,
    )
    index = squeeze.build_index(keys.to(dtype), values.to(dtype), cfg, queries=queries.to(dtype))
    q = (queries[:, -1:, :] + 0.5 * torch.randn(hq, m, d, generator=generator))[None].to(dtype)
    k_tail = torch.randn(1, hkv, m, d, generator=generator).to(dtype)
    v_tail = torch.randn(1, hkv, m, d, generator=generator).to(dtype)
    k_all = torch.cat([keys.to(dtype)[None], k_tail], dim=2).contiguous()
    v_all = torch.cat([values.to(dtype)[None], v_tail], dim=2).contiguous()
    packed = q.reshape(1, hkv, g * m, d)
    rows = torch.arange(g * m) % m
    mask = torch.arange(n + m)[None, :] > (n + rows)[:, None]  # bottom-right causal
    scale = d**-0.5
    dense_ms = {
        "matmul": timeit(lambda: dense_packed(packed, k_all, v_all, scale, mask), repeats=3) * 1e3,
        "sdpa": timeit(lambda: dense_sdpa(packed, k_all, v_all, scale, mask), repeats=3) * 1e3,
        "sdpa_gqa": timeit(
            lambda: F.scaled_dot_product_attention(
                q, k_all, v_all, attn_mask=~mask[:m], scale=scale, enable_gqa=True
            ),
            repeats=3,
        )
        * 1e3,
    }
    _, stats = squeeze.squeezed_attention(q, index, k_tail, v_tail, return_stats=True)
    sq_ms = timeit(lambda: squeeze.squeezed_attention(q, index, k_tail, v_tail), repeats=3) * 1e3
    return _result(
        "prefill", n, dtype_name, budget, cfg, dense_ms, sq_ms, m=m,
        kv_fraction=stats.kv_fraction, centroids_scored=stats.centroids_scored,
    )  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", choices=["kmeans", "decode", "prefill"], action="append")
    p.add_argument("--n", type=int, nargs="+", default=[65536, 131072], help="decode contexts")
    p.add_argument("--prefill-n", type=int, default=32768)
    p.add_argument("--prefill-m", type=int, default=512)
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--mode", default="threshold", choices=["threshold", "topk"])
    p.add_argument("--l1-ratio", type=float, default=0.01, help="0 for a one-level index")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--tail", type=int, default=64, help="question + generated tokens in decode")
    p.add_argument(
        "--kmeans-iters",
        type=int,
        default=5,
        help="index build iterations (attention speed barely depends on them)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/cpu.json")
    args = p.parse_args(argv)
    args.l1_ratio = args.l1_ratio or None
    only = set(args.only or ["kmeans", "decode", "prefill"])
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    if "kmeans" in only:
        import bench_kmeans

        rows += [dict(case="kmeans", **r) for r in bench_kmeans.main([])]
    if "decode" in only:
        for n in args.n:
            for dt in args.dtype:
                rows.append(bench_decode(n, dt, args.budget, args, generator))
                _print_row(rows[-1])
    if "prefill" in only:
        for dt in args.dtype:
            rows.append(
                bench_prefill(args.prefill_n, args.prefill_m, dt, args.budget, args, generator)
            )
            _print_row(rows[-1])
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "argv": sys.argv[1:],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print()
    print(
        f"{'case':8} {'N':>7} {'M':>4} {'dtype':5} {'dense ms':>9} {'squeezed ms':>11} "
        f"{'speedup':>7} {'kv read':>7}"
    )
    for r in rows:
        if r["case"] in ("decode", "prefill"):
            print(
                f"{r['case']:8} {r['n']:>7} {r.get('m', 1):>4} {r['dtype']:5} "
                f"{r['dense_ms']:>9.2f} {r['squeezed_ms']:>11.2f} {r['speedup']:>6.2f}x "
                f"{r['kv_fraction']:>7.3f}"
            )
    print(f"wrote {args.json}")
    return rows


def _print_row(r):
    print(
        json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
        flush=True,
    )


if __name__ == "__main__":
    main()
