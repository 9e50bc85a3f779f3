"""assign (FlashAssign) and reassign: every backend against brute force and the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params

from squeeze.kernels.assign import assign, assign_reference, reassign

BACKENDS = backend_params("assign")
NATIVE = backend_params("assign", ("native",))
FAST = backend_params("assign", ("native", "triton"))

# (G, N, K, D): tails of every block (points per work item / register block, centroids per panel,
# SIMD width), one centroid, one point, D below and above the vector width
SHAPES = [(1, 1, 1, 1), (2, 33, 1, 7), (3, 257, 37, 16), (2, 300, 20, 3), (1, 530, 24, 130)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def unit(t):
    return t / t.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize(
    "chunk_n,chunk_k", [(7, 5), (64, 16), (100, 36), (1000, 1000), (None, None)]
)
@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_assign_equals_bruteforce(gen, chunk_n, chunk_k, l2, backend):
    g, n, k, d = 3, 257, 37, 16
    x = torch.randn(g, n, d, generator=gen)
    c = torch.randn(g, k, d, generator=gen) * (1 + torch.rand(g, k, 1, generator=gen))
    if l2:
        labels, score = assign(
            x, c, half_sq=0.5 * (c * c).sum(-1), chunk_n=chunk_n, chunk_k=chunk_k, backend=backend
        )
        ref = torch.cdist(x.double(), c.double()).square()
        ref_best, ref_labels = ref.min(-1)
        dist = (x.double().square().sum(-1) - 2 * score.double()).clamp_min(0)
        torch.testing.assert_close(dist, ref_best, rtol=1e-4, atol=1e-4)
    else:
        labels, score = assign(x, c, chunk_n=chunk_n, chunk_k=chunk_k, backend=backend)
        ip = x.double() @ c.double().transpose(1, 2)
        ref_best, ref_labels = ip.max(-1)
        torch.testing.assert_close(score.double(), ref_best, rtol=1e-5, atol=1e-5)
    assert labels.dtype == torch.int64 and score.dtype == torch.float32
    assert torch.equal(labels, ref_labels)


def _assert_near_argmax(labels, score, x, c, half):
    """labels are the fp64 argmax wherever the best is clear of the runner-up; score matches."""
    ip = x.double() @ c.double().transpose(1, 2)
    if half is not None:
        ip = ip - half.double().unsqueeze(1)
    top = ip.topk(min(2, c.shape[1]), dim=-1).values
    clear = top[..., 0] - top[..., -1] > 1e-4 if c.shape[1] > 1 else torch.ones_like(top[..., 0])
    ref_best, ref_labels = ip.max(-1)
    assert torch.equal(labels[clear.bool()], ref_labels[clear.bool()])
    chosen = ip.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(chosen, ref_best, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(score.double(), ref_best, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_native_assign_matches_reference(gen, backend, shape, dtype, metric):
    g, n, k, d = shape
    x = (3 * torch.randn(g, n, d, generator=gen)).to(dtype)
    c = torch.randn(g, k, d, generator=gen)
    half = 0.5 * (c * c).sum(-1) if metric == "l2" else None
    if metric == "cosine":
        c = torch.nn.functional.normalize(c, dim=-1)
    lab, score = assign(x, c, half_sq=half, chunk_n=50, backend=backend)
    ref_lab, ref_score = assign_reference(x, c, half_sq=half, chunk_n=50)
    assert lab.dtype == ref_lab.dtype == torch.int64 and score.dtype == torch.float32
    _assert_near_argmax(lab, score, x.float(), c, half)
    _assert_near_argmax(ref_lab, ref_score, x.float(), c, half)
    torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", backend_params("assign", ("triton",)))
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("g", "n", "k", "d"), [(2, 150, 37, 64), (1, 70, 130, 128), (3, 20, 5, 16)]
)
def test_triton_assign_labels_exact(gen, backend, metric, dtype, g, n, k, d):
    x = (torch.randn(g, n, d, generator=gen) * 3).to(dtype)  # continuous data: no ties
    c = torch.randn(g, k, d, generator=gen)
    half = 0.5 * (c * c).sum(-1) if metric == "l2" else None
    if metric == "cosine":
        c = unit(c)
    ref_lab, ref_best = assign_reference(x, c, half_sq=half)
    lab, best = assign(x, c, half_sq=half, backend=backend)
    assert torch.equal(lab, ref_lab)
    torch.testing.assert_close(best, ref_best, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_assign_strided_input_and_fp16_large_norms(gen, backend):
    # fp16 keys of norm > 256: ‖x‖² overflows fp16, the kernels work in fp32
    x = (torch.randn(2, 64, 2 * 96, generator=gen) * 60).half()[:, :, ::2]  # strided
    c = torch.randn(2, 9, 96, generator=gen) * 60
    half = 0.5 * (c * c).sum(-1)
    want = assign_reference(x.float(), c, half_sq=half)[0]
    assert torch.equal(assign(x, c, half_sq=half, backend=backend)[0], want)


@pytest.mark.parametrize("backend", FAST)
def test_assign_ties_go_to_the_lowest_index(gen, backend):
    x = torch.randn(2, 100, 16, generator=gen)
    c = torch.randn(2, 40, 16, generator=gen)
    c[:, 30:] = c[:, 5:15]  # exact duplicates in another panel and lane: 5..14 must win
    c[:, 1] = c[:, 0]
    for half in (None, 0.5 * (c * c).sum(-1)):
        lab, _ = assign(x, c, half_sq=half, backend=backend)
        ref, _ = assign_reference(x, c, half_sq=half)
        assert torch.equal(lab, ref) and bool((lab < 30).all()) and bool((lab != 1).all())


@pytest.mark.parametrize("backend", NATIVE)
def test_reassign_equals_assign_bit_for_bit(gen, backend):
    x = torch.randn(3, 700, 24, generator=gen)
    c0 = torch.randn(3, 50, 24, generator=gen)
    c1 = c0.clone()
    c1[0, [3, 17, 49]] += 0.3  # a few moved
    c1[1] += 0.1  # all moved
    c1[2, 0] = c0[2, 5]  # a moved centroid now ties an unmoved one: the lower index wins
    for half0, half1 in ((None, None), (0.5 * (c0 * c0).sum(-1), 0.5 * (c1 * c1).sum(-1))):
        lab0, sc0 = assign(x, c0, half_sq=half0, backend=backend)
        lab1, sc1 = assign(x, c1, half_sq=half1, backend=backend)
        for groups in ([0, 1, 2], [2]):
            lab, sc = reassign(x, c1, half1, (c0, half0, lab0, sc0), groups, chunk_n=64)
            assert torch.equal(lab[groups], lab1[groups]) and torch.equal(sc[groups], sc1[groups])
