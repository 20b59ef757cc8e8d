"""FLUX.2-klein edit tuning on (sources, instruction, target) triples, through ComfyUI's executor."""
from __future__ import annotations

import json

import pytest
import safetensors
import torch

from devkit.graph import Graph
from tests.klein.klein_graphs import EDIT_INSTRUCTION, dataset, edit_fine_tune_then_generate, edit_teacher, load_klein
from tests.klein.klein_probe import predict_x0, relative_change, sample_with_noise

LORA_NAME = "dopsd/e2e_klein_edit"
SOURCE_IMAGE = "dopsd/klein_edit/source_0.png"


@pytest.fixture(scope="module")
def edit_run(comfy, klein_edit_folder):
    graph, ids = edit_fine_tune_then_generate(klein_edit_folder, SOURCE_IMAGE, LORA_NAME, steps=2)
    run = comfy.run(graph)
    assert run.success, run.error or run.node_errors
    # Snapshot the outputs: the executor's cache holds only the latest graph's.
    return run, {key: run.output(node_id) for key, node_id in ids.items()}


def test_edit_workflow_trains_saves_and_generates_from_a_source_image(edit_run, comfy_base):
    run, outputs = edit_run
    with safetensors.safe_open(str(comfy_base / "models" / "loras" / f"{LORA_NAME}.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["dopsd.steps"] == "2" and metadata["dopsd.images"] == "2"
    assert set(json.loads(metadata["dopsd.training_sigmas_per_image_size"])) == {"64x64"}
    saved_images = [img for node in run.ui_outputs.values() for img in node.get("images", [])]
    assert any(img["filename"].startswith("dopsd_klein_edit_tuned") for img in saved_images)


def test_student_sees_the_sources_and_the_teacher_also_the_target_as_last_reference(edit_run, comfy):
    run, outputs = edit_run
    clip, vae = outputs["loader"][1], outputs["loader"][2]
    items = outputs["pairs"][0]
    assert [item.name for item in items] == ["target_0.png", "target_1.png"]
    for index, item in enumerate(items):
        source = comfy.nodes.LoadImage().load_image(f"dopsd/klein_edit/source_{index}.png")[0]
        with torch.inference_mode():
            source_latent = vae.encode(source[..., :3]).cpu()
        for pair in item.pairs:
            [[_, student]], [[_, teacher]] = pair.student, pair.teacher
            assert len(student["reference_latents"]) == 1 and len(teacher["reference_latents"]) == 2
            torch.testing.assert_close(student["reference_latents"][0], source_latent, atol=1e-5, rtol=0)
            assert torch.equal(teacher["reference_latents"][0], student["reference_latents"][0])
            assert torch.equal(teacher["reference_latents"][1], item.latent), "the target must be the LAST reference"
            # The text parts: exactly CLIPTextEncode of the instruction (student) and of instruction + " " + the
            # teacher's note (teacher).
            encode = lambda text: comfy.nodes.CLIPTextEncode().encode(clip, text)[0][0][0]  # noqa: E731
            assert torch.equal(pair.student[0][0], encode(pair.prompt))
            assert torch.equal(pair.teacher[0][0], encode(f"{pair.prompt} {EDIT_INSTRUCTION}"))


def test_the_teacher_follows_the_target_the_student_only_the_sources(comfy, klein_edit_folder, klein_edit_variant_folders):
    g = Graph()
    loader = load_klein(g)
    folders = {"base": klein_edit_folder, **klein_edit_variant_folders}
    sets = {name: edit_teacher(g, loader, dataset(g, folder)) for name, folder in folders.items()}
    for training_set in sets.values():
        preview = g.node("DOPSDRolloutPreview", model=loader.out(0), vae=loader.out(2), training_set=training_set,
                         sigmas=loader.out(4), image_index=0, prompt_variant=0, seed=0)
        g.node("PreviewImage", images=preview)
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    model = run.output(loader.node_id)[0]
    pairs = {name: run.output(node.node_id)[0][0].pairs[0] for name, node in sets.items()}
    shape = tuple(run.output(sets["base"].node_id)[0][0].latent.shape)
    names = list(pairs)
    x0 = predict_x0(model, [pairs[n].student for n in names] + [pairs[n].teacher for n in names], shape)
    student, teacher = dict(zip(names, x0[:3])), dict(zip(names, x0[3:]))
    target_moves_teacher = relative_change(teacher["base"], teacher["targets"])
    source_moves_student = relative_change(student["base"], student["sources"])
    print(f"\nklein edit, x0 at sigma 0.7: another target moves the teacher by {target_moves_teacher:.2%} and the "
          f"student by {relative_change(student['base'], student['targets']):.2%}; another source moves the "
          f"student by {source_moves_student:.2%} and the teacher by "
          f"{relative_change(teacher['base'], teacher['sources']):.2%}")
    assert torch.equal(student["base"], student["targets"]), "the student must not see the target"
    assert target_moves_teacher > 0.02
    assert source_moves_student > 0.02 and relative_change(teacher["base"], teacher["sources"]) > 0.02


def test_stock_lora_loader_reproduces_the_trained_edit_model(edit_run, comfy):
    run, outputs = edit_run
    trained_model = outputs["train"][0]
    base_model = outputs["loader"][0]
    stock = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, f"{LORA_NAME}.safetensors", 1.0)[0]
    item = outputs["pairs"][0][0]
    from comfy_extras.nodes_flux import Flux2Scheduler

    sigmas = Flux2Scheduler.execute(4, 64, 64)[0]
    positive, shape = item.pairs[0].student, tuple(item.latent.shape)  # the sources as reference + the instruction
    trained, reloaded, base = (sample_with_noise(m, positive, sigmas, shape, seed=5)
                               for m in (trained_model, stock, base_model))
    assert torch.equal(trained, reloaded), "same bf16 LoRA tensors through the same comfy.lora path: exact"
    assert (trained - base).abs().max() > 1e-3, "the LoRA has no effect"
