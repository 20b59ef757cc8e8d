"""The Z-Image VLM teacher: Qwen3-VL whose language model is Z-Image's own Qwen3 text encoder, and its node.

Z-Image conditions on Qwen3-4B hidden states. Qwen3-VL-4B's language model has the same architecture, so
giving it Z-Image's encoder weights (wherever names and shapes match) and keeping Qwen3-VL's vision tower
yields features of the prompt *and* an image in the very space Z-Image reads: the teacher context.
Everything is local: the architecture ships as configs/qwen3_vl_4b_instruct.json, the tokenizer is the Qwen
tokenizer ComfyUI bundles, and the vision weights come from a file in the user's models folder.
"""
from __future__ import annotations

import gc
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.text_encoders.z_image
import folder_paths
import numpy as np
import safetensors
import torch
from comfy_api.latest import io
from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLModel

from .dataset import DATASET
from .errors import node_error
from .training_set import TRAINING_SET, EncodedItem, EncodedPair, encode_image, encode_prompt

ARCHITECTURE = json.loads((Path(__file__).parent / "configs" / "qwen3_vl_4b_instruct.json").read_text())
# Qwen3-VL's chat template for one user turn [image, text], generation prompt appended, no system prompt.
CHAT_TEMPLATE = "<|im_start|>user\n<|vision_start|>{image_pads}<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_PAD = "<|image_pad|>"
# The authors feed the teacher 512²–768² pixel images and keep at most 1024 feature tokens.
TEACHER_MIN_PIXELS, TEACHER_MAX_PIXELS = 512 * 512, 768 * 768
MAX_TEACHER_TOKENS = 1024
VISION_PREFIXES = ("model.visual.", "visual.")


class VisionWeightsError(ValueError):
    """The vision file cannot serve this text encoder; the message says why."""


