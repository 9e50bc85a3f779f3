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
