"""Tests of the pretrained world (world/): renderer, captions and evaluators in this process; the builder and the
experiment, which boot ComfyUI themselves, as the commands users run, in subprocesses."""
import pytest
import torch

from tests.pretrained_world.world_build import build

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


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """A whole build at smoke size (2 optimizer steps a stage), exported to <out>/weights; (out, its log)."""
    out = tmp_path_factory.mktemp("world_build")
    result = build(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout
