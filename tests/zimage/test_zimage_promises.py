"""Promises of the Z-Image pipeline checked against independent references: a resumed run equals an uninterrupted
one, and the VLM teacher's prediction follows the image it is shown."""
from __future__ import annotations

import pytest
import torch

from devkit.graph import Graph
from devkit.tiny_models import QWEN3_HIDDEN_SIZE
from devkit.tiny_vlm import write_vision_file
from tests.klein.klein_data import write_single_image_folder
from tests.klein.klein_probe import relative_change, x0_for_two_images
from tests.zimage.zimage_graphs import load_family, train, training_set

CAPTION = "a photo of [trigger], centred"


def train_lora(comfy, concept_folder, **inputs) -> dict[str, torch.Tensor]:
    g = Graph()
    loader = load_family(g)
    trained = train(g, loader, training_set(g, loader, concept_folder), **inputs)
    g.node("LossGraphNode", loss=trained.out(2), filename_prefix="resume_check")
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    return dict(run.output(trained.node_id)[1])


def test_resumed_training_ends_with_the_lora_of_an_uninterrupted_run(comfy, concept_folder):
    """Through the node: 2 steps, a checkpoint, then resumed to 4, against 4 steps in one go (bit-identical on CPU:
    the weights, the optimizer state and the random state must all come back)."""
    settings = dict(steps=4, checkpoint_every=2, seed=3, gradient_accumulation=2, ema_decay=0.5)
    uninterrupted = train_lora(comfy, concept_folder, checkpoint_folder="dopsd/checkpoints/resume_whole", **settings)
    train_lora(comfy, concept_folder, checkpoint_folder="dopsd/checkpoints/resume_parts", **{**settings, "steps": 2})
    resumed = train_lora(comfy, concept_folder, checkpoint_folder="dopsd/checkpoints/resume_parts", resume=True,
                         **settings)
    fresh = train_lora(comfy, concept_folder, checkpoint_folder="dopsd/checkpoints/resume_fresh",
                       **{**settings, "steps": 2})
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert any(not torch.equal(fresh[k], uninterrupted[k]) for k in uninterrupted), "4 steps must differ from 2"


@pytest.fixture(scope="module")
def two_image_folders(comfy_base) -> tuple[str, str]:
    """Same caption, different images."""
    for name, seed in (("zimage_teacher_a", 21), ("zimage_teacher_b", 34)):
        write_single_image_folder(comfy_base / "input" / "dopsd" / name, seed, CAPTION)
    return "dopsd/zimage_teacher_a", "dopsd/zimage_teacher_b"


def test_the_vlm_teachers_prediction_follows_the_image_and_the_students_does_not(comfy, two_image_folders):
    g = Graph()
    loader = load_family(g)
    sets = [training_set(g, loader, folder) for folder in two_image_folders]
    for s in sets:
        g.node("PreviewAny", source=s)
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    model = run.output(loader.node_id)[0]
    (item_a,), (item_b,) = (run.output(s.node_id)[0] for s in sets)
    student_a, student_b, teacher_a, teacher_b = x0_for_two_images(model, item_a, item_b)
    teacher_change = relative_change(teacher_a, teacher_b)
    print(f"\nZ-Image VLM teacher, x0 at sigma 0.7: image A -> B moves the teacher by {teacher_change:.2%} (RMS), "
          f"the student by {relative_change(student_a, student_b):.2%}")
    assert torch.equal(student_a, student_b), "the student must not see the image"
    assert teacher_change > 0.01, "the image barely reaches the teacher's prediction"


def test_a_vision_tower_with_other_patches_gets_images_cut_into_its_patches(comfy, comfy_base, two_image_folders):
    """Qwen3-VL towers of other sizes may embed other patch sizes (the pretrained world's: 32 px); the teacher node
    cuts the image to match. A square image is enlarged to 512², (512/16/2)² = 256 merged tokens for the 4B tower's
    16 px patches, (512/32/2)² = 64 for 32 px ones."""
    name = "qwen3_vl_patch32_vision.safetensors"
    write_vision_file(comfy_base / "models" / "clip_vision" / name, QWEN3_HIDDEN_SIZE, seed=5, patch_size=32)
    folder = two_image_folders[0]
    g = Graph()
    loader = load_family(g)
    sets = [training_set(g, loader, folder), training_set(g, loader, folder, vision=name)]
    for s in sets:
        g.node("PreviewAny", source=s)
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    [[first_16, *_], [first_32, *_]] = (run.output(s.node_id)[0] for s in sets)
    pair_16, pair_32 = first_16.pairs[0], first_32.pairs[0]
    assert pair_16.prompt == pair_32.prompt
    assert pair_16.teacher[0][0].shape[1] - pair_32.teacher[0][0].shape[1] == 256 - 64
