"""squeeze.kmeans and its kernels (chunked assignment, sorted update) against naive references."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from reference import make_keys

from squeeze.errors import BackendUnavailable
from squeeze.kernels import native
from squeeze.kernels.assign import assign
from squeeze.kmeans import KMeansResult, kmeans
from squeeze.kmeanspp import kmeanspp

kmeans_module = sys.modules["squeeze.kmeans"]  # `squeeze.kmeans` is also the function's name
ROOT = Path(__file__).resolve().parents[1]
NATIVE = native.available("kmeans")
needs_native = pytest.mark.skipif(
    not NATIVE, reason=f"native kernel unavailable: {native.unavailable_reason('kmeans')}"
)
BACKENDS = [pytest.param("native", marks=needs_native), "torch"]


@pytest.fixture(autouse=True)
def _no_backend_env(backend_env):
    backend_env(None)


# ---------------------------------------------------------------- naive references and data


def naive_lloyd(x, c, iters, metric, weights=None):
    """Full-distance-matrix Lloyd in fp64 from centroids c [G, K, D].

    Returns labels, inertia and whether a cluster was ever empty (it keeps its old centroid).
    """
    x = x.double()
    w = torch.ones(x.shape[:2], dtype=torch.float64) if weights is None else weights.double()
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
        c = torch.nn.functional.normalize(c.double(), dim=-1)
    c = c.double()
    emptied = False
    for _ in range(iters):
        labels = torch.cdist(x, c).argmin(-1)
        onehot = torch.nn.functional.one_hot(labels, c.shape[1]).double() * w.unsqueeze(-1)
        tot = onehot.sum(1).unsqueeze(-1)
        emptied |= bool((tot == 0).any())
        means = onehot.transpose(1, 2) @ x / tot.clamp_min(1e-300)
        means = torch.where(tot > 0, means, c)
        c = torch.nn.functional.normalize(means, dim=-1) if metric == "cosine" else means
    cl = c.gather(1, labels.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    return labels, ((x - cl).square().sum(-1) * w).sum(-1), emptied


def blobs(gen, g, n, d, k, spread=0.15, sep=3.0):
    """G groups of n points around k well-separated centres (fp32), and those centres."""
    centres = sep * torch.randn(g, k, d, generator=gen)
    which = torch.randint(0, k, (g, n), generator=gen)
    which[:, :k] = torch.arange(k)  # every blob populated
    x = centres.gather(1, which.unsqueeze(-1).expand(-1, -1, d))
    return x + spread * torch.randn(g, n, d, generator=gen), centres, which


def first_points_init(x, k, gen):
    """Initial centroids: k random distinct points of each group (fp32 [G, k, D])."""
    idx = torch.stack([torch.randperm(x.shape[1], generator=gen)[:k] for _ in range(x.shape[0])])
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2])).float().clone()


# ---------------------------------------------------------------- backends agree


@needs_native
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kmeans_matches_torch(gen, metric, dtype):
    x, _, _ = blobs(gen, 3, 700, 24, 20, spread=0.8, sep=2.0)
    x = x.to(dtype)
    w = torch.rand(3, 700, generator=gen)
    for init in ("k-means++", "random"):
        a = kmeans(x, 20, metric=metric, iters=8, seed=1, init=init, weights=w, backend="native")
        b = kmeans(x, 20, metric=metric, iters=8, seed=1, init=init, weights=w, backend="torch")
        assert torch.equal(a.labels, b.labels) and torch.equal(a.counts, b.counts)
        assert torch.equal(a.n_iter, b.n_iter)
        torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.inertia, b.inertia, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_native_kmeanspp_draws_the_same_centres(gen, spherical, weighted):
    """Same rounds, same random draws; D² and keys agree to round-off, so the draws agree."""
    x = torch.randn(2, 3000, 16, generator=gen) + 2.0 * torch.randn(
        2, 40, 16, generator=gen
    ).repeat(1, 75, 1)
    if spherical:
        x = torch.nn.functional.normalize(x, dim=-1)
    xsq = x.square().sum(-1)
    w = torch.rand(2, 3000, generator=gen) if weighted else None
    a, b = (
        kmeanspp(x, xsq, 200, w, torch.Generator().manual_seed(1), None, spherical, be)
        for be in ("native", "torch")
    )
    assert torch.equal(a, b)


@needs_native
def test_native_results_do_not_depend_on_threads(gen):
    x = torch.randn(3, 1000, 32, generator=gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = kmeans(x, 50, iters=4, backend="native")
        torch.set_num_threads(2)
        b = kmeans(x, 50, iters=4, backend="native")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.inertia, b.inertia)


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_kmeans_triton_equals_torch(metric, backend_env, monkeypatch, gen):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = make_keys(2, 120, 32, generator=gen)
    ref = kmeans(x, 8, metric=metric, iters=4, seed=1)
    backend_env("triton")
    got = kmeans(x, 8, metric=metric, iters=4, seed=1)
    assert torch.equal(got.labels, ref.labels)
    assert torch.equal(got.counts, ref.counts)
    torch.testing.assert_close(got.centroids, ref.centroids, rtol=1e-5, atol=1e-5)


def test_bad_backend_names_raise():
    with pytest.raises(ValueError, match="backend"):
        kmeans(torch.randn(1, 10, 4), 2, backend="cuda")


def test_unbuildable_native_kernel_falls_back_and_logs_once(
    gen, monkeypatch, tmp_path, caplog, fresh_logs
):
    """No compiler: native.load logs the reason once and k-means runs the PyTorch path."""
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native.cache.shutil, "which", lambda name: None)
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_reasons", {})
    monkeypatch.setattr(native, "_bound", {})
    x = torch.randn(2, 60, 8, generator=gen)
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        a = kmeans(x, 5, iters=3)
        b = kmeans(x, 5, iters=3)
        with pytest.raises(BackendUnavailable, match="no C compiler"):
            kmeans(x, 5, iters=3, backend="native")
    hits = [r for r in caplog.records if "'kmeans' unavailable" in r.getMessage()]
    assert len(hits) == 1
    ref = kmeans(x, 5, iters=3, backend="torch")
    assert torch.equal(a.labels, ref.labels) and torch.equal(b.labels, ref.labels)


# ---------------------------------------------------------------- kmeans against a naive Lloyd


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_inertia_matches_naive_lloyd(gen, metric, backend):
    x, _, _ = blobs(gen, 3, 400, 8, 6, spread=1.0, sep=2.0)  # overlapping: a real optimisation
    x = x + 3.0 * torch.randn(3, 1, 8, generator=gen)  # offset so cosine differs from l2
    c0 = first_points_init(x, 12, gen)
    res = kmeans(x, 12, metric=metric, iters=15, tol=0.0, init=c0, backend=backend)
    _, ref, emptied = naive_lloyd(x, c0, 15, metric)
    assert torch.all(res.inertia <= ref * 1.01)
    if not emptied:  # same algorithm: same objective (re-seeding empties may only improve it)
        torch.testing.assert_close(res.inertia.double(), ref, rtol=1e-2, atol=0)
    assert torch.equal(res.n_iter, torch.full((3,), 15))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_equal_naive_on_separated_data(gen, metric, backend):
    x, _, which = blobs(gen, 2, 300, 16, 8)
    c0 = first_points_init(x, 8, gen)
    c0[:, :4] = x[:, :4]  # points of blobs 0-3 (blobs() puts one of each first): 4 blobs covered
    res = kmeans(x, 8, metric=metric, iters=10, tol=0.0, init=c0, backend=backend)
    labels, inertia, emptied = naive_lloyd(x, c0, 10, metric)
    if not emptied:
        assert torch.equal(res.labels, labels)
        torch.testing.assert_close(res.inertia.double(), inertia, rtol=1e-4, atol=1e-4)
    c0 = x[:, :8].clone()  # one point of every blob: Lloyd recovers the blobs, nothing empties
    res = kmeans(x, 8, metric=metric, iters=10, tol=0.0, init=c0, backend=backend)
    labels, inertia, emptied = naive_lloyd(x, c0, 10, metric)
    assert not emptied and torch.equal(res.labels, labels) and torch.equal(labels, which)
    torch.testing.assert_close(res.inertia.double(), inertia, rtol=1e-4, atol=1e-4)


def test_kmeanspp_recovers_separated_blobs(gen):
    x, _, which = blobs(gen, 4, 500, 16, 10)
    res = kmeans(x, 10, metric="l2", iters=20)
    for gi in range(4):  # the partition is the blobs' (up to renaming)
        pairs = torch.unique(torch.stack([res.labels[gi], which[gi]]), dim=1)
        assert pairs.shape[1] == 10


def test_result_shapes_and_dtypes(gen):
    x = torch.randn(3, 50, 5, generator=gen)
    res = kmeans(x, 4, iters=3)
    assert isinstance(res, KMeansResult)
    assert res.centroids.shape == (3, 4, 5) and res.centroids.dtype == torch.float32
    assert res.labels.shape == (3, 50) and res.labels.dtype == torch.int64
    assert res.counts.shape == (3, 4) and res.counts.dtype == torch.int64
    assert res.inertia.shape == (3,) and res.inertia.dtype in (torch.float32, torch.float64)
    assert res.n_iter.shape == (3,) and res.n_iter.dtype == torch.int64
    assert res.iters == int(res.n_iter.max()) <= 3
    assert torch.equal(res.counts.sum(1), torch.full((3,), 50))


# ---------------------------------------------------------------- seeding and determinism


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_deterministic_under_seed_and_global_rng_untouched(gen, init):
    x = torch.randn(2, 200, 8, generator=gen)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = kmeans(x, 10, init=init, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # the global RNG has no effect
    b = kmeans(x, 10, init=init, seed=5)
    c = kmeans(x, 10, init=init, seed=6)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.labels, c.labels)


def test_kmeanspp_weighted_never_picks_zero_weight_points(gen):
    x = torch.randn(2, 300, 8, generator=gen)
    w = (torch.rand(2, 300, generator=gen) > 0.5).float() * torch.rand(2, 300, generator=gen)
    xsq = x.square().sum(-1)
    for k in (5, 60, 140):  # sequential and batched rounds
        c = kmeanspp(x, xsq, k, w, torch.Generator().manual_seed(k))
        hit = (c.unsqueeze(2) == x.unsqueeze(1)).all(-1).float()  # [G, k, N]
        assert torch.all(hit.sum(-1) == 1)  # every centre is a data point
        assert torch.all((hit * (w == 0).float().unsqueeze(1)).sum((1, 2)) == 0)
        assert torch.all(hit.sum(1).max(-1).values == 1)  # distinct points


# ---------------------------------------------------------------- empty clusters


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("iters", [1, 5])
def test_no_empty_cluster_with_duplicates(gen, metric, iters):
    base = torch.randn(2, 5, 8, generator=gen)
    x = base.repeat_interleave(12, dim=1)  # 60 points, 5 distinct: 10 clusters must share them
    res = kmeans(x, 10, metric=metric, iters=iters)
    assert res.counts.min() >= 1
    assert torch.equal(
        res.counts, torch.stack([torch.bincount(lab, minlength=10) for lab in res.labels])
    )


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_no_empty_cluster_with_far_init(gen, metric):
    x = torch.randn(3, 200, 6, generator=gen)
    c0 = first_points_init(x, 16, gen)
    c0[:, 8:] = 1000.0 + torch.randn(3, 8, 6, generator=gen)  # far away (cosine: one direction)
    res = kmeans(x, 16, metric=metric, iters=2, tol=0.0, init=c0)
    assert res.counts.min() >= 1 and torch.all(res.counts.sum(1) == 200)


def test_k_equals_n_gives_singletons(gen):
    x = torch.randn(2, 20, 4, generator=gen)
    res = kmeans(x, 20, metric="l2", iters=3)
    assert torch.all(res.counts == 1)
    torch.testing.assert_close(
        res.inertia, torch.zeros(2, dtype=res.inertia.dtype), atol=1e-6, rtol=0
    )


# ---------------------------------------------------------------- dtypes and metrics


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_large_norm(gen, dtype, metric, backend):
    x = (300.0 * torch.randn(2, 400, 64, generator=gen)).to(dtype)  # norms ~2400 >> 256
    assert torch.isinf(x[0, 0].square().sum()) or dtype == torch.bfloat16
    res = kmeans(x, 16, metric=metric, iters=5, seed=3, backend=backend)
    ref = kmeans(x.float(), 16, metric=metric, iters=5, seed=3, backend=backend)
    assert torch.equal(res.labels, ref.labels)
    torch.testing.assert_close(res.centroids, ref.centroids)
    half = 0.5 * ref.centroids.square().sum(-1)
    lab, _ = assign(x, ref.centroids, half_sq=half, chunk_n=64, backend=backend)
    lab32, _ = assign(x.float(), ref.centroids, half_sq=half, backend=backend)
    assert torch.equal(lab, lab32)


@pytest.mark.parametrize("weighted", [False, True])
def test_cosine_centroids_are_raw_member_means(gen, weighted):
    x = torch.randn(2, 300, 8, generator=gen) * (0.5 + 10 * torch.rand(2, 300, 1, generator=gen))
    w = torch.rand(2, 300, generator=gen) if weighted else None
    res = kmeans(x, 7, metric="cosine", iters=6, weights=w)
    norms = res.centroids.norm(dim=-1)
    assert (norms - 1).abs().max() > 0.1  # raw means, not unit vectors
    for gi in range(2):
        for ki in range(7):
            m = res.labels[gi] == ki
            ww = torch.ones(int(m.sum())) if w is None else w[gi][m]
            ref = (x[gi][m].double() * ww[:, None].double()).sum(0) / ww.double().sum()
            torch.testing.assert_close(res.centroids[gi, ki].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_weights_equal_duplicated_points(gen, metric):
    x, _, _ = blobs(gen, 2, 120, 6, 5, spread=0.5)
    w = torch.randint(1, 4, (2, 120), generator=gen)
    c0 = first_points_init(x, 5, gen)
    a = kmeans(x, 5, metric=metric, iters=8, tol=0.0, init=c0, weights=w.float())
    for gi in range(2):
        dup = x[gi].repeat_interleave(w[gi], dim=0).unsqueeze(0)  # point i repeated w_i times
        b = kmeans(dup, 5, metric=metric, iters=8, tol=0.0, init=c0[gi : gi + 1])
        assert torch.equal(a.labels[gi].repeat_interleave(w[gi]), b.labels[0])
        torch.testing.assert_close(a.centroids[gi], b.centroids[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.inertia[gi], b.inertia[0], rtol=1e-5, atol=1e-5)
        # counts are numbers of points: weights do not change them
        assert torch.equal(a.counts[gi], torch.bincount(a.labels[gi], minlength=5))


# ---------------------------------------------------------------- convergence per group


def test_groups_converge_independently(gen):
    easy, _, _ = blobs(gen, 1, 300, 8, 6, spread=0.01, sep=5.0)
    hard = torch.rand(1, 300, 8, generator=gen)
    x = torch.cat([easy, hard])
    c0 = first_points_init(x, 6, gen)
    res = kmeans(x, 6, metric="l2", iters=60, tol=1e-4, init=c0)
    assert res.n_iter[0] < res.n_iter[1] <= 60
    alone = kmeans(x[:1], 6, metric="l2", iters=60, tol=1e-4, init=c0[:1])
    assert alone.n_iter[0] == res.n_iter[0]  # a converged group is frozen, not updated further
    assert torch.equal(alone.labels[0], res.labels[0])
    torch.testing.assert_close(alone.centroids[0], res.centroids[0])
    full = kmeans(x, 6, metric="l2", iters=7, tol=0.0, init=c0)
    assert torch.equal(full.n_iter, torch.full((2,), 7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tol", [0.0, 1e-4])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_shortcuts_change_nothing(gen, monkeypatch, backend, tol, metric):
    """Groups reach a fixed point at different iterations, and fewer centroids move each
    iteration; skipping repeated iterations and re-scoring only moved centroids is invisible."""
    easy, _, _ = blobs(gen, 2, 400, 8, 6, spread=0.05, sep=5.0)  # fixed point after a few iters
    hard = torch.rand(2, 400, 8, generator=gen)  # still moving
    x = torch.cat([easy, hard])
    dup = x[:, :40].repeat_interleave(10, dim=1)  # 40 distinct points, 16 clusters: empties
    w = torch.rand(4, 400, generator=gen)
    for data, k, weights in ((x, 6, w), (dup, 16, None), (x, 40, None)):
        runs = []
        for skip, reuse in ((False, False), (True, True), (True, False), (False, True)):
            monkeypatch.setattr(kmeans_module, "SKIP_REPEATS", skip)
            monkeypatch.setattr(kmeans_module, "REUSE_SCORES", reuse)
            runs.append(kmeans(data, k, metric=metric, iters=25, tol=tol, weights=weights,
                               backend=backend))  # fmt: skip
        for run in runs[1:]:
            for field in ("labels", "centroids", "counts", "inertia", "n_iter"):
                assert torch.equal(getattr(run, field), getattr(runs[0], field)), field
        if tol == 0:
            assert torch.equal(runs[0].n_iter, torch.full((4,), 25))


# ---------------------------------------------------------------- bad inputs


def _bad_inputs():
    x = torch.randn(2, 10, 4)
    nan = x.clone()
    nan[0, 3, 1] = float("nan")
    inf = x.clone()
    inf[1, 0, 0] = float("inf")
    return [
        ({"x": x[0]}, ValueError, "x"),
        ({"x": x.int()}, TypeError, "x"),
        ({"x": x.tolist()}, TypeError, "x"),
        ({"x": nan}, ValueError, "x"),
        ({"x": inf}, ValueError, "x"),
        ({"x": torch.randn(2, 0, 4), "k": 1}, ValueError, "x"),
        ({"k": 0}, ValueError, "k"),
        ({"k": 11}, ValueError, "k"),
        ({"k": True}, TypeError, "k"),
        ({"k": 2.0}, TypeError, "k"),
        ({"iters": 0}, ValueError, "iters"),
        ({"tol": -1.0}, ValueError, "tol"),
        ({"tol": "small"}, TypeError, "tol"),
        ({"seed": -1}, ValueError, "seed"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"metric": "dot"}, ValueError, "metric"),
        ({"init": "kmeans++"}, ValueError, "init"),
        ({"init": 3}, TypeError, "init"),
        ({"init": torch.randn(2, 4, 4)}, ValueError, "init"),
        ({"init": torch.randn(2, 3, 5)}, ValueError, "init"),
        ({"init": torch.full((2, 3, 4), float("nan"))}, ValueError, "init"),
        ({"weights": torch.rand(2, 9)}, ValueError, "weights"),
        ({"weights": torch.rand(20)}, ValueError, "weights"),
        ({"weights": -torch.rand(2, 10)}, ValueError, "weights"),
        ({"weights": torch.ones(2, 10, dtype=torch.int64)}, TypeError, "weights"),
        ({"weights": torch.full((2, 10), float("nan"))}, ValueError, "weights"),
        ({"weights": torch.rand(2, 10, device="meta")}, ValueError, "device"),
    ]


@pytest.mark.parametrize("kwargs,exc,match", _bad_inputs())
def test_bad_input_raises(kwargs, exc, match):
    args = {"x": torch.randn(2, 10, 4), "k": 3}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kmeans(args.pop("x"), args.pop("k"), **args)


# ---------------------------------------------------------------- memory


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, torch
    from squeeze.kmeans import kmeans
    torch.set_num_threads(2)
    x = torch.randn(1, 65536, 64)  # 16 MB; a full N x K fp32 distance matrix would be 512 MB
    kmeans(x[:, :512], 8, iters=2)  # warm-up: thread pools, allocator
    try:  # reset the RSS high-water mark (Linux >= 4.0); without it the bound only loosens
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    kmeans(x, 2048, metric="cosine", iters=2)
    with open("/proc/self/status") as f:  # VmHWM: the high-water mark clear_refs reset
        hwm = [line for line in f if line.startswith("VmHWM:")]
    if hwm:
        peak = int(hwm[0].split()[1]) * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra": peak - before}))
    """
)


