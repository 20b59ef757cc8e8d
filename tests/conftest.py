"""Fixtures that run the pack inside the real ComfyUI runtime, on tiny checkpoints of the real architectures."""
from __future__ import annotations

import pytest

from devkit.tiny_dataset import write_concept_images
from devkit.tiny_models import write_tiny_models
from devkit.tiny_vlm import write_tiny_vision_towers
from devkit.comfy_runtime import ComfyRuntime
from devkit.comfy_server import ComfyServer
from devkit.paths import make_base_directory
from tests.klein.klein_data import write_concept_folder


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory):
    """A throw-away ComfyUI base directory with this pack, the test patches and the tiny models installed."""
    base = make_base_directory(tmp_path_factory.mktemp("comfy_base"))
    write_tiny_models(base / "models")
    write_tiny_vision_towers(base / "models")
    return base


@pytest.fixture(scope="session")
def comfy(comfy_base) -> ComfyRuntime:
    """ComfyUI booted in this process (once per session); `comfy.run(graph)` executes an API-format graph."""
    return ComfyRuntime.boot(comfy_base)


@pytest.fixture
def comfy_server(comfy_base, tmp_path):
    """A real ComfyUI HTTP server on a free loopback port, stopped after the test."""
    server = ComfyServer(comfy_base, tmp_path / "server.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def concept_folder(comfy_base) -> str:
    """A dataset folder under ComfyUI's input directory; returns its name relative to input/."""
    write_concept_images(comfy_base / "input" / "dopsd" / "fox")
    return "dopsd/fox"


@pytest.fixture(scope="session")
def klein_concept_folder(comfy_base) -> str:
    """FLUX.2-klein concept pairs: two images in different aspect buckets (80x48 and 64x64 px at the tiny size)."""
    write_concept_folder(comfy_base / "input" / "dopsd" / "klein_concept")
    return "dopsd/klein_concept"


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def user_files(comfy_base):
    """The user's models and earlier outputs, to check that a failing run changed none of them."""
    before = {name: snapshot(comfy_base / name) for name in ("models", "output")}
    yield
    after = {name: snapshot(comfy_base / name) for name in ("models", "output")}
    assert after["models"] == before["models"]
    assert after["output"].keys() >= before["output"].keys()
    assert all(after["output"][k] == v for k, v in before["output"].items())
