"""TEST ONLY: multi_gpu/train.py with the tiny-checkpoint patches installed first (torchrun runs this file).

The patches (devkit/tiny_model_patches) let ComfyUI load the tiny checkpoints of devkit/tiny_models.py; in the
web UI they come in as a custom node, here they are imported before the launcher runs."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from devkit.paths import comfyui_dir  # noqa: E402

spec = importlib.util.spec_from_file_location("dopsd_multi_gpu_train", REPO / "multi_gpu" / "train.py")
launcher = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launcher)
launcher.use_comfyui(comfyui_dir())
import devkit.tiny_model_patches  # noqa: E402,F401

sys.exit(launcher.main())
