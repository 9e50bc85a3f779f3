"""The backend choice (kernels/dispatch.py) and the native build (kernels/native/)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from squeeze.errors import BackendUnavailable
from squeeze.kernels import dispatch, native
from squeeze.kernels.assign import assign

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
HAS_TRITON = dispatch.triton_import_error() is None
KMEANS = native.available("kmeans")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")


def test_every_operation_has_a_torch_backend():
    ops = {op for op, _ in dispatch.TABLE}
    assert ops == {
        "sparse_attention", "centroid_scores", "segments", "assign", "centroid_update", "merge",
        "zone_estimate",
    }  # fmt: skip
    for op in ops:
        assert dispatch.backends(op)[-1] == "torch"
    with pytest.raises(ValueError, match="unknown kernel operation"):
        dispatch.backends("softmax")


@needs_triton
def test_auto_sends_cuda_to_triton_and_cpu_elsewhere():
    assert dispatch.choose("merge", CUDA) == "triton"
    assert dispatch.choose("merge", CPU) == "torch"  # even under the interpreter
    assert dispatch.choose("assign", CPU, dtype=torch.float32) == ("native" if KMEANS else "torch")
    assert dispatch.choose("assign", META, dtype=torch.float32) == "torch"


@needs_triton
def test_env_forces(backend_env):
    backend_env("torch")
    assert dispatch.choose("merge", CUDA) == "torch"
    backend_env("triton")
    assert dispatch.choose("merge", CPU) == "triton"  # CPU tensors: only under TRITON_INTERPRET
    backend_env("native")  # an operation without a native kernel: its reference
    assert dispatch.choose("merge", CUDA) == "torch"
    backend_env("Bogus")
    with pytest.raises(ValueError, match="SQUEEZE_BACKEND"):
        dispatch.choose("merge", CPU)


def test_env_is_read_once(backend_env, monkeypatch):
    backend_env("torch")
    assert dispatch.choose("assign", CPU) == "torch"
    monkeypatch.setenv(dispatch.ENV, "native")  # changed behind the dispatcher's back
    assert dispatch.env_backend() == "torch"


@needs_triton
def test_unusable_triton_falls_back_and_logs_once(backend_env, monkeypatch, caplog, fresh_logs):
    backend_env("triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        assert dispatch.choose("merge", CPU) == "torch"
        assert dispatch.choose("merge", CPU) == "torch"
    assert sum("SQUEEZE_BACKEND=triton cannot run merge" in r.message for r in caplog.records) == 1
    with pytest.raises(BackendUnavailable, match="backend='triton'"):
        dispatch.choose("merge", CPU, backend="triton")


def test_missing_triton_on_cuda_falls_back(monkeypatch, caplog, fresh_logs):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "ImportError: no triton")
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        assert dispatch.choose("assign", CUDA, dtype=torch.float32) == "torch"
    assert any("triton is not importable" in r.message for r in caplog.records)
    with pytest.raises(BackendUnavailable, match="not importable"):
        dispatch.choose("assign", CUDA, backend="triton")


def test_explicit_backends(monkeypatch):
    x = torch.randn(1, 10, 4)
    assert dispatch.choose("assign", x.device, dtype=x.dtype, backend="torch") == "torch"
    with pytest.raises(ValueError, match="backend must be None or one of"):
        dispatch.choose("merge", CPU, backend="native")  # merge has no native kernel
    with pytest.raises(ValueError, match="backend"):
        assign(x, torch.randn(1, 2, 4), backend="cuda")
    with pytest.raises(BackendUnavailable, match="CPU-only"):
        assign(x.to("meta"), torch.randn(1, 2, 4, device="meta"), backend="native")
    assert issubclass(BackendUnavailable, RuntimeError)


def test_declared_limits_route_quietly(caplog, fresh_logs):
    """Rows above an automatic crossover, or an output a backend does not compute, choose
    another backend without a log line; asking for it anyway raises."""
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        big = dispatch.choose(
            "sparse_attention", CPU, dtype=torch.float32, head_dim=64, rows=10_000
        )
        rows = dispatch.choose(
            "centroid_scores", CPU, dtype=torch.float32, rows=4, outputs=("log_mass",)
        )
    assert big == "torch" and rows == "torch" and not caplog.records
    if native.available("centroid_scores"):
        with pytest.raises(BackendUnavailable, match="log_mass"):
            dispatch.choose("centroid_scores", CPU, outputs=("log_mass",), backend="native")


@pytest.mark.skipif(not native.available("centroid_scores"), reason="no C compiler")
def test_stored_centroid_dtypes_take_the_native_kernel(caplog, fresh_logs):
    """fp32 and bf16 centroids (SqueezeConfig.centroid_dtype) are scored natively on CPU."""
    with caplog.at_level(logging.INFO, logger="squeeze"):
        for dtype in (torch.float32, torch.bfloat16):
            assert dispatch.choose("centroid_scores", CPU, dtype=dtype, rows=4) == "native"
    assert not caplog.records


@pytest.mark.skipif(not KMEANS, reason="native k-means kernels unavailable")
def test_env_naming_a_missing_backend_logs_once_and_uses_auto(
    backend_env, monkeypatch, caplog, fresh_logs
):
    x = torch.randn(1, 10, 4)
    backend_env("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        assert dispatch.choose("assign", x.device, dtype=x.dtype) == "native"
        dispatch.choose("assign", x.device, dtype=x.dtype)
    hits = [r for r in caplog.records if "SQUEEZE_BACKEND=triton" in r.getMessage()]
    assert len(hits) == 1


@needs_triton
def test_env_triton_runs_the_kernels_on_cpu(backend_env, gen):
    x, c = torch.randn(1, 40, 32, generator=gen), torch.randn(1, 6, 32, generator=gen)
    ref = assign(x, c)
    backend_env("triton")
    assert dispatch.choose("assign", x.device, dtype=x.dtype) == "triton"
    assert torch.equal(assign(x, c)[0], ref[0])


# ----------------------------------------------------------------------------- native build


@pytest.mark.skipif(not native.available("sparse_attention"), reason="no C compiler")
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


@pytest.mark.skipif(not native.available("sparse_attention"), reason="no C compiler")
def test_build_info_is_the_builds():
    for name in ("sparse_attention", "centroid_scores", "kmeans"):
        info = native.build_info(name)
        assert torch.float32 in info.dtypes and info.vector_width in (4, 8, 16)
    # centroids are stored in fp32 or bf16 (SqueezeConfig.centroid_dtype): both read natively
    assert torch.bfloat16 in native.build_info("centroid_scores").dtypes
    assert native.build_info("kmeans").panel in (6, 12)
    assert os.path.exists(native.CSRC / "simd.h")
