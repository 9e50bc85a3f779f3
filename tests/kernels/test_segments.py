"""segments: selected clusters → merged row segments on every backend, and the CSR helpers."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import backend_params

from squeeze.kernels.segments import (
    expand_rows,
    gather_rows,
    group_lengths,
    owners,
    segments,
    segments_with_lengths,
)
from squeeze.kernels.segments.reference import segments_reference

BACKENDS = backend_params("segments")


def compact(ptr, start, end):
    """Per-(b, h) list of non-empty segments."""
    ptr, start, end = ptr.tolist(), start.tolist(), end.tolist()
    return [
        [(s, e) for s, e in zip(start[a:b], end[a:b], strict=True) if e > s]
        for a, b in itertools.pairwise(ptr)
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [5, 300])  # one BLOCK_C tile, several
def test_segments_match_reference(gen, backend, k):
    b, hkv = 3, 2
    sizes = torch.randint(0, 4, (hkv, k + 1), generator=gen)  # zeros: empty clusters
    offsets = torch.cat([torch.zeros(hkv, 1, dtype=torch.int64), sizes.cumsum(1)], dim=1)
    mask = torch.rand(b, hkv, k + 1, generator=gen) < 0.4
    mask[0, 0] = False  # a head with only the window ...
    mask[0, 0, -1] = True
    mask[1, 1] = True  # ... and one with everything
    ref = segments_reference(mask, offsets)
    got = segments(mask, offsets, backend=backend)
    assert compact(*got) == compact(*ref)
    assert got[0].numel() == b * hkv + 1
    if backend == "torch":  # compact: no empty segments, adjacent clusters merged
        assert all(e > s for s, e in zip(ref[1].tolist(), ref[2].tolist(), strict=True))
    if backend == "native":  # the reference's compact segments exactly
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    *found, lengths = segments_with_lengths(mask, offsets, backend=backend)
    assert torch.equal(lengths, group_lengths(*ref).view(b, hkv))
    assert compact(*found) == compact(*ref)


def test_segments_merge_adjacent_and_skip_empty_clusters():
    offsets = torch.tensor([[0, 3, 3, 7, 9, 12]])  # cluster 1 is empty
    mask = torch.tensor([[[True, False, True, False, True]]])
    ptr, start, end = segments(mask, offsets)
    assert ptr.tolist() == [0, 2] and start.tolist() == [0, 9] and end.tolist() == [7, 12]


def test_expand_rows():
    seg_ptr = torch.tensor([0, 2, 3])
    start, end = torch.tensor([0, 10, 4]), torch.tensor([2, 13, 6])
    group, row = expand_rows(seg_ptr, start, end)  # 1 request x 2 heads
    assert group.tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert row.tolist() == [0, 1, 10, 11, 12, 4, 5]
    assert group_lengths(seg_ptr, start, end).tolist() == [5, 2]
    assert owners(seg_ptr).tolist() == [0, 0, 1]
    assert owners(torch.tensor([0, 0, 2]), 2).tolist() == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_rows_are_the_segments_rows(gen, backend, dtype):
    """Every group's segment rows, group after group (a group with no rows, empty segments,
    a head read by several batch rows), equal a plain Python gather, bit for bit."""
    b, hkv, k, d = 3, 2, 40, 24
    x = torch.randn(hkv, 200, d, generator=gen).to(dtype)
    sizes = torch.randint(0, 6, (hkv, k + 1), generator=gen)
    offsets = torch.cat([torch.zeros(hkv, 1, dtype=torch.int64), sizes.cumsum(1)], dim=1)
    mask = torch.rand(b, hkv, k + 1, generator=gen) < 0.4
    mask[2, 1] = False  # a group without rows
    ptr, start, end = segments(mask, offsets, backend="torch")
    start, end = torch.cat([start, start[:1]]), torch.cat([end, start[:1]])  # + an empty one
    ptr = ptr.clone()
    ptr[-1] += 1
    counts = group_lengths(ptr, start, end)
    out = torch.full((int(counts.sum()), d), float("nan"), dtype=dtype)
    got = gather_rows(x, ptr, start, end, counts, out, backend=backend)
    bounds = [(start[a:z].tolist(), end[a:z].tolist()) for a, z in itertools.pairwise(ptr)]
    want = [
        x[i % hkv, s:e] for i, (ss, es) in enumerate(bounds) for s, e in zip(ss, es, strict=True)
    ]
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, torch.cat(want))
