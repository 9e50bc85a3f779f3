"""The centroid lookup (squeeze.lookup): the same selection whichever backend scores, and the
whole pipeline on the Triton kernels (under TRITON_INTERPRET=1)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from reference import dense_reference, make_keys, rel_err

import squeeze
from squeeze import lookup
from squeeze.kernels import dispatch, native
from squeeze.kernels.segments import segments

needs_native = pytest.mark.skipif(
    not native.available("centroid_scores"), reason="no C compiler for the native kernel"
)
needs_triton = pytest.mark.skipif(
    dispatch.triton_import_error() is not None, reason="triton is not importable"
)


@pytest.fixture(autouse=True)
def _interpreter(backend_env, monkeypatch):
    backend_env(None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _compact(ptr, start, end):
    """Per-(b, h) list of non-empty segments."""
    ptr, start, end = ptr.tolist(), start.tolist(), end.tolist()
    return [
        [(s, e) for s, e in zip(start[a:b], end[a:b], strict=True) if e > s]
        for a, b in itertools.pairwise(ptr)
    ]


def _index(gen, l1_ratio, mode, reduce, budget):
    hkv, hq, n, d = 2, 4, 360, 64
    keys = make_keys(hkv, n, d, generator=gen)
    values = torch.randn(hkv, n, d, generator=gen)
    cfg = squeeze.SqueezeConfig(
        centroid_ratio=0.08, l1_ratio=l1_ratio, window=24, budget=budget, mode=mode,
        gqa_reduce=reduce, kmeans_iters=3,
    )  # fmt: skip
    return squeeze.build_index(keys, values, cfg, queries=torch.randn(hq, 24, d, generator=gen))


@needs_native
@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("centroid_dtype", ["bfloat16", "float32"])
def test_lookup_same_on_both_backends(gen, backend_env, levels, mode, centroid_dtype):
    """The selection is the same up to clusters whose score sits within round-off of the cut."""
    hkv, g, n, d = 2, 4, 3000, 64
    keys = make_keys(hkv, n, d, generator=gen)
    cfg = squeeze.SqueezeConfig(
        window=64, budget=0.15, mode=mode, l1_ratio=0.01 if levels == 2 else None, kmeans_iters=5,
        centroid_dtype=centroid_dtype,
    )  # fmt: skip
    index = squeeze.build_index(
        keys, torch.randn_like(keys), cfg, queries=make_keys(hkv * g, 64, d, generator=gen)
    )
    assert index.centroids.dtype == getattr(torch, centroid_dtype)
    q = torch.randn(3, hkv, g, 1, d, generator=gen)
    backend_env("torch")
    ref = lookup.select(q, index, d**-0.5)
    backend_env("native")
    got = lookup.select(q, index, d**-0.5)
    differ = (ref.mask != got.mask).float().mean().item()
    assert differ <= 0.002, differ
    assert int(ref.centroids_scored) == int(got.centroids_scored)
    if levels == 2:  # only the children of kept level-1 clusters count as scored
        assert int(got.centroids_scored) < 3 * hkv * (
            index.num_clusters + index.l1_centroids.shape[1]
        )
    assert math.isfinite(float(got.centroids_scored))


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("l1_ratio", [None, 0.02])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_select_identical_on_triton(l1_ratio, mode, reduce, gen, backend_env):
    """Triton scores (cut fused) select what the CPU kernels select; a block in threshold mode
    (its cut needs each row's scores, which the Triton kernel does not compute) is scored on
    the CPU path even when Triton is forced."""
    index = _index(gen, l1_ratio, mode, reduce, 0.3)
    for m in (1, 3):
        q = torch.randn(2, 2, 2, m, 64, generator=gen)
        ref = lookup.select(q, index, 0.125)
        backend_env("triton")
        got = lookup.select(q, index, 0.125)
        backend_env(None)
        assert torch.equal(got.mask, ref.mask)
        assert int(got.centroids_scored) == int(ref.centroids_scored)
        ref_segs = segments(ref.mask, index.offsets, backend="torch")
        got_segs = segments(got.mask, index.offsets, backend="triton")
        assert _compact(*got_segs) == _compact(*ref_segs)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.3, 1.0])
def test_squeezed_attention_all_triton_matches_torch(budget, gen, backend_env):
    index = _index(gen, 0.02, "threshold", "max", budget)
    q = torch.randn(1, 4, 2, 64, generator=gen)
    k_tail, v_tail = torch.randn(2, 1, 2, 3, 64, generator=gen)
    ref, ref_stats = squeeze.squeezed_attention(q, index, k_tail, v_tail, return_stats=True)
    backend_env("triton")  # scores, segments, sparse attention, merge
    out, stats = squeeze.squeezed_attention(q, index, k_tail, v_tail, return_stats=True)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(stats.keys_read, ref_stats.keys_read)
    assert math.isclose(stats.kv_fraction, ref_stats.kv_fraction)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_squeezed_attention_triton_budget_one_is_dense(mode, gen, backend_env):
    hkv, hq, n, d, m, t = 2, 4, 160, 64, 3, 5
    keys = make_keys(hkv, n, d, generator=gen)
    values = torch.randn(hkv, n, d, generator=gen)
    window_q = torch.randn(hq, 16, d, generator=gen)
    cfg = squeeze.SqueezeConfig(
        centroid_ratio=0.1, l1_ratio=None, window=16, budget=1.0, mode=mode, kmeans_iters=3
    )
    index = squeeze.build_index(keys, values, cfg, queries=window_q)
    q = torch.randn(1, hq, m, d, generator=gen)
    k_tail, v_tail = torch.randn(2, 1, hkv, t, d, generator=gen)
    backend_env("triton")
    out = squeeze.squeezed_attention(q, index, k_tail, v_tail)
    ref = dense_reference(q, index.keys, index.values, k_tail, v_tail)
    assert rel_err(out, ref) < 1e-5
