"""dense_attention: the causal tail attention, whole and ragged, against a plain softmax."""

from __future__ import annotations

import pytest
import torch

from squeeze.kernels.dense_attention import dense_attention


def plain(q, k, v, m, scale):
    """fp64 per (batch row, head): rows are the last m of the keys, bottom-right causal."""
    t, r = k.shape[-2], q.shape[-2]
    s = q.double() @ k.double().transpose(-1, -2) * scale
    rows = torch.arange(r) % m
    s = s.masked_fill(torch.arange(t)[None, :] > (t - m + rows)[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


@pytest.mark.parametrize("m", [1, 3])
def test_matches_plain_softmax(gen, m):
    q = torch.randn(2, 2, 4 * m, 32, generator=gen)
    k, v = torch.randn(2, 2, 2, 7, 32, generator=gen)
    out, lse = dense_attention(q, k, v, m, 0.2)
    ref_out, ref_lse = plain(q, k, v, m, 0.2)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [1, 2])
def test_ragged_rows_equal_their_own_lengths(gen, m):
    """Batch row b attends only to its first lengths[b] keys: as if alone, unpadded."""
    lengths = torch.tensor([3, 7, 5])
    q = torch.randn(3, 2, 4 * m, 16, generator=gen)
    k, v = torch.randn(2, 3, 2, 7, 16, generator=gen)
    k[0, :, 3:] = 1e4  # padding keys: large, but masked out (their weight is exactly 0)
    v[0, :, 3:] = 1e4
    out, lse = dense_attention(q, k, v, m, 0.25, lengths)
    for b, n in enumerate(lengths.tolist()):
        one, one_lse = dense_attention(
            q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], m, 0.25
        )
        torch.testing.assert_close(out[b : b + 1], one, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse[b : b + 1], one_lse, rtol=1e-5, atol=1e-6)
