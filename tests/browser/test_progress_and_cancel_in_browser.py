"""Training progress, Cancel and resume, driven from the web UI in a real browser.

The Z-Image workflow is opened from the template browser and shrunk to CPU size on the canvas (see
workflow_inputs.py), with a longer run and a checkpoint every CHECKPOINT_EVERY steps. While DOPSDTrain runs, the
tab title shows its progress ('[N%] DOPSDTrain'); the test clicks the queue bar's Cancel button mid-run, then
checks that training stopped within the roll-out step in flight, that ComfyUI reports DOPSDTrain interrupted, and
that the base MODEL (sampled before and after through the server), the earlier LoRA file and the checkpoints
written before the click are untouched. A second Run with `resume` on continues from the newest checkpoint.
"""
from __future__ import annotations

import json
import re
import shutil
import time

import numpy as np
import safetensors
from PIL import Image

from dopsd_core.checkpoints import CHECKPOINT_FILES, MANIFEST_FILE, checkpoint_damage, load_checkpoint
from tests.browser.workflow_inputs import api_graph, tiny_settings, write_inputs
from devkit.graph import Graph
from devkit.paths import PACK_DIR_NAME, REPO_ROOT

WORKFLOW = REPO_ROOT / "workflows" / "zimage_turbo_dopsd_finetune_then_generate.json"
TAG = "cancel"
STEPS, CHECKPOINT_EVERY, CANCEL_AT = 60, 3, 7
RESUMED_EXTRA_STEPS = 2
EARLIER_LORA = b"an earlier run's LoRA, which a cancelled run must leave alone"


