"""Defence in depth (issue 14): the kernels check the bounds they rely on, once per call, so that
no input reaching them reads or writes out of bounds, whatever the callers checked before.

Each case is what an unchecked index file used to feed them: centroids of the wrong head size
(a segfault or a misaligned read in the native scorer), level-1 offsets one past the level-2
count (a write past the output), segments past N (out-of-bounds reads where the host check is
skipped, as on CUDA), and NaN in the tail (issue 14, defect 7).
"""

from __future__ import annotations

import pytest
import torch
from conftest import native_reason

import squeeze
from squeeze.kernels import dispatch
from squeeze.kernels.centroid_scores import Subset, centroid_scores
from squeeze.kernels.segments import segments

NO_NATIVE = {lib: native_reason(lib) for lib in ("centroid_scores", "sparse_attention")}


def _scores_args(gen, d=32, dc=None, k=40):
    q = torch.randn(1, 2, 2, 1, d, generator=gen)
    c = torch.randn(2, k, dc or d, generator=gen)
    return q, c, torch.zeros(2, k)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("dc", [1, 33])
def test_centroid_head_size_is_checked(gen, backend, dc):
    if backend == "native" and NO_NATIVE["centroid_scores"]:
        pytest.skip(NO_NATIVE["centroid_scores"])
    if backend == "triton" and dispatch.triton_import_error():
        pytest.skip("no triton")
    q, c, lc = _scores_args(gen, dc=dc)
    with pytest.raises(ValueError, match="centroids must be"):
        centroid_scores(q, c, lc, 0.2, "max", backend=backend)


@pytest.mark.skipif(NO_NATIVE["centroid_scores"] is not None, reason="no native kernel")
def test_native_scorer_checks_its_runs(gen):
    """Runs one past K (level-1 offsets ending at K + 1) would write past the output."""
    from squeeze.kernels.centroid_scores import native

    q, c, lc = _scores_args(gen, k=40)
    ptr = torch.tensor([0, 1, 2])
    for start, end in (([0, 0], [41, 40]), ([-1, 0], [40, 40]), ([5, 0], [3, 40])):
        runs = (ptr, torch.tensor(start), torch.tensor(end))
        with pytest.raises(ValueError, match="runs out of bounds"):
            native.centroid_scores_native(q, c, lc, 0.2, "max", runs, None)
    with pytest.raises(ValueError, match="runs out of bounds"):  # the CSR past the run arrays
        bad_ptr = (torch.tensor([0, 1, 5]), torch.tensor([0, 0]), torch.tensor([40, 40]))
        native.centroid_scores_native(q, c, lc, 0.2, "max", bad_ptr, None)
    groups = torch.ones(1, 2, 2, dtype=torch.bool)
    sub = Subset(torch.ones(1, 2, 40, dtype=torch.bool), groups, torch.tensor([[0, 20, 41]] * 2))
    with pytest.raises(ValueError, match="runs out of bounds"):
        centroid_scores(q, c, lc, 0.2, "max", subset=sub, backend="native")


def test_segments_check_the_offsets_shape(gen):
    mask = torch.ones(1, 2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="offsets must be"):
        segments(mask, torch.zeros(2, 5, dtype=torch.int64))


def _kv_with_poison(gen, hkv=2, n=50, d=32):
    """``k, v [Hkv, N, D]`` views of buffers whose rows past N are NaN: a read past N shows."""
    buf = torch.full((2, hkv, 2 * n, d), float("nan"))
    buf[:, :, :n] = torch.randn(2, hkv, n, d, generator=gen)
    return buf[0, :, :n], buf[1, :, :n]


@pytest.mark.skipif(dispatch.triton_import_error() is not None, reason="no triton")
def test_triton_sparse_attention_keeps_reads_in_bounds(gen):
    """The host check is skipped on CUDA: the kernel itself never reads past N."""
    from squeeze.kernels.sparse_attention import sparse_attention_reference
    from squeeze.kernels.sparse_attention.triton import sparse_attention_triton

    k, v = _kv_with_poison(gen)
    q = torch.randn(1, 2, 4, 32, generator=gen)
    ptr = torch.tensor([0, 1, 2])
    start, end = torch.tensor([10, 40]), torch.tensor([30, 80])  # head 1 runs 30 rows past N
    out, lse = sparse_attention_triton(q, k, v, ptr, start, end, 32**-0.5)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    want, want_lse = sparse_attention_reference(
        q, k, v, ptr, start, end.clamp(max=50), scale=32**-0.5
    )
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)
    # a CSR pointing past the segment arrays: nothing read outside them, no exception
    out, _ = sparse_attention_triton(q, k, v, torch.tensor([0, 2, 2]), start, end, 32**-0.5)
    assert torch.isfinite(out).all()


@pytest.mark.skipif(NO_NATIVE["sparse_attention"] is not None, reason="no native kernel")
def test_native_sparse_attention_checks_its_segments(gen):
    from squeeze.kernels.sparse_attention.native import sparse_attention_native

    k, v = (t.contiguous() for t in _kv_with_poison(gen))
    q = torch.randn(1, 2, 4, 32, generator=gen)
    bad = [
        ([0, 1, 2], [10, 40], [30, 80]),  # past N
        ([0, 1, 2], [-3, 0], [30, 10]),  # negative
        ([0, 1, 2], [10, 30], [5, 40]),  # end before start
        ([0, 2, 1], [0, 0], [5, 5]),  # CSR falling
        ([0, 1, 7], [0, 0], [5, 5]),  # CSR past the segment arrays
    ]
    for ptr, start, end in bad:
        args = (torch.tensor(ptr), torch.tensor(start), torch.tensor(end))
        with pytest.raises(ValueError, match="segments out of bounds"):
            sparse_attention_native(q, k, v, *args, 32**-0.5)


@pytest.mark.parametrize("which", ["k_tail", "v_tail"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tail_is_refused_on_cpu(gen, which, value):
    keys, values = torch.randn(2, 200, 32, generator=gen), torch.randn(2, 200, 32, generator=gen)
    cfg = squeeze.SqueezeConfig(window=20, mode="topk", kmeans_iters=2)
    index = squeeze.build_index(keys, values, cfg)
    q = torch.randn(1, 4, 1, 32, generator=gen)
    tail = {"k_tail": torch.randn(1, 2, 3, 32), "v_tail": torch.randn(1, 2, 3, 32)}
    tail[which][0, 1, 1, 5] = value
    with pytest.raises(ValueError, match=f"{which} contains NaN or inf"):
        squeeze.squeezed_attention(q, index, tail["k_tail"], tail["v_tail"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_all_finite_reads_every_element(gen, dtype, layout):
    """The input check (native over contiguous CPU tensors, numpy otherwise) finds a NaN or an
    inf wherever it is, and passes the extremes of the finite range."""
    from squeeze.validation import all_finite

    def shaped(t):
        return {"contiguous": t, "transposed": t.t(), "strided": t[:, ::2]}[layout]

    x = torch.randn(37, 66, generator=gen).to(dtype)
    big = torch.finfo(dtype).max
    x[0, :4] = torch.tensor([big, -big, -0.0, 0.0], dtype=dtype)
    assert all_finite(shaped(x))
    for value in (float("nan"), float("inf"), float("-inf")):
        for at in ((0, 0), (20, 34), (36, 64)):
            y = x.clone()
            y[at] = value
            assert not all_finite(shaped(y)), (value, at)
