"""Where ComfyUI lives, and the throw-away ComfyUI base directories the tests and the example use."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "comfyui-dopsd"
TEST_PATCHES_DIR = REPO_ROOT / "tests" / "fixtures" / "comfy_test_patches"
COMFYUI_VERSION = "0.3.75"


def comfyui_dir() -> Path:
    """The ComfyUI checkout to run: $DOPSD_COMFYUI_DIR, else the one scripts/provision.sh unpacked."""
    chosen = os.environ.get("DOPSD_COMFYUI_DIR")
    path = Path(chosen) if chosen else REPO_ROOT / ".comfyui" / f"ComfyUI-{COMFYUI_VERSION}"
    if not (path / "main.py").is_file():
        raise FileNotFoundError(
            f"No ComfyUI found at {path}. Run `bash scripts/provision.sh` first, "
            "or set DOPSD_COMFYUI_DIR to a ComfyUI checkout."
        )
    return path


def make_base_directory(base: Path) -> Path:
    """Lay out a ComfyUI base directory (--base-directory) with this pack and the test patches installed.

    The tiny-model patches are installed as a custom node so they apply identically in-process and in a
    server subprocess; they never become part of the pack. The input folder starts as a real install's does, with
    ComfyUI's input/example.png (the image stock workflows' Load Image names).
    """
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    for link_name, target in ((PACK_DIR_NAME, REPO_ROOT), ("dopsd_test_patches", TEST_PATCHES_DIR)):
        link = custom_nodes / link_name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    for sub in ("models/diffusion_models", "models/text_encoders", "models/vae", "models/clip_vision", "models/loras",
                "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    example_image = base / "input" / "example.png"
    if not example_image.exists():
        shutil.copy(comfyui_dir() / "input" / "example.png", example_image)
    return base


def comfy_flags(base: Path) -> list[str]:
    """The command-line flags both the in-process runtime and the server subprocess start with."""
    return [
        "--cpu",
        "--base-directory", str(base),
        "--disable-api-nodes",
        "--database-url", "sqlite:///:memory:",
    ]
