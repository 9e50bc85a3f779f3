"""Triton FlashAssign and sorted centroid update under TRITON_INTERPRET=1 vs the references."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from reference import make_keys

import squeeze
from squeeze.kernels.assign import assign
from squeeze.kernels.assign_triton import assign_triton
from squeeze.kernels.centroid_update import centroid_update, sort_labels
from squeeze.kernels.centroid_update_triton import centroid_update_triton


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SQUEEZE_BACKEND", raising=False)


def _unit(t):
    return t / t.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("g", "n", "k", "d"), [(2, 150, 37, 64), (1, 70, 130, 128), (3, 20, 5, 16)]
)
def test_assign_labels_exact(metric, dtype, g, n, k, d, gen):
    x = (torch.randn(g, n, d, generator=gen) * 3).to(dtype)  # continuous data: no ties
    c = torch.randn(g, k, d, generator=gen)
    half = 0.5 * (c * c).sum(-1) if metric == "l2" else None
    if metric == "cosine":
        c = _unit(c)
    ref_lab, ref_best = assign(x, c, half_sq=half)
    lab, best = assign_triton(x, c, half_sq=half)
    assert torch.equal(lab, ref_lab)
    torch.testing.assert_close(best, ref_best, rtol=1e-5, atol=1e-4)


def test_assign_strided_input_and_fp16_large_norms(gen):
    # fp16 keys of norm > 256: ‖x‖² overflows fp16, the kernel works in fp32
    x = (torch.randn(2, 64, 2 * 96, generator=gen) * 60).half()[:, :, ::2]  # strided
    c = torch.randn(2, 9, 96, generator=gen) * 60
    half = 0.5 * (c * c).sum(-1)
    assert torch.equal(assign_triton(x, c, half_sq=half)[0], assign(x, c, half_sq=half)[0])


def test_assign_dispatch(monkeypatch, gen):
    x, c = torch.randn(1, 40, 32, generator=gen), torch.randn(1, 6, 32, generator=gen)
    ref = assign(x, c)
    monkeypatch.setenv("SQUEEZE_BACKEND", "triton")
    assert torch.equal(assign(x, c)[0], ref[0])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_centroid_update_matches_reference(weighted, dtype, gen):
    g, n, k, d = 2, 200, 23, 80  # D not a power of two, K with empty clusters
    x = torch.randn(g, n, d, generator=gen).to(dtype)
    labels = torch.randint(0, k - 3, (g, n), generator=gen)  # the last 3 clusters are empty
    labels[0, :40] = 0  # one big cluster (several BLOCK_M tiles)
    w = None
    if weighted:
        w = torch.rand(g, n, generator=gen)
        w[labels == 1] = 0.0  # an all-zero-weight cluster: plain mean
    ref_means, ref_counts = centroid_update(x, labels, k, weights=w)
    means, counts = centroid_update_triton(
        x, labels, k, weights=w, sorted_labels=sort_labels(labels, k)
    )
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(means, ref_means, rtol=1e-5, atol=1e-6)
    assert bool((means[:, -3:] == 0).all())


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_kmeans_triton_equals_torch(metric, monkeypatch, gen):
    x = make_keys(2, 120, 32, generator=gen)
    ref = squeeze.kmeans(x, 8, metric=metric, iters=4, seed=1)
    monkeypatch.setenv("SQUEEZE_BACKEND", "triton")
    got = squeeze.kmeans(x, 8, metric=metric, iters=4, seed=1)
    assert torch.equal(got.labels, ref.labels)
    assert torch.equal(got.counts, ref.counts)
    torch.testing.assert_close(got.centroids, ref.centroids, rtol=1e-5, atol=1e-5)
