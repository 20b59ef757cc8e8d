"""Tests of the pretrained world's renderer, captions and evaluators (world/); they need no ComfyUI."""
import pytest
import torch

from world.evaluators import WEIGHTS_DIR, load_evaluator
from world.manifest import verify_manifest


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The evaluator CNN is far too small to gain from threads on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def evaluator():
    """The committed evaluator, after its weights are checked against the manifest."""
    verify_manifest(WEIGHTS_DIR)
    return load_evaluator()
