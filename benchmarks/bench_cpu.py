"""CPU benchmark: k-means against faiss, squeezed decode and prefill against dense attention.

    python benchmarks/bench_cpu.py                    # everything, at 1 and 2 threads (make bench)
    python benchmarks/bench_cpu.py --only decode --n 65536 --threads 1 2
    python benchmarks/bench_cpu.py --quick            # 64K decode, 16K prefill, small k-means
    python benchmarks/bench_cpu.py --smoke --json /tmp/cpu.json   # seconds: the machinery only

Speed is a ratio against the best dense attention timed in the same process on the same data:
GQA-packed (each KV head's query group packed as rows, so K/V are read once per KV head), the
faster of matmul-softmax-matmul and SDPA on that packed view (prefill: also SDPA's own GQA path;
the matmul baseline only where its score matrix fits in 1 GiB). Squeezed times include the
centroid lookup, the segment building, the sparse attention, the dense tail and the merge, with
the defaults of ``squeeze.SqueezeConfig`` (one-level 5% centroids, 4 sinks, the spread
estimator, the sinks' mass, bf16 centroids, 4-row selection blocks) unless flags change them.

Every case is timed in ``--pairs`` interleaved rounds (``--prefill-pairs`` for prefill), the
dense implementations and squeezed in alternating order (``benchlib.interleaved``); the speedup
is the median of the per-round ratios, reported with its min-max and quartiles, beside
``bytes_fraction`` (K/V bytes read plus centroid bytes scored, over the dense K/V bytes; a
prefill's 4-row blocks each select and read on their own, so it can exceed 1). One index is built per context length, on fp32 keys;
the bf16 case casts its K/V to bf16 and recalibrates its thresholds on bf16 queries. The JSON
records the machine before and after (load average, threads, CPU, versions) and, per row, the
cores other processes kept busy; the table warns when the load average exceeds the thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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

import benchlib

import squeeze
from squeeze import hugepages

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: sizes of ``--quick`` and ``--smoke`` (each flag given explicitly still wins)
PRESETS = {
    "quick": dict(n=[65536], prefill_n=16384, prefill_m=256, pairs=5),
    "smoke": dict(
        n=[4096], prefill_n=2048, prefill_m=32, pairs=5, prefill_pairs=5, kmeans_iters=2, window=64
    ),
}
KMEANS_ARGS = {
    "quick": ["--groups", "4", "--n", "16384", "--iters", "10", "--no-memory"],
    "smoke": ["--groups", "2", "--n", "2048", "--iters", "3", "--no-memory"],
}


def synthetic_layer(hkv, hq, n, d, window, generator, n_modes=256):
    """Keys from a Gaussian mixture per head (cluster structure like real keys), values, and
    window queries drawn near the keys: ``keys, values [Hkv, N, D]``, ``queries [Hq, W, D]``,
    fp32."""
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
    """Dense GQA-packed attention: ``q [B, Hkv, R, D]``, ``k/v [B, Hkv, N, D]`` → ``[B, Hkv, R, D]``;
    ``mask [R, N]`` bool, True where masked."""
    s = torch.matmul(q_packed, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def dense_sdpa(q_packed, k, v, scale, mask=None):
    """The same through SDPA on the packed view."""
    return F.scaled_dot_product_attention(
        q_packed, k, v, attn_mask=None if mask is None else ~mask, scale=scale
    )


def config(args) -> squeeze.SqueezeConfig:
    fields = dict(budget=args.budget, window=args.window, kmeans_iters=args.kmeans_iters)
    fields.update(mode=args.mode, l1_ratio=args.l1_ratio or None, estimate_zone=args.estimate_zone)
    return squeeze.SqueezeConfig(**fields)


def indexes(keys, values, queries, cfg, dtypes):
    """``({dtype name: ClusterIndex}, build seconds)``: one build on fp32 keys; other dtypes
    cast its K/V and recalibrate their thresholds on their own queries."""
    t0 = time.perf_counter()
    base = squeeze.build_index(keys, values, cfg, queries=queries)
    build_s = time.perf_counter() - t0
    out = {}
    for name in dtypes:
        dt = DTYPES[name]
        kv = {n: hugepages.backed(getattr(base, n).to(dt)) for n in ("keys", "values")}
        ix = dataclasses.replace(base, **kv)
        out[name] = ix if dt == torch.float32 else ix.recalibrate(queries.to(dt))
    return out, build_s


def timed_row(fns: dict, dense_names: list[str], pairs: int, args, **fields) -> dict:
    """Time ``fns`` (dense implementations named in ``dense_names``, and ``"squeezed"``) in
    ``pairs`` interleaved rounds at the current thread count: one row of results."""
    load = os.getloadavg()[0]
    with benchlib.Interference() as busy:
        times = benchlib.interleaved(fns, pairs, args.min_sample_s)
    best = benchlib.best_of(times, dense_names)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {
        **fields,
        "threads": torch.get_num_threads(),
        "dense_ms": med[best],
        "dense_impl": best,
        "dense_all_ms": {k: v for k, v in med.items() if k != "squeezed"},
        "squeezed_ms": med["squeezed"],
        **benchlib.speedup(times[best], times["squeezed"]),
        "dense_times_ms": [t * 1e3 for t in times[best]],
        "squeezed_times_ms": [t * 1e3 for t in times["squeezed"]],
        "load_avg_1m": load,
        "other_cores": busy.cores,
    }


def bench_decode(n, args, generator) -> list[dict]:
    """Rows for one context length: every dtype at every thread count."""
    hq, d = args.heads, args.dim

    def queries_of(queries):  # near the window's (what threshold mode is calibrated on), cycled
        return queries[:, -16:, :] + 0.1 * torch.randn(hq, 16, d, generator=generator)

    return _cases(n, args, generator, queries_of, args.tail, _decode_case)


def _cases(n, args, generator, queries_of, tail, case) -> list[dict]:
    """One synthetic layer of ``n`` keys, its index per dtype, and ``case``'s rows for each: the
    queries ``queries_of(window_queries [Hq, W, D])`` and ``tail`` random tail tokens."""
    hq, hkv, d = args.heads, args.kv_heads, args.dim
    keys, values, queries = synthetic_layer(hkv, hq, n, d, args.window, generator)
    by_dtype, build_s = indexes(keys, values, queries, config(args), args.dtype)
    q = queries_of(queries)
    k_tail = torch.randn(1, hkv, tail, d, generator=generator)
    v_tail = torch.randn(1, hkv, tail, d, generator=generator)
    rows = []
    for name, index in by_dtype.items():
        data = [x.to(DTYPES[name]) for x in (keys, values, q, k_tail, v_tail)]
        rows += case(n, name, index, *data, args, build_s=build_s)
    return rows


def _decode_case(n, name, index, keys, values, qs, kt, vt, args, **fields) -> list[dict]:
    """``keys, values [Hkv, N, D]``, decode queries ``qs [Hq, Q, D]`` (cycled), tail
    ``kt, vt [1, Hkv, T, D]``, all in the case's dtype."""
    hkv, _, d = keys.shape
    n_q = qs.shape[1]
    g = qs.shape[0] // hkv
    qs = [qs[None, :, i : i + 1] for i in range(n_q)]  # [1, Hq, 1, D] each
    # dense baseline over the same keys as a real cache holds them: [context, tail]
    # in huge pages as the index's K/V are (squeeze.hugepages): the same memory for both
    k_all = hugepages.backed(torch.cat([keys[None], kt], dim=2).contiguous())
    v_all = hugepages.backed(torch.cat([values[None], vt], dim=2).contiguous())
    packed = [x.reshape(1, hkv, g, d) for x in qs]
    scale = d**-0.5
    stats = [squeeze.squeezed_attention(x, index, kt, vt, return_stats=True)[1] for x in qs]
    out = squeeze.squeezed_attention(qs[0], index, kt, vt)
    ref = dense_packed(packed[0].float(), k_all.float(), v_all.float(), scale).reshape(out.shape)
    cyc = _Cycle(n_q)
    fns = {
        "matmul": lambda: dense_packed(packed[cyc.next("m")], k_all, v_all, scale),
        "sdpa": lambda: dense_sdpa(packed[cyc.next("s")], k_all, v_all, scale),
        "squeezed": lambda: squeeze.squeezed_attention(qs[cyc.next("q")], index, kt, vt),
    }
    fields.update(
        case="decode", n=n, m=1, dtype=name, **_cost(stats), queries=n_q, config=_cfg(index),
        rel_err_vs_dense=float((out.float() - ref).norm() / ref.norm()),
    )  # fmt: skip
    return _at_threads(fns, ["matmul", "sdpa"], args.pairs, args, fields)


