"""Benchmark: squeeze.kmeans against FAISS spherical k-means, same data, same process.

    python benchmarks/bench_kmeans.py --groups 8 --n 32768 --dim 128 --ratio 0.05 --iters 20 \
        --json results/bench_kmeans.json

Ours: one batched ``kmeans(x, K, metric="cosine", iters, tol=0)`` call over all G groups, timed
twice: as shipped (only the centroids that moved since the last assignment are re-scored, and a
group whose centroids stop changing bit for bit skips its remaining, identical iterations; both
exact) and with both shortcuts off (``SKIP_REPEATS = REUSE_SCORES = False``: every score of every
iteration computed, the like-for-like comparison with FAISS's work). FAISS:
``faiss.Kmeans(D, K, niter=iters, spherical=True, max_points_per_centroid=N)`` (no subsampling)
trained on each group's L2-normalised points in turn. Both run their full iteration count.

Quality: both are scored with one formula from their labels (ours: ``labels``; FAISS: the nearest
of its final centroids): J = Σ ‖x̂ − ĉ‖², ĉ the normalised mean of the cluster's normalised points.
Peak memory of ours: the reset RSS high-water mark (VmHWM) minus the RSS just before the call, in a
fresh subprocess that runs ``kmeans`` on the same data with 2 iterations (the peak does not grow
with iterations).

The JSON (``{"meta", "rows"}``) records the machine before and after (``benchlib.machine``: load
average, threads, CPU, versions) and the cores other processes kept busy during the timing; the
table warns when the load average exceeds the thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

from squeeze.kmeans import kmeans
from squeeze.kmeanspp import kmeanspp

kmeans_module = sys.modules["squeeze.kmeans"]  # the module, not the function of the same name


def make_keys(groups: int, n: int, dim: int, seed: int) -> torch.Tensor:
    """[G, N, D] fp32 keys with structure: a shared offset plus a 256-mode Gaussian mixture.

    Built one group at a time, so generating the data adds little to the process's peak memory.
    """
    gen = torch.Generator().manual_seed(seed)
    modes = 256
    x = torch.empty(groups, n, dim)
    for g in range(groups):
        offset = 2.0 * torch.randn(1, dim, generator=gen)
        centres = torch.randn(modes, dim, generator=gen)
        scale = 0.3 + torch.rand(modes, 1, generator=gen)
        which = torch.randint(0, modes, (n,), generator=gen)
        torch.randn(n, dim, generator=gen, out=x[g])
        x[g].mul_(scale[which]).add_(centres[which]).add_(offset)
    return x


def _reset_peak() -> None:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); harmless where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def spherical_objective(xn: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Σ ‖x̂ − ĉ‖² over one group: xn [N, D] unit rows, labels [N], ĉ normalised cluster means."""
    sums = torch.zeros(k, xn.shape[1], dtype=torch.float64).index_add_(0, labels, xn.double())
    chat = torch.nn.functional.normalize(sums, dim=-1)
    return float((xn.double() - chat[labels]).square().sum())


