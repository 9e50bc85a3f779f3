"""GPU benchmark of the Triton path: decode, prefill and k-means against the best dense baselines.

    python benchmarks/bench_gpu.py            # on a CUDA GPU (issue 3's sizes)
    python benchmarks/bench_gpu.py --smoke    # tiny sizes on CPU under TRITON_INTERPRET=1

* Decode: N = 32K and 128K context, Hq=32, Hkv=8, D=128, bf16, budgets 5/10/20% (top-k mode, so
  the budget is met exactly), one query token, 64 tail tokens; the timed step is the whole
  ``squeezed_attention`` (lookup + segments + sparse attention + dense tail + merge), launched
  eagerly ("ours") and replayed as a CUDA graph ("ours_graph": no launch overhead). Baselines:
  dense FlashAttention over context + tail (flash-attn if installed, else PyTorch's flash SDPA
  backend with ``enable_gqa``) and FlashInfer's single decode if installed. "bw %" is the bytes the
  sparse attention reads (selected K/V rows) per second, over the measured device-copy bandwidth
  (a 1 GiB ``copy_``: read + write bytes per second).
* Prefill: 512 and 2048 question tokens over 32K and 128K; baseline: non-causal dense attention of
  the question rows over context + question (causal only changes M^2/2 of N*M scores).
* k-means: G=32, N=32768, D=128, K=1638, 20 iterations (``tol=0``), cosine; vs naive batched
  torch (the full [G, N, K] score matrix, argmax, ``index_add_``) and ``flash_kmeans`` if installed;
  plus all 32 layers x 8 KV heads of a 7B model at 32K (G=256).

Prints a table last and writes JSON to ``$OUT/bench_gpu.json`` (or ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

TARGETS = "decode >= 6x dense at 128K/10%; sparse attention >= 70% of copy bw; k-means iteration <= flash-kmeans; 7B clustering < 2 s"


def _setup_smoke():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    os.environ["SQUEEZE_BACKEND"] = "triton"


def _timer(device):
    import torch

    def run(fn, iters, warmup=2):
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters

    return run


def _dense_baselines(device, q, k, v, scale):
    """name -> callable, for q [1, Hq, M, D] over k, v [1, Hkv, L, D]."""
    import torch.nn.functional as F

    out = {}
    try:
        from flash_attn import flash_attn_func

        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        out["flash-attn"] = lambda: flash_attn_func(qt, kt, vt, softmax_scale=scale)
    except Exception:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH

        def sdpa():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

        out["sdpa-flash" if device.type == "cuda" else "sdpa-math"] = sdpa
    try:
        import flashinfer

        kt, vt = k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()
        if q.shape[2] == 1:
            qd = q[0, :, 0].contiguous()
            out["flashinfer"] = lambda: flashinfer.single_decode_with_kv_cache(qd, kt, vt)
        else:
            qp = q[0].transpose(0, 1).contiguous()
            out["flashinfer"] = lambda: flashinfer.single_prefill_with_kv_cache(qp, kt, vt)
    except Exception:
        pass
    return out


def _copy_bandwidth(device, run, nbytes):
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = run(lambda: dst.copy_(src), 5)
    return 2 * nbytes / (ms * 1e-3)


def _index(device, n, hkv, hq, d, dtype, budget, window, iters, seed=0):
    import torch

    import squeeze

    g = torch.Generator(device=device).manual_seed(seed)
    centers = torch.randn(hkv, 64, d, device=device, generator=g) * 2
    which = torch.randint(0, 64, (hkv, n), device=device, generator=g)
    keys = torch.gather(centers, 1, which[..., None].expand(-1, -1, d))
    keys = (keys + 0.7 * torch.randn(hkv, n, d, device=device, generator=g)).to(dtype)
    values = torch.randn(hkv, n, d, device=device, generator=g).to(dtype)
    cfg = squeeze.SqueezeConfig(
        centroid_ratio=0.05, l1_ratio=None, window=window, budget=budget, mode="topk",
        kmeans_iters=iters,
    )  # fmt: skip
    queries = torch.randn(hq, window, d, device=device, generator=g).to(dtype)
    return squeeze.build_index(keys, values, cfg, queries=queries)


def bench_attention(sz, device, run, copy_bw, rows):
    import torch

    import squeeze
    from squeeze.kernels.sparse_attention import sparse_attention

    hq, hkv, d, dtype = sz["hq"], sz["hkv"], sz["d"], sz["dtype"]
    scale = d**-0.5
    for n in sz["contexts"]:
        base = _index(device, n, hkv, hq, d, dtype, sz["budgets"][0], sz["window"], sz["iters"])
        for budget in sz["budgets"]:
            index = base.with_config(budget=budget)
            for m in [1, *sz["prefill"]]:
                t = max(m, sz["tail"])
                q = torch.randn(1, hq, m, d, device=device, dtype=dtype)
                k_tail = torch.randn(1, hkv, t, d, device=device, dtype=dtype)
                v_tail = torch.randn_like(k_tail)
                _, stats = squeeze.squeezed_attention(q, index, k_tail, v_tail, return_stats=True)
                step = functools.partial(squeeze.squeezed_attention, q, index, k_tail, v_tail)
                ours = run(step, sz["reps"])
                k_all = torch.cat([index.keys[None], k_tail], dim=2)
                v_all = torch.cat([index.values[None], v_tail], dim=2)
                row = {
                    "section": "decode" if m == 1 else "prefill", "N": n, "M": m,
                    "budget": budget, "kv_fraction": round(stats.kv_fraction, 4), "ours_ms": ours,
                }  # fmt: skip
                if device.type == "cuda" and m == 1:  # the step has no host sync: a graph
                    row["ours_graph_ms"] = _graph_time(step, run, sz["reps"])
                for name, fn in _dense_baselines(device, q, k_all, v_all, scale).items():
                    row[f"{name}_ms"] = run(fn, sz["reps"])
                    row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / ours
                if m == 1:  # bandwidth of the sparse attention alone, on the bytes it reads
                    from squeeze import lookup
                    from squeeze.kernels.segments import segments

                    qg = q.reshape(1, hkv, hq // hkv, 1, d)
                    found = lookup.select(qg, index, scale)
                    segs = segments(found.mask, index.offsets)
                    packed = qg.reshape(1, hkv, hq // hkv, d)
                    sa = run(
                        lambda: sparse_attention(packed, index.keys, index.values, *segs),  # noqa: B023
                        sz["reps"],
                    )
                    nbytes = int(stats.keys_read.sum()) * d * 2 * index.keys.element_size()
                    row["sparse_attn_ms"] = sa
                    row["bw_pct_of_copy"] = 100 * nbytes / (sa * 1e-3) / copy_bw
                rows.append(row)


def _graph_time(fn, run, reps):
    """ms per replay of ``fn`` captured in a CUDA graph (launch overhead removed), or the error."""
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return run(graph.replay, reps)
    except Exception as exc:  # a host sync inside fn makes capture fail: report it
        return f"capture failed: {type(exc).__name__}: {str(exc)[:80]}"


def bench_kmeans(sz, device, run, rows):
    import torch

    import squeeze

    for label, g in (("kmeans", sz["km_g"]), ("kmeans-7B-all-layers", sz["km_g_7b"])):
        n, d, k, iters = sz["km_n"], sz["d"], sz["km_k"], sz["km_iters"]
        x = torch.randn(g, n, d, device=device, dtype=sz["dtype"])
        fn = lambda: squeeze.kmeans(x, k, iters=iters, tol=0.0, metric="cosine")  # noqa: E731,B023
        total = run(fn, 1, warmup=1)
        row = {"section": label, "G": g, "N": n, "K": k, "iters": iters, "ours_ms": total,
               "ours_ms_per_iter": total / iters}  # fmt: skip
        if label == "kmeans":
            row["naive_torch_ms_per_iter"] = run(lambda: _naive_kmeans(x, k, iters), 1, 1) / iters  # noqa: B023
            try:
                from flash_kmeans import batch_kmeans_Cosine

                fk = lambda: batch_kmeans_Cosine(x, k, max_iters=iters, tol=-1.0)  # noqa: E731,B023
                row["flash_kmeans_ms_per_iter"] = run(fk, 1, warmup=1) / iters
            except Exception as exc:
                row["flash_kmeans"] = f"unavailable ({type(exc).__name__})"
        rows.append(row)


def _naive_kmeans(x, k, iters):
    """Batched spherical Lloyd in plain torch: the full [G, N, K] score matrix, argmax,
    ``index_add_`` (one atomic per point and dimension on GPU)."""
    import torch
    import torch.nn.functional as F

    g, _, d = x.shape
    xf = F.normalize(x.float(), dim=-1)
    c = xf[:, :k].clone()
    offs = torch.arange(g, device=x.device)[:, None] * k
    for _ in range(iters):
        lab = torch.bmm(xf, c.transpose(1, 2)).argmax(-1) + offs
        sums = torch.zeros(g * k, d, device=x.device).index_add_(
            0, lab.flatten(), xf.reshape(-1, d)
        )
        c = F.normalize(sums.view(g, k, d), dim=-1)
    return c


def sizes(smoke: bool):
    import torch

    if smoke:
        return dict(hq=4, hkv=2, d=64, dtype=torch.float32, contexts=[512], budgets=[0.05, 0.1, 0.2],
                    prefill=[8], tail=4, window=16, iters=2, reps=1, km_g=2, km_g_7b=2, km_n=256,
                    km_k=13, km_iters=2, copy_bytes=1 << 20)  # fmt: skip
    return dict(hq=32, hkv=8, d=128, dtype=torch.bfloat16, contexts=[32768, 131072],
                budgets=[0.05, 0.1, 0.2], prefill=[512, 2048], tail=64, window=100, iters=10,
                reps=20, km_g=32, km_g_7b=256, km_n=32768, km_k=1638, km_iters=20,
                copy_bytes=1 << 30)  # fmt: skip


def _table(rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [" | ".join(keys)]
    lines += [" | ".join(fmt(r.get(k, "")) for k in keys) for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, TRITON_INTERPRET=1")
    ap.add_argument("--only", choices=["attention", "kmeans"], default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        _setup_smoke()
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("bench_gpu.py needs a CUDA GPU (use --smoke to check it on CPU)")
    sz = sizes(args.smoke)
    run = _timer(device)
    rows = []
    copy_bw = _copy_bandwidth(device, run, sz["copy_bytes"])
    if args.only in (None, "attention"):
        bench_attention(sz, device, run, copy_bw, rows)
    if args.only in (None, "kmeans"):
        bench_kmeans(sz, device, run, rows)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result = {"device": gpu, "smoke": args.smoke, "copy_bw_GBps": copy_bw / 1e9,
              "targets": TARGETS, "rows": rows}  # fmt: skip
    out_dir = (
        Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("bench_gpu_smoke.json" if args.smoke else "bench_gpu.json")
    path.write_text(json.dumps(result, indent=1))
    print(f"device: {gpu}; copy bandwidth {copy_bw / 1e9:.1f} GB/s; JSON: {path}")
    print(f"targets: {TARGETS}")
    print(_table(rows))
    return result


if __name__ == "__main__":
    main()
