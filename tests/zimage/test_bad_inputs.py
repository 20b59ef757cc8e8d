"""Bad input gives a clear node error (which node, what is wrong, how to fix it) and changes nothing."""
from __future__ import annotations

import shutil

import pytest

from devkit.tiny_dataset import write_concept_images
from devkit.tiny_vlm import MISMATCHED_VISION_FILE
from devkit.graph import Graph
from tests.node_errors import assert_node_error
from tests.zimage.zimage_graphs import TINY_MEGAPIXELS, load_family, train, training_set


def training_graph(folder: str, **train_overrides) -> dict:
    g = Graph()
    loader = load_family(g)
    trained = train(g, loader, training_set(g, loader, folder), **train_overrides)
    g.node("LossGraphNode", loss=trained.out(2), filename_prefix="bad")
    return g.to_api()


@pytest.mark.parametrize("case, fragment", [
    ("missing", "does not exist"),
    ("empty", "no images found"),
    ("no_caption", "have no caption file: concept_1.png"),
    ("unreadable", "cannot read the image 'concept_0.png'"),
])
def test_dataset_folder_problems(comfy, comfy_base, user_files, case, fragment):
    folder = comfy_base / "input" / "dopsd" / f"bad_{case}"
    shutil.rmtree(folder, ignore_errors=True)
    if case != "missing":
        folder.mkdir(parents=True)
    if case in ("no_caption", "unreadable"):
        write_concept_images(folder)
    if case == "no_caption":
        (folder / "concept_1.txt").unlink()
    if case == "unreadable":
        (folder / "concept_0.png").write_bytes(b"not a png at all")
    assert_node_error(comfy.run(training_graph(f"dopsd/bad_{case}")), "DOPSDDatasetFromFolder", fragment)


def test_dataset_folder_outside_input_is_refused(comfy, comfy_base, tmp_path, user_files):
    write_concept_images(tmp_path / "elsewhere")
    assert_node_error(comfy.run(training_graph(str(tmp_path / "elsewhere"))), "DOPSDDatasetFromFolder",
                      "outside ComfyUI's input folder", "allow_outside_input")


def test_image_and_caption_count_mismatch(comfy, comfy_base, user_files):
    write_concept_images(comfy_base / "input" / "batch_source")
    shutil.copy(comfy_base / "input" / "batch_source" / "concept_0.png", comfy_base / "input" / "batch_source.png")
    g = Graph()
    loader = load_family(g)
    image = g.node("LoadImage", image="batch_source.png")
    batch = g.node("RepeatImageBatch", image=image, amount=2)
    dataset = g.node("DOPSDDatasetFromImages", images=batch, captions="a\n---\nb\n---\nc", trigger_word="",
                     placeholder="[trigger]", megapixels=TINY_MEGAPIXELS, bucket_multiple=16)
    pairs = g.node("DOPSDTeacherContextVLM", clip=loader.out(1), vae=loader.out(2), dataset=dataset,
                   vision_weights="qwen3_vl_4b_instruct_vision.safetensors")
    g.node("LossGraphNode", loss=train(g, loader, pairs).out(2), filename_prefix="bad")
    assert_node_error(comfy.run(g.to_api()), "DOPSDDatasetFromImages", "2 images but 3 caption blocks")


def test_vision_file_that_does_not_match_the_text_encoder(comfy, concept_folder, user_files):
    g = Graph()
    loader = load_family(g)
    pairs = training_set(g, loader, concept_folder, vision=MISMATCHED_VISION_FILE.split("/", 1)[1])
    g.node("LossGraphNode", loss=train(g, loader, pairs).out(2), filename_prefix="bad")
    assert_node_error(comfy.run(g.to_api()), "DOPSDTeacherContextVLM", "another Qwen3-VL size", "Qwen3-VL-4B-Instruct")


def test_model_that_is_not_a_flow_model(comfy, concept_folder, user_files):
    g = Graph()
    loader = load_family(g)
    eps_model = g.node("ModelSamplingDiscrete", model=loader.out(0), sampling="eps", zsnr=False)
    trained = train(g, loader, training_set(g, loader, concept_folder), model=eps_model)
    g.node("LossGraphNode", loss=trained.out(2), filename_prefix="bad")
    assert_node_error(comfy.run(g.to_api()), "DOPSDTrain", "not a flow-matching model")


def test_sigmas_that_do_not_end_at_zero(comfy, concept_folder, user_files):
    g = Graph()
    loader = load_family(g)
    high_sigmas = g.node("SplitSigmas", sigmas=loader.out(4), step=2)
    trained = train(g, loader, training_set(g, loader, concept_folder), training_sigmas=high_sigmas)
    g.node("LossGraphNode", loss=trained.out(2), filename_prefix="bad")
    assert_node_error(comfy.run(g.to_api()), "DOPSDTrain", "must end at exactly 0")


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute_lora", "dopsd/../../escaped"])
def test_lora_name_outside_the_loras_folder_is_refused(comfy, concept_folder, comfy_base, user_files, name):
    g = Graph()
    loader = load_family(g)
    trained = train(g, loader, training_set(g, loader, concept_folder))
    g.node("DOPSDSaveLoRA", model=loader.out(0), lora=trained.out(1), lora_name=name, overwrite=True, strength=1.0)
    assert_node_error(comfy.run(g.to_api()), "DOPSDSaveLoRA", "outside")
    assert not (comfy_base / "models" / "escaped.safetensors").exists()
