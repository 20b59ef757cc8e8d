"""Every workflow in workflows/, as an artist meets it: in the real web UI, in a real (headless) browser.

Per workflow: the server's template endpoint lists it under the pack; the template browser opens it with no
missing-node or missing-model dialog and no error toast; the graph the UI would queue is exactly what the headless
converter (devkit/ui_workflow.py) makes of the file; then, with the widgets set to CPU-sized values on the
canvas (workflow_inputs.py: the shipped values, 2000 steps at ~1 MP, would take hours on a CPU), clicking Run
executes it to completion on the tiny models, and a screenshot of the finished canvas is kept as an artifact.
"""
from __future__ import annotations

import json

import pytest
import safetensors

from tests.browser.workflow_inputs import api_graph, tiny_settings, write_inputs
from devkit.example_job import TINY_SETTINGS
from devkit.paths import PACK_DIR_NAME, REPO_ROOT

WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
RUN_TIMEOUT = 400


def comparable(graph: dict) -> dict:
    return {node_id: (node["class_type"], node["inputs"]) for node_id, node in graph.items()}


def inside(box, outer) -> bool:
    (x, y, w, h), (ox, oy, ow, oh) = box, outer
    return ox <= x and oy <= y and x + w <= ox + ow and y + h <= oy + oh


def overlap(a, b) -> bool:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def assert_tidy_canvas(nodes: dict, groups: dict) -> None:
    """With the sizes the web UI itself gives the nodes: each node sits inside one group, and nothing overlaps."""
    for node_id, box in nodes.items():
        homes = [title for title, group in groups.items() if inside(box, group)]
        assert len(homes) == 1, f"node {node_id} {box} lies in groups {homes}, not in exactly one"
    ids = sorted(nodes)
    crowded = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if overlap(nodes[a], nodes[b])]
    assert not crowded, f"overlapping nodes: {crowded}"
    titles = sorted(groups)
    assert not [(a, b) for i, a in enumerate(titles) for b in titles[i + 1:] if overlap(groups[a], groups[b])]


@pytest.mark.parametrize("workflow_file", WORKFLOWS, ids=lambda path: path.stem)
def test_workflow_opens_from_the_template_browser_and_runs(page, browser_server, comfy_base, artifacts, workflow_file):
    name = workflow_file.stem
    workflow = json.loads(workflow_file.read_text())
    object_info = browser_server.get("/object_info")
    expected = api_graph(workflow, object_info)
    write_inputs(comfy_base / "input", expected)

    assert name in browser_server.get("/workflow_templates").get(PACK_DIR_NAME, []), "not listed under the pack"
    page.open_template(PACK_DIR_NAME, name, expected_nodes=len(workflow["nodes"]))
    page.screenshot("loaded")
    assert page.dialogs() == [], "a dialog opened on load (missing nodes or models?)"
    assert page.toasts() == [], "the UI warned about the workflow on load"
    nodes = page.nodes()
    assert {n["type"] for n in nodes} <= set(object_info) | {"MarkdownNote", "Note"}
    # Muted nodes may name what the workflow itself produces (the saved LoRA, for the stock loader group).
    assert [n for n in nodes if n["unavailable"] and n["mode"] == 0] == [], \
        "widgets name files or options the server does not have"
    assert comparable(page.queued_prompt()) == comparable(expected), \
        "the UI would queue another graph than the file describes (widget values shifted?)"
    nodes, groups = page.canvas_boxes()
    (artifacts / "canvas_boxes.json").write_text(json.dumps({"nodes": nodes, "groups": groups}, indent=1))
    assert_tidy_canvas(nodes, groups)

    for node_id, values in tiny_settings(expected, name).items():
        page.set_widgets(node_id, values)
    page.clear_events()
    page.run()
    event, detail = page.wait_finished(RUN_TIMEOUT)
    page.fit_view()
    screenshot = page.screenshot("finished_canvas")
    assert event == "execution_success", (detail, page.dialogs())
    assert page.dialogs() == [], "an error dialog is open after the run"

    entry = browser_server.wait_history(detail["prompt_id"])
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    queued = entry["prompt"][2]  # [number, prompt_id, graph, extra_data, outputs]
    for node_id, node in queued.items():
        if node["class_type"] == "SaveImage":
            assert outputs[node_id]["images"], f"SaveImage {node_id} wrote nothing"
        if node["class_type"] == "DOPSDSaveLoRA":
            lora_file = comfy_base / "models" / "loras" / f"{node['inputs']['lora_name']}.safetensors"
            with safetensors.safe_open(str(lora_file), "pt") as f:
                assert f.metadata()["dopsd.steps"] == str(TINY_SETTINGS["DOPSDTrain"]["steps"])
    assert screenshot.stat().st_size > 10_000
    print(f"finished canvas: {screenshot}")


def test_missing_node_dialog_is_detected(page):
    """Control for the check above: a workflow with a node type nobody registered makes the UI open its
    missing-nodes dialog, and `page.dialogs()` sees it."""
    workflow = json.loads(WORKFLOWS[0].read_text())
    workflow["nodes"][0]["type"] = "DOPSDNoSuchNode"
    page.load_graph_data(workflow)
    dialogs = page.dialogs()
    assert any("DOPSDNoSuchNode" in text for text in dialogs), dialogs


def test_missing_model_warning_is_detected(page):
    """Control for the load check above: a workflow that names a model file the server lacks makes the UI warn
    (a dialog in frontend 1.32, the error overlay in 1.49), and `page.dialogs()` sees it once the page settles."""
    workflow = json.loads(WORKFLOWS[0].read_text())
    missing = {"name": "dopsd_no_such_model.safetensors", "directory": "diffusion_models",
               "url": "https://example.invalid/dopsd_no_such_model.safetensors"}
    loader = next(node for node in workflow["nodes"] if node["type"] == "DOPSDLoadModel")
    loader["widgets_values"][1] = missing["name"]  # what a workflow shared by someone with other files names
    loader["properties"]["models"] = [missing]
    workflow["models"] = [missing]
    page.load_graph_data(workflow)
    dialogs = page.dialogs()
    assert any("dopsd_no_such_model" in text for text in dialogs), dialogs
