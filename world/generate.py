"""Images from the world's model the way an artist makes them: ComfyUI's stock loaders, CLIPTextEncode, KSampler
(Euler, simple scheduler) and VAEDecode, run by ComfyUI's executor; optionally with a LoRA through
LoraLoaderModelOnly."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from world import models


@dataclass(frozen=True)
class Sampling:
    steps: int = 8
    cfg: float = 1.0
    images_per_prompt: int = 2
    seed: int = 0


def sampling_graph(prompt: str, sampling: Sampling, seed: int, lora: str | None = None) -> tuple[dict, str]:
    """The API-format graph and the id of the node whose output is the IMAGE batch."""
    graph = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": Path(models.WEIGHT_FILES["dit.safetensors"]).name,
                                                          "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {
            "clip_name": Path(models.WEIGHT_FILES["text_encoder.safetensors"]).name, "type": "lumina2"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": Path(models.WEIGHT_FILES["vae.safetensors"]).name}},
        "positive": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["clip", 0]}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["clip", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64,
                                                                   "batch_size": sampling.images_per_prompt}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "seed": seed, "steps": sampling.steps, "cfg": sampling.cfg,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["positive", 0],
            "negative": ["negative", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }
    if lora is not None:
        graph["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": lora,
                                                                         "strength_model": 1.0}}
        graph["sampler"]["inputs"]["model"] = ["lora", 0]
    return graph, "decode"


def generate(runtime, prompts: list[str], sampling: Sampling = Sampling(), lora: str | None = None) -> np.ndarray:
    """(len(prompts) * images_per_prompt, 64, 64, 3) images, prompt by prompt; prompt i uses seed
    sampling.seed + i, so every method sees the same noise for the same prompt."""
    images = []
    for index, prompt in enumerate(prompts):
        graph, output = sampling_graph(prompt, sampling, sampling.seed + index, lora)
        run = runtime.run(graph)
        if not run.success:
            raise RuntimeError(f"sampling {prompt!r} failed: {run.error or run.node_errors or run.validation_error}")
        images.append(run.output(output)[0].numpy())
    return np.concatenate(images)


def sample_conditionings(model, vae, positives: list, negative, sampling: Sampling) -> np.ndarray:
    """Like `generate`, for CONDITIONINGs no stock node makes (the teacher's image + prompt): the sampling call
    KSampler makes, with KSampler's noise for seed sampling.seed + i, decoded by VAEDecode's VAE. `positives` holds
    one CONDITIONING per prompt; `negative` is used where sampling.cfg is not 1."""
    import comfy.sample
    import torch

    images = []
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        for index, positive in enumerate(positives):
            seed = sampling.seed + index
            latent = torch.zeros(sampling.images_per_prompt, 16, 8, 8)
            samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), sampling.steps,
                                          sampling.cfg, "euler", "simple", positive,
                                          positive if sampling.cfg == 1.0 else negative, latent, seed=seed,
                                          disable_pbar=True)
            images.append(vae.decode(samples).float().numpy())
    return np.concatenate(images)
