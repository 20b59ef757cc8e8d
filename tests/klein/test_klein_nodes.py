"""The klein nodes' inputs: version isolation, reference-latent attachment, edit-triple datasets, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from devkit.graph import Graph
from tests.node_errors import node_error_message
from tests.klein.klein_data import save, scene
from tests.klein.klein_graphs import (
    PUBLISHED_SCHEDULE,
    TRAIN_DEFAULTS,
    dataset,
    edit_teacher,
    load_klein,
    per_image_schedule,
    reference_teacher,
)
from devkit.comfy_runtime import pack_module
from dopsd_core import flux2_klein_sigmas, flux2_klein_training_sigmas


def run_to_preview(comfy, build):
    """Run a graph whose last training set feeds a roll-out preview (so the graph has an output)."""
    g = Graph()
    loader = load_klein(g)
    training_set = build(g, loader)
    preview = g.node("DOPSDRolloutPreview", model=loader.out(0), vae=loader.out(2), training_set=training_set,
                     sigmas=loader.out(4), image_index=0, prompt_variant=0, seed=0)
    g.node("PreviewImage", images=preview)
    return comfy.run(g.to_api())


def test_flux2_text_encoder_type_is_looked_up_in_one_place(comfy):
    import comfy.sd

    compat = pack_module("nodes.comfy_compat")
    assert compat.clip_type("lumina2") is comfy.sd.CLIPType.LUMINA2
    assert compat.clip_type("FLUX2") is getattr(comfy.sd.CLIPType, "FLUX2", None)


def test_klein_preset_on_a_comfyui_without_the_klein_encoder_says_to_update(comfy):
    if pack_module("nodes.comfy_compat").clip_type("FLUX2") is not None:
        pytest.skip("this ComfyUI has the FLUX.2-klein text encoder")
    g = Graph()
    loader = load_klein(g, text_encoder_type="from preset")
    g.node("PreviewAny", source=loader.out(4))
    message = node_error_message(comfy.run(g.to_api()), "DOPSDLoadModel")
    assert "this ComfyUI has no text-encoder type 'flux2'" in message
    assert "update ComfyUI" in message


def test_reference_latents_are_attached_as_chained_reference_latent_nodes_would(comfy):
    compat = pack_module("nodes.comfy_compat")
    reference_latent = comfy.node_class("ReferenceLatent")
    text = [[torch.randn(1, 5, 8), {"pooled_output": None}]]
    a, b = torch.randn(1, 128, 4, 4), torch.randn(1, 128, 3, 5)
    chained = reference_latent.execute(reference_latent.execute(text, {"samples": a})[0], {"samples": b})[0]
    ours = compat.with_reference_latents(compat.with_reference_latents(text, [a]), [b])
    assert compat.reference_latents(ours) == [[a, b]] and compat.reference_latents(chained) == [[a, b]]
    assert all(x is y for x, y in zip(ours[0][1]["reference_latents"], chained[0][1]["reference_latents"]))
    assert compat.with_reference_latents(text, []) is text
    assert "reference_latents" not in text[0][1], "the input conditioning is not modified"


AUTHORS_CONCEPT_INSTRUCTION = ("Make the main subject (facial/ip details), background, and overall composition "
                               "consistent with the reference image.")
AUTHORS_EDIT_INSTRUCTION = ("Note that the last image is the output image I expect to be. Your output must be as "
                            "similar as the last reference image, based on the first reference image and the editing "
                            "instructions.")


@pytest.mark.parametrize(
    "prompt, instruction, expected",
    [
        ("a photo of sks", "Keep it.", "a photo of sks Keep it."),
        ("Where is sks?", "Keep it.", "Where is sks? Keep it."),
        ("a photo of sks", "  ", "a photo of sks"),
    ],
)
def test_the_instruction_follows_the_prompt_after_one_space_as_the_authors_join_them(prompt, instruction, expected):
    assert pack_module("nodes.teacher_reference").append_instruction(prompt, instruction) == expected


def test_the_teacher_instructions_default_to_the_authors_strings_verbatim():
    module = pack_module("nodes.teacher_reference")
    defaults = {node: {i.id: getattr(i, "default", None) for i in getattr(module, node).define_schema().inputs}["instruction"]
                for node in ("DOPSDTeacherContextReference", "DOPSDTeacherContextEdit")}
    assert defaults == {"DOPSDTeacherContextReference": AUTHORS_CONCEPT_INSTRUCTION,
                        "DOPSDTeacherContextEdit": AUTHORS_EDIT_INSTRUCTION}


def test_each_teacher_node_refuses_the_other_dataset_layout(comfy, klein_concept_folder, klein_edit_folder):
    run = run_to_preview(comfy, lambda g, loader: reference_teacher(g, loader, dataset(g, klein_edit_folder)))
    message = node_error_message(run, "DOPSDTeacherContextReference")
    assert "2 item(s) are edit triples" in message and "Edit Tuning" in message
    run = run_to_preview(comfy, lambda g, loader: edit_teacher(g, loader, dataset(g, klein_concept_folder)))
    message = node_error_message(run, "DOPSDTeacherContextEdit")
    assert "2 item(s) have no source images" in message and '"sources"' in message


@pytest.mark.parametrize(
    "line, problem",
    [
        ({"target": "b.png", "prompt": "x"}, "line 2: an edit triple needs 'sources'"),
        ({"sources": ["a.png"], "prompt": "x"}, "line 2: an edit triple needs 'sources'"),
        ({"sources": ["a.png", "missing.png"], "target": "b.png", "prompt": "x"}, "line 2 names 'missing.png'"),
        ({"sources": ["a.png"], "target": "b.png", "prompts": "x y".split() + [3]}, "line 2: 'prompts' must be"),
        ({"sources": ["a.png"], "target": "b.png"}, "empty caption for: b.png"),
    ],
)
def test_bad_edit_metadata_lines_are_explained(comfy, comfy_base, line, problem):
    folder = comfy_base / "input" / "dopsd" / "klein_bad_edit"
    save(scene(64, 64, 1), folder / "a.png"), save(scene(64, 64, 2), folder / "b.png")
    good = {"sources": ["a.png"], "target": "b.png", "prompt": "move it"}
    (folder / "metadata.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    run = run_to_preview(comfy, lambda g, loader: edit_teacher(g, loader, dataset(g, "dopsd/klein_bad_edit")))
    message = node_error_message(run, "DOPSDDatasetFromFolder")
    assert problem in message and "How to fix" in message


def test_edit_triples_with_several_sources_keep_their_order(comfy, comfy_base):
    folder = comfy_base / "input" / "dopsd" / "klein_two_sources"
    for name, seed, size in (("first.png", 1, (64, 64)), ("second.png", 2, (96, 64)), ("out.png", 3, (64, 64))):
        save(scene(*size, seed), folder / name)
    (folder / "metadata.jsonl").write_text(json.dumps(
        {"sources": ["first.png", "second.png"], "target": "out.png", "prompt": "combine [trigger]"}) + "\n")
    g = Graph()
    loader = load_klein(g)
    training_set = edit_teacher(g, loader, dataset(g, "dopsd/klein_two_sources", trigger_word="sks"))
    g.node("PreviewAny", source=training_set)
    run = comfy.run(g.to_api())
    assert run.success, run.error
    [item] = run.output(training_set.node_id)[0]
    [[_, student]], [[_, teacher]] = item.pairs[0].student, item.pairs[0].teacher
    assert item.pairs[0].prompt == "combine sks"
    # Each source at its own aspect bucket: 64x64 px and 80x48 px -> 4x4 and 3x5 latents.
    assert [tuple(r.shape[2:]) for r in student["reference_latents"]] == [(4, 4), (3, 5)]
    assert [tuple(r.shape[2:]) for r in teacher["reference_latents"]] == [(4, 4), (3, 5), (4, 4)]
    assert torch.equal(teacher["reference_latents"][2], item.latent)


def test_train_refuses_per_image_schedules_with_another_step_count(comfy, klein_reference_folders):
    g = Graph()
    loader = load_klein(g)
    three_steps = g.node("Flux2Scheduler", steps=3, width=64, height=64)
    scheduled = g.node("DOPSDScheduleFlux2PerImage", training_set=reference_teacher(
        g, loader, dataset(g, klein_reference_folders[0])), training_sigmas=three_steps, schedule=PUBLISHED_SCHEDULE)
    trained = g.node("DOPSDTrain", model=loader.out(0), training_set=scheduled, training_sigmas=loader.out(4),
                     **TRAIN_DEFAULTS)
    g.node("PreviewAny", source=trained.out(1))
    message = node_error_message(comfy.run(g.to_api()), "DOPSDTrain")
    assert "per-image schedules have [3] steps but training_sigmas has 4" in message


def test_preview_rolls_each_image_out_on_its_own_schedule_as_training_does(comfy, klein_reference_folders):
    g = Graph()
    loader = load_klein(g)
    pairs = reference_teacher(g, loader, dataset(g, klein_reference_folders[0]))  # one 64x64 image
    scheduled = per_image_schedule(g, loader, pairs, "sampling grid")

    def preview(training_set, sigmas):
        node = g.node("DOPSDRolloutPreview", model=loader.out(0), vae=loader.out(2), training_set=training_set,
                      sigmas=sigmas, image_index=0, prompt_variant=0, seed=0)
        g.node("PreviewImage", images=node)
        return node

    per_image = preview(scheduled, loader.out(4))
    stock_64px = preview(pairs, g.node("Flux2Scheduler", steps=4, width=64, height=64))
    preset_1024px = preview(pairs, loader.out(4))
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    states = {name: run.output(node.node_id)[1]["samples"]
              for name, node in (("per_image", per_image), ("stock", stock_64px), ("preset", preset_1024px))}
    torch.testing.assert_close(states["per_image"], states["stock"], atol=1e-5, rtol=1e-5)
    assert (states["per_image"] - states["preset"]).abs().max() > 1e-3, "the preset's 1024² schedule was used"


def test_per_image_schedules_are_the_authors_or_the_sampling_grid_at_each_image_size(comfy, klein_concept_folder):
    g = Graph()
    loader = load_klein(g)
    pairs = reference_teacher(g, loader, dataset(g, klein_concept_folder))  # 80x48 and 64x64 px
    schedules = {"published": flux2_klein_training_sigmas, "sampling": flux2_klein_sigmas}
    nodes = {name: per_image_schedule(g, loader, pairs, choice)
             for name, choice in zip(schedules, (PUBLISHED_SCHEDULE, "sampling grid"))}
    for node in nodes.values():
        g.node("PreviewAny", source=node)
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    for name, schedule in schedules.items():
        items = run.output(nodes[name].node_id)[0]
        assert sorted(tuple(item.image.shape[1:3]) for item in items) == [(48, 80), (64, 64)]
        for item in items:
            height, width = item.image.shape[1:3]
            assert torch.equal(item.sigmas, schedule(4, height * width // 256)), (name, height, width)


def test_preview_refuses_per_image_schedules_with_another_step_count(comfy, klein_reference_folders):
    g = Graph()
    loader = load_klein(g)
    scheduled = g.node("DOPSDScheduleFlux2PerImage", training_set=reference_teacher(
        g, loader, dataset(g, klein_reference_folders[0])), training_sigmas=loader.out(4), schedule=PUBLISHED_SCHEDULE)
    three_steps = g.node("Flux2Scheduler", steps=3, width=64, height=64)
    preview = g.node("DOPSDRolloutPreview", model=loader.out(0), vae=loader.out(2), training_set=scheduled,
                     sigmas=three_steps, image_index=0, prompt_variant=0, seed=0)
    g.node("PreviewImage", images=preview)
    message = node_error_message(comfy.run(g.to_api()), "DOPSDRolloutPreview")
    assert "per-image schedules have [4] steps but sigmas has 3" in message
