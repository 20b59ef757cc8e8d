"""Z-Image fine-tune-then-generate through ComfyUI's executor, on tiny real-architecture checkpoints."""
from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors
import torch

from devkit.graph import Graph
from devkit.comfy_runtime import pack_module
from tests.klein.klein_probe import sample_with_noise
from tests.zimage.zimage_graphs import fine_tune_then_generate, load_family, train, training_set

LORA_NAME = "dopsd/e2e_fox"
SAMPLE_SEED = 11


def sample(comfy, model, prompt: str = "a photo of sks fox") -> torch.Tensor:
    """8-step generation with ComfyUI's own KSampler function, from fixed noise."""
    clip = comfy.nodes.CLIPLoader().load_clip("qwen_3_4b.safetensors", "lumina2")[0]
    positive = comfy.nodes.CLIPTextEncode().encode(clip, prompt)[0]
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    with torch.inference_mode():
        (out,) = comfy.nodes.common_ksampler(model, SAMPLE_SEED, 8, 1.0, "euler", "simple", positive, positive, latent)
    return out["samples"].clone()


@pytest.fixture(scope="module")
def untrained(comfy):
    """The loader's MODEL and its 8-step sample before anything has trained on it."""
    g = Graph()
    loader = load_family(g)
    g.node("PreviewAny", source=loader.out(4))
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    model = run.output(loader.node_id)[0]
    return model, sample(comfy, model)


@pytest.fixture(scope="module")
def workflow_run(comfy, concept_folder, untrained):
    graph, ids = fine_tune_then_generate(concept_folder, LORA_NAME)
    run = comfy.run(graph)
    assert run.success, run.error or run.node_errors
    return run, ids


def test_workflow_graph_trains_saves_and_generates(workflow_run, comfy_base):
    run, ids = workflow_run
    lora_file = comfy_base / "models" / "loras" / f"{LORA_NAME}.safetensors"
    with safetensors.safe_open(str(lora_file), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["dopsd.method"] == "D-OPSD"
    assert metadata["dopsd.base_model"] == "z_image_turbo_bf16.safetensors"
    assert metadata["dopsd.steps"] == "3" and metadata["dopsd.rank"] == "4"
    assert metadata["dopsd.training_sigmas"] == "[1.0, 0.9, 0.75, 0.5, 0.0]"
    assert metadata["dopsd.rollout_schedule"] == "published (authors')"
    assert metadata["dopsd.lora_init"] == "gaussian" and metadata["dopsd.lora_targets_choice"] == "published"
    assert metadata["dopsd.gradient_accumulation"] == "1"
    # q, k and v of every fused qkv get their own LoRA, under the diffusers names ComfyUI maps onto the slices.
    for block in ("layers.0", "noise_refiner.1", "context_refiner.0"):
        for part in ("to_q", "to_k", "to_v", "out", "feed_forward.w2"):
            name = part if part.startswith("feed") else f"attention.{part}"
            assert f"diffusion_model.{block}.{name}.lora_down.weight" in keys, (block, name)
    assert not any(".qkv." in k for k in keys)
    assert all(k.startswith("diffusion_model.") for k in keys)

    [first_item, *_] = run.output(ids["pairs"])[0]
    assert first_item.latent.shape == (1, 16, 6, 10), "96x64 images go to the 80x48 bucket at 4096 pixels"
    model, lora, loss, previews = run.output(ids["train"])
    assert len(loss["loss"]) == 3 and all(math.isfinite(v) for v in loss["loss"])
    assert previews["samples"].shape == first_item.latent.shape

    panels = run.output(ids["preview"])[0]
    assert panels.shape == (4, 48, 3 * 80, 3), "one student|teacher|target row per roll-out step"
    student, teacher = panels[..., :80, :], panels[..., 80:160, :]
    assert not torch.equal(student, teacher), "the teacher context does not change the prediction"

    saved_images = [img for node in run.ui_outputs.values() for img in node.get("images", [])]
    assert any(img["filename"].startswith("dopsd_tuned") for img in saved_images)
    assert run.ui_outputs[ids["loss_graph"]]["images"], "the native loss graph got no LOSS_MAP it can plot"


def test_stock_lora_loader_reproduces_the_trained_model(workflow_run, comfy):
    run, ids = workflow_run
    trained_model = run.output(ids["train"])[0]
    base_model = run.output(ids["loader"])[0]
    stock = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, f"{LORA_NAME}.safetensors", 1.0)[0]
    trained, reloaded, base = sample(comfy, trained_model), sample(comfy, stock), sample(comfy, base_model)
    # Same tensors through the same comfy.lora path: the tolerance is exact equality.
    assert torch.equal(trained, reloaded)
    assert (trained - base).abs().max() > 1e-4, "the LoRA has no effect"


