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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,g,d,ragged", [(1, 1, 64, False), (3, 4, 128, True), (2, 3, 64, True)])
def test_decode_tail_on_the_native_kernel(gen, monkeypatch, dtype, b, g, d, ragged):
    """One row per head (a decode step) on CPU runs on the native kernel, every (batch row, KV
    head) one segment, and agrees with the PyTorch reference (the fp32-math oracle)."""
    from squeeze.kernels import sparse_attention
    from squeeze.kernels.dense_attention.reference import dense_reference

    if sparse_attention.select_backend(torch.empty(1, 1, g, d), torch.empty(1, 1, d)) != "native":
        pytest.skip("the native sparse-attention kernel is not available here")
    calls = []
    real = sparse_attention.native.sparse_attention_native
    monkeypatch.setattr(
        sparse_attention.native, "sparse_attention_native", lambda *a: calls.append(1) or real(*a)
    )
    hkv, t = 2, 19
    q = torch.randn(b, hkv, g, d, generator=gen).to(dtype)
    k, v = torch.randn(2, b, hkv, t, d, generator=gen).to(dtype)
    lengths = torch.randint(1, t + 1, (b,), generator=gen) if ragged else None
    out, lse = dense_attention(q, k, v, 1, d**-0.5, lengths)
    ref_out, ref_lse = dense_reference(q, k, v, 1, d**-0.5, lengths)
    assert calls == [1]
    assert out.shape == (b, hkv, g, d) and lse.shape == (b, hkv, g)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,d", [(1, 64), (1, 128), (3, 64)])
def test_prior_is_merged_as_merge_attention_would(gen, dtype, m, d):
    """A prior partial attention (the context's) comes out merged, on the native decode path
    (m = 1: the merge is the kernel's last pass) and on the reference (m = 3); a prior row
    without keys (lse -inf, its out garbage) leaves the tail's attention alone; prior and
    tail together equal one softmax over both key sets."""
    from squeeze.kernels.merge import merge_attention

    b, hkv, g, t, n = 2, 3, 2, 9, 40
    q = torch.randn(b, hkv, g * m, d, generator=gen).to(dtype)
    k, v = torch.randn(2, b, hkv, t, d, generator=gen).to(dtype)
    kc, vc = torch.randn(2, b, hkv, n, d, generator=gen).to(dtype)  # the prior's keys
    scale = d**-0.5
    s = (q.double() @ kc.double().transpose(-1, -2)) * scale
    prior = (torch.softmax(s, -1) @ vc.double()).float(), torch.logsumexp(s, -1).float()
    prior[1][1, 2, 1] = float("-inf")  # a row without prior keys: its out is never read
    prior[0][1, 2, 1] = float("nan")
    lengths = torch.tensor([t, t - 3])
    out, lse = dense_attention(q, k, v, m, scale, lengths, prior=prior)
    tail = dense_attention(q, k, v, m, scale, lengths)
    want, want_lse = merge_attention(*prior, *tail)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 2, 1], tail[0][1, 2, 1], rtol=1e-5, atol=1e-5)
    # one softmax over [prior keys, tail keys] (causal in the tail, ragged lengths)
    for i in range(b):
        kk = torch.cat([kc[i], k[i, :, : lengths[i]]], 1)
        vv = torch.cat([vc[i], v[i, :, : lengths[i]]], 1)
        ref, _ = plain(q[i : i + 1], kk[None], vv[None], m, scale)
        keep = torch.ones(hkv, g * m, dtype=torch.bool)
        if i == 1:
            keep[2, 1] = False  # its prior was dropped
        tol = 2e-4 if dtype == torch.float32 else 2e-2  # bf16 blocks: the flash output rounded
        torch.testing.assert_close(out[i][keep].double(), ref[0][keep], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("ragged", [False, True])
def test_block_of_rows_on_cpu_flash_matches_reference(gen, dtype, tol, ragged):
    """A block of rows (M > 1) on CPU runs on torch's flash kernel with the causal and ragged
    mask; it agrees with the fp32 matmul-softmax reference (bf16: to the output's rounding)."""
    from squeeze.kernels import FLASH_CPU
    from squeeze.kernels.dense_attention.reference import dense_reference

    if FLASH_CPU is None:
        pytest.skip("this torch has no CPU flash-attention kernel")
    b, hkv, g, m, t, d = 3, 2, 3, 5, 11, 64
    q = torch.randn(b, hkv, g * m, d, generator=gen).to(dtype)
    k, v = torch.randn(2, b, hkv, t, d, generator=gen).to(dtype)
    lengths = torch.tensor([t, m, 8]) if ragged else None
    out, lse = dense_attention(q, k, v, m, d**-0.5, lengths)
    ref_out, ref_lse = dense_reference(q, k, v, m, d**-0.5, lengths)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
