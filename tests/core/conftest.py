import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The toy models are far too small to gain from threads, and two spinning threads on a busy
    two-core machine run several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
