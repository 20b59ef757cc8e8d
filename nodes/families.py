"""Family presets: the files users have from ComfyUI's official repackaged releases, and each family's schedules.

A preset only suggests defaults; every node downstream works on plain MODEL/CLIP/VAE/SIGMAS, so the stock
loaders work just as well.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from collections.abc import Callable, Iterable

import torch

from ..dopsd_core import schedules

Schedule = Callable[[int], torch.Tensor]  # the image's token count -> sigmas ending at 0


@dataclass(frozen=True)
class Recipe:
    """The authors' optimisation settings. They trained with batch 1 on each of 4 or 8 GPUs; on one device, gradient
    accumulation over as many roll-outs gives the same averaged gradient."""

    steps: int
    learning_rate: float
    gradient_accumulation: int


@dataclass(frozen=True)
class Family:
    name: str
    diffusion_model: str
    text_encoder: str
    vae: str
    clip_type: str  # a comfy.sd.CLIPType member name
    inference_sigmas: Schedule  # what the family generates with
    training_sigmas: Schedule  # the authors' D-OPSD roll-out schedule
    recipe: Recipe


# Z-Image-Turbo's schedules do not depend on the image size.
ZIMAGE_TURBO = Family(
    name="Z-Image-Turbo",
    diffusion_model="z_image_turbo_bf16.safetensors",
    text_encoder="qwen_3_4b.safetensors",
    vae="ae.safetensors",
    clip_type="LUMINA2",
    inference_sigmas=lambda image_tokens: schedules.zimage_turbo_inference_sigmas(),
    training_sigmas=lambda image_tokens: schedules.zimage_turbo_training_sigmas(4),
    recipe=Recipe(steps=2000, learning_rate=1e-4, gradient_accumulation=4),
)
# Roll-out schedules to train on: the authors' (the default), or the grid the family samples with.
PUBLISHED_SCHEDULE = "published (authors')"
SAMPLING_SCHEDULE = "sampling grid"
ROLLOUT_SCHEDULES = (PUBLISHED_SCHEDULE, SAMPLING_SCHEDULE)
# klein samples on its grid shifted for the image size; the authors rolled out on another grid (ending near 0.001
# instead of 1/steps), shifted the same way. (steps, image tokens) -> sigmas.
FLUX2_SCHEDULES = {PUBLISHED_SCHEDULE: schedules.flux2_klein_training_sigmas,
                   SAMPLING_SCHEDULE: schedules.flux2_klein_sigmas}
FLUX2_KLEIN_4B = Family(
    name="FLUX.2-klein 4B",
    diffusion_model="flux-2-klein-4b.safetensors",
    text_encoder="qwen_3_4b.safetensors",
    vae="flux2-vae.safetensors",
    clip_type="FLUX2",
    inference_sigmas=lambda image_tokens: FLUX2_SCHEDULES[SAMPLING_SCHEDULE](4, image_tokens),
    training_sigmas=lambda image_tokens: FLUX2_SCHEDULES[PUBLISHED_SCHEDULE](4, image_tokens),
    recipe=Recipe(steps=3000, learning_rate=2e-5, gradient_accumulation=4),
)
# The 9B model differs from the 4B only in its files (the authors used the same recipe for both).
FLUX2_KLEIN_9B = replace(
    FLUX2_KLEIN_4B,
    name="FLUX.2-klein 9B",
    diffusion_model="flux-2-klein-9b.safetensors",
    text_encoder="qwen_3_8b.safetensors",
)
FAMILIES = {f.name: f for f in (ZIMAGE_TURBO, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B)}
CUSTOM = "custom"
# klein edit tuning: the concept recipe on 8 GPUs.
KLEIN_EDIT_TUNING = replace(FLUX2_KLEIN_4B.recipe, gradient_accumulation=8)

def rollout_schedule(family: Family, choice: str) -> Schedule:
    return family.training_sigmas if choice == PUBLISHED_SCHEDULE else family.inference_sigmas


def schedule_name(sigmas: torch.Tensor, image_tokens: Iterable[int]) -> str:
    """Which roll-out schedule `sigmas` is for an image of one of `image_tokens` tokens: a family's published or
    sampling grid, else "custom"."""
    sigmas = sigmas.detach().cpu().float()
    for choice in ROLLOUT_SCHEDULES:
        for family in FAMILIES.values():
            for tokens in image_tokens:
                expected = rollout_schedule(family, choice)(tokens)
                if expected.shape == sigmas.shape and torch.allclose(expected, sigmas, atol=1e-6, rtol=0):
                    return choice
    return "custom"


# Pixels the official workflows generate at; sets the resolution-dependent FLUX.2 schedule at load time.
DEFAULT_IMAGE_TOKENS = (1024 // 16) * (1024 // 16)

# LoRA targets per architecture (ComfyUI module names; ComfyUI fuses q/k/v into one `qkv` linear, which gets one
# adapter per q, k and v slice). "published": what the authors' adapters reach. For Z-Image that is attention
# q/k/v/out and the feed-forward layers of every block; for klein only the double-stream blocks' attention
# projections (their target list also names MLP and single-block layers, but by names diffusers' klein model does not
# have, so peft skipped them). "attention + feed-forward": every block's attention and MLP, klein's single blocks too.
ZIMAGE_ATTENTION_FEED_FORWARD = r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])"
LORA_TARGET_PRESETS = {
    "published": {
        "NextDiT": ZIMAGE_ATTENTION_FEED_FORWARD,
        "Flux": r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)",
    },
    "attention + feed-forward": {
        "NextDiT": ZIMAGE_ATTENTION_FEED_FORWARD,
        "Flux": r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12]",
    },
}
CUSTOM_TARGETS = "custom regex"
LORA_TARGET_CHOICES = (*LORA_TARGET_PRESETS, CUSTOM_TARGETS)


def lora_targets(diffusion_model, choice: str, custom_regex: str = "") -> str | None:
    """The target-module regex: a preset's for the model's architecture (None if the preset does not know it), or the
    user's regex."""
    if choice == CUSTOM_TARGETS:
        return custom_regex.strip() or None
    return LORA_TARGET_PRESETS[choice].get(type(diffusion_model).__name__)


def transformer_blocks(diffusion_model) -> list:
    """The repeated blocks, where gradient checkpointing pays off."""
    return [block for child in diffusion_model.children() if isinstance(child, torch.nn.ModuleList) for block in child]
