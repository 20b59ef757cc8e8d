"""The world's models: Z-Image's architecture (NextDiT, Qwen3 text encoder, FLUX.1 VAE, Qwen3-VL vision tower) at
sizes that train on two CPU cores, where the weights live, and how a ComfyUI models folder gets them.

Only the DiT and the VAE are trained. The text encoder and the vision tower are frozen random networks of the real
layouts (seeded): like the real ones, they turn a prompt, or an image and a prompt, into features the DiT learns to
read. The vision tower cuts images into 32-pixel patches (the 4B one: 16), so the 512² image the teacher node
makes of a 64² scene becomes 8 x 8 = 64 feature tokens instead of 256.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from devkit import tiny_models

WORLD_DIR = Path(__file__).parent
WEIGHTS_DIR = WORLD_DIR / "weights"
BUILD_DIR = WORLD_DIR / "build"

TEXT_HIDDEN = 32
TEXT_LAYERS = 4                     # Z-Image reads hidden_states[-2]
DIT_LAYERS = 4                      # plus ComfyUI's fixed 2 noise and 2 context refiner blocks
# 8 heads of 32 rather than the test models' 2 of 128: with 2 heads, a from-scratch DiT read a background color
# word a quarter as strongly after 1200 steps (the loss rose 5 % instead of 21 % when the word was swapped).
DIT_HEAD_DIM = 32
VISION_CONFIG = {
    "depth": 2,
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_heads": 2,
    "patch_size": 32,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": TEXT_HIDDEN,
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [0, 1],
}
# The vision tower's random weights are drawn at scales that carry an image's content through to the DiT. With
# transformers' default initialisation its position embeddings (std 1) outweighed the patch content twice over and
# its merger's outputs were a fifth the size of a text token's embedding, so the language model's layers drowned
# them: an MLP probe read an object's color from its image tokens' features 0.33 of the time, against 0.65 with
# these scales and 0.69 from the raw pixels of the same tokens.
VISION_POSITION_STD = 0.1
VISION_PATCH_STD = 0.02
VISION_OUTPUT_GAIN = 2.0            # merger outputs near a text embedding's size (norm about 5.6)
TEXT_ENCODER_SEED = 11
VISION_SEED = 12
DIT_SEED = 13
VAE_SEED = 14

# world/weights/<file> -> the file name under ComfyUI's models/ that the shipped Z-Image workflow loads.
WEIGHT_FILES = {
    "dit.safetensors": tiny_models.ZIMAGE_DIT_FILE,
    "text_encoder.safetensors": tiny_models.QWEN3_TE_FILE,
    "vae.safetensors": tiny_models.FLUX1_VAE_FILE,
    "vision.safetensors": "clip_vision/qwen3_vl_4b_instruct_vision.safetensors",
}


def text_encoder_state_dict() -> dict[str, torch.Tensor]:
    return tiny_models.qwen3_state_dict(TEXT_ENCODER_SEED, num_layers=TEXT_LAYERS, hidden_size=TEXT_HIDDEN)


def initial_dit_state_dict() -> dict[str, torch.Tensor]:
    """The untrained DiT. Its output layer starts at zero (the prediction starts as "no change"), as DiTs are
    usually initialised for training, and its query/key norms at one: the test models' larger norm scale makes
    every attention row nearly one-hot at the start, and a DiT started that way learned ten times slower (it
    could not memorise 16 training images in 300 steps; with unit norms their sampled latents came within 3 %)."""
    sd = tiny_models.zimage_state_dict(DIT_SEED, num_layers=DIT_LAYERS, cap_feat_dim=TEXT_HIDDEN,
                                      head_dim=DIT_HEAD_DIM)
    for key in [k for k in sd if k.endswith(("q_norm.weight", "k_norm.weight"))]:
        sd[key] = torch.ones_like(sd[key])
    sd["final_layer.linear.weight"].zero_()
    sd["final_layer.linear.bias"].zero_()
    return sd


def initial_vae_state_dict() -> dict[str, torch.Tensor]:
    return tiny_models.flux1_vae_state_dict(VAE_SEED)


def vision_tensors() -> dict[str, torch.Tensor]:
    """The Qwen3-VL vision tower under the keys of a Qwen3-VL checkpoint (``model.visual.*``)."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    torch.manual_seed(VISION_SEED)
    tower = Qwen3VLVisionModel(Qwen3VLVisionConfig(**VISION_CONFIG))
    with torch.no_grad():
        tower.pos_embed.weight.normal_(0, VISION_POSITION_STD)
        tower.patch_embed.proj.weight.normal_(0, VISION_PATCH_STD)
        for merger in (tower.merger, *tower.deepstack_merger_list):
            for linear in (merger.linear_fc1, merger.linear_fc2):
                linear.weight.normal_(0, linear.in_features ** -0.5)
            merger.linear_fc2.weight.mul_(VISION_OUTPUT_GAIN)
    return {f"model.visual.{k}": v.detach().contiguous() for k, v in tower.state_dict().items()}


def save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging), metadata=metadata)
    os.replace(staging, path)
    return path


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def write_frozen_encoders(folder: Path) -> dict[str, Path]:
    """The text encoder and the vision tower in bf16, as Qwen ships them (the vision tower's config in its header,
    the way the teacher node reads towers of other sizes)."""
    text = {k: v.to(torch.bfloat16) for k, v in text_encoder_state_dict().items()}
    vision = {k: v.to(torch.bfloat16) for k, v in vision_tensors().items()}
    return {
        "text_encoder": save_atomically(text, folder / "text_encoder.safetensors"),
        "vision": save_atomically(vision, folder / "vision.safetensors",
                                  metadata={"config": json.dumps(VISION_CONFIG)}),
    }


def world_is_built(weights_dir: Path = WEIGHTS_DIR) -> bool:
    """Whether `weights_dir` holds the world's model files. The DiT is the last of them the build makes (the VAE
    ships before it, and the build reuses it): without the DiT the world is not built yet; with it every model file
    must be there and match the folder's sha256 manifest (ValueError naming the files otherwise), so that a damaged
    or half-copied world is never run as if it were the shipped one."""
    from world.manifest import verify_manifest

    if not (Path(weights_dir) / "dit.safetensors").exists():
        return False
    missing = [name for name in WEIGHT_FILES if not (Path(weights_dir) / name).exists()]
    if missing:
        raise ValueError(f"{weights_dir}: the world's weights are incomplete, missing {', '.join(missing)}")
    verify_manifest(weights_dir)
    return True


def install_world(models_dir: Path, weights_dir: Path = WEIGHTS_DIR) -> dict[str, Path]:
    """Copy the world's weights into a ComfyUI models folder under the file names the Z-Image workflow loads."""
    installed = {}
    for name, relative in WEIGHT_FILES.items():
        target = Path(models_dir) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights_dir / name, target)
        installed[name] = target
    return installed
