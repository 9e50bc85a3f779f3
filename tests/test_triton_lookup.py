"""Triton centroid lookup (scores, fused threshold, compact segments) under TRITON_INTERPRET=1."""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import itertools

from reference import make_keys, rel_err

import squeeze
from squeeze import lookup
from squeeze.kernels import lookup_triton as lt


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SQUEEZE_BACKEND", raising=False)


def _compact(ptr, start, end):
    """Per-(b, h) list of non-empty segments."""
    ptr, start, end = ptr.tolist(), start.tolist(), end.tolist()
    return [
        [(s, e) for s, e in zip(start[a:b], end[a:b], strict=True) if e > s]
        for a, b in itertools.pairwise(ptr)
    ]


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize(("g", "m"), [(1, 1), (4, 1), (2, 5), (2, 20)])
@pytest.mark.parametrize("extra", [False, True])
def test_scores_match_reference(reduce, g, m, extra, gen):
    b, hkv, k, d = 2, 2, 70, 64
    q = torch.randn(b, hkv, g, m, d, generator=gen) * 2
    c = torch.randn(hkv, k, d, generator=gen)
    counts = torch.randint(0, 9, (hkv, k), generator=gen)  # zeros: empty clusters
    lc = torch.log(counts.float())
    ex = torch.randn(b, hkv, g, m, generator=gen) + 3 if extra else None
    scale = d**-0.5
    ref = lookup.log_scores(q, c, lc, scale, reduce, ex)
    rows = q.reshape(b, hkv, g * m, d)
    den = lt._log_den(
        rows, c, lc[None].expand(b, -1, -1), scale, None if ex is None else ex.reshape(b, hkv, -1)
    )
    got, _ = lt._scores(rows, c, lc[None].expand(b, -1, -1), den, scale, g, reduce)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    assert rel_err(got[fin], ref[fin]) < 1e-5


def test_fused_threshold_decision(gen):
    b, hkv, g, k, d = 1, 3, 4, 50, 32
    q = torch.randn(b, hkv, g, 1, d, generator=gen)
    c = torch.randn(hkv, k, d, generator=gen)
    lc = torch.log(torch.randint(1, 5, (hkv, k), generator=gen).float())[None].expand(b, -1, -1)
    rows = q.reshape(b, hkv, g, d)
    den = lt._log_den(rows, c, lc, 0.2)
    score, _ = lt._scores(rows, c, lc, den, 0.2, g, "max")
    s = score.flatten().sort().values
    thr = float(s[len(s) // 2] + s[len(s) // 2 + 1]) / 2  # between two scores: no ties
    _, keep = lt._scores(rows, c, lc, den, 0.2, g, "max", thr)
    assert torch.equal(keep[..., :-1].bool(), score >= thr)
    assert bool(keep[..., -1].all())  # the window column


def test_segments_match_reference(gen):
    b, hkv, k = 3, 2, 300  # several BLOCK_C tiles
    sizes = torch.randint(0, 4, (hkv, k + 1), generator=gen)  # zeros: empty clusters
    offsets = torch.cat([torch.zeros(hkv, 1, dtype=torch.int64), sizes.cumsum(1)], dim=1)
    mask = torch.rand(b, hkv, k + 1, generator=gen) < 0.4
    mask[0, 0] = False  # a head with only the window ...
    mask[0, 0, -1] = True
    mask[1, 1] = True  # ... and one with everything
    ref = lookup.segments(mask, offsets)
    got = lt.segments_triton(mask, offsets)
    assert _compact(*got) == _compact(*ref)
    assert got[0].numel() == b * hkv + 1


def _index(gen, l1_ratio, mode, reduce, budget):
    hkv, hq, n, d = 2, 4, 360, 64
    keys = make_keys(hkv, n, d, generator=gen)
    values = torch.randn(hkv, n, d, generator=gen)
    cfg = squeeze.SqueezeConfig(
        centroid_ratio=0.08, l1_ratio=l1_ratio, window=24, budget=budget, mode=mode,
        gqa_reduce=reduce, kmeans_iters=3,
    )  # fmt: skip
    return squeeze.build_index(keys, values, cfg, queries=torch.randn(hq, 24, d, generator=gen))


@pytest.mark.slow
@pytest.mark.parametrize("l1_ratio", [None, 0.02])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_select_identical_segments(l1_ratio, mode, reduce, gen, monkeypatch):
    index = _index(gen, l1_ratio, mode, reduce, 0.3)
    for m in (1, 3):
        q = torch.randn(2, 2, 2, m, 64, generator=gen)
        ref = lookup.select(q, index, 0.125)
        if mode == "threshold" and m > 1:  # a block in threshold mode: routed to the torch cut
            monkeypatch.setenv("SQUEEZE_BACKEND", "triton")
            got = lookup.select(q, index, 0.125)
            monkeypatch.delenv("SQUEEZE_BACKEND")
        else:
            got = lt.select_triton(q, index, 0.125)
        assert torch.equal(got.mask, ref.mask)
        assert int(got.centroids_scored) == int(ref.centroids_scored)
        ref_segs = lookup.segments(ref.mask, index.offsets)
        assert _compact(*lt.segments_triton(got.mask, index.offsets)) == _compact(*ref_segs)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.3, 1.0])
def test_squeezed_attention_all_triton_matches_torch(budget, gen, monkeypatch):
    index = _index(gen, 0.02, "threshold", "max", budget)
    q = torch.randn(1, 4, 2, 64, generator=gen)
    k_tail, v_tail = torch.randn(2, 1, 2, 3, 64, generator=gen)
    ref, ref_stats = squeeze.squeezed_attention(q, index, k_tail, v_tail, return_stats=True)
    monkeypatch.setenv("SQUEEZE_BACKEND", "triton")  # lookup, segments, sparse attention
    out, stats = squeeze.squeezed_attention(q, index, k_tail, v_tail, return_stats=True)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(stats.keys_read, ref_stats.keys_read)
    assert math.isclose(stats.kv_fraction, ref_stats.kv_fraction)