def _peak_rss_bytes() -> int:
    """VmHWM, the high-water mark that ``_reset_peak`` resets; ru_maxrss where it is missing
    (ru_maxrss is never reset, so there it also counts the peak of building the data)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(args: argparse.Namespace) -> None:
    x = make_keys(args.groups, args.n, args.dim, args.seed)
    k = max(1, round(args.ratio * args.n))
    kmeans(x[:, :256], 4, iters=1)  # warm up thread pools and allocator
    _reset_peak()
    before = _rss_bytes()
    kmeans(x, k, metric="cosine", iters=2, tol=0.0, seed=args.seed)
    peak = _peak_rss_bytes()
    print(json.dumps({"peak_extra_bytes": peak - before, "x_bytes": x.numel() * 4}))


def measure_peak(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", "--groups", str(args.groups)]
    cmd += ["--n", str(args.n), "--dim", str(args.dim), "--ratio", str(args.ratio)]
    cmd += ["--seed", str(args.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.05)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        _memory_child(args)
        return []
    import faiss  # imported late: the memory child must not load it

    meta = {"before": benchlib.machine()}
    busy = benchlib.Interference().start()

    g, n, d, it = args.groups, args.n, args.dim, args.iters
    k = max(1, round(args.ratio * n))
    x = make_keys(g, n, d, args.seed)
    xn = torch.nn.functional.normalize(x, dim=-1)
    xn_np = [xn[i].numpy() for i in range(g)]

    def run_faiss() -> list:
        out = []
        for i in range(g):
            km = faiss.Kmeans(
                d,
                k,
                niter=it,
                spherical=True,
                max_points_per_centroid=n,
                min_points_per_centroid=1,
                seed=args.seed + 1 + i,
                verbose=False,
            )
            km.train(xn_np[i])
            out.append(km)
        return out

    kmeans(x[:, :256], 4, iters=1)  # warm-up of both libraries on tiny inputs
    faiss.Kmeans(d, 4, niter=1, min_points_per_centroid=1).train(xn_np[0][:256])
    t_ours, t_full, t_faiss = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = kmeans(x, k, metric="cosine", iters=it, tol=0.0, seed=args.seed)
        t_ours.append(time.perf_counter() - t0)
        kmeans_module.SKIP_REPEATS = kmeans_module.REUSE_SCORES = False
        try:
            t0 = time.perf_counter()
            full = kmeans(x, k, metric="cosine", iters=it, tol=0.0, seed=args.seed)
            t_full.append(time.perf_counter() - t0)
        finally:
            kmeans_module.SKIP_REPEATS = kmeans_module.REUSE_SCORES = True
        same = torch.equal(res.labels, full.labels) and torch.equal(res.centroids, full.centroids)
        t0 = time.perf_counter()
        kms = run_faiss()
        t_faiss.append(time.perf_counter() - t0)

    j_ours = sum(spherical_objective(xn[i], res.labels[i], k) for i in range(g))
    j_faiss = 0.0
    for i, km in enumerate(kms):
        _, lab = km.index.search(xn_np[i], 1)
        j_faiss += spherical_objective(xn[i], torch.from_numpy(lab[:, 0]).long(), k)

    # Seeding cost against one Lloyd iteration (t(iters=2) - t(iters=1), same init, tol=0).
    xw = xn.contiguous()
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    c0 = kmeanspp(xw, xw.square().sum(-1), k, None, gen, None, True)
    t_pp = time.perf_counter() - t0
    t_calls = []
    for n_it in (1, 2):
        t0 = time.perf_counter()
        kmeans(x, k, metric="cosine", iters=n_it, tol=0.0, init=c0)
        t_calls.append(time.perf_counter() - t0)
    t_iter = t_calls[1] - t_calls[0]

    busy.stop()
    row = {
        "groups": g,
        "n": n,
        "dim": d,
        "k": k,
        "iters": it,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "ours_s": min(t_ours),
        "faiss_s": min(t_faiss),
        "ratio": min(t_ours) / min(t_faiss),
        "ours_every_iteration_s": min(t_full),
        "ratio_every_iteration": min(t_full) / min(t_faiss),
        "shortcut_result_identical": same,
        "ours_inertia": j_ours,
        "ours_inertia_reported": float(res.inertia.sum()),
        "faiss_inertia": j_faiss,
        "inertia_gap": (j_ours - j_faiss) / j_faiss,
        "kmeanspp_s": t_pp,
        "one_iteration_s": t_iter,
        "load_avg_1m": meta["before"]["load_avg"][0],
        "other_cores": busy.cores,
    }
    if not args.no_memory:
        mem = measure_peak(args)
        row["ours_peak_extra_mb"] = mem["peak_extra_bytes"] / 2**20
        row["x_mb"] = mem["x_bytes"] / 2**20
        row["memory_method"] = "VmHWM (reset) - RSS before call, subprocess, iters=2"
    benchlib.close(meta, max(row["torch_threads"], row["faiss_threads"]))
    _print_table(row, meta)
    if args.json is not None:
        benchlib.write_json(args.json, meta, [row])
    return [row]


def _print_table(row: dict, meta: dict) -> None:
    if meta.get("load_warning"):
        print(meta["load_warning"])
    print(
        f"G={row['groups']} N={row['n']} D={row['dim']} K={row['k']} iters={row['iters']} "
        f"threads torch={row['torch_threads']} faiss={row['faiss_threads']}"
    )
    print(f"{'method':<34}{'time s':>10}{'/ faiss':>9}{'inertia':>14}")
    for name, t, r, j in (
        ("squeeze.kmeans", row["ours_s"], row["ratio"], row["ours_inertia"]),
        (
            "squeeze.kmeans, all scores",
            row["ours_every_iteration_s"],
            row["ratio_every_iteration"],
            row["ours_inertia"],
        ),
        ("faiss.Kmeans", row["faiss_s"], 1.0, row["faiss_inertia"]),
    ):
        print(f"{name:<34}{t:>10.2f}{r:>9.3f}{j:>14.2f}")
    print(
        f"inertia gap {100 * row['inertia_gap']:+.3f}%   shortcut result identical: "
        f"{row['shortcut_result_identical']}"
    )
    print(
        f"k-means++ {row['kmeanspp_s']:.3f} s vs one Lloyd iteration {row['one_iteration_s']:.3f} s"
    )
    if row.get("other_cores") is not None:
        print(f"cores busy outside this process while timing: {row['other_cores']:.2f}")
    if "ours_peak_extra_mb" in row:
        print(
            f"peak extra memory (ours) {row['ours_peak_extra_mb']:.1f} MB for x of "
            f"{row['x_mb']:.1f} MB ({row['memory_method']})"
        )


if __name__ == "__main__":
    main()
