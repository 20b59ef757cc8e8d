"""The README's main job: the example Z-Image workflow, headless, on the tiny built-in models.

The graph is the workflow file itself (converted as the web UI converts it on Queue); only sizes change, so a
CPU finishes in minutes: tiny images, a short run, a small rank. Those changes are listed in TINY_SETTINGS.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from devkit.tiny_dataset import write_concept_images
from devkit.tiny_models import write_tiny_models
from devkit.tiny_vlm import write_tiny_vision_towers
from devkit.comfy_runtime import ComfyRuntime, GraphRun
from devkit.paths import REPO_ROOT
from devkit.ui_workflow import input_spec_from_object_info, to_api

WORKFLOW = REPO_ROOT / "workflows" / "zimage_turbo_dopsd_finetune_then_generate.json"
DATASET_FOLDER = "dopsd/my_concept"
TINY_SETTINGS = {
    "DOPSDDatasetFromFolder": {"megapixels": 64 * 64 / 1_000_000, "bucket_multiple": 16},
    # One roll-out per optimizer step instead of the recipe's 4 (8 for klein edit tuning): a CPU-sized batch.
    "DOPSDTrain": {"steps": 12, "rank": 8, "alpha": 16.0, "learning_rate": 1e-3, "checkpoint_every": 6,
                   "preview_every": 4, "gradient_accumulation": 1},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
}


@dataclass
class ExampleResult:
    run: GraphRun
    lora_file: Path
    images: list[Path]
    loss_curve: Path
    losses: list[float]


def prepare_base(base: Path) -> None:
    write_tiny_models(base / "models")
    write_tiny_vision_towers(base / "models")
    write_concept_images(base / "input" / DATASET_FOLDER, count=3)


def workflow_graph(runtime: ComfyRuntime, settings: dict[str, dict]) -> dict:
    """The example workflow as the web UI queues it, with `settings` (class type -> inputs) changed on its nodes."""
    workflow = json.loads(WORKFLOW.read_text())
    graph = to_api(workflow, lambda node_type: input_spec_from_object_info(runtime.object_info(node_type)))
    for node in graph.values():
        node["inputs"].update(settings.get(node["class_type"], {}))
    return graph


def example_graph(runtime: ComfyRuntime) -> dict:
    return workflow_graph(runtime, TINY_SETTINGS)


def node_of(graph: dict, class_type: str) -> str:
    [node_id] = [k for k, v in graph.items() if v["class_type"] == class_type]
    return node_id


def run_example(runtime: ComfyRuntime, results_dir: Path) -> ExampleResult:
    import folder_paths  # ComfyUI's, importable once the runtime is booted

    graph = example_graph(runtime)
    run = runtime.run(graph)
    if not run.success:
        raise RuntimeError(f"the example workflow failed: {run.error or run.node_errors or run.validation_error}")
    results_dir.mkdir(parents=True, exist_ok=True)
    lora_name = graph[node_of(graph, "DOPSDSaveLoRA")]["inputs"]["lora_name"]
    lora_file = Path(folder_paths.get_folder_paths("loras")[0]) / f"{lora_name}.safetensors"
    shutil.copy(lora_file, results_dir / lora_file.name)
    images = []
    for node_id, ui in run.ui_outputs.items():
        for image in ui.get("images", []):
            source = Path(folder_paths.get_directory_by_type(image["type"])) / image["subfolder"] / image["filename"]
            label = "loss_curve" if node_id == node_of(graph, "LossGraphNode") else graph[node_id]["class_type"]
            target = results_dir / f"{label}_{node_id}_{image['filename']}"
            shutil.copy(source, target)
            images.append(target)
    losses = run.output(node_of(graph, "DOPSDTrain"))[2]["loss"]
    (results_dir / "losses.json").write_text(json.dumps(losses))
    [loss_curve] = [p for p in images if p.name.startswith("loss_curve")]
    return ExampleResult(run, results_dir / lora_file.name, [p for p in images if p != loss_curve], loss_curve, losses)
