"""Centroid scores: the native kernel against the PyTorch reference; the lookup on both backends."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from reference import make_keys

import squeeze
from squeeze import lookup
from squeeze.kernels import centroid_scores as cs
from squeeze.kernels import native

needs_native = pytest.mark.skipif(
    not native.available("centroid_scores"), reason="no C compiler for the native kernel"
)


def _random_runs(gen, b, hkv, k):
    """A random subset of clusters per (row, head), as a mask and as merged CSR runs."""
    scored = torch.rand(b, hkv, k, generator=gen) < 0.5
    if b * hkv > 1:
        scored[0, 0] = False  # one (row, head) scores nothing at all
    offsets = torch.arange(k + 1).expand(hkv, -1)
    return scored, lookup.segments(scored, offsets)


@needs_native
@pytest.mark.parametrize(
    "b,hkv,g,m", [(1, 1, 1, 1), (1, 8, 4, 1), (3, 2, 8, 1), (2, 2, 4, 3), (1, 2, 4, 33)]
)
@pytest.mark.parametrize("d", [24, 64, 128])
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("subset", [False, True])
def test_native_matches_reference(gen, b, hkv, g, m, d, reduce, subset):
    k = 1 + int(torch.randint(1, 300, (1,), generator=gen))
    q = torch.randn(b, hkv, g, m, d, generator=gen) * 2
    c = torch.randn(hkv, k, d, generator=gen)
    counts = torch.randint(0, 30, (hkv, k), generator=gen)  # zeros: empty clusters
    lc = torch.log(counts.float())
    extra = torch.randn(b, hkv, g, m, generator=gen) * 3 if subset else None
    kw = dict(extra_log_den=extra)
    if subset:
        scored, runs = _random_runs(gen, b, hkv, k)
        kw.update(scored=scored, runs=runs)
    got = cs.centroid_scores(q, c, lc, d**-0.5, reduce, backend="native", per_row=True, **kw)
    want = cs.centroid_scores(q, c, lc, d**-0.5, reduce, backend="torch", per_row=True, **kw)
    for x, y in zip(got, want, strict=True):  # the block's scores, then each row's
        assert torch.equal(torch.isneginf(x), torch.isneginf(y))
        fin = torch.isfinite(y)
        assert fin.any()
        torch.testing.assert_close(x[fin], y[fin], rtol=1e-5, atol=1e-5)
    alone = cs.centroid_scores(q, c, lc, d**-0.5, reduce, backend="native", **kw)
    assert torch.equal(alone, got[0])


@needs_native
def test_native_reads_bf16_queries_and_extreme_logits(gen):
    hkv, k, d = 2, 50, 64
    q = (torch.randn(1, hkv, 4, 1, d, generator=gen) * 300).to(torch.bfloat16)
    c = torch.randn(hkv, k, d, generator=gen) * 30
    lc = torch.log(torch.randint(1, 9, (hkv, k), generator=gen).float())
    got = cs.centroid_scores(q, c, lc, d**-0.5, "max", backend="native")
    want = cs.centroid_scores(q, c, lc, d**-0.5, "max", backend="torch")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_unsupported_shapes_fall_back(gen, caplog):
    q = torch.randn(1, 2, 8, 513, 24, generator=gen)  # 4104 rows per KV head: over the limit
    c = torch.randn(2, 10, 24, generator=gen)
    lc = torch.zeros(2, 10)
    with caplog.at_level(logging.INFO, logger="squeeze"):
        s = cs.centroid_scores(q, c, lc, 0.2, "max")
    want = cs.reduce_scores(cs.centroid_logits(q, c, 0.2), lc[None], "max")
    torch.testing.assert_close(s, want)
    with pytest.raises(ValueError, match="together"):
        cs.centroid_scores(q, c, lc, 0.2, "max", scored=torch.ones(1, 2, 10, dtype=torch.bool))


@needs_native
@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_lookup_same_on_both_backends(gen, monkeypatch, levels, mode):
    """The selection is the same up to clusters whose score sits within round-off of the cut."""
    hkv, g, n, d = 2, 4, 3000, 64
    keys = make_keys(hkv, n, d, generator=gen)
    cfg = squeeze.SqueezeConfig(
        window=64, budget=0.15, mode=mode, l1_ratio=0.01 if levels == 2 else None, kmeans_iters=5
    )
    index = squeeze.build_index(
        keys, torch.randn_like(keys), cfg, queries=make_keys(hkv * g, 64, d, generator=gen)
    )
    q = torch.randn(3, hkv, g, 1, d, generator=gen)
    monkeypatch.setenv("SQUEEZE_BACKEND", "torch")
    ref = lookup.select(q, index, d**-0.5)
    monkeypatch.setenv("SQUEEZE_BACKEND", "native")
    got = lookup.select(q, index, d**-0.5)
    differ = (ref.mask != got.mask).float().mean().item()
    assert differ <= 0.002, differ
    assert int(ref.centroids_scored) == int(got.centroids_scored)
    if levels == 2:  # only the children of kept level-1 clusters count as scored
        assert int(got.centroids_scored) < 3 * hkv * (
            index.num_clusters + index.l1_centroids.shape[1]
        )
    assert math.isfinite(float(got.centroids_scored))
