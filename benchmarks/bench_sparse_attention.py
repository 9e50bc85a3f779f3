"""Sparse attention over cluster segments vs the best dense attention, on CPU, same process, same data.

Decode: Hq=32, Hkv=8 (R=4 packed rows), D=128, N=65536 context keys, ``budget`` of each KV head's
keys selected as random clusters of ~20 tokens. Prefill: M=512 question rows (R=2048) at N=32768.
Dense baseline: GQA-packed ``q @ k^T -> softmax -> @ v`` and SDPA on the packed view (the faster).
"warm" times repeat the call on the same data; "cold" first streams a buffer larger than the
last-level cache through, as when many layers' K/V pass through between two reads of one layer.

    python benchmarks/bench_sparse_attention.py --n 65536 --budget 0.1 --dtype fp32,bf16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# Sleeping, not spinning, OpenMP workers: on a shared machine a spinning worker gets preempted and
# every parallel region (dense and sparse alike) then waits for a scheduler tick. Must precede the
# torch import; set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

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


def time_interleaved(fns: dict, repeats: int, flush: torch.Tensor | None = None) -> dict:
    """Median seconds of each ``fn()`` over ``repeats`` rounds after one warm-up round; the
    functions take turns within each round, so that machine noise hits them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if flush is not None:
                flush.sum()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_case(kind, dtype_name, n, budget, rows, hkv, d, repeats, flush, backends, temps):
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
    for temp in temps:
        t = time_interleaved(fns, repeats, flush if temp == "cold" else None)
        best = min((name for name in t if name.startswith("dense:")), key=t.get)
        for backend in backends:
            nbytes = 2 * tokens * d * k.element_size()
            results.append(
                dict(
                    kind=kind, dtype=dtype_name, cache=temp, n=n, rows=rows, hkv=hkv, d=d,
                    budget=budget, selected=tokens / (hkv * n), segments=int(seg_ptr[-1]),
                    threads=torch.get_num_threads(), omp_wait=os.environ.get("OMP_WAIT_POLICY"),
                    backend=backend, ms=t[backend] * 1e3, dense_ms=t[best] * 1e3,
                    dense_impl=best.split(":")[1], speedup=t[best] / t[backend],
                    gbps=nbytes / t[backend] / 1e9,
                    dense_gbps=2 * hkv * n * d * k.element_size() / t[best] / 1e9,
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
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    g = a.hq // a.hkv
    flush = torch.ones((1 << 30) // 4, dtype=torch.float32)  # 1 GiB > any last-level cache
    rows = []
    for name in a.dtype.split(","):
        rows += bench_case("decode", name, a.n, a.budget, g, a.hkv, a.d, a.repeats, flush,
                           ("native", "torch"), ("warm", "cold"))  # fmt: skip
        if not a.no_prefill:
            rows += bench_case("prefill", name, a.prefill_n, a.budget, g * a.prefill_m, a.hkv,
                               a.d, max(1, a.repeats // 3), flush, ("torch",), ("warm",))  # fmt: skip
    print(f"torch threads: {threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    head = (
        f"{'kind':8}{'dtype':6}{'cache':6}{'N':>7}{'R':>6}{'backend':>8}{'ms':>9}{'dense ms':>10}"
    )
    print(head + f"{'(impl)':>8}{'speedup':>9}{'GB/s':>7}{'dense GB/s':>11}")
    for r in rows:
        print(
            f"{r['kind']:8}{r['dtype']:6}{r['cache']:6}{r['n']:>7}{r['rows']:>6}{r['backend']:>8}"
            f"{r['ms']:>9.2f}{r['dense_ms']:>10.2f}{r['dense_impl']:>8}{r['speedup']:>8.1f}x"
            f"{r['gbps']:>7.1f}{r['dense_gbps']:>11.1f}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
