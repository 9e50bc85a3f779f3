"""centroid_update: every backend against the naive per-cluster mean and the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params

from squeeze.kernels.centroid_update import (
    centroid_update,
    centroid_update_reference,
    sort_labels,
)

BACKENDS = backend_params("centroid_update")
NATIVE = backend_params("centroid_update", ("native",))
SHAPES = [(1, 1, 1, 1), (2, 33, 1, 7), (3, 257, 37, 16), (2, 300, 20, 3), (1, 530, 24, 130)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_centroid_update_equals_naive_mean(gen, weighted, dtype, backend):
    g, n, k, d = 2, 300, 11, 8
    x = (torch.randn(g, n, d, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, k - 1, (g, n), generator=gen)  # cluster k-1 stays empty
    w = torch.rand(g, n, generator=gen) * 3 if weighted else None
    if weighted:
        w[labels == 3] = 0.0  # a cluster whose members all weigh 0: plain mean
    means, counts = centroid_update(x, labels, k, weights=w, backend=backend)
    assert means.dtype == torch.float32 and means.shape == (g, k, d)
    assert counts.dtype == torch.int64
    for gi in range(g):
        for ki in range(k):
            m = labels[gi] == ki
            assert counts[gi, ki] == int(m.sum())
            if not m.any():
                assert torch.all(means[gi, ki] == 0)
                continue
            pts = x[gi][m].double()
            ww = torch.ones(len(pts), dtype=torch.float64) if w is None else w[gi][m].double()
            if ww.sum() == 0:
                ww = torch.ones_like(ww)
            ref = (pts * ww[:, None]).sum(0) / ww.sum()
            torch.testing.assert_close(means[gi, ki].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_native_matches_reference(gen, backend, shape, dtype, weighted):
    g, n, k, d = shape
    x = (4 * torch.randn(g, n, d, generator=gen)).to(dtype)
    labels = torch.randint(0, max(1, k - 1), (g, n), generator=gen)  # cluster k-1 empty (k > 1)
    w = None
    if weighted:
        w = torch.rand(g, n, generator=gen) * 3
        w[labels == 0] = 0.0  # all-zero weights: the plain mean
    means, counts = centroid_update(x, labels, k, weights=w, backend=backend)
    ref_means, ref_counts = centroid_update_reference(x, labels, k, weights=w, chunk_rows=64)
    assert torch.equal(counts, ref_counts) and means.dtype == torch.float32
    torch.testing.assert_close(means, ref_means, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params("centroid_update", ("triton",)))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(gen, backend, weighted, dtype):
    g, n, k, d = 2, 200, 23, 80  # D not a power of two, K with empty clusters
    x = torch.randn(g, n, d, generator=gen).to(dtype)
    labels = torch.randint(0, k - 3, (g, n), generator=gen)  # the last 3 clusters are empty
    labels[0, :40] = 0  # one big cluster (several BLOCK_M tiles)
    w = None
    if weighted:
        w = torch.rand(g, n, generator=gen)
        w[labels == 1] = 0.0  # an all-zero-weight cluster: plain mean
    ref_means, ref_counts = centroid_update_reference(x, labels, k, weights=w)
    means, counts = centroid_update(
        x, labels, k, weights=w, sorted_labels=sort_labels(labels, k), backend=backend
    )
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(means, ref_means, rtol=1e-5, atol=1e-6)
    assert bool((means[:, -3:] == 0).all())


@pytest.mark.parametrize("backend", NATIVE)
def test_native_rejects_bad_labels(backend):
    x = torch.randn(1, 10, 4)
    with pytest.raises(ValueError, match="labels"):
        centroid_update(x, torch.full((1, 10), 3), 3, backend=backend)