def test_saved_lora_reproduces_the_students_rollout_at_the_end_of_training(workflow_run, comfy):
    """The file against the trained adapters themselves (separate q/k/v in float32 during training), not against
    another application of the same file: the training preview is the student's roll-out on the training schedule
    from noise seed 0."""
    run, ids = workflow_run
    base_model = run.output(ids["loader"])[0]
    previews = run.output(ids["train"])[3]["samples"]
    item = run.output(ids["pairs"])[0][0]
    stock = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, f"{LORA_NAME}.safetensors", 1.0)[0]
    schedule = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
    positive, shape = item.pairs[0].student, tuple(item.latent.shape)
    student = previews[-1:]
    stock_rollout = sample_with_noise(stock, positive, schedule, shape, seed=0)
    base_rollout = sample_with_noise(base_model, positive, schedule, shape, seed=0)
    difference = (stock_rollout - student).abs().max().item()
    base_difference = (base_rollout - student).abs().max().item()
    assert difference < 0.05 * base_difference, (difference, base_difference)


def test_input_model_is_unchanged_by_training_success_cancel_and_failure(untrained, workflow_run, comfy,
                                                                         concept_folder):
    base_model, before = untrained
    run, ids = workflow_run
    assert run.output(ids["loader"])[0] is base_model, "the workflow trained the MODEL sampled before it"
    assert torch.equal(sample(comfy, base_model), before), "a successful run changed the input MODEL"

    g = Graph()
    loader = load_family(g)
    cancelled = train(g, loader, training_set(g, loader, concept_folder), steps=50, seed=5)
    g.node("LossGraphNode", loss=cancelled.out(2), filename_prefix="cancelled")
    cancel_run = comfy.run(g.to_api(), interrupt_at_progress=1)
    assert not cancel_run.success and cancel_run.error["event"] == "execution_interrupted"
    assert cancel_run.error["node_type"] == "DOPSDTrain"
    progress = [m for e, m in comfy.server.messages if e == "progress"]
    assert max(p["value"] for p in progress) < 50, "training ran on after the interrupt"

    g = Graph()
    loader = load_family(g)
    failing = train(g, loader, training_set(g, loader, concept_folder), lora_targets="custom regex",
                    custom_lora_targets=r"no_such_layer\.\d+")
    g.node("LossGraphNode", loss=failing.out(2), filename_prefix="failing")
    failed_run = comfy.run(g.to_api())
    assert not failed_run.success and "lora_targets" in failed_run.error["exception_message"]

    assert torch.equal(sample(comfy, base_model), before)
    assert not any("lora_" in name for name, _ in base_model.model.diffusion_model.named_modules())


def test_training_shows_its_memory_plan_then_step_loss_and_time_left_on_its_node(comfy, concept_folder):
    graph, ids = fine_tune_then_generate(concept_folder, "dopsd/progress_text", steps=2)
    run = comfy.run(graph)
    assert run.success, run.error or run.node_errors
    shown = [data["text"] for event, data in comfy.server.messages
             if event == "progress_text" and data["node"] == ids["train"]]
    losses = run.output(ids["train"])[2]["loss"]
    assert len(shown) == 3
    assert shown[0].startswith("memory plan: about ")
    assert shown[1].startswith(f"step 1/2 · loss {losses[0]:.4f} · about ") and shown[1].endswith(" left")
    assert shown[2] == f"step 2/2 · loss {losses[1]:.4f}"


@pytest.mark.parametrize("step, seconds_per_step, expected", [
    (10, 3.02, "step 10/2000 · loss 0.0500 · about 1 h 40 min left"),  # 1990 steps x 3.02 s = 100.2 min
    (1990, 3.0, "step 1990/2000 · loss 0.0500 · about 1 min left"),  # 30 s
    (1400, 6.0, "step 1400/2000 · loss 0.0500 · about 1 h 00 min left"),
])
def test_time_left_reads_as_minutes_or_hours_and_minutes(comfy, step, seconds_per_step, expected):
    assert pack_module("nodes.training").progress_text(step, 2000, 0.05, seconds_per_step) == expected
