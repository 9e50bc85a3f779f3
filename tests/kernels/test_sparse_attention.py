"""sparse_attention: every backend against the PyTorch oracle and dense attention, its dispatch
and its input checks."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import backend_params
from reference import ragged_selection

from squeeze.errors import BackendUnavailable
from squeeze.kernels import native
from squeeze.kernels.sparse_attention import native as sa_native
from squeeze.kernels.sparse_attention import reference as sa_reference
from squeeze.kernels.sparse_attention import (
    select_backend,
    sparse_attention,
    sparse_attention_reference,
)

BACKENDS = backend_params("sparse_attention")
NATIVE = native.available("sparse_attention")
needs_native = pytest.mark.skipif(not NATIVE, reason="native kernel unavailable")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def native_dtypes():
    info = native.build_info("sparse_attention")
    return info.dtypes if info is not None else ()


def skip_unbuilt(backend, dtype, d=None):
    if backend != "native":
        return
    if dtype not in native_dtypes():
        pytest.skip(f"native kernel built without {dtype}")
    if d is not None and d % native.build_info("sparse_attention").vector_width:
        pytest.skip(f"native kernel cannot take D={d} on this build")


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
    if (~empty).any():
        assert float((lse - ref_lse)[~empty].abs().max()) < tol * max(
            1.0, float(ref_lse[~empty].abs().max())
        )


def tolerance(backend, dtype):
    """The native kernel computes in fp32 on the exact K/V values; the others may use the dtype."""
    return 1e-5 if dtype == torch.float32 or backend == "native" else 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("rows", [1, 4, 8, 24])  # G = 1, 4, 8 and M = 3 rows of G = 8
@pytest.mark.parametrize("B", [1, 2])
def test_matches_reference(B, rows, d, dtype, backend):
    skip_unbuilt(backend, dtype)
    gen = torch.Generator().manual_seed(B * 1000 + rows * 10 + d)
    hkv, n = 5, 300
    q = torch.randn(B, hkv, rows, d, generator=gen).to(dtype)
    k = torch.randn(hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(hkv, n, d, generator=gen).to(dtype)
    segs = ragged_selection(B, hkv, n, gen)
    out, lse = sparse_attention(q, k, v, *segs, backend=backend)
    # bf16 / fp16: against an fp32 reference on the upcast inputs
    ref_out, ref_lse = sparse_attention_reference(q.float(), k.float(), v.float(), *segs)
    check_against_reference(out, lse, ref_out, ref_lse, tolerance(backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_kv_with_fp32_queries(backend, dtype):
    skip_unbuilt(backend, dtype)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 5, 4, 128, generator=gen)  # fp32 queries over half-precision K/V
    k = torch.randn(5, 300, 128, generator=gen).to(dtype)
    v = torch.randn(5, 300, 128, generator=gen).to(dtype)
    segs = ragged_selection(2, 5, 300, gen)
    out, lse = sparse_attention(q, k, v, *segs, backend=backend)
    ref_out, ref_lse = sparse_attention_reference(q, k.float(), v.float(), *segs)
    check_against_reference(out, lse, ref_out, ref_lse, 1e-5)  # same values, fp32 arithmetic


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [48, 80, 96, 256])
def test_other_head_sizes(backend, d, dtype):
    """The generic-D code paths: native bf16 with D % 32 != 0 reads single columns, not pairs;
    Triton takes any D (BLOCK_D = next_pow2(D), masked)."""
    skip_unbuilt(backend, dtype, d)
    gen = torch.Generator().manual_seed(d)
    q = torch.randn(2, 5, 4, d, generator=gen).to(dtype)
    k = torch.randn(5, 90, d, generator=gen).to(dtype)
    v = torch.randn(5, 90, d, generator=gen).to(dtype)
    segs = ragged_selection(2, 5, 90, gen)
    out, lse = sparse_attention(q, k, v, *segs, backend=backend)
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), *segs)
    check_against_reference(out, lse, *ref, tolerance(backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cuts", ["one", "many"])
def test_everything_selected_equals_dense(backend, dtype, cuts):
    gen = torch.Generator().manual_seed(3)
    B, hkv, rows, n, d = 2, 4, 8, 1000, 128
    q = torch.randn(B, hkv, rows, d, generator=gen).to(dtype)
    k = torch.randn(hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(hkv, n, d, generator=gen).to(dtype)
    # every (b, h) selects all N keys: one segment, or many consecutive ones of uneven size
    points = [] if cuts == "one" else torch.randint(0, n, (40,), generator=gen).tolist()
    bounds = sorted({0, n, *points})
    per = len(bounds) - 1
    seg_ptr = torch.arange(B * hkv + 1) * per
    seg_start = torch.tensor(bounds[:-1] * (B * hkv))
    seg_end = torch.tensor(bounds[1:] * (B * hkv))
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


@needs_native
@pytest.mark.parametrize("min_chunk", [1, 7, 128])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("serial_bytes", [0, 1 << 40])  # threads used / one thread, any size
def test_native_chunk_split_and_threads(monkeypatch, min_chunk, threads, serial_bytes):
    """Chunks cut inside segments and merged by LSE give the same result for any split, on any
    number of threads."""
    gen = torch.Generator().manual_seed(min_chunk)
    q = torch.randn(2, 5, 8, 64, generator=gen)
    k = torch.randn(5, 2000, 64, generator=gen)
    v = torch.randn(5, 2000, 64, generator=gen)
    segs = ragged_selection(2, 5, 2000, gen)
    monkeypatch.setattr(sa_native, "MIN_CHUNK", min_chunk)
    monkeypatch.setattr(native, "SERIAL_BYTES", serial_bytes)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = sparse_attention(q, k, v, *segs, backend="native")
    finally:
        torch.set_num_threads(old)
    check_against_reference(out, lse, *sparse_attention_reference(q, k, v, *segs), 1e-5)


@pytest.mark.parametrize("backend", backend_params("sparse_attention", ("triton",)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("rows", [1, 4, 40])  # decode MHA, decode GQA group of 4, prefill 4 x 10
@pytest.mark.parametrize("chunk", [64, 512])  # many chunks per head (reduction) / one chunk
def test_triton_chunks_match_reference(backend, dtype, d, rows, chunk, gen, monkeypatch):
    from squeeze.kernels.sparse_attention import triton as sat

    monkeypatch.setattr(sat, "CHUNK", chunk)
    b, hkv, n = 2, 3, 260
    q = torch.randn(b, hkv, rows, d, generator=gen).to(dtype)
    k = torch.randn(hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(hkv, n, d, generator=gen).to(dtype)
    segs = ragged_selection(b, hkv, n, gen)  # nothing / everything / one token / empties / random
    out, lse = sparse_attention(q, k, v, *segs, backend=backend)
    ref_out, ref_lse = sparse_attention_reference(q.float(), k.float(), v.float(), *segs)
    check_against_reference(out, lse, ref_out, ref_lse, tolerance(backend, dtype))


def test_default_scale():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*s, generator=gen) for s in ((1, 2, 4, 64), (2, 50, 64), (2, 50, 64)))
    segs = (torch.tensor([0, 1, 2]), torch.tensor([0, 10]), torch.tensor([50, 40]))
    a = sparse_attention(q, k, v, *segs, backend="torch")
    b = sparse_attention(q, k, v, *segs, scale=64**-0.5, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_rows_and_batch():
    g = _good()
    out, lse = sparse_attention(**(g | {"q": g["q"][:, :, :0]}))
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)


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
    for module, name, tag in (
        (sa_native, "sparse_attention_native", "native"),
        (sa_reference, "gather_attention", "torch"),
    ):
        impl = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _t=tag, _f=impl: calls.append(_t) or _f(*a))
    q, k, v, segs = _decode_inputs(rows=4)
    assert select_backend(q, k) == "native"
    sparse_attention(q, k, v, *segs)
    q_big = torch.randn(1, 2, 129, 64)  # above the fp32 crossover (128 rows)
    assert select_backend(q_big, k) == "torch"
    sparse_attention(q_big, k, v, *segs)
    assert calls == ["native", "torch"]


@needs_native
def test_head_size_the_native_kernel_cannot_take(caplog, fresh_logs):
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
    with pytest.raises(BackendUnavailable, match="D % "):
        sparse_attention(q, k, v, *segs, backend="native")


def test_env_forces_torch(backend_env):
    q, k, _, _ = _decode_inputs()
    backend_env("torch")
    assert select_backend(q, k) == "torch"
    backend_env("bogus")
    with pytest.raises(ValueError, match="SQUEEZE_BACKEND"):
        select_backend(q, k)


def test_env_selects_triton_on_cpu_under_interpreter(backend_env):
    pytest.importorskip("triton")
    q, k, _, _ = _decode_inputs()
    assert select_backend(q, k) != "triton"  # automatic: CPU tensors go to the CPU paths
    backend_env("triton")
    assert select_backend(q, k) == "triton"


def test_env_naming_a_missing_backend_logs_and_uses_auto(
    backend_env, monkeypatch, caplog, fresh_logs
):
    q, k, _, _ = _decode_inputs()
    backend_env("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors: triton cannot run
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        assert select_backend(q, k) == ("native" if NATIVE else "torch")
        select_backend(q, k)
    assert sum("SQUEEZE_BACKEND=triton" in r.getMessage() for r in caplog.records) == 1


def test_no_compiler_falls_back_and_logs_once(monkeypatch, caplog, fresh_logs):
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_reasons", {})
    monkeypatch.setattr(native.cache, "compiler", lambda: None)
    q, k, v, segs = _decode_inputs()
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        assert not native.available()
        assert "no C compiler" in native.unavailable_reason()
        out, _ = sparse_attention(q, k, v, *segs)  # auto: the torch path, no exception
        sparse_attention(q, k, v, *segs)
        with pytest.raises(BackendUnavailable, match="backend='native'"):
            sparse_attention(q, k, v, *segs, backend="native")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("native kernel 'sparse_attention' unavailable" in m for m in messages) == 1, messages
    ref, _ = sparse_attention_reference(q, k, v, *segs)
    assert rel_err(out, ref) < 1e-5


def test_unusable_backend_requests_raise(monkeypatch):
    q, k, _, _ = _decode_inputs()
    with pytest.raises(ValueError, match="backend must be None or one of"):
        select_backend(q, k, backend="bogus")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="backend='triton'"):
        select_backend(q, k, backend="triton")
    with pytest.raises(BackendUnavailable, match="CPU-only"):
        select_backend(q.to("meta"), k.to("meta"), backend="native")


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


@pytest.mark.parametrize("backend", [None, *BACKENDS])
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
