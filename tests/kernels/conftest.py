"""Shared by the kernel tests: which backends run here, and a clean backend environment."""

from __future__ import annotations

import pytest

from squeeze.kernels import dispatch, native


def native_reason(library: str) -> str | None:
    return None if native.available(library) else native.unavailable_reason(library)


#: the native library behind each operation's native backend
LIBRARIES = {
    "sparse_attention": "sparse_attention",
    "centroid_scores": "centroid_scores",
    "segments": "segments",
    "assign": "kmeans",
    "centroid_update": "kmeans",
    "zone_estimate": "zone_estimate",
}


def backend_params(op: str, names: tuple[str, ...] | None = None):
    """``pytest.param`` per backend of ``op`` (or of those in ``names``), each skipped where it
    cannot run here (Triton runs CPU tensors under ``TRITON_INTERPRET=1``)."""
    params = []
    for name in reversed(dispatch.backends(op)):  # torch first: the cheapest to read
        if names is not None and name not in names:
            continue
        marks = []
        if name == "native":
            why = native_reason(LIBRARIES[op])
            marks.append(pytest.mark.skipif(why is not None, reason=f"no native kernel: {why}"))
        if name == "triton":
            why = dispatch.triton_import_error()
            marks.append(pytest.mark.skipif(why is not None, reason=f"no triton: {why}"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(autouse=True)
def _clean_backend(backend_env, monkeypatch):
    """No ``$SQUEEZE_BACKEND`` from outside; Triton's interpreter on (CPU tensors)."""
    backend_env(None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
