"""FLUX.2-klein concept LoRA with the editing-branch teacher, through ComfyUI's executor on tiny checkpoints."""
from __future__ import annotations

import json
import math

import pytest
import safetensors
import torch

from devkit.graph import Graph
from tests.klein.klein_graphs import (
    CONCEPT_INSTRUCTION,
    GENERATION_STEPS,
    concept_fine_tune_then_generate,
    dataset,
    load_klein,
    reference_teacher,
)
from devkit.comfy_runtime import pack_module
from tests.klein.klein_probe import relative_change, sample_with_noise, x0_for_two_images

LORA_NAME = "dopsd/e2e_klein_concept"


@pytest.fixture(scope="module")
def concept_run(comfy, klein_concept_folder):
    graph, ids = concept_fine_tune_then_generate(klein_concept_folder, LORA_NAME)
    run = comfy.run(graph)
    assert run.success, run.error or run.node_errors
    # Snapshot the outputs: the executor's cache holds only the latest graph's.
    return run, {key: run.output(node_id) for key, node_id in ids.items()}


def comfy_flux2_scheduler(steps: int, width: int, height: int) -> torch.Tensor:
    """ComfyUI's own Flux2Scheduler node, the schedule klein is sampled with."""
    from comfy_extras.nodes_flux import Flux2Scheduler

    return Flux2Scheduler.execute(steps, width, height)[0].float()


