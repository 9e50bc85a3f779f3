"""vLLM plugin pieces without an engine: the paged-cache read against the core, tensor-parallel
head slicing (two simulated ranks), configuration errors, metadata subsetting."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("vllm")

import squeeze
from squeeze.patches.vllm import paged
from squeeze.patches.vllm.config import SqueezeVllmConfigError, plugin_config
from squeeze.patches.vllm.contexts import kv_head_range, slice_heads
from squeeze.patches.vllm.kv_layout import CpuVecLayout

BS, D = 32, 32


def paged_cache(k, v, gen, num_blocks=64):
    """Write ``k, v [Hkv, L, D]`` (positions 0..L-1) into a random-order CPU vec paged cache."""
    hkv, length, d = k.shape
    n_blk = -(-length // BS)
    block_row = torch.randperm(num_blocks - 1, generator=gen)[:n_blk] + 1
    cache = torch.randn(num_blocks, hkv, BS, 2 * d, generator=gen)  # garbage elsewhere
    halves = cache.view(num_blocks, hkv, 2, BS * d)
    kview = halves[:, :, 0].view(num_blocks, hkv, d, BS)
    vview = halves[:, :, 1].view(num_blocks, hkv, BS, d)
    for p in range(length):
        b, o = block_row[p // BS], p % BS
        kview[b, :, :, o] = k[:, p]
        vview[b, :, o] = v[:, p]
    return cache, block_row.to(torch.int32)


def one_gathered(q, ix, layout, row, seq_len):
    """One request through the gather path: ``q [M, Hq, D]`` → ``out [M, Hq, D]``, its stats."""
    source = paged.GatheredContext(ix, layout, row[None])
    out, stats = paged.squeezed_rows(q[None], ix, source, layout, row[None], [seq_len], D**-0.5)
    return out[0], stats


def keys_read(stats):
    """Context keys read per request, over the KV heads."""
    return stats.keys_read.sum(1).tolist()


def setup(gen, budget, n=300, tail=12, hkv=2, hq=8, mode="topk"):
    keys = torch.randn(hkv, n, D, generator=gen)
    values = torch.randn(hkv, n, D, generator=gen)
    cfg = squeeze.SqueezeConfig(window=20, budget=budget, mode=mode, centroid_ratio=0.1)
    queries = torch.randn(hq, 20, D, generator=gen) if mode == "threshold" else None
    index = squeeze.build_index(keys, values, cfg, queries=queries)
    k_tail = torch.randn(hkv, tail, D, generator=gen)
    v_tail = torch.randn(hkv, tail, D, generator=gen)
    cache, row = paged_cache(torch.cat([keys, k_tail], 1), torch.cat([values, v_tail], 1), gen)
    return index, k_tail, v_tail, cache, row


@pytest.mark.parametrize("budget", [1.0, 0.2])
@pytest.mark.parametrize("m", [1, 4])
def test_paged_read_matches_core(gen, budget, m):
    index, k_tail, v_tail, cache, row = setup(gen, budget)
    q = torch.randn(1, 8, m, D, generator=gen)
    want, stats = squeeze.squeezed_attention(
        q, index, k_tail[None], v_tail[None], return_stats=True
    )
    without_kv = slice_heads(index, 0, index.num_kv_heads)
    assert without_kv.keys is None and without_kv.values is None
    got, read = one_gathered(q[0].permute(1, 0, 2), without_kv, CpuVecLayout(cache), row, 300 + 12)
    torch.testing.assert_close(got.permute(1, 0, 2), want[0], atol=2e-5, rtol=2e-5)
    assert torch.equal(read.keys_read, stats.keys_read)
    assert read.n_context == 300 and read.kv_fraction == pytest.approx(stats.kv_fraction)


def test_budget_one_equals_dense(gen):
    index, k_tail, v_tail, cache, row = setup(gen, 1.0)
    q = torch.randn(8, 1, D, generator=gen)  # [Hq, M, D]
    got, _ = one_gathered(
        q.permute(1, 0, 2), slice_heads(index, 0, 2), CpuVecLayout(cache), row, 312
    )
    order = torch.argsort(index.positions, dim=1)  # back to context order
    k = torch.cat([torch.gather(index.keys, 1, order[..., None].expand(-1, -1, D)), k_tail], 1)
    v = torch.cat([torch.gather(index.values, 1, order[..., None].expand(-1, -1, D)), v_tail], 1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[None], k.repeat_interleave(4, 0)[None], v.repeat_interleave(4, 0)[None]
    )[0]
    torch.testing.assert_close(got.permute(1, 0, 2), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_tensor_parallel_two_ranks(gen, mode):
    """Each rank holds half the KV heads (and their query heads) in its own cache: the two
    ranks' outputs, concatenated over heads, equal the single-rank output."""
    hkv, hq = 4, 8
    index, _kt, _vt, cache, row = setup(gen, 0.2, hkv=hkv, hq=hq, mode=mode)
    q = torch.randn(2, hq, D, generator=gen)  # [M, Hq, D]
    full, full_read = one_gathered(q, slice_heads(index, 0, hkv), CpuVecLayout(cache), row, 312)
    parts, read = [], 0
    for rank in range(2):
        h0, h1 = kv_head_range(hkv, 2, rank)
        rank_cache = cache[:, h0:h1].contiguous()  # what this rank's KV cache holds
        q_rank = q[:, h0 * hq // hkv : h1 * hq // hkv]
        out, r = one_gathered(
            q_rank, slice_heads(index, h0, h1), CpuVecLayout(rank_cache), row, 312
        )
        parts.append(out)
        read += keys_read(r)[0]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-6, rtol=1e-6)
    assert read == keys_read(full_read)[0]


