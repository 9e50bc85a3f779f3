"""Triton sparse flash attention (segments and index list) under TRITON_INTERPRET=1 vs the references."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from reference import dense_reference, make_keys, rel_err
from test_sparse_attention import ragged_selection

import squeeze
import squeeze.kernels.sparse_attention_triton as sat
from squeeze.kernels.sparse_attention import (
    select_backend,
    sparse_attention,
    sparse_attention_reference,
)
from squeeze.kernels.sparse_attention_indexed import (
    sparse_attention_indexed,
    sparse_attention_indexed_reference,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SQUEEZE_BACKEND", raising=False)


def _inputs(b, hkv, r, d, n, dtype, gen):
    q = torch.randn(b, hkv, r, d, generator=gen).to(dtype)
    k = torch.randn(hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(hkv, n, d, generator=gen).to(dtype)
    return q, k, v


def _compare(out, lse, ref_out, ref_lse, dtype):
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~fin)  # heads without keys: lse -inf ...
    assert bool((out[~fin] == 0).all())  # ... and out 0
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(lse[fin], ref_lse[fin]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("rows", [1, 4, 40])  # decode MHA, decode GQA group of 4, prefill 4 x 10
@pytest.mark.parametrize("chunk", [64, 512])  # many chunks per head (reduction) / one chunk
def test_segments_match_reference(dtype, d, rows, chunk, gen, monkeypatch):
    monkeypatch.setattr(sat, "CHUNK", chunk)
    b, hkv, n = 2, 3, 260
    q, k, v = _inputs(b, hkv, rows, d, n, dtype, gen)
    segs = ragged_selection(b, hkv, n, gen)  # nothing / everything / one token / empties / random
    out, lse = sparse_attention(q, k, v, *segs, backend="triton")
    ref_out, ref_lse = sparse_attention_reference(q.float(), k.float(), v.float(), *segs)
    _compare(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("d", [80, 256])  # any D: BLOCK_D = next_pow2(D), masked
def test_other_head_dims(d, gen):
    q, k, v = _inputs(1, 2, 4, d, 90, torch.bfloat16, gen)
    segs = ragged_selection(1, 2, 90, gen)
    out, lse = sparse_attention(q, k, v, *segs, backend="triton")
    ref_out, ref_lse = sparse_attention_reference(q.float(), k.float(), v.float(), *segs)
    _compare(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [4, 24])
def test_index_list_matches_reference(dtype, rows, gen, monkeypatch):
    monkeypatch.setattr(sat, "CHUNK", 64)
    b, hkv, d, s = 2, 2, 64, 200
    q, k, v = _inputs(b, hkv, rows, d, s, dtype, gen)
    # a [slots, Hkv, D] cache seen as [Hkv, slots, D]: strided, not copied
    k_cache = k.transpose(0, 1).contiguous().transpose(0, 1)
    v_cache = v.transpose(0, 1).contiguous().transpose(0, 1)
    ptr, idx = [0], []
    for bh in range(b * hkv):
        count = [0, s, 1, 77][bh % 4]  # nothing, every slot (shuffled), one, some
        idx += torch.randperm(s, generator=gen)[:count].tolist()
        ptr.append(len(idx))
    idx_ptr, idx = torch.tensor(ptr), torch.tensor(idx, dtype=torch.int64)
    out, lse = sparse_attention_indexed(q, k_cache, v_cache, idx_ptr, idx, backend="triton")
    ref_out, ref_lse = sparse_attention_indexed_reference(
        q.float(), k.float(), v.float(), idx_ptr, idx
    )
    _compare(out, lse, ref_out, ref_lse, dtype)
    auto = sparse_attention_indexed(q, k_cache, v_cache, idx_ptr, idx)  # CPU tensors: reference
    assert rel_err(auto[0], ref_out) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_segments_equal_dense(dtype, gen):
    b, hkv, g, d, n = 1, 2, 4, 64, 150
    q, k, v = _inputs(b, hkv, g, d, n, dtype, gen)
    ptr = torch.arange(b * hkv + 1, dtype=torch.int64)
    start = torch.zeros(b * hkv, dtype=torch.int64)
    end = torch.full((b * hkv,), n, dtype=torch.int64)
    out, _ = sparse_attention(q, k, v, ptr, start, end, backend="triton")
    s = torch.einsum("bhrd,hnd->bhrn", q.double(), k.double()) * d**-0.5
    dense = torch.einsum("bhrn,hnd->bhrd", torch.softmax(s, -1), v.double())
    assert rel_err(out, dense) < TOL[dtype]


def test_env_selects_triton_on_cpu_under_interpreter(monkeypatch):
    q, k, _ = _inputs(1, 1, 1, 64, 8, torch.float32, None)
    assert select_backend(q, k) != "triton"  # auto: CPU tensors go to the CPU paths
    monkeypatch.setenv("SQUEEZE_BACKEND", "triton")
    assert select_backend(q, k) == "triton"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_squeezed_attention_triton_budget_one_is_dense(mode, gen, monkeypatch):
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
    monkeypatch.setenv("SQUEEZE_BACKEND", "triton")
    out = squeeze.squeezed_attention(q, index, k_tail, v_tail)
    ref = dense_reference(q, index.keys, index.values, k_tail, v_tail)
    assert rel_err(out, ref) < 1e-5