def test_workflow_trains_on_each_buckets_own_schedule_saves_and_generates(concept_run, comfy_base):
    run, outputs = concept_run
    lora_file = comfy_base / "models" / "loras" / f"{LORA_NAME}.safetensors"
    with safetensors.safe_open(str(lora_file), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["dopsd.base_model"] == "flux-2-klein-4b.safetensors"
    # The published klein targets: the double blocks' attention projections only, q, k and v (image and text
    # streams) each with its own LoRA under the diffusers names ComfyUI maps onto the fused qkv.
    modules = {k.removesuffix(".lora_down.weight") for k in keys if k.endswith(".lora_down.weight")}
    assert modules == {f"transformer.transformer_blocks.{block}.attn.{name}" for block in range(2)
                       for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")} | {
        f"diffusion_model.double_blocks.{block}.{stream}_attn.proj" for block in range(2) for stream in ("img", "txt")}
    assert metadata["dopsd.rollout_schedule"] == "published (authors')"

    # Two aspect buckets (80x48 and 64x64 px): each is rolled out on the authors' 4-step schedule for its own size
    # (diffusers' set_timesteps with klein's mu for that size).
    training_sigmas = pack_module("dopsd_core").flux2_klein_training_sigmas
    per_size = json.loads(metadata["dopsd.training_sigmas_per_image_size"])
    assert set(per_size) == {"80x48", "64x64"}
    for size, sigmas in per_size.items():
        width, height = map(int, size.split("x"))
        torch.testing.assert_close(torch.tensor(sigmas), training_sigmas(4, width * height // 256), atol=1e-6, rtol=0)
        assert sigmas[3] < 0.05, "the authors' grid ends near 0.001 before the shift"
    assert per_size["80x48"] != per_size["64x64"], "15 and 16 image tokens give different shifts"
    assert json.loads(metadata["dopsd.training_sigmas"]) == pytest.approx(
        training_sigmas(4, 4096).tolist(), abs=1e-6), "the loader's training_sigmas: the 1024² schedule"

    model, lora, loss, previews = outputs["train"]
    assert len(loss["loss"]) == 3 and all(math.isfinite(v) and v > 0 for v in loss["loss"])
    panels = outputs["preview"][0]
    assert panels.shape == (4, 48, 3 * 80, 3), "one student|teacher|target row per roll-out step"
    saved_images = [img for node in run.ui_outputs.values() for img in node.get("images", [])]
    assert any(img["filename"].startswith("dopsd_klein_tuned") for img in saved_images)


def test_teacher_conditioning_is_the_prompt_plus_instruction_with_the_target_as_reference_latent(concept_run, comfy):
    run, outputs = concept_run
    loader_outputs = outputs["loader"]
    clip = loader_outputs[1]
    reference_latent = comfy.node_class("ReferenceLatent")
    instruction = CONCEPT_INSTRUCTION
    for item in outputs["pairs"][0]:
        assert item.latent.shape == (1, 128, item.image.shape[1] // 16, item.image.shape[2] // 16)
        for pair in item.pairs:
            assert all("reference_latents" not in extras for _, extras in pair.student)
            # Exactly what CLIPTextEncode + a stock ReferenceLatent node give for the prompt with the instruction.
            text = comfy.nodes.CLIPTextEncode().encode(clip, f"{pair.prompt} {instruction}")[0]
            stock = reference_latent.execute(text, {"samples": item.latent})[0]
            [[teacher_features, teacher_extras]] = pair.teacher
            [[stock_features, stock_extras]] = stock
            assert torch.equal(teacher_features, stock_features)
            assert len(teacher_extras["reference_latents"]) == 1
            assert torch.equal(teacher_extras["reference_latents"][0], stock_extras["reference_latents"][0])
            assert torch.equal(pair.student[0][0], comfy.nodes.CLIPTextEncode().encode(clip, pair.prompt)[0][0][0])


def test_the_teachers_prediction_follows_the_reference_image_and_the_students_does_not(comfy, klein_reference_folders):
    g = Graph()
    loader = load_klein(g)
    sets = [reference_teacher(g, loader, dataset(g, folder)) for folder in klein_reference_folders]
    previews = [g.node("DOPSDRolloutPreview", model=loader.out(0), vae=loader.out(2), training_set=s,
                       sigmas=loader.out(4), image_index=0, prompt_variant=0, seed=0) for s in sets]
    for preview in previews:
        g.node("PreviewImage", images=preview)
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    model = run.output(loader.node_id)[0]
    (item_a,), (item_b,) = (run.output(s.node_id)[0] for s in sets)

    # The preview node: the student's roll-out and x0 (left panel) are identical for both images, the teacher's
    # x0 (middle panel) is not.
    (panels_a, states_a), (panels_b, states_b) = (run.output(p.node_id) for p in previews)
    width = item_a.image.shape[2]
    assert torch.equal(states_a["samples"], states_b["samples"])
    assert torch.equal(panels_a[..., :width, :], panels_b[..., :width, :])
    assert not torch.equal(panels_a[..., width:2 * width, :], panels_b[..., width:2 * width, :])

    student_a, student_b, teacher_a, teacher_b = x0_for_two_images(model, item_a, item_b)
    teacher_change, teacher_vs_student = relative_change(teacher_a, teacher_b), relative_change(student_a, teacher_a)
    print(f"\nklein reference teacher, x0 at sigma 0.7: reference image A -> B moves the teacher by "
          f"{teacher_change:.2%} (RMS), the student by {relative_change(student_a, student_b):.2%}; "
          f"teacher vs student {teacher_vs_student:.2%}")
    assert torch.equal(student_a, student_b), "the student must not see the image"
    assert teacher_change > 0.02, "the reference latent does not reach the teacher's prediction"


def test_stock_lora_loader_reproduces_the_trained_model_and_the_students_rollout(concept_run, comfy):
    run, outputs = concept_run
    trained_model, _, _, previews = outputs["train"]
    base_model = outputs["loader"][0]
    stock = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, f"{LORA_NAME}.safetensors", 1.0)[0]
    item = outputs["pairs"][0][0]
    height, width = item.image.shape[1:3]
    positive, shape = item.pairs[0].student, tuple(item.latent.shape)

    # 1. Generation with klein's 4-step schedule: the in-graph trained MODEL and the stock loader's are the same
    #    bf16 LoRA tensors through the same comfy.lora path, so the tolerance is exact equality.
    sigmas = comfy_flux2_scheduler(GENERATION_STEPS, width, height)
    trained, reloaded, base = (sample_with_noise(m, positive, sigmas, shape, seed=11)
                               for m in (trained_model, stock, base_model))
    assert torch.equal(trained, reloaded)
    lora_effect = (trained - base).abs().max().item()
    assert lora_effect > 1e-3, "the LoRA has no effect"

    # 2. The student's own roll-out at the end of training (fp32 adapters, the training preview: first image,
    #    first prompt, noise seed 0, its per-size schedule) against the saved bf16 LoRA through the stock loader.
    training_schedule = pack_module("dopsd_core").flux2_klein_training_sigmas(4, (height // 16) * (width // 16))
    stock_rollout = sample_with_noise(stock, positive, training_schedule, shape, seed=0)
    student_rollout = previews["samples"][-1:]
    difference = (stock_rollout - student_rollout).abs().max().item()
    base_difference = (sample_with_noise(base_model, positive, training_schedule, shape, seed=0)
                       - student_rollout).abs().max().item()
    print(f"\nklein concept LoRA: stock-loaded vs training student roll-out max |diff| {difference:.2e} "
          f"(base model vs student {base_difference:.2e}; latent std {student_rollout.std().item():.2f})")
    assert difference < 0.05 * base_difference, "the saved LoRA does not reproduce the trained student"
