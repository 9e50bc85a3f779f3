"""squeeze.hugepages: large CPU tensors moved into huge-page-advised memory, values unchanged."""

import pytest
import torch

import squeeze
from squeeze import hugepages

ADVISED = hugepages._madvise() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_backed_keeps_values_shape_and_dtype(gen, dtype):
    t = (torch.randn(3, 1 << 18, 2, generator=gen) * 100).to(dtype)  # 6 MiB in fp32
    out = hugepages.backed(t)
    assert out.dtype == dtype and out.shape == t.shape and out.is_contiguous()
    assert torch.equal(out, t)
    if ADVISED:
        assert out.data_ptr() % hugepages.PAGE == 0 and out.data_ptr() != t.data_ptr()
        assert hugepages.backed(out) is out  # moved once


def test_small_tensors_and_none_stay(gen):
    t = torch.randn(100, 10, generator=gen)
    assert hugepages.backed(t) is t
    assert hugepages.backed(None) is None


def test_without_huge_pages_nothing_moves(gen, monkeypatch):
    monkeypatch.setattr(hugepages, "_madvise", lambda: None)
    t = torch.randn(1 << 20, generator=gen)
    assert hugepages.backed(t) is t
    assert hugepages.empty((1 << 20,), torch.float32).shape == (1 << 20,)


def test_a_built_index_holds_its_kv_in_cluster_order(gen):
    """The K/V gathered into huge pages are the rows of the input at the index's positions."""
    hkv, n, d = 2, 9000, 64  # 4.6 MB of keys per layer: above the huge-page minimum
    keys = torch.randn(hkv, n, d, generator=gen)
    values = torch.randn(hkv, n, d, generator=gen)
    ix = squeeze.build_index(keys, values, squeeze.SqueezeConfig(kmeans_iters=2, mode="topk"))
    idx = ix.positions[..., None].expand(-1, -1, d)
    assert torch.equal(ix.keys, torch.gather(keys, 1, idx))
    assert torch.equal(ix.values, torch.gather(values, 1, idx))
    if ADVISED:
        assert ix.keys.data_ptr() % hugepages.PAGE == 0