def text_encoder_weights(clip_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3 language-model weights from a ComfyUI CLIP state dict, under Qwen3VLModel's names."""
    anchors = [k for k in clip_state if k.endswith("model.embed_tokens.weight")]
    if len(anchors) != 1:
        raise VisionWeightsError("the CLIP is not a single Qwen3 text encoder (load Z-Image's qwen_3_4b)")
    prefix = anchors[0][: -len("model.embed_tokens.weight")] + "model."
    return {"language_model." + k[len(prefix):]: v for k, v in clip_state.items() if k.startswith(prefix)}


def read_vision_file(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The vision tower's tensors under Qwen3VLModel's names, and its config (the file's 'config' header, if
    present, over the Qwen3-VL-4B one). Accepts a full Qwen3-VL checkpoint file or just its vision part."""
    with safetensors.safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
        keys = list(f.keys())
        vision = {}
        for key in keys:
            prefix = next((p for p in VISION_PREFIXES if key.startswith(p)), None)
            if prefix is not None:
                vision["visual." + key[len(prefix):]] = f.get_tensor(key)
    if not vision:
        raise VisionWeightsError(f"{Path(path).name} holds no Qwen3-VL vision weights (no 'model.visual.*' keys)")
    config = {**ARCHITECTURE["vision_config"], **json.loads(header.get("config", "{}"))}
    return vision, config


def build_config(language: dict[str, torch.Tensor], vision_config: dict) -> Qwen3VLConfig:
    """Qwen3-VL config whose language-model sizes are read off the text encoder's tensors."""
    q_norm = language["language_model.layers.0.self_attn.q_norm.weight"]
    head_dim = q_norm.shape[0]
    embed = language["language_model.embed_tokens.weight"]
    layers = 1 + max(int(k.split(".")[2]) for k in language if k.startswith("language_model.layers."))
    text_config = {
        **ARCHITECTURE["text_config"],
        "vocab_size": embed.shape[0],
        "hidden_size": embed.shape[1],
        "intermediate_size": language["language_model.layers.0.mlp.gate_proj.weight"].shape[0],
        "num_hidden_layers": layers,
        "head_dim": head_dim,
        "num_attention_heads": language["language_model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        "num_key_value_heads": language["language_model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
    }
    top_level = {k: v for k, v in ARCHITECTURE.items() if k not in ("text_config", "vision_config", "image_processor", "_comment")}
    return Qwen3VLConfig(text_config=text_config, vision_config=vision_config, **top_level)


def check_fits(config: Qwen3VLConfig, weights: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Qwen3VLModel(config).state_dict().items()}
    missing = sorted(expected.keys() - weights.keys())
    wrong = sorted(k for k in expected.keys() & weights.keys() if weights[k].shape != expected[k])
    if config.vision_config.out_hidden_size != config.text_config.hidden_size:
        raise VisionWeightsError(
            f"the vision tower outputs {config.vision_config.out_hidden_size}-wide features but the text encoder is "
            f"{config.text_config.hidden_size} wide: the vision file belongs to another Qwen3-VL size "
            "(Z-Image's qwen_3_4b needs the Qwen3-VL-4B-Instruct vision weights)"
        )
    if missing or wrong:
        details = ", ".join(
            [f"missing {k}" for k in missing[:3]]
            + [f"{k} is {tuple(weights[k].shape)} not {tuple(expected[k])}" for k in wrong[:3]]
        )
        raise VisionWeightsError(f"the vision weights do not fit the text encoder ({details})")


def image_processor_for(vision_config: dict) -> Qwen2VLImageProcessor:
    """The processor that cuts images into the patches this vision tower embeds (its patch, merge and temporal sizes:
    a tower of another size than the 4B one reads other patches)."""
    sizes = {"patch_size": vision_config["patch_size"], "merge_size": vision_config["spatial_merge_size"],
             "temporal_patch_size": vision_config["temporal_patch_size"]}
    return Qwen2VLImageProcessor(**{**ARCHITECTURE["image_processor"], **sizes},
                                 min_pixels=TEACHER_MIN_PIXELS, max_pixels=TEACHER_MAX_PIXELS)


@dataclass
class VLMTeacherEncoder:
    """Encodes (image, prompt) into teacher features: hidden_states[-2], at most MAX_TEACHER_TOKENS tokens."""

    model: Qwen3VLModel
    tokenizer: Qwen2Tokenizer
    image_processor: Qwen2VLImageProcessor

    @classmethod
    def build(cls, clip_state, vision_path: str, tokenizer_dir: str, device, dtype) -> "VLMTeacherEncoder":
        language = text_encoder_weights(clip_state)
        vision, vision_config = read_vision_file(vision_path)
        weights = {k: v.to(dtype) for k, v in {**language, **vision}.items()}
        config = build_config(language, vision_config)
        check_fits(config, weights)
        model = Qwen3VLModel.from_pretrained(None, config=config, state_dict=weights, dtype=dtype)
        return cls(
            model=model.to(device).eval(),
            tokenizer=Qwen2Tokenizer.from_pretrained(tokenizer_dir),
            image_processor=image_processor_for(vision_config),
        )

    @torch.no_grad()
    def encode(self, image: torch.Tensor, prompt: str) -> torch.Tensor:
        """image: [H, W, 3] in 0..1. Returns [1, T, hidden] features, T <= MAX_TEACHER_TOKENS."""
        pixels = (image[..., :3].clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
        vision_inputs = self.image_processor(images=[pixels], return_tensors="pt")
        merge = self.image_processor.merge_size
        image_tokens = int(vision_inputs["image_grid_thw"].prod()) // (merge * merge)
        text = CHAT_TEMPLATE.format(image_pads=IMAGE_PAD * image_tokens, prompt=prompt)
        tokens = self.tokenizer(text, return_tensors="pt")
        device = self.model.device
        inputs = dict(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            pixel_values=vision_inputs["pixel_values"].to(device, self.model.dtype),
            image_grid_thw=vision_inputs["image_grid_thw"].to(device),
            output_hidden_states=True,
        )
        if accepts_mm_token_type_ids(self.model):
            inputs["mm_token_type_ids"] = mm_token_type_ids(inputs["input_ids"], self.image_token_id)
        output = self.model(**inputs)
        return output.hidden_states[-2][:, :MAX_TEACHER_TOKENS]

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)


def accepts_mm_token_type_ids(model: torch.nn.Module) -> bool:
    """Whether this transformers' Qwen3-VL forward takes `mm_token_type_ids` (5.x does, and requires it with images:
    "Multimodal data was passed ... but mm_token_type_ids is missing"; 4.x finds the image tokens in input_ids
    itself and has no such argument)."""
    return "mm_token_type_ids" in inspect.signature(model.forward).parameters


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """What transformers 5's Qwen3-VL processor returns beside input_ids: per token 0 for text, 1 for an image token
    (ProcessorMixin.create_mm_token_type_ids). The multimodal RoPE positions are computed from it."""
    return (input_ids == image_token_id).to(torch.int32)


MAX_STUDENT_TOKENS = 512  # Z-Image reads at most 512 prompt tokens
VISION_FOLDER = "clip_vision"


def truncate_tokens(conditioning: list, max_tokens: int) -> list:
    """Keep at most max_tokens feature tokens (and the matching attention-mask entries)."""
    truncated = []
    for features, extras in conditioning:
        extras = dict(extras)
        if "attention_mask" in extras:
            extras["attention_mask"] = extras["attention_mask"][:, :max_tokens]
        truncated.append([features[:, :max_tokens], extras])
    return truncated


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
