"""Writes the UI-format example workflows in workflows/ from the short descriptions below.

Widget order, socket types and output names come from the real node definitions (ComfyUI booted in-process
with this pack), so the files match what the web UI itself would save. Run after changing a node's inputs:
    .venv/bin/python scripts/make_workflows.py
"""
from __future__ import annotations

import json
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness.comfy_runtime import ComfyRuntime  # noqa: E402
from tests.harness.paths import make_base_directory  # noqa: E402
from tests.harness.ui_workflow import has_control_widget, is_widget  # noqa: E402

NODE_WIDTH, COLUMN_GAP, ROW_HEIGHT, WIDGET_HEIGHT, TITLE_HEIGHT = 360, 60, 40, 26, 60
GROUP_PADDING, GROUP_TITLE = 20, 50
MUTED = 2


@dataclass
class Node:
    key: str
    type: str
    widgets: dict = field(default_factory=dict)
    links: dict[str, tuple[str, int]] = field(default_factory=dict)
    title: str | None = None
    mode: int = 0


@dataclass
class Group:
    title: str
    note: str
    nodes: list[Node]
    column: int
    row: int = 0


@dataclass
class Workflow:
    file: str
    groups: list[Group]


def zimage_workflow() -> Workflow:
    lora = "dopsd/my_concept"
    return Workflow("zimage_turbo_dopsd_finetune_then_generate.json", [
        Group("1 · Load Z-Image-Turbo", (
            "## 1 · Load the step-distilled model\n"
            "Files from ComfyUI's Z-Image-Turbo release: `diffusion_models/z_image_turbo_bf16.safetensors`, "
            "`text_encoders/qwen_3_4b.safetensors`, `vae/ae.safetensors`.\n\n"
            "Gives the 8-step **inference** schedule and the 4-step D-OPSD **training** schedule "
            "(sigmas 1, .9, .75, .5 → 0). The stock loaders work too."),
            [Node("load", "DOPSDLoadModel", {"family": "Z-Image-Turbo", "diffusion_model": "z_image_turbo_bf16.safetensors",
                                             "text_encoder": "qwen_3_4b.safetensors", "text_encoder_type": "from preset",
                                             "vae": "ae.safetensors"})], column=0),
        Group("2 · Your images", (
            "## 2 · Dataset\n4–20 images in `ComfyUI/input/dopsd/my_concept/`, each with a same-name `.txt` caption: "
            "one prompt variant per line, `[trigger]` where the concept goes. Images are cropped into ~1 MP "
            "aspect-ratio buckets."),
            [Node("dataset", "DOPSDDatasetFromFolder", {"folder": "dopsd/my_concept", "trigger_word": "sks",
                                                        "placeholder": "[trigger]", "megapixels": 1.0,
                                                        "bucket_multiple": 64, "allow_outside_input": False})], column=1),
        Group("3 · Teacher context (VLM)", (
            "## 3 · Teacher = prompt + your image\nQwen3-VL built from Z-Image's own text encoder plus the Qwen3-VL-4B "
            "vision weights (`models/clip_vision/`, see the README). Every image and prompt variant is encoded once; "
            "the VLM is freed afterwards."),
            [Node("teacher", "DOPSDTeacherContextVLM", {"vision_weights": "qwen3_vl_4b_instruct_vision.safetensors"},
                  {"clip": ("load", 1), "vae": ("load", 2), "dataset": ("dataset", 0)})], column=2),
        Group("4 · Look at the teacher first", (
            "## 4 · Preview before training\nThe student's own few-step roll-out; per step: **student | teacher | "
            "target**. The student learns whatever the teacher shows here, artifacts included."),
            [Node("preview", "DOPSDRolloutPreview", {"pair_index": 0, "prompt_variant": 0, "seed": 0},
                  {"model": ("load", 0), "vae": ("load", 2), "training_set": ("teacher", 0), "sigmas": ("load", 4)}),
             Node("preview_image", "PreviewImage", {}, {"images": ("preview", 0)})], column=3),
        Group("5 · Train with D-OPSD", (
            "## 5 · On-policy self-distillation\nDefaults are the authors': rank 64 / alpha 128, AdamW 1e-4, EMA "
            "teacher 0.9999, x0 loss, 2000 steps. Set `checkpoint_every` to resume after a cancel. Switch "
            "`objective` to SFT to compare with plain fine-tuning."),
            [Node("train", "DOPSDTrain", {"checkpoint_every": 250, "checkpoint_folder": f"dopsd/checkpoints/{lora.split('/')[-1]}",
                                          "preview_every": 100},
                  {"model": ("load", 0), "training_set": ("teacher", 0), "training_sigmas": ("load", 4)}),
             Node("loss", "LossGraphNode", {"filename_prefix": "dopsd_loss"}, {"loss": ("train", 2)}),
             Node("train_previews", "VAEDecode", {}, {"samples": ("train", 3), "vae": ("load", 2)}),
             Node("train_preview_image", "PreviewImage", {}, {"images": ("train_previews", 0)})], column=4),
        Group("6 · Save the LoRA, generate in 8 steps", (
            "## 6 · Save and generate\nThe LoRA goes to `models/loras/dopsd/my_concept.safetensors` (Load LoRA lists "
            "it at once) and is applied from the saved file. Generation: 8 steps, CFG 1, as Z-Image-Turbo is meant "
            "to be run."),
            [Node("save", "DOPSDSaveLoRA", {"lora_name": lora, "overwrite": True, "strength": 1.0},
                  {"model": ("load", 0), "lora": ("train", 1)}),
             Node("prompt", "CLIPTextEncode", {"text": "a photo of sks, in a sunlit garden"}, {"clip": ("load", 1)}),
             Node("latent", "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
             Node("sampler", "KSampler", {"seed": 42, "steps": 8, "cfg": 1.0, "sampler_name": "euler",
                                          "scheduler": "simple", "denoise": 1.0},
                  {"model": ("save", 0), "positive": ("prompt", 0), "negative": ("prompt", 0),
                   "latent_image": ("latent", 0)}),
             Node("decode", "VAEDecode", {}, {"samples": ("sampler", 0), "vae": ("load", 2)}),
             Node("save_image", "SaveImage", {"filename_prefix": "dopsd/my_concept"}, {"images": ("decode", 0)})],
            column=5),
        Group("7 · Later: the saved LoRA with the stock loader (unmute with Ctrl+M)", (
            "## 7 · Sharing and reuse\nThis group is muted because the LoRA file only exists after the first run. "
            "Unmute it to generate with the stock **LoraLoaderModelOnly** — any Z-Image-Turbo workflow can load the "
            "LoRA this way."),
            [Node("stock_lora", "LoraLoaderModelOnly", {"lora_name": f"{lora}.safetensors", "strength_model": 1.0},
                  {"model": ("load", 0)}, mode=MUTED),
             Node("stock_sampler", "KSampler", {"seed": 43, "steps": 8, "cfg": 1.0, "sampler_name": "euler",
                                                "scheduler": "simple", "denoise": 1.0},
                  {"model": ("stock_lora", 0), "positive": ("prompt", 0), "negative": ("prompt", 0),
                   "latent_image": ("latent", 0)}, mode=MUTED),
             Node("stock_decode", "VAEDecode", {}, {"samples": ("stock_sampler", 0), "vae": ("load", 2)}, mode=MUTED),
             Node("stock_save", "SaveImage", {"filename_prefix": "dopsd/my_concept_stock"}, {"images": ("stock_decode", 0)},
                  mode=MUTED)], column=5, row=1),
    ])


def widget_values(node: Node, classes) -> list:
    input_types = classes[node.type].INPUT_TYPES()
    values = []
    for section in ("required", "optional"):
        for name, (input_type, *rest) in input_types.get(section, {}).items():
            options = rest[0] if rest else {}
            if not is_widget(input_type) or name in node.links:
                continue
            values.append(node.widgets[name] if name in node.widgets else options.get("default"))
            if has_control_widget(name, input_type, options):
                values.append("fixed")
    unknown = set(node.widgets) - {n for s in input_types.values() for n in s}
    if unknown:
        raise ValueError(f"{node.key}: {node.type} has no inputs {sorted(unknown)}")
    return values


def socket_types(node_type: str, classes) -> dict[str, str]:
    input_types = classes[node_type].INPUT_TYPES()
    return {name: spec[0] for section in ("required", "optional") for name, spec in input_types.get(section, {}).items()}


def build(workflow: Workflow, classes) -> dict:
    all_nodes = [n for g in workflow.groups for n in g.nodes]
    ids = {n.key: i for i, n in enumerate(all_nodes, start=1)}
    links = []  # [id, from_node, from_slot, to_node, to_slot, type], as the UI saves them
    for node in all_nodes:
        types = socket_types(node.type, classes)
        for slot, (name, (source, source_slot)) in enumerate(node.links.items()):
            links.append([len(links) + 1, ids[source], source_slot, ids[node.key], slot, types[name]])
    nodes, groups = [], []
    row_tops = {0: 0.0, 1: 1100.0}
    for group in workflow.groups:
        x = group.column * (NODE_WIDTH + 2 * GROUP_PADDING + COLUMN_GAP)
        y = row_tops[group.row] + GROUP_TITLE
        note_height = 220
        nodes.append({"id": len(all_nodes) + len(groups) + 1, "type": "MarkdownNote", "pos": [x + GROUP_PADDING, y],
                      "size": [NODE_WIDTH, note_height], "flags": {}, "order": 0, "mode": 0, "inputs": [],
                      "outputs": [], "properties": {}, "widgets_values": [group.note],
                      "color": "#432", "bgcolor": "#653"})
        y += note_height + ROW_HEIGHT
        for node in group.nodes:
            cls = classes[node.type]
            values = widget_values(node, classes)
            height = TITLE_HEIGHT + WIDGET_HEIGHT * (len(values) + len(cls.RETURN_TYPES))
            node_id = ids[node.key]
            node_inputs = [{"name": list(node.links)[link[4]], "type": link[5], "link": link[0]}
                           for link in links if link[3] == node_id]
            output_names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
            node_outputs = [{"name": output_names[i], "type": t, "slot_index": i,
                             "links": [l[0] for l in links if l[1] == node_id and l[2] == i]}
                            for i, t in enumerate(cls.RETURN_TYPES)]
            entry = {"id": node_id, "type": node.type, "pos": [x + GROUP_PADDING, y], "size": [NODE_WIDTH, height],
                     "flags": {}, "order": node_id, "mode": node.mode, "inputs": node_inputs, "outputs": node_outputs,
                     "properties": {"Node name for S&R": node.type}, "widgets_values": values}
            if node.title:
                entry["title"] = node.title
            nodes.append(entry)
            y += height + ROW_HEIGHT
        top = row_tops[group.row]
        groups.append({"id": len(groups) + 1, "title": group.title,
                       "bounding": [x, top, NODE_WIDTH + 2 * GROUP_PADDING, y - top],
                       "color": "#3f789e", "font_size": 22, "flags": {}})
    # The web UI validates workflows and warns unless "id" is a UUID; a name-based one keeps the files reproducible.
    workflow_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-dopsd/workflows/" + workflow.file))
    return {"id": workflow_id, "revision": 0, "last_node_id": len(nodes),
            "last_link_id": len(links), "nodes": nodes, "links": links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}}, "version": 0.4}


def main() -> None:
    runtime = ComfyRuntime.boot(make_base_directory(Path(tempfile.mkdtemp(prefix="dopsd_make_workflows_"))))
    classes = runtime.nodes.NODE_CLASS_MAPPINGS
    out_dir = REPO / "workflows"
    out_dir.mkdir(exist_ok=True)
    for workflow in (zimage_workflow(),):
        path = out_dir / workflow.file
        path.write_text(json.dumps(build(workflow, classes), indent=1) + "\n")
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
