"""Writes every example workflow in workflows/ (UI format) from the short descriptions below.

Widget order, socket types and output names come from the real node definitions (ComfyUI booted in-process with
this pack, scripts/workflow_builder.py), so the files match what the web UI itself would save. Run after changing a
node's inputs:
    .venv/bin/python scripts/make_workflows.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Appended, not prepended: in a test session ComfyUI's own `nodes` module must stay ahead of this repo's `nodes/`.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from scripts.workflow_builder import MUTED, Group, Node, Workflow, build  # noqa: E402


def families():
    """The pack's family presets, as ComfyUI imported the pack (needs the booted runtime)."""
    from devkit.comfy_runtime import pack_module

    return pack_module("nodes.families")


def recipe_widgets(recipe) -> dict:
    """The authors' optimisation settings for DOPSDTrain's widgets."""
    return {"steps": recipe.steps, "learning_rate": recipe.learning_rate,
            "gradient_accumulation": recipe.gradient_accumulation}


def concept_dataset_group(folder: str) -> Group:
    return Group("2 · Your images", (
        f"## 2 · Dataset\n4–20 images in `ComfyUI/input/{folder}/`, each with a same-name `.txt` caption: one prompt "
        "variant per line, `[trigger]` where the concept goes. Images are cropped into ~1 MP aspect-ratio buckets."),
        [dataset_node(folder)], column=1)


def dataset_node(folder: str) -> Node:
    return Node("dataset", "DOPSDDatasetFromFolder", {"folder": folder, "trigger_word": "sks", "placeholder": "[trigger]",
                                                      "megapixels": 1.0, "bucket_multiple": 64,
                                                      "allow_outside_input": False})