def bench_prefill(n, m, args, generator) -> list[dict]:
    """Rows for ``m`` question rows over an ``n``-token context: every dtype and thread count."""
    hq, d = args.heads, args.dim

    def queries_of(queries):
        return (queries[:, -1:, :] + 0.5 * torch.randn(hq, m, d, generator=generator))[None]

    return _cases(n, args, generator, queries_of, m, _prefill_case)


def _prefill_case(n, name, index, keys, values, q, kt, vt, args, **fields) -> list[dict]:
    """``keys, values [Hkv, N, D]``, question queries ``q [1, Hq, M, D]`` and their K/V
    ``kt, vt [1, Hkv, M, D]`` (causal among themselves), all in the case's dtype."""
    hkv, _, d = keys.shape
    _, hq, m, _ = q.shape
    g = hq // hkv
    rows_idx = torch.arange(g * m) % m
    mask = torch.arange(n + m)[None, :] > (n + rows_idx)[:, None]  # bottom-right causal
    scale = d**-0.5
    # in huge pages as the index's K/V are (squeeze.hugepages): the same memory for both
    k_all = hugepages.backed(torch.cat([keys[None], kt], dim=2).contiguous())
    v_all = hugepages.backed(torch.cat([values[None], vt], dim=2).contiguous())
    packed = q.reshape(1, hkv, g * m, d)
    fns = {
        "sdpa": lambda: dense_sdpa(packed, k_all, v_all, scale, mask),
        "sdpa_gqa": lambda: F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=~mask[:m], scale=scale, enable_gqa=True
        ),
    }
    if g * m * (n + m) * hkv * 4 <= 1 << 30:  # the matmul baseline materialises the scores
        fns["matmul"] = lambda: dense_packed(packed, k_all, v_all, scale, mask)
    dense_names = list(fns)
    fns["squeezed"] = lambda: squeeze.squeezed_attention(q, index, kt, vt)
    _, stats = squeeze.squeezed_attention(q, index, kt, vt, return_stats=True)
    fields.update(case="prefill", n=n, m=m, dtype=name, **_cost([stats]), config=_cfg(index))
    return _at_threads(fns, dense_names, args.prefill_pairs, args, fields)


