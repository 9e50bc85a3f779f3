"""Backend dispatch rules (kernels/backend.py) and the Triton merge kernel."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from squeeze.kernels import backend
from squeeze.kernels.merge import merge_attention
from squeeze.kernels.merge_triton import merge_attention_triton

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("SQUEEZE_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend, "_logged", set())


def test_auto_sends_cuda_to_triton_and_cpu_to_reference():
    assert backend.use_triton("op", CUDA)
    assert not backend.use_triton("op", CPU)  # even under the interpreter


def test_env_forces(monkeypatch):
    monkeypatch.setenv("SQUEEZE_BACKEND", "torch")
    assert not backend.use_triton("op", CUDA)
    monkeypatch.setenv("SQUEEZE_BACKEND", "triton")
    assert backend.use_triton("op", CPU)  # CPU tensors: only under TRITON_INTERPRET=1
    monkeypatch.setenv("SQUEEZE_BACKEND", "Bogus")
    with pytest.raises(ValueError, match="SQUEEZE_BACKEND"):
        backend.use_triton("op", CPU)


def test_unusable_triton_falls_back_and_logs_once(monkeypatch, caplog):
    monkeypatch.setenv("SQUEEZE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        assert not backend.use_triton("op", CPU)
        assert not backend.use_triton("op", CPU)
    assert sum("op uses the PyTorch reference" in r.message for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="backend='triton'"):
        backend.use_triton("op", CPU, backend="triton")


def test_missing_triton_on_cuda_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(backend, "triton_import_error", lambda: "ImportError: no triton")
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        assert not backend.use_triton("assign", CUDA)
    assert any("triton is not importable" in r.message for r in caplog.records)


@pytest.mark.parametrize("d", [64, 128])
def test_merge_kernel_matches_reference(d, gen):
    shape = (2, 3, 21)
    out_a, out_b = torch.randn(2, *shape, d, generator=gen)
    lse_a, lse_b = torch.randn(2, *shape, generator=gen) * 5
    lse_a[0, 0] = float("-inf")  # side A empty: its out is garbage and must be ignored
    out_a[0, 0] = float("nan")
    lse_a[1, 1, :3] = lse_b[1, 1, :3] = float("-inf")  # both empty
    ref_out, ref_lse = merge_attention(out_a, lse_a, out_b, lse_b)
    out, lse = merge_attention_triton(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)
    assert bool((out[1, 1, :3] == 0).all()) and bool(torch.isneginf(lse[1, 1, :3]).all())
