"""Dynamic VRAM (ComfyUI 0.33, `ModelPatcherDynamic` via comfy-aimdo) and the pack's training.

0.33 turns dynamic VRAM on by default on GPUs. It cannot be exercised on a CPU: `--cpu` turns it off
(comfy/cli_args.py: enables_dynamic_vram), and even with `--enable-dynamic-vram` ModelPatcherDynamic hands a CPU
load device to the plain ModelPatcher (comfy/model_patcher.py: ModelPatcherDynamic.__new__). The first test pins that
fact down, so the day it changes this file says so; what a GPU run must still check (issue 12's
note): a model loaded as ModelPatcherDynamic trains through the pack's session (LoRA injection,
gradient checkpointing, in_training) and the input MODEL samples identically before and after.
"""
from __future__ import annotations

import pytest
import torch

from devkit.paths import comfy_version

pytestmark = pytest.mark.skipif(comfy_version() != "0.33", reason="dynamic VRAM exists from ComfyUI 0.33 on")


def test_model_patcher_dynamic_falls_back_to_the_plain_patcher_on_cpu(comfy):
    from comfy.model_patcher import ModelPatcher, ModelPatcherDynamic

    model = comfy.nodes.UNETLoader().load_unet("z_image_turbo_bf16.safetensors", "default")[0]
    dynamic = ModelPatcherDynamic(model.model, torch.device("cpu"), torch.device("cpu"))
    assert type(dynamic) is ModelPatcher
