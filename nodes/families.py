"""Family presets: the files users have from ComfyUI's official repackaged releases, and each family's schedules.

A preset only suggests defaults; every node downstream works on plain MODEL/CLIP/VAE/SIGMAS, so the stock
loaders work just as well.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..dopsd_core import schedules

Schedule = Callable[[int], torch.Tensor]  # the image's token count -> sigmas ending at 0


@dataclass(frozen=True)
class Family:
    name: str
    diffusion_model: str
    text_encoder: str
    vae: str
    clip_type: str  # a comfy.sd.CLIPType member name
    inference_sigmas: Schedule  # what the family generates with
    training_sigmas: Schedule  # the authors' D-OPSD roll-out schedule


def klein_four_steps(image_tokens: int) -> torch.Tensor:
    """klein samples and trains on its own 4-step schedule, shifted for the image size."""
    return schedules.flux2_klein_sigmas(4, image_tokens)


# Z-Image-Turbo's schedules do not depend on the image size.
ZIMAGE_TURBO = Family(
    name="Z-Image-Turbo",
    diffusion_model="z_image_turbo_bf16.safetensors",
    text_encoder="qwen_3_4b.safetensors",
    vae="ae.safetensors",
    clip_type="LUMINA2",
    inference_sigmas=lambda image_tokens: schedules.zimage_turbo_inference_sigmas(),
    training_sigmas=lambda image_tokens: schedules.zimage_turbo_training_sigmas(4),
)
FLUX2_KLEIN_4B = Family(
    name="FLUX.2-klein 4B",
    diffusion_model="flux-2-klein-4b.safetensors",
    text_encoder="qwen_3_4b.safetensors",
    vae="flux2-vae.safetensors",
    clip_type="FLUX2",
    inference_sigmas=klein_four_steps,
    training_sigmas=klein_four_steps,
)
# The 9B model differs from the 4B only in its files.
FLUX2_KLEIN_9B = replace(
    FLUX2_KLEIN_4B,
    name="FLUX.2-klein 9B",
    diffusion_model="flux-2-klein-9b.safetensors",
    text_encoder="qwen_3_8b.safetensors",
)
FAMILIES = {f.name: f for f in (ZIMAGE_TURBO, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B)}
CUSTOM = "custom"

# Pixels the official workflows generate at; sets the resolution-dependent FLUX.2 schedule at load time.
DEFAULT_IMAGE_TOKENS = (1024 // 16) * (1024 // 16)

# LoRA targets per architecture (ComfyUI module names): attention q/k/v/out and the feed-forward layers, in every
# transformer block (FLUX.2 also its text-stream projections). ComfyUI fuses q/k/v into one `qkv` linear.
LORA_TARGETS = {
    "NextDiT": r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])",
    "Flux": r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12]",
}
AUTO = "auto"


def lora_targets(diffusion_model, requested: str) -> str | None:
    """The target-module regex: the user's, or for "auto" the one of the model's architecture (None if unknown)."""
    if requested.strip() != AUTO:
        return requested.strip()
    return LORA_TARGETS.get(type(diffusion_model).__name__)


def transformer_blocks(diffusion_model) -> list:
    """The repeated blocks, where gradient checkpointing pays off."""
    return [block for child in diffusion_model.children() if isinstance(child, torch.nn.ModuleList) for block in child]
