"""The Z-Image VLM teacher (nodes/teacher_vlm.py) with the transformers of both environments: 4.57.1 (.venv, ComfyUI
0.3.75) and 5.24.0 (.venv-comfy033, the newest). transformers 5's Qwen3-VL forward requires `mm_token_type_ids`
with images ("Multimodal data was passed ... but mm_token_type_ids is missing"); 4.x has no such argument.

The reference is transformers' own Qwen3-VL processor: given the same image and one `<|image_pad|>`, it expands the
image tokens, and (in 5.x) returns mm_token_type_ids; its outputs fed to the same model must give exactly the
teacher's features. Tiny checkpoints, real tokenizer (ComfyUI's bundled Qwen tokenizer), nothing mocked.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from devkit.tiny_vlm import MATCHING_VISION_FILE
from devkit.comfy_runtime import pack_module

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


@pytest.fixture(scope="module")
def teacher(comfy, comfy_base):
    from comfy.text_encoders import z_image

    teacher_vlm = pack_module("nodes.teacher_vlm")
    clip = comfy.nodes.CLIPLoader().load_clip("qwen_3_4b.safetensors", "lumina2")[0]
    tokenizer_dir = os.path.join(os.path.dirname(z_image.__file__), "qwen25_tokenizer")
    return teacher_vlm.VLMTeacherEncoder.build(clip.get_sd(), str(comfy_base / "models" / MATCHING_VISION_FILE),
                                               tokenizer_dir, "cpu", torch.float32)


def image(seed: int) -> torch.Tensor:
    return torch.rand(72, 88, 3, generator=torch.Generator().manual_seed(seed))


def processor_features(teacher, picture: torch.Tensor, prompt: str) -> tuple[torch.Tensor, dict]:
    """transformers' own Qwen3-VL pre-processing of the same turn, through the same model."""
    teacher_vlm = pack_module("nodes.teacher_vlm")
    processor = Qwen3VLProcessor(image_processor=teacher.image_processor, tokenizer=teacher.tokenizer,
                                 video_processor=_video_processor())
    pixels = (picture.numpy() * 255).round().astype(np.uint8)
    text = teacher_vlm.CHAT_TEMPLATE.format(image_pads=teacher_vlm.IMAGE_PAD, prompt=prompt)
    inputs = processor(images=[pixels], text=[text], return_tensors="pt")
    with torch.no_grad():
        output = teacher.model(**inputs, output_hidden_states=True)
    return output.hidden_states[-2][:, :teacher_vlm.MAX_TEACHER_TOKENS], inputs


def _video_processor():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor()


def test_teacher_features_equal_transformers_own_processor_path(teacher):
    prompt = "a photo of sks fox"
    features = teacher.encode(image(0), prompt)
    reference, inputs = processor_features(teacher, image(0), prompt)
    assert features.shape == reference.shape and features.shape[-1] == teacher.model.config.text_config.hidden_size
    torch.testing.assert_close(features, reference, rtol=0, atol=0)
    if TRANSFORMERS_MAJOR >= 5:
        assert "mm_token_type_ids" in inputs
        assert int(inputs["mm_token_type_ids"].sum()) == int((inputs["input_ids"] == teacher.image_token_id).sum()) > 0


def test_teacher_features_depend_on_the_image_and_the_prompt(teacher):
    base = teacher.encode(image(0), "a photo of sks fox")
    assert torch.isfinite(base).all()
    assert not torch.equal(base, teacher.encode(image(1), "a photo of sks fox"))
    assert not torch.equal(base, teacher.encode(image(0), "a drawing of sks fox"))


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="transformers 4.x finds the image tokens in input_ids itself")
def test_control_transformers_5_refuses_images_without_mm_token_type_ids(teacher):
    """What the teacher hit before the fix, with transformers >= 5."""
    _, inputs = processor_features(teacher, image(0), "a photo")
    inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids` is missing"):
        teacher.model(**inputs)
