"""centroid_scores: the native and Triton kernels against the PyTorch reference, for fp32 and bf16
centroids (the index's ``centroid_dtype``) with and without spreads; its optional outputs (cut,
per-row scores, log-mass of a subset) and its dispatch."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import backend_params
from reference import rel_err

from squeeze.errors import BackendUnavailable
from squeeze.kernels.centroid_scores import Subset, centroid_scores, sink_log_mass
from squeeze.kernels.centroid_scores.reference import centroid_logits, reduce_scores

BACKENDS = backend_params("centroid_scores")
NATIVE = backend_params("centroid_scores", ("native",))
TRITON = backend_params("centroid_scores", ("triton",))
CENTROID_DTYPES = [torch.float32, torch.bfloat16]


def random_spread(gen, hkv, k, on=True):
    """Per-cluster ``σ²/2`` (fp32, positive), or ``None``."""
    return torch.rand(hkv, k, generator=gen) * 0.5 + 0.01 if on else None


def random_subset(gen, b, hkv, k):
    """A random subset of clusters per (row, head): every cluster its own group. The last
    (row, head) scores cluster 0 at least."""
    scored = torch.rand(b, hkv, k, generator=gen) < 0.5
    if b * hkv > 1:
        scored[0, 0] = False  # one (row, head) scores nothing at all
    scored[-1, -1, 0] = True
    return Subset(scored, scored, torch.arange(k + 1).expand(hkv, -1))


def assert_scores_close(x, y, tol=1e-5):
    assert torch.equal(torch.isneginf(x), torch.isneginf(y))
    fin = torch.isfinite(y)
    assert fin.any()
    torch.testing.assert_close(x[fin], y[fin], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize(
    "b,hkv,g,m", [(1, 1, 1, 1), (1, 8, 4, 1), (3, 2, 8, 1), (2, 2, 4, 3), (1, 2, 4, 33)]
)
@pytest.mark.parametrize("d", [24, 64, 128])
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("spread", [False, True])
@pytest.mark.parametrize("cdtype", CENTROID_DTYPES)
def test_native_matches_reference(gen, backend, b, hkv, g, m, d, reduce, subset, spread, cdtype):
    k = 1 + int(torch.randint(1, 300, (1,), generator=gen))
    q = torch.randn(b, hkv, g, m, d, generator=gen) * 2
    c = torch.randn(hkv, k, d, generator=gen).to(cdtype)
    counts = torch.randint(0, 30, (hkv, k), generator=gen)  # zeros: empty clusters
    counts[:, 0] += 1  # ... but not cluster 0: some cluster is scored whatever the subset
    lc = torch.log(counts.float())
    extra = torch.randn(b, hkv, g, m, generator=gen) * 3 if subset else None
    kw = dict(
        extra_log_den=extra,
        subset=random_subset(gen, b, hkv, k) if subset else None,
        spread=random_spread(gen, hkv, k, spread),
    )
    got = centroid_scores(q, c, lc, d**-0.5, reduce, backend=backend, per_row=True, **kw)
    want = centroid_scores(q, c, lc, d**-0.5, reduce, backend="torch", per_row=True, **kw)
    assert_scores_close(got.block, want.block)  # the block's scores, then each row's
    assert_scores_close(got.rows, want.rows)
    alone = centroid_scores(q, c, lc, d**-0.5, reduce, backend=backend, **kw)
    assert torch.equal(alone.block, got.block) and alone.rows is None


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("cdtype", CENTROID_DTYPES)
def test_native_same_on_one_and_two_threads(gen, monkeypatch, backend, cdtype):
    """The (batch row, KV head) pairs split over threads, or a small call kept on one: the same
    scores either way, and the reference's."""
    from squeeze.kernels import native

    b, hkv, g, m, d, k = 2, 3, 4, 2, 64, 257
    q = torch.randn(b, hkv, g, m, d, generator=gen)
    c = torch.randn(hkv, k, d, generator=gen).to(cdtype)
    lc = torch.log(torch.randint(1, 30, (hkv, k), generator=gen).float())
    spread = random_spread(gen, hkv, k)
    old = torch.get_num_threads()
    got = {}
    try:
        for threads, serial in ((1, 1 << 40), (2, 0), (2, 1 << 40)):
            torch.set_num_threads(threads)
            monkeypatch.setattr(native, "SERIAL_BYTES", serial)
            got[threads, serial] = centroid_scores(
                q, c, lc, 0.125, "max", backend=backend, per_row=True, spread=spread
            )
    finally:
        torch.set_num_threads(old)
    want = centroid_scores(q, c, lc, 0.125, "max", backend="torch", per_row=True, spread=spread)
    for s in got.values():
        assert torch.equal(s.block, got[1, 1 << 40].block)
        assert torch.equal(s.rows, got[1, 1 << 40].rows)
    assert_scores_close(got[2, 0].block, want.block)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("kdtype", CENTROID_DTYPES)