def zimage_workflow() -> Workflow:
    lora = "dopsd/my_concept"
    return Workflow("zimage_turbo_dopsd_finetune_then_generate.json", [
        Group("1 · Load Z-Image-Turbo", (
            "## 1 · Load the step-distilled model\n"
            "Files from ComfyUI's Z-Image-Turbo release: `diffusion_models/z_image_turbo_bf16.safetensors`, "
            "`text_encoders/qwen_3_4b.safetensors`, `vae/ae.safetensors`.\n\n"
            "Gives the 8-step **inference** schedule and the authors' 4-step D-OPSD **training** schedule "
            "(sigmas 1, .9, .75, .5 → 0; `training_schedule` 'sampling grid' trains on the 8 steps instead). The "
            "stock loaders work too.\n\n"
            "Less VRAM: `weight_dtype` fp8_e4m3fn keeps the model's weights in fp8 (half the memory); the LoRA still "
            "trains in full precision and works on the bf16 model too."),
            [Node("load", "DOPSDLoadModel", {"family": "Z-Image-Turbo", "diffusion_model": "z_image_turbo_bf16.safetensors",
                                             "text_encoder": "qwen_3_4b.safetensors", "text_encoder_type": "from preset",
                                             "vae": "ae.safetensors",
                                             "training_schedule": families().PUBLISHED_SCHEDULE,
                                             "weight_dtype": "default"})], column=0),
        concept_dataset_group("dopsd/my_concept"),
        Group("3 · Teacher context (VLM)", (
            "## 3 · Teacher = prompt + your image\nQwen3-VL built from Z-Image's own text encoder plus the Qwen3-VL-4B "
            "vision weights (`models/clip_vision/`, see the README). Every image and prompt variant is encoded once; "
            "the VLM is freed afterwards."),
            [Node("teacher", "DOPSDTeacherContextVLM", {"vision_weights": "qwen3_vl_4b_instruct_vision.safetensors"},
                  {"clip": ("load", 1), "vae": ("load", 2), "dataset": ("dataset", 0)})], column=2),
        Group("4 · Look at the teacher first", (
            "## 4 · Preview before training\nThe student's own few-step roll-out; per step: **student | teacher | "
            "target**. The student learns whatever the teacher shows here, artifacts included."),
            [Node("preview", "DOPSDRolloutPreview", {"image_index": 0, "prompt_variant": 0, "seed": 0},
                  {"model": ("load", 0), "vae": ("load", 2), "training_set": ("teacher", 0), "sigmas": ("load", 4)}),
             Node("preview_image", "PreviewImage", {}, {"images": ("preview", 0)})], column=3),
        Group("5 · Train with D-OPSD", (
            "## 5 · On-policy self-distillation\nThe authors' Z-Image recipe: rank 64 / alpha 128 (gaussian init; "
            "separate q, k, v adapters) on attention and feed-forward, AdamW 1e-4, gradient accumulation 4 (their "
            "batch of 4 GPUs), EMA teacher 0.9999, x0 loss, 2000 steps. Set `checkpoint_every` to resume after a "
            f"cancel. Switch `objective` to SFT to compare with plain fine-tuning.\n\n{TRAINING_MEMORY_NOTE}"),
            [Node("train", "DOPSDTrain", {**recipe_widgets(families().ZIMAGE_TURBO.recipe), "checkpoint_every": 250,
                                          "checkpoint_folder": f"dopsd/checkpoints/{lora.split('/')[-1]}",
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
                  mode=MUTED)], column=5, order_in_column=1),
    ])


# FLUX.2-klein: the editing-branch teacher (concept LoRA) and edit tuning, both ending in 4-step generation.

KLEIN_CONCEPT_FILE = "klein_dopsd_concept_lora_then_generate.json"
KLEIN_EDIT_FILE = "klein_dopsd_edit_tuning_then_generate.json"
KLEIN_GENERATION_SIZE = 1024

KLEIN_LOAD_NOTE = (
    "## 1 · Load FLUX.2-klein\n"
    "Files from ComfyUI's FLUX.2-klein 4B release: `diffusion_models/flux-2-klein-4b.safetensors`, "
    "`text_encoders/qwen_3_4b.safetensors`, `vae/flux2-vae.safetensors` (9B: pick the 9B preset, "
    "`flux-2-klein-9b.safetensors` and `qwen_3_8b.safetensors`).\n\n"
    "Needs a ComfyUI with FLUX.2-klein support (text-encoder type `flux2`). Gives klein's 4-step **inference** "
    "schedule and the authors' 4-step **training** schedule, both for 1024×1024. The authors rolled out on another "
    "grid than klein samples with (at 1024²: 1, .952, .832, .0098 against 1, .967, .908, .767); `training_schedule` "
    "'sampling grid' trains on the sampling one."
)
TRAINING_MEMORY_NOTE = (
    "Memory: before the first step the node measures what the run needs and shows it on the node; if the GPU "
    "(or `memory_limit_gb`) cannot hold it, it stops at once and names settings that fit (gradient checkpointing, "
    "fp8 weights, fewer megapixels). `start_from_lora` continues from a LoRA this node trained (a second round, or "
    "D-OPSD on top of an SFT LoRA)."
)
KLEIN_SCHEDULE_NOTE = (
    "Klein's schedule shifts with the image size (its token count, height/16 · width/16), and aspect buckets "
    "differ: **Training Schedule per Image Size** gives every image its own 4-step schedule for that size. Keep its "
    "`schedule` the same as the loader's `training_schedule`.\n\n"
    "Less VRAM: `weight_dtype` fp8_e4m3fn keeps the weights in fp8 (klein 9B: about 9 GB instead of 18); the LoRA "
    "still trains in full precision and works on the bf16 model too."
)


def klein_load_group() -> Group:
    return Group("1 · Load FLUX.2-klein 4B", KLEIN_LOAD_NOTE, [
        Node("load", "DOPSDLoadModel", {"family": "FLUX.2-klein 4B", "diffusion_model": "flux-2-klein-4b.safetensors",
                                         "text_encoder": "qwen_3_4b.safetensors", "text_encoder_type": "from preset",
                                         "vae": "flux2-vae.safetensors",
                                         "training_schedule": families().PUBLISHED_SCHEDULE,
                                         "weight_dtype": "default"})], column=0)


def klein_teacher_group(title: str, note: str, teacher_node: str) -> Group:
    """The teacher context, then klein's schedule for every image's size: preview and training both roll out on it."""
    return Group(title, f"{note}\n\n{KLEIN_SCHEDULE_NOTE}", [
        Node("teacher", teacher_node, {}, {"clip": ("load", 1), "vae": ("load", 2), "dataset": ("dataset", 0)}),
        Node("schedule", "DOPSDScheduleFlux2PerImage", {"schedule": families().PUBLISHED_SCHEDULE},
             {"training_set": ("teacher", 0), "training_sigmas": ("load", 4)})], column=2)


def klein_preview_group(note: str) -> Group:
    return Group("4 · Look at the teacher first", note, [
        Node("preview", "DOPSDRolloutPreview", {"image_index": 0, "prompt_variant": 0, "seed": 0},
             {"model": ("load", 0), "vae": ("load", 2), "training_set": ("schedule", 0), "sigmas": ("load", 4)}),
        Node("preview_image", "PreviewImage", {}, {"images": ("preview", 0)})], column=3)


def klein_train_group(note: str, recipe, lora_name: str) -> Group:
    return Group("5 · Train with D-OPSD", f"{note}\n\n{TRAINING_MEMORY_NOTE}", [
        Node("train", "DOPSDTrain", {**recipe_widgets(recipe), "checkpoint_every": 250,
                                     "checkpoint_folder": f"dopsd/checkpoints/{lora_name.split('/')[-1]}",
                                     "preview_every": 100},
             {"model": ("load", 0), "training_set": ("schedule", 0), "training_sigmas": ("load", 4)}),
        Node("loss", "LossGraphNode", {"filename_prefix": "dopsd_loss"}, {"loss": ("train", 2)}),
        Node("train_previews", "VAEDecode", {}, {"samples": ("train", 3), "vae": ("load", 2)}),
        Node("train_preview_image", "PreviewImage", {}, {"images": ("train_previews", 0)})], column=4)


def klein_save_group(lora_name: str, note: str) -> Group:
    return Group("6 · Save the LoRA", note, [
        Node("save", "DOPSDSaveLoRA", {"lora_name": lora_name, "overwrite": True, "strength": 1.0},
             {"model": ("load", 0), "lora": ("train", 1)})], column=5)


def klein_generation_nodes(prefix: str, prompt: str, reference_image: str | None = None) -> list[Node]:
    """klein's 4-step recipe with the saved LoRA: Flux2Scheduler for the output size, Euler, no CFG (BasicGuider).
    For an edit, the source image scaled to ~1 MP, VAE-encoded and attached with ReferenceLatent; the output takes
    its size. The conditioning node is keyed "conditioning" so the stock-loader group can share it."""
    size = {"width": KLEIN_GENERATION_SIZE, "height": KLEIN_GENERATION_SIZE}
    size_links = {}
    if reference_image is None:
        nodes = [Node("conditioning", "CLIPTextEncode", {"text": prompt}, {"clip": ("load", 1)})]
    else:
        nodes = [
            Node("prompt", "CLIPTextEncode", {"text": prompt}, {"clip": ("load", 1)}),
            Node("source", "LoadImage", {"image": reference_image}),
            Node("source_scaled", "ImageScaleToTotalPixels", {"upscale_method": "lanczos", "megapixels": 1.0},
                 {"image": ("source", 0)}),
            Node("source_size", "GetImageSize", {}, {"image": ("source_scaled", 0)}),
            Node("source_latent", "VAEEncode", {}, {"pixels": ("source_scaled", 0), "vae": ("load", 2)}),
            Node("conditioning", "ReferenceLatent", {}, {"conditioning": ("prompt", 0), "latent": ("source_latent", 0)}),
        ]
        size_links = {"width": ("source_size", 0), "height": ("source_size", 1)}
    return nodes + [
        Node("sampler", "KSamplerSelect", {"sampler_name": "euler"}),
        Node("sigmas", "Flux2Scheduler", {"steps": 4, **size}, size_links),
        Node("latent", "EmptyFlux2LatentImage", {**size, "batch_size": 1}, size_links),
        *klein_sampling_nodes(prefix, ("save", 0), seed=42),
    ]


def klein_sampling_nodes(prefix: str, model: tuple[str, int], seed: int, key: str = "", mode: int = 0) -> list[Node]:
    """Noise, guider, sampling, decoding and saving for `model`, on the generation group's conditioning, sampler,
    schedule and latent size."""
    k = lambda name: f"{key}{name}"  # noqa: E731
    return [
        Node(k("noise"), "RandomNoise", {"noise_seed": seed}, mode=mode),
        Node(k("guider"), "BasicGuider", {}, {"model": model, "conditioning": ("conditioning", 0)}, mode=mode),
        Node(k("sample"), "SamplerCustomAdvanced", {},
             {"noise": (k("noise"), 0), "guider": (k("guider"), 0), "sampler": ("sampler", 0),
              "sigmas": ("sigmas", 0), "latent_image": ("latent", 0)}, mode=mode),
        Node(k("decode"), "VAEDecode", {}, {"samples": (k("sample"), 0), "vae": ("load", 2)}, mode=mode),
        Node(k("save_image"), "SaveImage", {"filename_prefix": prefix}, {"images": (k("decode"), 0)}, mode=mode),
    ]


def klein_stock_loader_group(lora: str, prefix: str) -> Group:
    return Group("8 · Later: the saved LoRA with the stock loader (unmute with Ctrl+M)", (
        "## 8 · Sharing and reuse\nMuted because the LoRA file only exists after the first run. Unmute to generate "
        "with the stock **LoraLoaderModelOnly** — any FLUX.2-klein workflow can load the LoRA this way. It uses the "
        "prompt, image and size of group 7."),
        [Node("stock_lora", "LoraLoaderModelOnly", {"lora_name": f"{lora}.safetensors", "strength_model": 1.0},
              {"model": ("load", 0)}, mode=MUTED),
         *klein_sampling_nodes(f"{prefix}_stock", ("stock_lora", 0), seed=43, key="stock_", mode=MUTED)],
        column=6)


def klein_concept_workflow() -> Workflow:
    lora = "dopsd/my_klein_concept"
    prompt = "a photo of sks, in a sunlit garden"
    return Workflow(KLEIN_CONCEPT_FILE, [
        klein_load_group(),
        concept_dataset_group("dopsd/my_klein_concept"),
        klein_teacher_group("3 · Teacher context (editing branch), schedule per image", (
            "## 3 · Teacher = prompt + instruction + your image as reference\nThe student sees the prompt alone. "
            "The teacher sees the prompt with the instruction below appended, plus the image VAE-encoded as a "
            "**reference latent** (what the ReferenceLatent node does): klein's editing branch. Edit the "
            "instruction freely."), "DOPSDTeacherContextReference"),
        klein_preview_group(
            "## 4 · Preview before training\nThe student's own 4-step roll-out; per step: **student | teacher | "
            "target**. The student learns whatever the teacher shows here, artifacts included (e.g. a zoom-in)."),
        klein_train_group(
            "## 5 · On-policy self-distillation\nThe authors' klein recipe (4B and 9B): rank 64 / alpha 128 "
            "(gaussian init) on the double blocks' attention only (`lora_targets` 'published'), AdamW 2e-5, "
            "gradient accumulation 4 (their batch of 4 GPUs), EMA teacher 0.9999, x0 loss, 3000 steps. Set "
            "`checkpoint_every` to resume after a cancel.", families().FLUX2_KLEIN_4B.recipe, lora),
        klein_save_group(lora, "## 6 · Save\nThe LoRA goes to `models/loras/dopsd/my_klein_concept.safetensors` "
                               "(Load LoRA lists it at once) and is applied from the saved file."),
        Group("7 · Generate in 4 steps", (
            "## 7 · Generate\nKlein as it is meant to be run: 4 steps, Flux2Scheduler for the output size, "
            "Euler, no CFG."),
            klein_generation_nodes("dopsd/my_klein_concept", prompt), column=5, order_in_column=1),
        klein_stock_loader_group(lora, "dopsd/my_klein_concept"),
    ])


def klein_edit_workflow() -> Workflow:
    lora = "dopsd/my_klein_edit"
    instruction = "make [trigger] wear a red scarf"
    source = "example.png"  # ComfyUI ships input/example.png; the user picks the image to edit
    return Workflow(KLEIN_EDIT_FILE, [
        klein_load_group(),
        Group("2 · Your edit pairs", (
            "## 2 · Edit triples\nIn `ComfyUI/input/dopsd/my_klein_edit/`: the source and target images and a "
            "`metadata.jsonl`, one line per edit:\n\n`{\"sources\": [\"source_0.png\"], \"target\": "
            "\"target_0.png\", \"prompts\": [\"make [trigger] wear a red scarf\", \"...\"]}`\n\nSeveral sources "
            "per edit are fine; each image gets its own ~1 MP aspect bucket."),
            [dataset_node("dopsd/my_klein_edit")], column=1),
        klein_teacher_group("3 · Teacher context (edit tuning), schedule per image", (
            "## 3 · Student and teacher\n**Student**: the sources as reference latents + the edit instruction, "
            "exactly as at inference. **Teacher**: the sources and the **target as the last reference** + the "
            "instruction with the note below appended (the last image is the expected result)."),
            "DOPSDTeacherContextEdit"),
        klein_preview_group(
            "## 4 · Preview before training\nThe student's own 4-step edit; per step: **student | teacher | "
            "target**. Models with weak multi-reference ability make poor teachers: check here first."),
        klein_train_group(
            "## 5 · On-policy self-distillation\nThe authors' edit-tuning recipe: rank 64 / alpha 128 (gaussian "
            "init) on the double blocks' attention, AdamW 2e-5, gradient accumulation 8 (their batch of 8 GPUs), "
            "EMA teacher 0.9999, x0 loss, 3000 steps. Set `checkpoint_every` to resume after a cancel.",
            families().KLEIN_EDIT_TUNING, lora),
        klein_save_group(lora, "## 6 · Save\nThe LoRA goes to `models/loras/dopsd/my_klein_edit.safetensors` and "
                               "is applied from the saved file."),
        Group("7 · Edit an image in 4 steps", (
            "## 7 · Edit\nPick the image to edit in **Load Image**; it is scaled to ~1 MP, VAE-encoded and attached "
            "with **ReferenceLatent**, as in klein's own edit workflows, and the output takes its size. 4 steps, "
            "no CFG."),
            klein_generation_nodes("dopsd/my_klein_edit", instruction.replace("[trigger]", "sks"), source),
            column=5, order_in_column=1),
        klein_stock_loader_group(lora, "dopsd/my_klein_edit"),
    ])


WORKFLOWS = (zimage_workflow, klein_concept_workflow, klein_edit_workflow)


def main() -> None:
    from devkit.comfy_runtime import ComfyRuntime
    from devkit.paths import make_base_directory

    runtime = ComfyRuntime.boot(make_base_directory(Path(tempfile.mkdtemp(prefix="dopsd_make_workflows_"))))
    for make in WORKFLOWS:
        workflow = make()
        path = REPO / "workflows" / workflow.file
        path.write_text(json.dumps(build(workflow, runtime.nodes.NODE_CLASS_MAPPINGS), indent=1) + "\n")
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