def probe_image(server, base, loader_inputs: dict) -> np.ndarray:
    """A 4-step sample from the loader's MODEL, queued through the server (ComfyUI's cache keeps the loaded MODEL
    across prompts, so this samples the very object that went into training)."""
    g = Graph()
    loader = g.node("DOPSDLoadModel", **loader_inputs)
    positive = g.node("CLIPTextEncode", clip=loader.out(1), text="a probe")
    latent = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    sampled = g.node("KSampler", model=loader, positive=positive, negative=positive, latent_image=latent, seed=5,
                     steps=4, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.node("SaveImage", images=g.node("VAEDecode", samples=sampled, vae=loader.out(2)), filename_prefix="browser_probe")
    reply = server.queue(g.to_api())
    entry = server.wait_history(reply["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    return np.asarray(Image.open(base / "output" / image["subfolder"] / image["filename"]))


def folder_bytes(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_progress(events, node_id: str) -> list[int]:
    return [detail["value"] for _, _, detail in events if str(detail.get("node")) == node_id]


def test_progress_cancel_and_resume_from_the_ui(page, browser_server, comfy_base, artifacts):
    workflow = json.loads(WORKFLOW.read_text())
    graph = api_graph(workflow, browser_server.get("/object_info"))
    write_inputs(comfy_base / "input", graph)
    settings = tiny_settings(graph, TAG)
    [train_id] = [i for i, n in graph.items() if n["class_type"] == "DOPSDTrain"]
    [loader_id] = [i for i, n in graph.items() if n["class_type"] == "DOPSDLoadModel"]
    [save_id] = [i for i, n in graph.items() if n["class_type"] == "DOPSDSaveLoRA"]
    settings[train_id].update(steps=STEPS, checkpoint_every=CHECKPOINT_EVERY, preview_every=0, resume=False)
    checkpoints = comfy_base / "output" / settings[train_id]["checkpoint_folder"]
    shutil.rmtree(checkpoints, ignore_errors=True)
    lora_file = comfy_base / "models" / "loras" / f"{settings[save_id]['lora_name']}.safetensors"
    lora_file.parent.mkdir(parents=True, exist_ok=True)
    lora_file.write_bytes(EARLIER_LORA)
    model_before = probe_image(browser_server, comfy_base, graph[loader_id]["inputs"])

    page.open_template(PACK_DIR_NAME, WORKFLOW.stem, expected_nodes=len(workflow["nodes"]))
    for node_id, values in settings.items():
        page.set_widgets(node_id, values)
    page.clear_events()
    page.run()

    titles, node_texts, deadline = [], [], time.monotonic() + 300
    while True:
        shown = page.title_node_progress()
        if shown and shown[1] == "DOPSDTrain" and (not titles or titles[-1] != shown[0]):
            titles.append(shown[0])
        text = page.node_text(train_id)
        if text and (not node_texts or node_texts[-1] != text):
            node_texts.append(text)
        done = train_progress(page.events("progress"), train_id)
        if done and done[-1] >= CANCEL_AT:
            break
        assert time.monotonic() < deadline and not page.events("execution_error", "execution_success"), \
            (page.events("execution_error"), page.screenshot("no_progress"))
        time.sleep(0.1)
    before_cancel = folder_bytes(checkpoints)
    steps_at_click = train_progress(page.events("progress"), train_id)[-1]
    clicked = page.cancel()
    event, detail = page.wait_finished(120)
    page.screenshot("after_cancel")
    latency = page.events(event)[0][1] / 1000 - clicked
    stamps = [stamp / 1000 for _, stamp, d in page.events("progress") if str(d.get("node")) == train_id]
    step_seconds = float(np.median(np.diff(stamps))) if len(stamps) > 2 else float("nan")

    # The UI showed training advance, in the tab title, on the node (step, loss, time left) and in its progress.
    assert len(titles) >= 3 and titles == sorted(titles), titles
    assert any(re.fullmatch(rf"step \d+/{STEPS} · loss \d+\.\d{{4}} · about \d+ min left", t) for t in node_texts), \
        node_texts
    assert event == "execution_interrupted" and detail["node_type"] == "DOPSDTrain", (event, detail)
    # Stopped within the roll-out step in flight: no further optimizer step completed after the click.
    progress = train_progress(page.events("progress"), train_id)
    assert max(progress) <= steps_at_click + 1, (steps_at_click, progress)
    # DOPSDTrain logs how many steps it completed when it sees the interrupt between roll-out steps; ComfyUI's
    # progress hook may see it first, at the end of an optimizer step (then ComfyUI's own interrupt report stands).
    completed = [int(n) for n in re.findall(r"DOPSDTrain cancelled after (\d+) completed steps", browser_server.log())]
    assert all(n <= steps_at_click + 1 for n in completed), (completed, steps_at_click)
    # The MODEL, the earlier LoRA and the checkpoints are intact; no partial checkpoint is left behind.
    assert lora_file.read_bytes() == EARLIER_LORA
    after_cancel = folder_bytes(checkpoints)
    assert {k: after_cancel.get(k) for k in before_cancel} == before_cancel
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names and all(re.fullmatch(r"step_\d{6}", n) for n in names), names
    for name in names:
        assert {p.name for p in (checkpoints / name).iterdir()} == {*CHECKPOINT_FILES, MANIFEST_FILE}
        assert checkpoint_damage(checkpoints / name) is None
        load_checkpoint(checkpoints / name)
    last = max(int(n.removeprefix("step_")) for n in names)
    assert last >= CHECKPOINT_EVERY and last % CHECKPOINT_EVERY == 0
    assert np.array_equal(probe_image(browser_server, comfy_base, graph[loader_id]["inputs"]), model_before), \
        "the base MODEL changed after a cancelled training run"

    # Resume from the UI: the same workflow, `resume` on, a few steps past the newest checkpoint.
    page.set_widgets(train_id, {"resume": True, "steps": last + RESUMED_EXTRA_STEPS})
    page.clear_events()
    page.run()
    event, detail = page.wait_finished(300)
    page.fit_view()
    page.screenshot("after_resume")
    assert event == "execution_success", detail
    resumed = train_progress(page.events("progress"), train_id)
    assert resumed[0] == last and resumed[-1] == last + RESUMED_EXTRA_STEPS, resumed
    final = last + RESUMED_EXTRA_STEPS
    assert re.fullmatch(rf"step {final}/{final} · loss \d+\.\d{{4}}", page.node_text(train_id) or ""), \
        page.node_text(train_id)
    assert f"resumed from {checkpoints / f'step_{last:06d}'} at step {last}" in browser_server.log()
    with safetensors.safe_open(str(lora_file), "pt") as f:
        assert f.metadata()["dopsd.steps"] == str(last + RESUMED_EXTRA_STEPS)
    print(f"cancel: clicked at step {steps_at_click}, interrupted {latency:.2f}s later (one optimizer step: "
          f"{step_seconds:.2f}s), "
          f"completed {max(progress)} steps; resumed at step {last}; title progress seen: {titles}; "
          f"node text: {node_texts[-1]!r}")
