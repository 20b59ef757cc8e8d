"""The pack loads into the real ComfyUI, and stock graphs run on the tiny real-architecture checkpoints."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from devkit.graph import Graph
from devkit.paths import PACK_DIR_NAME


def stock_zimage_graph(prompt: str, prefix: str, seed: int = 1) -> dict:
    g = Graph()
    model = g.node("UNETLoader", unet_name="z_image_turbo_bf16.safetensors", weight_dtype="default")
    clip = g.node("CLIPLoader", clip_name="qwen_3_4b.safetensors", type="lumina2", device="default")
    vae = g.node("VAELoader", vae_name="ae.safetensors")
    positive = g.node("CLIPTextEncode", clip=clip, text=prompt)
    latent = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    sampled = g.node("KSampler", model=model, positive=positive, negative=positive, latent_image=latent, seed=seed,
                     steps=4, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    image = g.node("VAEDecode", samples=sampled, vae=vae)
    g.node("SaveImage", images=image, filename_prefix=prefix)
    return g.to_api()


def saved_images(base: Path, ui_outputs: dict) -> list[np.ndarray]:
    images = [img for out in ui_outputs.values() for img in out.get("images", [])]
    return [np.asarray(Image.open(base / "output" / img["subfolder"] / img["filename"])) for img in images]


def test_pack_registers_its_nodes_without_import_errors(comfy):
    # LOADED_MODULE_DIRS only gets packs whose import succeeded.
    assert PACK_DIR_NAME in comfy.nodes.LOADED_MODULE_DIRS
    assert "DOPSDLoadModel" in comfy.nodes.NODE_CLASS_MAPPINGS
    assert comfy.node_class("DOPSDLoadModel").RELATIVE_PYTHON_MODULE == f"custom_nodes.{PACK_DIR_NAME}"


def test_stock_zimage_graph_runs_in_process(comfy, comfy_base):
    run_a = comfy.run(stock_zimage_graph("a red fox in the snow", "stock_a"))
    run_b = comfy.run(stock_zimage_graph("a lighthouse at night", "stock_b"))
    assert run_a.success and run_b.success, (run_a.error, run_b.error)
    [image_a], [image_b] = saved_images(comfy_base, run_a.ui_outputs), saved_images(comfy_base, run_b.ui_outputs)
    assert image_a.shape == (64, 64, 3)
    assert image_a.std() > 0, "decoded image is flat"
    assert not np.array_equal(image_a, image_b), "the prompt does not reach the tiny Z-Image model"


def test_server_lists_pack_nodes_and_runs_stock_graph(comfy_server, comfy_base):
    info = comfy_server.get("/object_info")
    loader = info["DOPSDLoadModel"]
    assert loader["python_module"] == f"custom_nodes.{PACK_DIR_NAME}"
    assert loader["category"] == "D-OPSD"
    assert set(loader["output_name"]) >= {"MODEL", "CLIP", "VAE", "inference_sigmas", "training_sigmas"}

    templates = comfy_server.get("/workflow_templates")
    assert "zimage_turbo_dopsd_finetune_then_generate" in templates[PACK_DIR_NAME]

    reply = comfy_server.queue(stock_zimage_graph("a red fox in the snow", "served"))
    assert "prompt_id" in reply, reply
    entry = comfy_server.wait_history(reply["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = saved_images(comfy_base, entry["outputs"])
    assert image.shape == (64, 64, 3) and image.std() > 0
