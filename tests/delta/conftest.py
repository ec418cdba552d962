"""Fixtures of the delta-rule tests."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread per test module: the reference runs thousands of tiny per-token ops and
    the interpreter tiny numpy ops, so on a shared 2-core machine extra OpenMP threads only spin
    (T=8192 costs minutes with 2 threads, ~30 s CPU with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
