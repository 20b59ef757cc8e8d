"""What a workflow from workflows/ needs to run on the tiny models from the UI: its input files, and the widget values
that shrink it to CPU size.

The shipped widget values are the real ones (2000 steps, ~1 MP images): far too slow on a CPU. After loading a
workflow in the browser, the tests set these smaller values on the canvas's widgets, as a user would type them,
before clicking Run. Per node type: the README main job's TINY_SETTINGS, plus output names of the test's own (so
the browser runs do not overwrite the files other tests check), and the sizes of FLUX.2 nodes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from devkit.tiny_dataset import write_concept_images
from devkit.example_job import TINY_SETTINGS
from devkit.paths import comfy_version
from devkit.ui_workflow import input_spec_from_object_info, to_api
from tests.klein.klein_graphs import IMAGE_SCALE_MIN_MEGAPIXELS, TEXT_ENCODER_TYPE_0_3_75

TINY_SIZE = {"width": 64, "height": 64}


def tiny_settings(api_graph: dict, tag: str) -> dict[str, dict]:
    """node id -> the widget values to set in the UI before Run."""
    settings = {}
    for node_id, node in api_graph.items():
        kind, values = node["class_type"], dict(TINY_SETTINGS.get(node["class_type"], {}))
        if kind == "DOPSDTrain":
            values["checkpoint_folder"] = f"dopsd/checkpoints/browser_{tag}"
        elif kind == "DOPSDSaveLoRA":
            values["lora_name"] = f"dopsd/browser_{tag}"
        elif kind in ("EmptyFlux2LatentImage", "Flux2Scheduler", "EmptySD3LatentImage"):
            # A size fed by a link (an edit's output follows its source image) stays linked.
            values.update({k: v for k, v in TINY_SIZE.items() if not isinstance(node["inputs"].get(k, []), list)})
        elif kind == "ImageScaleToTotalPixels":
            values["megapixels"] = IMAGE_SCALE_MIN_MEGAPIXELS
        elif (kind == "DOPSDLoadModel" and str(node["inputs"].get("family", "")).startswith("FLUX.2-klein")
              and comfy_version() == "0.3.75"):
            # klein_graphs.py says why; users keep "from preset", as the tests do on 0.33 (native klein encoder).
            values["text_encoder_type"] = TEXT_ENCODER_TYPE_0_3_75
        if values:
            settings[node_id] = values
    return settings


def api_graph(workflow: dict, object_info: dict) -> dict:
    """The workflow converted as the UI converts it on Run (devkit/ui_workflow.py)."""
    return to_api(workflow, lambda node_type: input_spec_from_object_info(object_info[node_type]))


def write_inputs(input_dir: Path, graph: dict) -> None:
    """The dataset folders and images the workflow names, under ComfyUI's input folder."""
    consumers = {}
    for node in graph.values():
        for value in node["inputs"].values():
            if isinstance(value, list) and len(value) == 2:
                consumers.setdefault(str(value[0]), set()).add(node["class_type"])
    for node_id, node in graph.items():
        if node["class_type"] == "DOPSDDatasetFromFolder":
            folder = input_dir / node["inputs"]["folder"]
            if "DOPSDTeacherContextEdit" in consumers.get(node_id, ()):
                write_edit_triples(folder)
            else:
                write_concept_images(folder, count=3)
        elif node["class_type"] == "LoadImage":
            # Replaced even when present (ComfyUI's 768² example.png): a tiny image keeps the CPU run tiny.
            target = input_dir / node["inputs"]["image"]
            target.parent.mkdir(parents=True, exist_ok=True)
            [source, *_] = write_concept_images(input_dir / "dopsd" / "_load_image_sources", count=1)
            shutil.copy(source, target)


def write_edit_triples(folder: Path) -> None:
    """Edit-tuning records (sources -> target + instruction) in metadata.jsonl, the Dataset node's edit format."""
    images = write_concept_images(folder, count=3)
    lines = [{"sources": [images[i].name], "target": images[i + 1].name,
              "prompt": "move the [trigger] disc to the right"} for i in range(2)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
