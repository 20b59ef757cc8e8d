"""Teacher-context nodes: every (image, prompt variant) encoded once into student and teacher CONDITIONING.

The student sees the prompt alone, exactly as at inference. The teacher sees the prompt plus the target image;
how the image enters is the family's business (VLM features for Z-Image), but the result is a plain
CONDITIONING, so training and preview need no per-family code.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import comfy.model_management
import comfy.text_encoders.z_image
import folder_paths
import torch
from comfy_api.latest import io

from .dataset import DATASET
from .errors import node_error
from .teacher_vlm import VisionWeightsError, VLMTeacherEncoder

TRAINING_SET = io.Custom("DOPSD_TRAINING_SET")
MAX_STUDENT_TOKENS = 512  # Z-Image reads at most 512 prompt tokens
VISION_FOLDER = "clip_vision"


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


def truncate_tokens(conditioning: list, max_tokens: int) -> list:
    """Keep at most max_tokens feature tokens (and the matching attention-mask entries)."""
    truncated = []
    for features, extras in conditioning:
        extras = dict(extras)
        if "attention_mask" in extras:
            extras["attention_mask"] = extras["attention_mask"][:, :max_tokens]
        truncated.append([features[:, :max_tokens], extras])
    return truncated


def encode_prompt(clip, prompt: str) -> list:
    """The stock CLIPTextEncode path."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


def encode_image(vae, image: torch.Tensor) -> torch.Tensor:
    """An IMAGE [1, H, W, C] -> its latent in the VAE's space, on the CPU (the VAEEncode path)."""
    return vae.encode(image[..., :3]).cpu()


class DOPSDTeacherContextVLM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDTeacherContextVLM",
            display_name="Teacher Context: VLM (D-OPSD, Z-Image)",
            category="D-OPSD",
            description=(
                "Z-Image-Turbo teacher context. Builds Qwen3-VL from the loaded Qwen3 text encoder (language model) "
                "and Qwen3-VL-4B-Instruct vision weights, and encodes every image + prompt variant once. The student "
                "side is the plain text encoding. The VLM is freed afterwards."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="Z-Image's Qwen3 text encoder (qwen_3_4b)."),
                io.Vae.Input("vae", tooltip="Encodes the target images (latent sizes, and the SFT target)."),
                DATASET.Input("dataset", tooltip="Image–text pairs from a dataset node (not edit triples)."),
                io.Combo.Input("vision_weights", options=folder_paths.get_filename_list(VISION_FOLDER),
                               tooltip="Qwen3-VL-4B-Instruct vision weights (models/clip_vision): the whole "
                                       "checkpoint file holding 'model.visual.*', or the vision part alone."),
            ],
            outputs=[TRAINING_SET.Output(display_name="training_set")],
        )

    @classmethod
    def execute(cls, clip, vae, dataset, vision_weights) -> io.NodeOutput:
        vision_path = folder_paths.get_full_path(VISION_FOLDER, vision_weights) if vision_weights else None
        if vision_path is None:
            raise node_error(cls, f"no vision weights file '{vision_weights}' in models/{VISION_FOLDER}",
                             "put the Qwen3-VL-4B-Instruct vision weights there (see the README) and pick them")
        device = comfy.model_management.text_encoder_device()
        clip_state = clip.get_sd()
        dtype = next(iter(clip_state.values())).dtype
        # The VLM holds a copy of the text encoder's language model plus a vision tower about a tenth its size;
        # asking for twice the text encoder's size leaves room for it and for its activations.
        comfy.model_management.free_memory(sum(t.numel() * t.element_size() for t in clip_state.values()) * 2, device)
        tokenizer_dir = os.path.join(os.path.dirname(comfy.text_encoders.z_image.__file__), "qwen25_tokenizer")
        try:
            teacher = VLMTeacherEncoder.build(clip_state, vision_path, tokenizer_dir, device, dtype)
        except VisionWeightsError as err:
            raise node_error(cls, f"{vision_weights}: {err}", "pick the vision weights of Qwen3-VL-4B-Instruct") from err
        try:
            items = [
                EncodedItem(
                    name=item.name,
                    image=item.image,
                    latent=encode_image(vae, item.image),
                    pairs=tuple(
                        EncodedPair(
                            prompt=prompt,
                            student=truncate_tokens(encode_prompt(clip, prompt), MAX_STUDENT_TOKENS),
                            teacher=[[teacher.encode(item.image[0], prompt).cpu(), {}]],
                        )
                        for prompt in item.prompts
                    ),
                )
                for item in dataset
            ]
        finally:
            del teacher
            gc.collect()
            comfy.model_management.soft_empty_cache()
        return io.NodeOutput(items)