def _at_threads(fns, dense_names, pairs, args, fields) -> list[dict]:
    """One timed row per thread count of ``args.threads``."""
    rows = []
    for threads in args.threads:
        with benchlib.num_threads(threads):
            rows.append(timed_row(fns, dense_names, pairs, args, **fields))
        _print_row(rows[-1])
    return rows


class _Cycle:
    """Independent round-robin counters over ``n`` items, one per key."""

    def __init__(self, n: int):
        self.n, self.i = n, {}

    def next(self, key: str) -> int:
        self.i[key] = (self.i.get(key, -1) + 1) % self.n
        return self.i[key]


def _cost(stats) -> dict:
    """Mean read fractions of some ``SqueezeStats``."""
    return {
        "bytes_fraction": statistics.mean(s.bytes_fraction for s in stats),
        "kv_fraction": statistics.mean(s.kv_fraction for s in stats),
        "clustered_fraction": statistics.mean(s.clustered_fraction for s in stats),
        "centroids_scored": statistics.mean(s.centroids_scored for s in stats),
        "selections": stats[0].selections,
    }


def _cfg(index) -> dict:
    """The index's configuration, its levels and the sparse backend its decode dispatches to."""
    from squeeze.kernels.sparse_attention import select_backend

    q = torch.zeros(1, index.num_kv_heads, 1, index.head_dim, dtype=index.keys.dtype)
    backend = select_backend(q, index.keys)
    return {**dataclasses.asdict(index.config), "levels": index.levels, "sparse_backend": backend}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", choices=["kmeans", "decode", "prefill"], action="append")
    p.add_argument("--n", type=int, nargs="+", default=[65536, 131072], help="decode contexts")
    p.add_argument("--prefill-n", type=int, default=32768)
    p.add_argument("--prefill-m", type=int, default=512)
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch thread counts, each timed (default: 1 and torch's default)")  # fmt: skip
    p.add_argument("--pairs", type=int, default=7, help="interleaved dense/squeezed rounds (>= 5)")
    p.add_argument(
        "--prefill-pairs", type=int, default=5, help="the same for prefill (seconds each)"
    )
    p.add_argument("--min-sample-s", type=float, default=0.05, help="shortest timed sample")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--mode", default="threshold", choices=["threshold", "topk"])
    p.add_argument(
        "--estimate-zone",
        type=float,
        default=squeeze.SqueezeConfig().estimate_zone,
        help="SqueezeConfig.estimate_zone (default: the config's; 0 turns the zone off)",
    )
    p.add_argument("--l1-ratio", type=float, default=None, help="a two-level index (e.g. 0.01)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--tail", type=int, default=64, help="question + generated tokens in decode")
    p.add_argument("--kmeans-iters", type=int, default=5,
                   help="index build iterations (attention speed barely depends on them)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"smaller sizes: {PRESETS['quick']}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the machinery only")
    p.add_argument(
        "--json", default=None, help="default benchmarks/results/cpu[_quick|_smoke].json"
    )
    args = p.parse_args(argv)
    preset = "smoke" if args.smoke else "quick" if args.quick else None
    if preset:
        given = {a.split("=")[0][2:].replace("-", "_") for a in (argv or sys.argv[1:])}
        for key, value in PRESETS[preset].items():
            if key not in given:
                setattr(args, key, value)
    args.preset = preset
    args.threads = args.threads or sorted({1, torch.get_num_threads()})
    if args.json is None:
        args.json = f"benchmarks/results/cpu{'_' + preset if preset else ''}.json"
    if min(args.pairs, args.prefill_pairs) < 1:
        p.error("--pairs and --prefill-pairs must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    only = set(args.only or ["kmeans", "decode", "prefill"])
    generator = torch.Generator().manual_seed(args.seed)
    meta = {"before": benchlib.machine()}
    t_start = time.perf_counter()
    rows = []
    if "kmeans" in only:
        import bench_kmeans

        rows += [
            dict(case="kmeans", **r) for r in bench_kmeans.main(KMEANS_ARGS.get(args.preset, []))
        ]
    if "decode" in only:
        for n in args.n:
            rows += bench_decode(n, args, generator)
    if "prefill" in only:
        rows += bench_prefill(args.prefill_n, args.prefill_m, args, generator)
    benchlib.close(meta, max(args.threads), t_start)
    benchlib.write_json(args.json, meta, rows)
    print_table(rows, meta)
    print(f"wrote {args.json} ({meta['wall_s']:.0f} s)")
    return rows


def print_table(rows: list[dict], meta: dict) -> None:
    m = meta["before"]
    print(f"\n{m['cpu']}, {m['logical_cpus']} CPUs, torch {m['torch']}, squeeze {m['squeeze']}")
    if meta.get("load_warning"):
        print(meta["load_warning"])
    print(
        f"{'case':8} {'N':>7} {'M':>4} {'dtype':5} {'thr':>3} {'dense ms':>9} {'(impl)':>8} "
        f"{'squeezed ms':>11} {'speedup [min-max]':>20} {'bytes':>6} {'kv':>6} {'others':>6}"
    )
    for r in rows:
        if r["case"] not in ("decode", "prefill"):
            continue
        busy = r["other_cores"]
        flag = " !" if busy is not None and busy > benchlib.BUSY_CORES else ""
        print(
            f"{r['case']:8} {r['n']:>7} {r['m']:>4} {r['dtype']:5} {r['threads']:>3} "
            f"{r['dense_ms']:>9.2f} {r['dense_impl']:>8} {r['squeezed_ms']:>11.2f} "
            f"{benchlib.spread_text(r):>20} {r['bytes_fraction']:>6.3f} {r['kv_fraction']:>6.3f} "
            f"{'-' if busy is None else f'{busy:.2f}':>6}{flag}"
        )
    print(
        "speedup: median of the interleaved rounds' ratios [min-max]; bytes: bytes_fraction; "
        f"others: cores busy outside this process (! above {benchlib.BUSY_CORES})"
    )


def _print_row(r):
    skip = ("dense_times_ms", "squeezed_times_ms", "config")
    print(
        json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                    if k not in skip}),
        flush=True,
    )  # fmt: skip


if __name__ == "__main__":
    main()
