"""The training set every teacher-context node produces and D-OPSD Train, the preview and the schedule nodes read.

Every (image, prompt variant) is encoded once into a student CONDITIONING (the prompt alone, exactly as at
inference) and a teacher CONDITIONING (the prompt plus the target image; how the image enters is the family's
business: VLM features for Z-Image, reference latents for FLUX.2-klein). Both are plain CONDITIONING, so training
and preview need no per-family code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

TRAINING_SET = io.Custom("DOPSD_TRAINING_SET")


@dataclass(frozen=True)
class EncodedPair:
    prompt: str
    student: list  # CONDITIONING: the prompt alone
    teacher: list  # CONDITIONING: the prompt with the target image


@dataclass(frozen=True)
class EncodedItem:
    name: str
    image: torch.Tensor  # [1, H, W, 3]
    latent: torch.Tensor  # the image VAE-encoded, [1, C, h, w] in the VAE's latent space
    pairs: tuple[EncodedPair, ...]
    sigmas: torch.Tensor | None = None  # this image's own roll-out schedule; None: the training_sigmas


def encode_prompt(clip, prompt: str) -> list:
    """The stock CLIPTextEncode path."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


def encode_image(vae, image: torch.Tensor) -> torch.Tensor:
    """An IMAGE [1, H, W, C] -> its latent in the VAE's space, on the CPU (the VAEEncode path)."""
    return vae.encode(image[..., :3]).cpu()
