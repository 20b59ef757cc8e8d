"""Training under ComfyUI 0.33's model code: `comfy.model_management.in_training` (nodes/model_bridge.py).

0.33 runs fused inference-only kernels (comfy-kitchen: `rms_rope` in Z-Image's attention, `apply_rope` in
FLUX.2/klein) unless `comfy.model_management.in_training` is set; they have no backward. 0.33's own TrainLoraNode
sets the flag around training, and so does the pack's training session. 0.3.75 has no such flag: the session must
leave its model management as it is. Real loaders, real model code, real autograd; nothing is mocked.
"""
from __future__ import annotations

import pytest
import torch

from devkit.comfy_runtime import pack_module
from devkit.paths import comfy_version

ON_033 = comfy_version() == "0.33"
# family -> (diffusion model file, CLIPLoader type for the tiny text encoder in this ComfyUI, latent shape)
FAMILIES = {
    "zimage": ("z_image_turbo_bf16.safetensors", "lumina2", (1, 16, 8, 8)),
    "klein": ("flux-2-klein-4b.safetensors", "flux2" if ON_033 else "lumina2", (1, 128, 4, 4)),
}


def load(comfy, family: str):
    unet, clip_type, shape = FAMILIES[family]
    model = comfy.nodes.UNETLoader().load_unet(unet, "default")[0]
    clip = comfy.nodes.CLIPLoader().load_clip("qwen_3_4b.safetensors", clip_type)[0]
    conditioning = comfy.nodes.CLIPTextEncode().encode(clip, "a photo of a fox")[0]
    return model, conditioning, shape


def backward_through_model(session, conditioning, shape) -> torch.Tensor:
    """One x0 prediction with gradients flowing into the input latent, and its backward; returns the gradient.
    The model's blocks get copies of their inputs, as DOPSDTrain gives them (FLUX blocks add residuals in place)."""
    allow_inplace_residuals = pack_module("dopsd_core.autograd_safety").allow_inplace_residuals
    transformer_blocks = pack_module("nodes.families").transformer_blocks
    prepared = session.prepare(conditioning, shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    with allow_inplace_residuals(transformer_blocks(session.model.model.diffusion_model)):
        session.predict_x0(x, torch.tensor([0.7]), prepared).square().mean().backward()
    return x.grad


def test_training_session_sets_comfy_training_mode_and_restores_it(comfy):
    import comfy.model_management as mm

    bridge = pack_module("nodes.model_bridge")
    model, _, shape = load(comfy, "zimage")
    if not ON_033:
        assert not hasattr(mm, "in_training")
        with bridge.model_session(model, shape, training=True):
            assert not hasattr(mm, "in_training"), "0.3.75's model management must stay untouched"
        return
    assert mm.in_training is False
    with bridge.model_session(model, shape, training=True):
        assert mm.in_training is True
    assert mm.in_training is False
    with bridge.model_session(model, shape, training=False):
        assert mm.in_training is False, "roll-out previews and probes are inference"
    with pytest.raises(ValueError, match="boom"):
        with bridge.model_session(model, shape, training=True):
            raise ValueError("boom")
    assert mm.in_training is False, "restored after an error too"
    mm.in_training = True  # someone else's training (e.g. a native TrainLoraNode running around it) keeps its flag
    try:
        with bridge.model_session(model, shape, training=True):
            pass
        assert mm.in_training is True
    finally:
        mm.in_training = False


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_flow_through_the_model_in_a_training_session(comfy, family):
    bridge = pack_module("nodes.model_bridge")
    model, conditioning, shape = load(comfy, family)
    with bridge.model_session(model, shape, training=True) as session:
        grad = backward_through_model(session, conditioning, shape)
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.skipif(not ON_033, reason="ComfyUI 0.3.75 has no inference-only kernels and no in_training flag")
@pytest.mark.parametrize("family,kernel", [("zimage", "rms_rope"), ("klein", "apply_rope")])
def test_control_without_training_mode_backward_fails_in_comfy_kitchen(comfy, family, kernel):
    """Why the flag matters: the same backward with the flag cleared inside the session fails in 0.33's fused
    kernel (the error users hit before the fix)."""
    import comfy.model_management as mm

    bridge = pack_module("nodes.model_bridge")
    model, conditioning, shape = load(comfy, family)
    with bridge.model_session(model, shape, training=True) as session:
        mm.in_training = False
        try:
            with pytest.raises(RuntimeError, match=rf"comfy_kitchen\.{kernel}.*no autograd formula"):
                backward_through_model(session, conditioning, shape)
        finally:
            mm.in_training = True