def test_peak_memory_within_documented_bound():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    extra = json.loads(out.stdout.strip().splitlines()[-1])["extra"]
    g, n, d, k = 1, 65536, 64, 2048
    b = 4 * g * n * d  # one fp32 copy of x (16 MiB)
    w = max(4 * g * 2048 * k, 16 * 2**20)  # the shared scratch (default ~16 MiB score tile)
    bound = b + w + 128 * g * n + 32 * g * k * d  # the formula in kmeans' docstring
    bound += 32 * 2**20  # allocator, thread-pool and library slack
    assert extra < bound, f"peak extra {extra / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    assert bound < 512 * 2**20 // 4  # a full N x K fp32 distance matrix would be 512 MiB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cuda_matches_cpu(gen, metric):
    x, _, _ = blobs(gen, 3, 500, 16, 8, spread=0.5)
    w = torch.rand(3, 500, generator=gen)
    c0 = first_points_init(x, 8, gen)
    cpu = kmeans(x, 8, metric=metric, iters=5, tol=0.0, init=c0, weights=w)
    dev = kmeans(x.cuda(), 8, metric=metric, iters=5, tol=0.0, init=c0.cuda(), weights=w.cuda())
    assert torch.equal(dev.labels.cpu(), cpu.labels)
    torch.testing.assert_close(dev.centroids.cpu(), cpu.centroids, rtol=1e-4, atol=1e-4)
    seeded = kmeans(x.cuda().half(), 8, metric=metric, iters=3)  # k-means++ on the device
    assert seeded.labels.device.type == "cuda" and seeded.counts.min() >= 1
