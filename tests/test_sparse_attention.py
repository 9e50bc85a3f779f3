"""sparse_attention: native and torch backends against the PyTorch reference and dense attention."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

from squeeze.kernels import native
from squeeze.kernels import sparse_attention as sa
from squeeze.kernels.sparse_attention import (
    select_backend,
    sparse_attention,
    sparse_attention_reference,
)

NATIVE = native.available("sparse_attention")
needs_native = pytest.mark.skipif(
    not NATIVE, reason=f"native kernel unavailable: {native.unavailable_reason('sparse_attention')}"
)
BACKENDS = [pytest.param("native", marks=needs_native), "torch"]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("SQUEEZE_BACKEND", raising=False)


def ragged_selection(B, hkv, n, gen):
    """CSR segments per (b, h): (0) nothing, (1) everything in a few segments, (2) one 1-token
    segment, (3) only empty-length segments, others random clusters with empty segments mixed in."""
    ptr, starts, ends = [0], [], []
    for bh in range(B * hkv):
        pattern = bh % 5
        if pattern == 1:
            cuts = [0, n // 3, n // 3, 2 * n // 3, n]  # includes an empty segment
            segs = list(itertools.pairwise(cuts))
        elif pattern == 2:
            t = int(torch.randint(n, (1,), generator=gen))
            segs = [(t, t + 1)]
        elif pattern == 3:
            segs = [(5, 5), (9, 9)]
        elif pattern == 4:
            segs, pos = [], 0
            while True:
                gap, size = (int(x) for x in torch.randint(0, 30, (2,), generator=gen))
                if pos + gap + size > n:
                    break
                segs.append((pos + gap, pos + gap + size))  # size 0 gives an empty segment
                pos += gap + size
        else:
            segs = []
        starts += [s for s, _ in segs]
        ends += [e for _, e in segs]
        ptr.append(len(starts))
    as_t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return as_t(ptr), as_t(starts), as_t(ends)


def rel_err(x, ref):
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def check_against_reference(out, lse, ref_out, ref_lse, tol):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "the (b, h) without keys differ"
    assert torch.all(lse[empty] == float("-inf"))
    assert torch.all(out[empty] == 0)
    assert rel_err(out, ref_out) < tol
    assert float((lse - ref_lse)[~empty].abs().max()) < tol * max(
        1.0, float(ref_lse[~empty].abs().max())
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("rows", [1, 4, 8, 24])  # G = 1, 4, 8 and M = 3 rows of G = 8
@pytest.mark.parametrize("B", [1, 2])
def test_matches_reference(B, rows, d, dtype, backend):
    if backend == "native" and dtype not in sa.native_dtypes():
        pytest.skip(f"native kernel built without {dtype}")
    gen = torch.Generator().manual_seed(B * 1000 + rows * 10 + d)
    hkv, n = 5, 300
    q = torch.randn(B, hkv, rows, d, generator=gen).to(dtype)
    k = torch.randn(hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(hkv, n, d, generator=gen).to(dtype)
    segs = ragged_selection(B, hkv, n, gen)
    out, lse = sparse_attention(q, k, v, *segs, backend=backend)
    # bf16 / fp16: against an fp32 reference on the upcast inputs
    ref_out, ref_lse = sparse_attention_reference(q.float(), k.float(), v.float(), *segs)
    check_against_reference(out, lse, ref_out, ref_lse, 1e-5 if dtype == torch.float32 else 2e-2)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_half_types_and_mixed_q(dtype):
    if dtype not in sa.native_dtypes():
        pytest.skip(f"native kernel built without {dtype}")
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 5, 4, 128, generator=gen)  # fp32 queries over half-precision K/V
    k = torch.randn(5, 300, 128, generator=gen).to(dtype)
    v = torch.randn(5, 300, 128, generator=gen).to(dtype)
    segs = ragged_selection(2, 5, 300, gen)
    out, lse = sparse_attention(q, k, v, *segs, backend="native")
    ref_out, ref_lse = sparse_attention_reference(q, k.float(), v.float(), *segs)
    check_against_reference(out, lse, ref_out, ref_lse, 1e-5)  # same values, fp32 arithmetic


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [48, 96])
def test_native_other_head_sizes(d, dtype):
    """The generic-D code paths (bf16 with D % 32 != 0 reads single columns, not pairs)."""
    if dtype not in sa.native_dtypes() or d % sa.native_vector_width():
        pytest.skip(f"native kernel cannot take {dtype} with D={d} on this build")
    gen = torch.Generator().manual_seed(d)
    q = torch.randn(2, 5, 4, d, generator=gen)
    k = torch.randn(5, 300, d, generator=gen).to(dtype)
    v = torch.randn(5, 300, d, generator=gen).to(dtype)
    segs = ragged_selection(2, 5, 300, gen)
    out, lse = sparse_attention(q, k, v, *segs, backend="native")
    ref = sparse_attention_reference(q, k.float(), v.float(), *segs)
    check_against_reference(out, lse, *ref, 1e-5)


@needs_native
def test_head_size_the_native_kernel_cannot_take(monkeypatch, caplog):
    monkeypatch.setattr(sa, "_logged", set())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 4, 20, generator=gen),
        torch.randn(2, 50, 20),
        torch.randn(2, 50, 20),
    )
    segs = (torch.tensor([0, 1, 2]), torch.tensor([0, 10]), torch.tensor([50, 40]))
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        assert select_backend(q, k) == "torch"
        out, lse = sparse_attention(q, k, v, *segs)
    assert any("D % " in r.getMessage() for r in caplog.records)
    check_against_reference(out, lse, *sparse_attention_reference(q, k, v, *segs), 1e-5)
    with pytest.raises(RuntimeError, match="D % "):
        sparse_attention(q, k, v, *segs, backend="native")


@needs_native
@pytest.mark.parametrize("min_chunk", [1, 7, 128])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_chunk_split_and_threads(monkeypatch, min_chunk, threads):
    """Chunks cut inside segments and merged by LSE give the same result for any split."""
    gen = torch.Generator().manual_seed(min_chunk)
    q = torch.randn(2, 5, 8, 64, generator=gen)
    k = torch.randn(5, 2000, 64, generator=gen)
    v = torch.randn(5, 2000, 64, generator=gen)
    segs = ragged_selection(2, 5, 2000, gen)
    monkeypatch.setattr(sa, "NATIVE_MIN_CHUNK", min_chunk)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = sparse_attention(q, k, v, *segs, backend="native")
    finally:
        torch.set_num_threads(old)
    check_against_reference(out, lse, *sparse_attention_reference(q, k, v, *segs), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_everything_selected_equals_dense(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    B, hkv, rows, n, d = 2, 4, 8, 1000, 128
    q = torch.randn(B, hkv, rows, d, generator=gen).to(dtype)
    k = torch.randn(hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(hkv, n, d, generator=gen).to(dtype)
    # every (b, h) selects all N keys, as many consecutive segments of uneven size
    cuts = sorted({0, n, *torch.randint(0, n, (40,), generator=gen).tolist()})
    per = len(cuts) - 1
    seg_ptr = torch.arange(B * hkv + 1) * per
    seg_start = torch.tensor(cuts[:-1] * (B * hkv))
    seg_end = torch.tensor(cuts[1:] * (B * hkv))
    scale = 0.07
    out, lse = sparse_attention(q, k, v, seg_ptr, seg_start, seg_end, scale=scale, backend=backend)

    qf, kf, vf = q.double(), k.double()[None], v.double()[None]
    dense = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, scale=scale)
    dense_lse = torch.logsumexp(qf @ kf.transpose(-1, -2) * scale, dim=-1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out.double(), dense) < tol
    assert float((lse.double() - dense_lse).abs().max()) < tol * float(dense_lse.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 3, 64, generator=gen).transpose(1, 2)  # [1, 3, 4, 64] view
    k = torch.randn(200, 3, 64, generator=gen).transpose(0, 1)  # [3, 200, 64] view
    v = torch.randn(200, 3, 64, generator=gen).transpose(0, 1)
    segs = ragged_selection(1, 3, 200, gen)
    out, lse = sparse_attention(q, k, v, *segs, backend=backend)
    ref = sparse_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), *segs)
    check_against_reference(out, lse, *ref, 1e-5)


def test_default_scale():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*s, generator=gen) for s in ((1, 2, 4, 64), (2, 50, 64), (2, 50, 64)))
    segs = (torch.tensor([0, 1, 2]), torch.tensor([0, 10]), torch.tensor([50, 40]))
    a = sparse_attention(q, k, v, *segs, backend="torch")
    b = sparse_attention(q, k, v, *segs, scale=64**-0.5, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- dispatch


def _decode_inputs(rows=4):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, rows, 64, generator=gen)
    k, v = torch.randn(2, 100, 64, generator=gen), torch.randn(2, 100, 64, generator=gen)
    segs = (torch.tensor([0, 2, 3]), torch.tensor([0, 50, 10]), torch.tensor([20, 60, 90]))
    return q, k, v, segs


@needs_native
def test_auto_uses_native_for_decode_and_torch_for_prefill(monkeypatch):
    calls = []
    for name in ("native", "torch"):
        impl = sa._IMPLS[name]
        monkeypatch.setitem(
            sa._IMPLS, name, lambda *a, _n=name, _f=impl: calls.append(_n) or _f(*a)
        )
    q, k, v, segs = _decode_inputs(rows=4)
    assert select_backend(q, k) == "native"
    sparse_attention(q, k, v, *segs)
    q_big = torch.randn(1, 2, sa.NATIVE_MAX_ROWS[k.dtype] + 1, 64)
    assert select_backend(q_big, k) == "torch"
    sparse_attention(q_big, k, v, *segs)
    assert calls == ["native", "torch"]


def test_env_forces_torch(monkeypatch):
    q, k, _, _ = _decode_inputs()
    monkeypatch.setenv("SQUEEZE_BACKEND", "torch")
    assert select_backend(q, k) == "torch"
    monkeypatch.setenv("SQUEEZE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SQUEEZE_BACKEND"):
        select_backend(q, k)


def test_env_naming_a_missing_backend_logs_and_uses_auto(monkeypatch, caplog):
    q, k, _, _ = _decode_inputs()
    monkeypatch.setenv("SQUEEZE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors: triton cannot run
    monkeypatch.setattr(sa, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        assert select_backend(q, k) == ("native" if NATIVE else "torch")
        select_backend(q, k)
    assert sum("SQUEEZE_BACKEND=triton" in r.message for r in caplog.records) == 1


def test_no_compiler_falls_back_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_reasons", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(sa, "_logged", set())
    q, k, v, segs = _decode_inputs()
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        assert not native.available()
        assert "no C compiler" in native.unavailable_reason()
        out, _ = sparse_attention(q, k, v, *segs)  # auto: the torch path, no exception
        sparse_attention(q, k, v, *segs)
        with pytest.raises(RuntimeError, match="backend='native'"):
            sparse_attention(q, k, v, *segs, backend="native")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("native kernel 'sparse_attention' unavailable" in m for m in messages) == 1, messages
    ref, _ = sparse_attention_reference(q, k, v, *segs)
    assert rel_err(out, ref) < 1e-5


@needs_native
def test_build_cache_is_keyed_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_libs", {})
    assert native.available("sparse_attention")
    built = sorted((tmp_path / "native").glob("sparse_attention-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_libs", {})
    assert native.available("sparse_attention")  # loads the cached file, no rebuild
    assert built[0].stat().st_mtime_ns == mtime
    assert not list((tmp_path / "native").glob(".*"))  # no temp files left behind


def test_unusable_backend_requests_raise(monkeypatch):
    q, k, _, _ = _decode_inputs()
    with pytest.raises(ValueError, match="backend must be None or one of"):
        select_backend(q, k, backend="bogus")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        select_backend(q, k, backend="triton")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU-only"):
            select_backend(q.cuda(), k.cuda(), backend="native")


# ----------------------------------------------------------------------------- bad inputs


def _good():
    q, k, v, (p, s, e) = _decode_inputs()
    return dict(q=q, k=k, v=v, seg_ptr=p, seg_start=s, seg_end=e)


def _bad_cases():
    g = _good()
    meta = torch.empty(3, dtype=torch.int64, device="meta")
    return [
        ("q", g["q"][0], ValueError, "q must be 4-D"),
        ("k", g["k"][0], ValueError, "k must be 3-D"),
        ("v", g["v"][None], ValueError, "v must be 3-D"),
        ("q", [1.0], TypeError, "q must be a torch.Tensor"),
        ("q", g["q"].long(), TypeError, "q must be a float"),
        ("q", g["q"].double(), TypeError, "q must be float32, bfloat16 or float16"),
        ("v", g["v"].bfloat16(), TypeError, "v must have k's dtype"),
        ("v", g["v"][:, :50], ValueError, "v must have k's shape"),
        ("q", torch.randn(1, 3, 4, 64), ValueError, "Hkv=3"),
        ("q", torch.randn(1, 2, 4, 32), ValueError, "head size D=32"),
        ("seg_ptr", torch.tensor([0, 3]), ValueError, "B \\* Hkv \\+ 1 = 3"),
        ("seg_ptr", g["seg_ptr"].int(), TypeError, "seg_ptr must be an int64"),
        ("seg_start", g["seg_start"].float(), TypeError, "seg_start must be an int64"),
        ("seg_end", g["seg_end"][:2], ValueError, "seg_end must have seg_start's length"),
        ("seg_end", torch.tensor([20, 60, 101]), ValueError, "seg_end <= N = 100"),
        ("seg_start", torch.tensor([-1, 50, 10]), ValueError, "0 <= seg_start"),
        ("seg_end", torch.tensor([20, 40, 90]), ValueError, "segment 1"),
        ("seg_ptr", torch.tensor([1, 2, 3]), ValueError, "seg_ptr must rise from 0"),
        ("seg_ptr", torch.tensor([0, 2, 2]), ValueError, "seg_ptr must rise from 0"),
        ("seg_ptr", torch.tensor([0, 3, 2]), ValueError, "seg_ptr must rise from 0"),
        ("seg_end", meta, ValueError, "one device"),
    ]


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise(case, backend):
    name, value, exc, match = _bad_cases()[case]
    args = _good() | {name: value}
    with pytest.raises(exc, match=match):
        sparse_attention(**args, backend=backend)
    with pytest.raises(exc, match=match):
        sparse_attention_reference(**args)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"scale": "x"}, TypeError),
        ({"scale": math.inf}, ValueError),
        ({"backend": "cuda"}, ValueError),
    ],
)
def test_bad_options_raise(kwargs, exc):
    with pytest.raises(exc, match=next(iter(kwargs))):
        sparse_attention(**_good(), **kwargs)


def test_empty_rows_and_batch():
    g = _good()
    out, lse = sparse_attention(**(g | {"q": g["q"][:, :, :0]}))
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)
