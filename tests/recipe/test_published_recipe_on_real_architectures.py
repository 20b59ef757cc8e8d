"""The published recipe on the real architectures: how many parameters the default LoRA trains.

The models are built on the meta device (no memory, no weights) by ComfyUI's own detection and model classes from
state dicts with the key layout and the shapes of the released checkpoints that decide the architecture. The counts
must equal what the authors' peft setup trains: rank 64 on each diffusers module their target list reaches, q, k
and v separately.
"""
from __future__ import annotations

import pytest
import torch

from dopsd_core import DualLora, LoraSpec
from devkit.comfy_runtime import pack_module

RANK = 64


def lora_size(in_features: int, out_features: int) -> int:
    return RANK * (in_features + out_features)


def zimage_turbo_keys() -> dict[str, tuple[int, ...]]:
    """Z-Image-Turbo 6B: dim 3840, 30 layers (+ 2 noise and 2 context refiner layers), Qwen3-4B captions."""
    keys = {"cap_embedder.1.weight": (3840, 2560), "cap_pad_token": (1, 3840), "x_pad_token": (1, 3840),
            "noise_refiner.0.attention.k_norm.weight": (128,)}
    keys |= {f"layers.{i}.attention.qkv.weight": (3 * 3840, 3840) for i in range(30)}
    return keys


def klein_keys(hidden: int, text_width: int, double: int, single: int) -> dict[str, tuple[int, ...]]:
    """FLUX.2-klein: klein stacks three Qwen3 layers as the text input."""
    keys = {"img_in.weight": (hidden, 128), "txt_in.weight": (hidden, 3 * text_width),
            "double_stream_modulation_img.lin.weight": (6 * hidden, hidden)}
    for i in range(double):
        for stream in ("img", "txt"):
            keys[f"double_blocks.{i}.{stream}_attn.norm.key_norm.scale"] = (128,)
            keys[f"double_blocks.{i}.{stream}_attn.norm.query_norm.scale"] = (128,)
    keys |= {f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(single)}
    return keys


# What the authors' adapters train (peft, rank 64, each module's in + out features times the rank):
# Z-Image: 34 blocks x (to_q, to_k, to_v, to_out.0: 3840 -> 3840; w1, w3: 3840 -> 10240; w2: 10240 -> 3840).
# klein: the double blocks' to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out (hidden -> hidden); nothing else matched.
ARCHITECTURES = {
    "Z-Image-Turbo 6B": (zimage_turbo_keys(), 34 * (4 * lora_size(3840, 3840) + 3 * lora_size(3840, 10240))),
    "FLUX.2-klein 4B": (klein_keys(3072, 2560, double=5, single=20), 5 * 8 * lora_size(3072, 3072)),
    "FLUX.2-klein 9B": (klein_keys(4096, 4096, double=8, single=24), 8 * 8 * lora_size(4096, 4096)),
}


def meta_model(keys: dict[str, tuple[int, ...]]):
    """ComfyUI's model for a checkpoint with these keys, built on the meta device."""
    import comfy.model_detection

    state_dict = {key: torch.empty(shape, device="meta") for key, shape in keys.items()}
    config = comfy.model_detection.model_config_from_unet(state_dict, "")
    assert config is not None, "ComfyUI does not recognise the checkpoint"
    with torch.device("meta"):
        return config.get_model(state_dict, "")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_default_lora_trains_exactly_the_authors_parameters(comfy, name):
    keys, authors_count = ARCHITECTURES[name]
    families, lora_io = pack_module("nodes.families"), pack_module("nodes.lora_io")
    model = meta_model(keys)
    targets = families.lora_targets(model.diffusion_model, "published")
    slices, _ = lora_io.output_slice_layout(model, targets)
    spec = LoraSpec(RANK, 2.0 * RANK, targets, output_slices=slices)
    with torch.device("meta"):  # the adapters too, beside their meta base layers
        adapters = DualLora(model.diffusion_model, spec)
    trainable = sum(p.numel() for p in adapters.student_parameters())
    print(f"\n{name}: {trainable:,} trainable LoRA parameters (authors: {authors_count:,}); "
          f"{len(adapters.module_names)} adapted layers, {len(slices)} fused qkv split into q, k, v")
    assert trainable == authors_count
    assert all(len(sizes) == 3 for sizes in slices.values()), "every fused qkv splits into q, k and v"
    if name.startswith("FLUX"):
        assert {m.split(".")[0] for m in adapters.module_names} == {"double_blocks"}
        assert {m.split(".")[2] for m in adapters.module_names} == {"img_attn", "txt_attn"}
