"""merge_attention: the LSE merge of partial attentions equals attention over the union of the
keys, on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params

from squeeze.kernels.merge import merge_attention

BACKENDS = backend_params("merge")


def attend(q, k, v):
    """Dense attention with its LSE, q [..., R, D], k / v [..., n, D]; n = 0 gives out 0, lse -inf."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    if k.shape[-2] == 0:
        return torch.zeros_like(q), lse
    return torch.softmax(scores, dim=-1) @ v, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [1, 37, 99])
def test_two_halves_equal_the_union(backend, split):
    gen = torch.Generator().manual_seed(split)
    q = torch.randn(2, 3, 5, 64, generator=gen)
    k, v = torch.randn(2, 3, 100, 64, generator=gen), torch.randn(2, 3, 100, 64, generator=gen)
    out_a, lse_a = attend(q, k[..., :split, :], v[..., :split, :])
    out_b, lse_b = attend(q, k[..., split:, :], v[..., split:, :])
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b, backend=backend)
    ref_out, ref_lse = attend(q, k, v)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_side_empty_returns_the_other(backend):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(4, 8, 32, generator=gen)
    k, v = torch.randn(4, 20, 32, generator=gen), torch.randn(4, 20, 32, generator=gen)
    out_a, lse_a = attend(q, k, v)
    out_e, lse_e = attend(q, k[:, :0], v[:, :0])
    assert torch.all(lse_e == float("-inf"))
    for out, lse in (
        merge_attention(out_a, lse_a, out_e, lse_e, backend=backend),
        merge_attention(out_e, lse_e, out_a, lse_a, backend=backend),
        # the empty side's out is ignored, even if it holds garbage
        merge_attention(out_a, lse_a, torch.full_like(out_a, float("nan")), lse_e, backend=backend),
    ):
        assert not out.isnan().any()
        torch.testing.assert_close(out, out_a)
        torch.testing.assert_close(lse, lse_a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_rows_and_both_empty(backend):
    gen = torch.Generator().manual_seed(2)
    out_a, out_b = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    lse_a = torch.tensor([0.5, float("-inf"), float("-inf")])
    lse_b = torch.tensor([float("-inf"), 1.5, float("-inf")])
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b, backend=backend)
    torch.testing.assert_close(out[0], out_a[0])
    torch.testing.assert_close(out[1], out_b[1])
    assert torch.all(out[2] == 0) and lse[2] == float("-inf")
    assert lse[0] == 0.5 and lse[1] == 1.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [64, 128])
def test_garbage_on_an_empty_side_and_both_empty(backend, d, gen):
    shape = (2, 3, 21)
    out_a, out_b = torch.randn(2, *shape, d, generator=gen)
    lse_a, lse_b = torch.randn(2, *shape, generator=gen) * 5
    lse_a[0, 0] = float("-inf")  # side A empty: its out is garbage and must be ignored
    out_a[0, 0] = float("nan")
    lse_a[1, 1, :3] = lse_b[1, 1, :3] = float("-inf")  # both empty
    ref_out, ref_lse = merge_attention(out_a, lse_a, out_b, lse_b, backend="torch")
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b, backend=backend)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)
    assert bool((out[1, 1, :3] == 0).all()) and bool(torch.isneginf(lse[1, 1, :3]).all())
    assert not out.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_lse_gap_stays_finite(backend):
    out_a, out_b = torch.ones(1, 4), torch.full((1, 4), 2.0)
    out, lse = merge_attention(
        out_a, torch.tensor([1000.0]), out_b, torch.tensor([-1000.0]), backend=backend
    )
    torch.testing.assert_close(out, out_a)
    torch.testing.assert_close(lse, torch.tensor([1000.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_give_fp32(backend):
    out_a, out_b = torch.randn(2, 3, 8).bfloat16(), torch.randn(2, 3, 8).bfloat16()
    lse_a, lse_b = torch.randn(2, 3), torch.randn(2, 3)
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b, backend=backend)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    w = torch.sigmoid(lse_a - lse_b)[..., None]
    torch.testing.assert_close(out, w * out_a.float() + (1 - w) * out_b.float())


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (
            (torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 5), torch.zeros(2)),
            ValueError,
            "out_b",
        ),
        (
            (torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, 4), torch.zeros(2)),
            ValueError,
            "lse_a",
        ),
        (
            (torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 4), torch.zeros(2, 1)),
            ValueError,
            "lse_b",
        ),
        ((torch.zeros(4), torch.zeros(()), torch.zeros(4), torch.zeros(())), ValueError, "out_a"),
        (
            (
                torch.zeros(2, 4),
                torch.zeros(2, dtype=torch.long),
                torch.zeros(2, 4),
                torch.zeros(2),
            ),
            TypeError,
            "lse_a",
        ),
        (([0.0], torch.zeros(1), torch.zeros(1, 1), torch.zeros(1)), TypeError, "out_a"),
        (
            (torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 4, device="meta"), torch.zeros(2)),
            ValueError,
            "one device",
        ),
    ],
)
def test_bad_inputs_raise(args, exc, match):
    with pytest.raises(exc, match=match):
        merge_attention(*args)
