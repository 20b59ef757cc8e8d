"""Where ComfyUI lives, and the throw-away ComfyUI base directories the tests and the example use."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "comfyui-dopsd"
TEST_PATCHES_DIR = REPO_ROOT / "devkit" / "tiny_model_patches"
# The ComfyUI releases the suite runs against (scripts/comfy_versions.sh): version key -> provisioned folder.
COMFYUI_FOLDERS = {"0.3.75": "ComfyUI-0.3.75", "0.33": "ComfyUI-0.33.0"}
COMFY033_VENV = REPO_ROOT / ".venv-comfy033"


def comfy_version() -> str:
    """Which ComfyUI the tests run: "0.3.75" or "0.33".

    $DOPSD_COMFY_VERSION (scripts/test.sh sets it), else the version of $DOPSD_COMFYUI_DIR's checkout (0.3.75, or
    "0.33" for any other release: the newest line), else the one whose provisioned venv runs this Python."""
    chosen = os.environ.get("DOPSD_COMFY_VERSION")
    if chosen:
        key = {"0.33.0": "0.33"}.get(chosen, chosen)
        if key not in COMFYUI_FOLDERS:
            raise ValueError(f"DOPSD_COMFY_VERSION={chosen!r}: expected one of {', '.join(COMFYUI_FOLDERS)}")
        return key
    custom = os.environ.get("DOPSD_COMFYUI_DIR")
    if custom:
        version_file = Path(custom) / "comfyui_version.py"
        if version_file.is_file():
            return "0.3.75" if '"0.3.75"' in version_file.read_text() else "0.33"
    return "0.33" if Path(sys.prefix).resolve() == COMFY033_VENV.resolve() else "0.3.75"


def comfy_at_least_033() -> bool:
    return comfy_version() == "0.33"


def comfyui_dir() -> Path:
    """The ComfyUI checkout to run: $DOPSD_COMFYUI_DIR, else the one scripts/provision.sh unpacked for
    `comfy_version()`."""
    chosen = os.environ.get("DOPSD_COMFYUI_DIR")
    path = Path(chosen) if chosen else REPO_ROOT / ".comfyui" / COMFYUI_FOLDERS[comfy_version()]
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
