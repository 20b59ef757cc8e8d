"""The shipped Z-Image workflow file runs as the README's main job runs it (tests/foundation checks it is current)."""
from __future__ import annotations

import json

import safetensors

from devkit.example_job import TINY_SETTINGS, WORKFLOW, example_graph, prepare_base, run_example


def test_converted_workflow_has_every_active_node_and_no_muted_one(comfy):
    workflow = json.loads(WORKFLOW.read_text())
    graph = example_graph(comfy)
    active = {str(n["id"]) for n in workflow["nodes"] if n["mode"] == 0 and n["type"] != "MarkdownNote"}
    assert set(graph) == active
    assert "LoraLoaderModelOnly" not in {n["class_type"] for n in graph.values()}
    train = next(n for n in graph.values() if n["class_type"] == "DOPSDTrain")
    assert train["inputs"]["objective"] == "D-OPSD" and train["inputs"]["ema_decay"] == 0.9999
    assert train["inputs"]["steps"] == TINY_SETTINGS["DOPSDTrain"]["steps"]


def test_example_job_writes_lora_images_and_loss_curve(comfy, comfy_base, tmp_path):
    prepare_base(comfy_base)
    result = run_example(comfy, tmp_path / "results")
    with safetensors.safe_open(str(result.lora_file), "pt") as f:
        assert f.metadata()["dopsd.steps"] == str(TINY_SETTINGS["DOPSDTrain"]["steps"])
    assert len(result.losses) == TINY_SETTINGS["DOPSDTrain"]["steps"]
    assert result.loss_curve.stat().st_size > 0
    assert any(p.name.startswith("SaveImage") for p in result.images)
    checkpoints = sorted((comfy_base / "output" / "dopsd" / "checkpoints" / "my_concept").iterdir())
    assert [c.name for c in checkpoints] == ["step_000006", "step_000012"]
