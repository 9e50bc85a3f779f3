import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: decoding a tiny model is all small ops, one thread is
    faster, and on a shared machine spinning OpenMP threads cost several times the work."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
