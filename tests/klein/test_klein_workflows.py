"""The shipped FLUX.2-klein workflow files run as the web UI would queue them (tests/foundation checks they are current).

Only sizes change for the tiny models (TINY_SETTINGS), plus, on ComfyUI 0.3.75 only, the text encoder: 0.3.75 has no
FLUX.2-klein text encoder (CLIPType FLUX2), so the loader's text_encoder_type "from preset" becomes "lumina2"
(0.3.75's one Qwen3 encoder, which the tiny FLUX.2 DiT is built for there). 0.33 keeps "from preset".
"""
from __future__ import annotations

import json

import numpy as np

import pytest
import safetensors
from PIL import Image

from devkit.paths import REPO_ROOT
from devkit.ui_workflow import input_spec_from_object_info, to_api
from tests.klein.klein_data import save, scene, write_concept_folder, write_edit_folder
from tests.klein.klein_graphs import IMAGE_SCALE_MIN_MEGAPIXELS, TEXT_ENCODER_TYPE_0_3_75, TINY_MEGAPIXELS
from scripts.make_workflows import klein_concept_workflow, klein_edit_workflow

TINY_SETTINGS = {
    "DOPSDLoadModel": {"text_encoder_type": TEXT_ENCODER_TYPE_0_3_75},
    "DOPSDDatasetFromFolder": {"megapixels": TINY_MEGAPIXELS, "bucket_multiple": 16},
    "DOPSDTrain": {"steps": 2, "rank": 4, "alpha": 8.0, "learning_rate": 1e-3, "checkpoint_every": 2,
                   "preview_every": 1, "gradient_accumulation": 1},
    "Flux2Scheduler": {"width": 64, "height": 64},
    "EmptyFlux2LatentImage": {"width": 64, "height": 64},
    "ImageScaleToTotalPixels": {"megapixels": IMAGE_SCALE_MIN_MEGAPIXELS},
}


KLEIN_WORKFLOWS = (klein_concept_workflow, klein_edit_workflow)


def workflow_file(make) -> dict:
    return json.loads((REPO_ROOT / "workflows" / make().file).read_text())


def tiny_graph(comfy, workflow: dict) -> dict:
    graph = to_api(workflow, lambda node_type: input_spec_from_object_info(comfy.object_info(node_type)))
    for node in graph.values():
        inputs = node["inputs"]
        # Widgets fed by a link (the edit's output size, from the source image) keep their link.
        inputs.update({name: value for name, value in TINY_SETTINGS.get(node["class_type"], {}).items()
                       if not isinstance(inputs.get(name), list)})
    return graph


def only(graph: dict, class_type: str) -> str:
    [node_id] = [k for k, v in graph.items() if v["class_type"] == class_type]
    return node_id


@pytest.mark.parametrize("make", KLEIN_WORKFLOWS, ids=lambda make: make.__name__)
def test_workflow_runs_and_ends_in_4_step_generation_with_the_saved_lora(comfy, comfy_base, make):
    workflow = workflow_file(make)
    graph = tiny_graph(comfy, workflow)
    dataset = graph[only(graph, "DOPSDDatasetFromFolder")]["inputs"]["folder"]
    if "DOPSDTeacherContextEdit" in {n["class_type"] for n in graph.values()}:
        write_edit_folder(comfy_base / "input" / dataset)
        image = graph[only(graph, "LoadImage")]["inputs"]["image"]
        assert image == "example.png", "the image every ComfyUI install has in input/"
        save(scene(96, 64, seed=5), comfy_base / "input" / image)  # landscape: the edit's output must follow it
    else:
        write_concept_folder(comfy_base / "input" / dataset)

    # As the UI queues it: the muted stock-loader group is left out; generation samples the saved LoRA in 4 steps.
    assert "LoraLoaderModelOnly" not in {n["class_type"] for n in graph.values()}
    sample = graph[only(graph, "SamplerCustomAdvanced")]["inputs"]
    assert graph[sample["guider"][0]]["inputs"]["model"] == [only(graph, "DOPSDSaveLoRA"), 0]
    assert graph[sample["sigmas"][0]]["class_type"] == "Flux2Scheduler"
    assert graph[sample["sigmas"][0]]["inputs"]["steps"] == 4
    train = graph[only(graph, "DOPSDTrain")]["inputs"]
    assert graph[train["training_set"][0]]["class_type"] == "DOPSDScheduleFlux2PerImage"

    run = comfy.run(graph)
    assert run.success, run.error or run.node_errors or run.validation_error
    lora_name = graph[only(graph, "DOPSDSaveLoRA")]["inputs"]["lora_name"]
    with safetensors.safe_open(str(comfy_base / "models" / "loras" / f"{lora_name}.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["dopsd.steps"] == "2" and metadata["dopsd.base_model"] == "flux-2-klein-4b.safetensors"
    assert "dopsd.training_sigmas_per_image_size" in metadata
    saved = run.ui_outputs[only(graph, "SaveImage")]["images"]
    assert len(saved) == 1 and saved[0]["filename"].startswith(lora_name.split("/")[-1])
    checkpoints = comfy_base / "output" / "dopsd" / "checkpoints" / lora_name.split("/")[-1]
    assert [c.name for c in sorted(checkpoints.iterdir())] == ["step_000002"]
    if make is klein_edit_workflow:
        source_size = run.output(only(graph, "GetImageSize"))[:2]
        with Image.open(comfy_base / "output" / saved[0]["subfolder"] / saved[0]["filename"]) as edited:
            assert edited.size == tuple(side // 16 * 16 for side in source_size), "the output takes the source's size"
        assert source_size[0] > source_size[1], "the landscape source was scaled, not cropped square"

    # Later, as the muted group's note says: unmute it (Ctrl+M) and generate with the stock loader. With its seed set
    # to the generation group's, the stock LoraLoaderModelOnly gives exactly the same image from the saved file.
    for node in workflow["nodes"]:
        node["mode"] = 0
    later = tiny_graph(comfy, workflow)
    for node in later.values():
        if node["class_type"] == "RandomNoise":
            node["inputs"]["noise_seed"] = 42
    assert "LoraLoaderModelOnly" in {n["class_type"] for n in later.values()}
    run = comfy.run(later)
    assert run.success, run.error or run.node_errors or run.validation_error
    [stock_save] = [k for k, v in later.items() if v["class_type"] == "SaveImage" and k not in graph]
    [stock_image] = run.ui_outputs[stock_save]["images"]

    def pixels(image: dict) -> np.ndarray:
        with Image.open(comfy_base / "output" / image["subfolder"] / image["filename"]) as png:
            return np.asarray(png)

    assert np.array_equal(pixels(stock_image), pixels(saved[0])), "the stock loader's image differs from the trained one"
