"""Sparse attention over cluster segments vs the best dense attention, on CPU, same process, same data.

Decode: Hq=32, Hkv=8 (R=4 packed rows), D=128, N=65536 context keys, ``budget`` of each KV head's
keys selected as random clusters of ~20 tokens. Prefill: M=512 question rows (R=2048) at N=32768.
Dense baseline: GQA-packed ``q @ k^T -> softmax -> @ v`` and SDPA on the packed view (the faster).
"warm" times repeat the call on the same data; "cold" first streams a buffer larger than the
last-level cache through, as when many layers' K/V pass through between two reads of one layer.

    python benchmarks/bench_sparse_attention.py --n 65536 --budget 0.1 --dtype fp32,bf16 --json out.json
    python benchmarks/bench_sparse_attention.py --threads 1 2 --smoke --json /tmp/sparse.json

Each case runs ``--repeats`` interleaved rounds (``benchlib.interleaved``); the speedup is the
median of the per-round ratios with their min-max. ``bytes_fraction`` here is the K/V bytes of the
selected segments over the dense K/V bytes: this benchmark times the kernel alone, without the
centroid lookup (bench_cpu.py times the whole path). The JSON (``{"meta", "rows"}``) records the
machine before and after, and per row the cores other processes kept busy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

# Sleeping, not spinning, OpenMP workers: on a shared machine a spinning worker gets preempted and
# every parallel region (dense and sparse alike) then waits for a scheduler tick. Must precede the
# torch import; set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

from squeeze.kernels.sparse_attention import sparse_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_selection(hkv: int, n: int, budget: float, mean: float = 20.0, seed: int = 0):
    """Per KV head: random cluster sizes (mean ``mean``) tiling [0, n); random clusters until
    ``budget * n`` tokens. Returns CSR ``seg_ptr, seg_start, seg_end`` for B = 1 and the token count."""
    g = torch.Generator().manual_seed(seed)
    ptr, starts, ends = [0], [], []
    for _ in range(hkv):
        sizes = (torch.rand(2 * int(n / mean) + 16, generator=g) * (2 * mean - 1) + 1).long()
        bounds = torch.cumsum(sizes, 0)
        bounds = torch.cat(
            [torch.zeros(1, dtype=torch.int64), bounds[bounds < n], torch.tensor([n])]
        )
        order = torch.randperm(bounds.numel() - 1, generator=g)
        lens = (bounds[1:] - bounds[:-1])[order]
        keep = order[: int(torch.searchsorted(torch.cumsum(lens, 0), int(budget * n))) + 1]
        keep = torch.sort(keep).values
        starts.append(bounds[keep])
        ends.append(bounds[keep + 1])
        ptr.append(ptr[-1] + keep.numel())
    seg_start, seg_end = torch.cat(starts), torch.cat(ends)
    return torch.tensor(ptr), seg_start, seg_end, int((seg_end - seg_start).sum())


def dense_matmul(q, k, v, scale):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v)


def dense_sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def bench_case(
    kind, dtype_name, n, budget, rows, hkv, d, repeats, flush, backends, temps, min_sample_s
):
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    q = torch.randn(1, hkv, rows, d, dtype=dtype)
    k = torch.randn(hkv, n, d, dtype=dtype)
    v = torch.randn(hkv, n, d, dtype=dtype)
    seg_ptr, seg_start, seg_end, tokens = make_selection(hkv, n, budget)
    scale = d**-0.5
    kd, vd = k[None], v[None]
    fns = {"dense:sdpa": lambda: dense_sdpa(q, kd, vd, scale)}
    if rows * n * hkv * 4 <= 1 << 30:  # the matmul baseline materialises the scores
        fns["dense:matmul"] = lambda: dense_matmul(q, kd, vd, scale)
    for b in backends:
        fns[b] = lambda b=b: sparse_attention(q, k, v, seg_ptr, seg_start, seg_end, backend=b)
    results = []
    dense_names = [name for name in fns if name.startswith("dense:")]
    for temp in temps:
        before = flush.sum if temp == "cold" else None
        with benchlib.Interference() as busy:
            times = benchlib.interleaved(fns, repeats, min_sample_s, before)
        t = {name: statistics.median(x) for name, x in times.items()}
        best = benchlib.best_of(times, dense_names)
        for backend in backends:
            nbytes = 2 * tokens * d * k.element_size()
            results.append(
                dict(
                    kind=kind, dtype=dtype_name, cache=temp, n=n, rows=rows, hkv=hkv, d=d,
                    budget=budget, selected=tokens / (hkv * n), bytes_fraction=tokens / (hkv * n),
                    segments=int(seg_ptr[-1]), threads=torch.get_num_threads(),
                    omp_wait=os.environ.get("OMP_WAIT_POLICY"), backend=backend,
                    ms=t[backend] * 1e3, dense_ms=t[best] * 1e3, dense_impl=best.split(":")[1],
                    **benchlib.speedup(times[best], times[backend]),
                    gbps=nbytes / t[backend] / 1e9,
                    dense_gbps=2 * hkv * n * d * k.element_size() / t[best] / 1e9,
                    other_cores=busy.cores,
                )
            )  # fmt: skip
    return results


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=65536, help="context tokens for decode")
    p.add_argument("--prefill-n", type=int, default=32768, help="context tokens for prefill")
    p.add_argument("--prefill-m", type=int, default=512, help="question rows per head (prefill)")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--dtype", default="fp32,bf16")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch thread counts, each timed (default: torch's)")  # fmt: skip
    p.add_argument("--min-sample-s", type=float, default=0.02, help="shortest warm sample")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the machinery only")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.prefill_n, a.prefill_m, a.repeats = 4096, 2048, 32, 5
    meta = {"before": benchlib.machine()}
    g = a.hq // a.hkv
    flush = torch.ones((1 << (26 if a.smoke else 30)) // 4)  # 1 GiB > any last-level cache
    rows = []
    for threads in a.threads or [torch.get_num_threads()]:
        with benchlib.num_threads(threads):
            for name in a.dtype.split(","):
                rows += bench_case("decode", name, a.n, a.budget, g, a.hkv, a.d, a.repeats, flush,
                                   ("native", "torch"), ("warm", "cold"), a.min_sample_s)  # fmt: skip
                if not a.no_prefill:
                    rows += bench_case("prefill", name, a.prefill_n, a.budget, g * a.prefill_m,
                                       a.hkv, a.d, max(5, a.repeats // 3), flush, ("torch",),
                                       ("warm",), a.min_sample_s)  # fmt: skip
    benchlib.close(meta, max(r["threads"] for r in rows))
    print_table(rows, meta)
    if a.json:
        benchlib.write_json(a.json, meta, rows)
    return rows


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"{meta['before']['cpu']}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if meta["load_warning"]:
        print(meta["load_warning"])
    head = f"{'kind':8}{'dtype':6}{'cache':6}{'N':>7}{'R':>6}{'thr':>4}{'backend':>8}{'ms':>9}"
    print(
        head + f"{'dense ms':>10}{'(impl)':>8}{'speedup [min-max]':>20}{'bytes':>7}{'GB/s':>7}"
        f"{'dense GB/s':>11}{'others':>7}"
    )
    for r in rows:
        busy = "-" if r["other_cores"] is None else f"{r['other_cores']:.2f}"
        print(
            f"{r['kind']:8}{r['dtype']:6}{r['cache']:6}{r['n']:>7}{r['rows']:>6}{r['threads']:>4}"
            f"{r['backend']:>8}{r['ms']:>9.2f}{r['dense_ms']:>10.2f}{r['dense_impl']:>8}"
            f"{benchlib.spread_text(r):>20}{r['bytes_fraction']:>7.3f}{r['gbps']:>7.1f}"
            f"{r['dense_gbps']:>11.1f}{busy:>7}"
        )


if __name__ == "__main__":
    main()