def test_kv_head_range():
    assert [kv_head_range(8, 2, r) for r in range(2)] == [(0, 4), (4, 8)]
    assert [kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    with pytest.raises(ValueError):
        kv_head_range(3, 2, 0)


def test_plugin_config(tmp_path):
    assert plugin_config(None) is None
    assert plugin_config({"other": 1}) is None
    f = tmp_path / "doc.sqz"
    f.write_bytes(b"x")
    cfg = plugin_config({"squeeze": {"contexts": [str(f)], "budget": 0.2}})
    assert cfg.budget == 0.2 and cfg.contexts == (f,)
    bad = [
        ({"contexts": []}, "contexts"),
        ({"contexts": [str(tmp_path / "missing.sqz")]}, "does not exist"),
        ({"contexts": [str(f)], "budget": 0}, "budget"),
        ({"contexts": [str(f)], "budget": 1.5}, "budget"),
        ({"contexts": [str(f)], "budget": "high"}, "budget"),
        ({"contexts": [str(f)], "budgte": 0.1}, "unknown keys"),
        ("doc.sqz", "JSON object"),
    ]
    for raw, words in bad:
        with pytest.raises(SqueezeVllmConfigError, match=words):
            plugin_config({"squeeze": raw})


def test_register_is_idempotent_and_overrides_cpu_attn():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from squeeze.patches import vllm as plugin

    plugin.register()
    plugin.register()
    assert AttentionBackendEnum.CPU_ATTN.get_path().endswith("backend.SqueezeCPUBackend")


def test_unsupported_vllm_version_is_refused(monkeypatch):
    from squeeze.patches import vllm as plugin

    monkeypatch.setattr(plugin, "SUPPORTED_VLLM", ("0.1",))
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.1\.x, found 0\.32"):
        plugin.check_vllm_version()


def test_matcher_prefers_the_longest_context():
    import numpy as np

    from squeeze.patches.vllm.contexts import ServedContext
    from squeeze.patches.vllm.routing import Matcher

    short = ServedContext("a", np.arange(3, 10), {})
    long = ServedContext("b", np.arange(3, 20), {})

    from types import SimpleNamespace

    tokens = np.stack([np.arange(3, 28), np.r_[np.arange(3, 15), [0] * 13], np.arange(3, 28)])
    batch = SimpleNamespace(
        req_ids=["r0", "r1", "r2"], num_prompt_tokens=np.array([25, 12, 5]), token_ids_cpu=tokens
    )
    runner = SimpleNamespace(input_batch=batch)
    assert Matcher([short, long]).match(runner, 3).tolist() == [1, 0, -1]


@pytest.mark.parametrize("m,step,zone", [(2, 4, 0.0), (5, 2, 0.0), (5, 2, 1.0)])
def test_batch_equals_one_by_one(gen, m, step, zone):
    """Three requests on one context (shared context blocks, own tail blocks, own tail lengths)
    in one batched call equal three single calls, also when their rows are cut into several
    query blocks (``block_rows=step``), every block's rows gathered for its own request, and
    with the estimated zone (each request's own)."""
    index, _kt, _vt, cache, row = setup(gen, 0.2, n=320, tail=0)  # 10 full blocks
    layout = CpuVecLayout(cache)
    free = sorted(set(range(1, cache.shape[0])) - set(row.tolist()))
    rows, lens = [], []
    for i, t in enumerate((5, 9, 40)):
        tail_blocks = torch.tensor(free[2 * i : 2 * i + 2], dtype=torch.int32)
        r = torch.cat([row, tail_blocks])
        k_t, v_t = torch.randn(2, 2, t, D, generator=gen)
        for p in range(t):
            blk, off = int(r[(320 + p) // BS]), (320 + p) % BS
            layout_k = cache.view(cache.shape[0], 2, 2, BS * D)[:, :, 0].view(-1, 2, D, BS)
            layout_v = cache.view(cache.shape[0], 2, 2, BS * D)[:, :, 1].view(-1, 2, BS, D)
            layout_k[blk, :, :, off] = k_t[:, p]
            layout_v[blk, :, off] = v_t[:, p]
        rows.append(r)
        lens.append(320 + t)
    q = torch.randn(3, m, 8, D, generator=gen)
    ix = slice_heads(index, 0, 2).with_config(block_rows=step, estimate_zone=zone)
    block_rows = torch.stack(rows)
    source = paged.GatheredContext(ix, layout, block_rows)
    out, reads = paged.squeezed_rows(q, ix, source, layout, block_rows, lens, D**-0.5)
    for i in range(3):
        one, read = one_gathered(q[i], ix, layout, rows[i], lens[i])
        torch.testing.assert_close(out[i], one, atol=1e-5, rtol=1e-5)
        assert keys_read(reads)[i] == keys_read(read)[0]


@pytest.mark.parametrize("budget", [1.0, 0.2])
@pytest.mark.parametrize("m", [1, 4])
def test_copy_read_matches_core(gen, budget, m):
    """The cluster-ordered copy taken once from the paged cache reads what the core reads
    (n = 300, 32-token blocks: the copy holds the 288 positions of the full blocks, the first 8
    window rows included; the last partial block is read per request)."""
    index, k_tail, v_tail, cache, row = setup(gen, budget)
    q = torch.randn(1, 8, m, D, generator=gen)
    want, stats = squeeze.squeezed_attention(
        q, index, k_tail[None], v_tail[None], return_stats=True
    )
    ix, layout = slice_heads(index, 0, 2), CpuVecLayout(cache)
    copy = paged.take_copy(ix, layout, row, chunk=64)
    assert copy.tail_start == 288 and copy.keys.shape == (2, 288, D)
    got, reads = paged.squeezed_rows(
        q.permute(0, 2, 1, 3), ix, copy, layout, row[None], [312], D**-0.5
    )
    torch.testing.assert_close(got[0].permute(1, 0, 2), want[0], atol=2e-5, rtol=2e-5)
    assert torch.equal(reads.keys_read, stats.keys_read)
    assert reads.n_context == 300 and reads.n_dense == index.n_dense == index.config.sinks + 20
    assert copy.nbytes == 2 * 2 * 288 * D * 4


@pytest.mark.parametrize("budget", [1.0, 0.2])
def test_copy_with_partial_block_before_window(gen, budget):
    """n = 350 (32-token blocks, window 20): positions 320..329 sit in the last partial block
    but before the window; the copy stops at 320 and those rows are read per request, always.
    Budget 1.0 equals dense attention; a lower budget reads what the gather path reads plus at
    most those 10 rows per head, and the same selected clusters."""
    index, _kt, _vt, cache, row = setup(gen, budget, n=350)
    ix, layout = slice_heads(index, 0, 2), CpuVecLayout(cache)
    copy = paged.take_copy(ix, layout, row)
    assert copy.tail_start == 320 and copy.block_ids.numel() == 10
    q = torch.randn(1, 2, 8, D, generator=gen)  # [B, M, Hq, D]
    got, reads = paged.squeezed_rows(q, ix, copy, layout, row[None], [362], D**-0.5)
    old, old_read = one_gathered(q[0], ix, layout, row, 362)
    assert 0 <= keys_read(reads)[0] - keys_read(old_read)[0] <= 2 * 10
    if budget == 1.0:
        torch.testing.assert_close(got[0], old, atol=2e-5, rtol=2e-5)
        assert keys_read(reads)[0] == 2 * 350


def test_copy_rows_are_the_cluster_ordered_rows(gen):
    index, _kt, _vt, cache, row = setup(gen, 0.2)
    ix = slice_heads(index, 0, 2)
    copy = paged.take_copy(ix, CpuVecLayout(cache), row, chunk=50)
    for h in range(2):
        keep = index.positions[h] < copy.tail_start
        torch.testing.assert_close(copy.keys[h], index.keys[h][keep], atol=0, rtol=0)
        torch.testing.assert_close(copy.values[h], index.values[h][keep], atol=0, rtol=0)
        counts = torch.diff(copy.offsets[h])
        bounds = index.offsets[h].tolist()
        want = [int(keep[a:b].sum()) for a, b in itertools.pairwise(bounds)]
        assert counts.tolist() == want
        # the sinks and the window rows of the full blocks; the rest is read per request
        assert counts[-1] == index.config.sinks + 8


def test_copy_block_ids_and_batch(gen):
    """Requests holding the copy's blocks match it, one with other blocks does not; a batch read
    through the copy equals the gather path one by one (budget 1.0: same keys)."""
    index, _kt, _vt, cache, row = setup(gen, 1.0, n=320, tail=0)  # 10 full blocks
    layout = CpuVecLayout(cache)
    ix = slice_heads(index, 0, 2)
    copy = paged.take_copy(ix, layout, row)
    free = sorted(set(range(1, cache.shape[0])) - set(row.tolist()))
    rows, lens = [], []
    for i, t in enumerate((3, 9, 40)):
        r = torch.cat([row, torch.tensor(free[2 * i : 2 * i + 2], dtype=torch.int32)])
        k_t, v_t = torch.randn(2, 2, t, D, generator=gen)
        halves = cache.view(cache.shape[0], 2, 2, BS * D)
        for p in range(t):
            blk, off = int(r[(320 + p) // BS]), (320 + p) % BS
            halves[:, :, 0].view(-1, 2, D, BS)[blk, :, :, off] = k_t[:, p]
            halves[:, :, 1].view(-1, 2, BS, D)[blk, :, off] = v_t[:, p]
        rows.append(r)
        lens.append(320 + t)
    block_rows = torch.stack(rows)
    other = block_rows[0].clone()
    other[3] = free[-1]
    assert copy.matches(torch.stack([block_rows[0], other])).tolist() == [True, False]
    q = torch.randn(3, 2, 8, D, generator=gen)
    out, reads = paged.squeezed_rows(q, ix, copy, layout, block_rows, lens, D**-0.5)
    for i in range(3):
        one, read = one_gathered(q[i], ix, layout, rows[i], lens[i])
        torch.testing.assert_close(out[i], one, atol=1e-5, rtol=1e-5)
        assert keys_read(reads)[i] == keys_read(read)[0]


def test_copy_tensor_parallel_two_ranks(gen):
    """Per rank, a copy of its own KV heads from its own cache: outputs concatenated over heads
    equal the single-rank copy read."""
    hkv, hq = 4, 8
    index, _kt, _vt, cache, row = setup(gen, 0.2, hkv=hkv, hq=hq)
    q = torch.randn(1, 2, hq, D, generator=gen)
    ix = slice_heads(index, 0, hkv)
    layout = CpuVecLayout(cache)
    full, full_reads = paged.squeezed_rows(
        q, ix, paged.take_copy(ix, layout, row), layout, row[None], [312], D**-0.5
    )
    parts, read = [], 0
    for rank in range(2):
        h0, h1 = kv_head_range(hkv, 2, rank)
        rix, rlayout = slice_heads(index, h0, h1), CpuVecLayout(cache[:, h0:h1].contiguous())
        q_rank = q[:, :, h0 * hq // hkv : h1 * hq // hkv]
        copy = paged.take_copy(rix, rlayout, row)
        out, r = paged.squeezed_rows(q_rank, rix, copy, rlayout, row[None], [312], D**-0.5)
        parts.append(out)
        read += keys_read(r)[0]
    torch.testing.assert_close(torch.cat(parts, dim=2), full, atol=1e-6, rtol=1e-6)
    assert read == keys_read(full_reads)[0]
