import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Triton kernels run on CPU tensors in the interpreter; read when a kernel is defined (imported).
# CPU tensors still go to the references unless a test forces the triton backend.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen(request):
    """A generator seeded from the test's node id: fresh, different data per test, reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def backend_env(monkeypatch):
    """``backend_env("triton")`` sets ``$SQUEEZE_BACKEND`` for this test, ``backend_env(None)``
    unsets it; the dispatcher reads it once per process, so its cache is cleared each time."""
    from squeeze.kernels import dispatch

    def set_backend(value):
        if value is None:
            monkeypatch.delenv(dispatch.ENV, raising=False)
        else:
            monkeypatch.setenv(dispatch.ENV, value)
        dispatch.env_backend.cache_clear()

    yield set_backend
    monkeypatch.undo()
    dispatch.env_backend.cache_clear()


@pytest.fixture
def fresh_logs(monkeypatch):
    """Forget which messages were logged once, so that this test sees its own."""
    from squeeze import logs

    monkeypatch.setattr(logs, "_seen", set())