@pytest.mark.parametrize(
    "b,hkv,g,m,s,d", [(1, 8, 4, 1, 4, 128), (2, 3, 3, 4, 1, 64), (3, 2, 1, 2, 9, 24)]
)
def test_sink_log_mass_native_matches_torch(gen, backend, kdtype, b, hkv, g, m, s, d):
    """The sinks' log mass on the C loop against the PyTorch computation, large logits too."""
    q = torch.randn(b, hkv, g, m, d, generator=gen) * 4
    keys = (torch.randn(hkv, s, d, generator=gen) * 4).to(kdtype)
    got = sink_log_mass(q, keys, d**-0.5, backend=backend)
    want = sink_log_mass(q, keys, d**-0.5, backend="torch")
    plain = torch.logsumexp(torch.einsum("bhgmd,hsd->bhgms", q, keys.float()) * d**-0.5, -1)
    assert got.shape == (b, hkv, g, m) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(want, plain, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", NATIVE)
def test_native_reads_bf16_queries_and_extreme_logits(gen, backend):
    hkv, k, d = 2, 50, 64
    q = (torch.randn(1, hkv, 4, 1, d, generator=gen) * 300).to(torch.bfloat16)
    c = torch.randn(hkv, k, d, generator=gen) * 30
    lc = torch.log(torch.randint(1, 9, (hkv, k), generator=gen).float())
    got = centroid_scores(q, c, lc, d**-0.5, "max", backend=backend).block
    want = centroid_scores(q, c, lc, d**-0.5, "max", backend="torch").block
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize(("g", "m"), [(1, 1), (4, 1), (2, 5), (2, 20)])
@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize("spread", [False, True])
@pytest.mark.parametrize("cdtype", CENTROID_DTYPES)
def test_triton_matches_reference(gen, backend, reduce, g, m, extra, spread, cdtype):
    b, hkv, k, d = 2, 2, 70, 64
    q = torch.randn(b, hkv, g, m, d, generator=gen) * 2
    c = torch.randn(hkv, k, d, generator=gen).to(cdtype)
    counts = torch.randint(0, 9, (hkv, k), generator=gen)  # zeros: empty clusters
    lc = torch.log(counts.float())
    ex = torch.randn(b, hkv, g, m, generator=gen) + 3 if extra else None
    kw = dict(extra_log_den=ex, spread=random_spread(gen, hkv, k, spread), log_mass=True)
    ref = centroid_scores(q, c, lc, d**-0.5, reduce, backend="torch", **kw)
    got = centroid_scores(q, c, lc, d**-0.5, reduce, backend=backend, **kw)
    assert torch.equal(torch.isneginf(got.block), torch.isneginf(ref.block))
    fin = torch.isfinite(ref.block)
    assert rel_err(got.block[fin], ref.block[fin]) < 1e-5
    mask = torch.rand(b, hkv, k, generator=gen) < 0.4
    assert rel_err(got.log_mass(mask), ref.log_mass(mask)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spread", [False, True])
def test_bf16_centroids_score_as_their_fp32_values(gen, backend, spread):
    """Every backend reads bf16 centroids and computes in fp32: the scores are those of the
    same (rounded) values stored in fp32, on the reference bit for bit."""
    b, hkv, g, m, k, d = 2, 2, 4, 2, 90, 48
    q = torch.randn(b, hkv, g, m, d, generator=gen)
    c = torch.randn(hkv, k, d, generator=gen).to(torch.bfloat16)
    lc = torch.log(torch.randint(0, 6, (hkv, k), generator=gen).float())
    sp = random_spread(gen, hkv, k, spread)
    got = centroid_scores(q, c, lc, d**-0.5, "max", spread=sp, backend=backend).block
    want = centroid_scores(q, c.float(), lc, d**-0.5, "max", spread=sp, backend="torch").block
    if backend == "torch":
        assert torch.equal(got, want)
    else:
        assert_scores_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cut_is_the_threshold_decision(gen, backend):
    """The cut (fused in the Triton score kernel) keeps exactly the clusters scoring >= it."""
    b, hkv, g, k, d = 1, 3, 4, 50, 32
    q = torch.randn(b, hkv, g, 1, d, generator=gen)
    c = torch.randn(hkv, k, d, generator=gen)
    lc = torch.log(torch.randint(1, 5, (hkv, k), generator=gen).float())
    score = centroid_scores(q, c, lc, 0.2, "max", backend=backend).block
    s = score.flatten().sort().values
    thr = float(s[len(s) // 2] + s[len(s) // 2 + 1]) / 2  # between two scores: no ties
    got = centroid_scores(q, c, lc, 0.2, "max", cut=thr, backend=backend)
    assert got.keep.dtype == torch.bool and torch.equal(got.keep, got.block >= thr)
    assert torch.equal(got.block, score)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_subset_scores_only_its_clusters(gen, backend, reduce):
    b, hkv, g, m, k, d = 2, 2, 4, 1, 90, 64
    q = torch.randn(b, hkv, g, m, d, generator=gen)
    c = torch.randn(hkv, k, d, generator=gen)
    lc = torch.log(torch.randint(0, 6, (hkv, k), generator=gen).float())
    subset = random_subset(gen, b, hkv, k)
    extra = torch.randn(b, hkv, g, m, generator=gen)
    got = centroid_scores(
        q, c, lc, d**-0.5, reduce, subset=subset, extra_log_den=extra, backend=backend
    ).block
    lc_masked = lc[None].masked_fill(~subset.mask, float("-inf"))
    want, _ = reduce_scores(centroid_logits(q, c, d**-0.5), lc_masked, reduce, extra)
    assert_scores_close(got, want)
    assert bool(torch.isneginf(got[~subset.mask]).all())


@pytest.mark.parametrize("backend", backend_params("centroid_scores", ("torch", "triton")))
@pytest.mark.parametrize("m", [1, 3])
def test_log_mass_of_a_subset(gen, backend, m):
    b, hkv, g, k, d = 2, 2, 4, 40, 32
    q = torch.randn(b, hkv, g, m, d, generator=gen)
    c = torch.randn(hkv, k, d, generator=gen)
    counts = torch.randint(0, 5, (hkv, k), generator=gen)
    lc = torch.log(counts.float())
    mask = torch.rand(b, hkv, k, generator=gen) < 0.4
    got = centroid_scores(q, c, lc, 0.3, "max", log_mass=True, backend=backend).log_mass(mask)
    logits = torch.einsum("bhgmd,hkd->bhgmk", q.double(), c.double()) * 0.3
    weights = counts.double()[None, :, None, None, :] * mask[:, :, None, None, :]
    want = torch.log((torch.exp(logits) * weights).sum(-1))
    assert got.shape == (b, hkv, g, m)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_unsupported_shapes_fall_back(gen, caplog, fresh_logs):
    q = torch.randn(1, 2, 8, 513, 24, generator=gen)  # 4104 rows per KV head: over the limit
    c = torch.randn(2, 10, 24, generator=gen)
    lc = torch.zeros(2, 10)
    with caplog.at_level(logging.INFO, logger="squeeze"):
        s = centroid_scores(q, c, lc, 0.2, "max").block
    want, _ = reduce_scores(centroid_logits(q, c, 0.2), lc[None], "max")
    torch.testing.assert_close(s, want)


@pytest.mark.parametrize("backend", NATIVE)
def test_outputs_a_backend_lacks_are_refused_when_asked(gen, backend):
    q = torch.randn(1, 2, 4, 1, 32, generator=gen)
    c, lc = torch.randn(2, 10, 32, generator=gen), torch.zeros(2, 10)
    with pytest.raises(BackendUnavailable, match="log_mass"):
        centroid_scores(q, c, lc, 0.2, "max", log_mass=True, backend=backend)
    auto = centroid_scores(q, c, lc, 0.2, "max", log_mass=True)  # quietly the reference
    assert auto.log_mass is not None
