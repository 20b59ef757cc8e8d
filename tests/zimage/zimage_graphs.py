"""API-format graphs of the Z-Image fine-tune-then-generate pipeline on the tiny models."""
from __future__ import annotations

from devkit.tiny_vlm import MATCHING_VISION_FILE
from devkit.graph import Graph, NodeRef

TINY_MEGAPIXELS = 64 * 64 / 1_000_000
TRAIN_DEFAULTS = dict(
    objective="D-OPSD", steps=3, learning_rate=1e-3, rank=4, alpha=8.0, ema_decay=0.9999, loss_space="x0",
    gradient_accumulation=1, warmup_steps=0, seed=0, lora_targets="published", custom_lora_targets="",
    lora_init="gaussian", gradient_checkpointing=True,
    checkpoint_every=0, checkpoint_folder="dopsd/checkpoints/test", resume=False, preview_every=0, keep_last=0, start_from_lora="none", memory_limit_gb=0.0,
)


def load_family(g: Graph, weight_dtype: str = "default") -> NodeRef:
    return g.node("DOPSDLoadModel", family="Z-Image-Turbo", diffusion_model="z_image_turbo_bf16.safetensors",
                  text_encoder="qwen_3_4b.safetensors", text_encoder_type="from preset", vae="ae.safetensors",
                  training_schedule="published (authors')", weight_dtype=weight_dtype)


def training_set(g: Graph, loader: NodeRef, folder: str, vision: str = MATCHING_VISION_FILE.split("/", 1)[1],
                 megapixels: float = TINY_MEGAPIXELS) -> NodeRef:
    dataset = g.node("DOPSDDatasetFromFolder", folder=folder, trigger_word="sks fox", placeholder="[trigger]",
                     megapixels=megapixels, bucket_multiple=16, allow_outside_input=False)
    return g.node("DOPSDTeacherContextVLM", clip=loader.out(1), vae=loader.out(2), dataset=dataset, vision_weights=vision)


def train(g: Graph, loader: NodeRef, pairs: NodeRef, **overrides) -> NodeRef:
    """DOPSDTrain on the loader's model and training schedule; `overrides` may replace any input, links included."""
    inputs = {"model": loader.out(0), "training_set": pairs, "training_sigmas": loader.out(4), **TRAIN_DEFAULTS}
    return g.node("DOPSDTrain", **{**inputs, **overrides})


def generate(g: Graph, model, clip, vae, prompt: str, prefix: str, seed: int = 7) -> NodeRef:
    positive = g.node("CLIPTextEncode", clip=clip, text=prompt)
    latent = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    sampled = g.node("KSampler", model=model, positive=positive, negative=positive, latent_image=latent, seed=seed,
                     steps=8, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.node("SaveImage", images=g.node("VAEDecode", samples=sampled, vae=vae), filename_prefix=prefix)
    return sampled


def fine_tune_then_generate(folder: str, lora_name: str, **train_overrides) -> tuple[dict, dict[str, str]]:
    """The example workflow's graph; returns it and the ids of the nodes tests inspect."""
    g = Graph()
    loader = load_family(g)
    pairs = training_set(g, loader, folder)
    preview = g.node("DOPSDRolloutPreview", model=loader.out(0), vae=loader.out(2), training_set=pairs,
                     sigmas=loader.out(4), image_index=0, prompt_variant=0, seed=0)
    g.node("PreviewImage", images=preview)
    trained = train(g, loader, pairs, **train_overrides)
    loss_graph = g.node("LossGraphNode", loss=trained.out(2), filename_prefix="dopsd_loss")
    saved = g.node("DOPSDSaveLoRA", model=loader.out(0), lora=trained.out(1), lora_name=lora_name, overwrite=True,
                   strength=1.0)
    sampled = generate(g, saved.out(0), loader.out(1), loader.out(2), "a photo of sks fox", "dopsd_tuned")
    return g.to_api(), {"loader": loader.node_id, "pairs": pairs.node_id, "preview": preview.node_id,
                        "train": trained.node_id, "loss_graph": loss_graph.node_id, "save": saved.node_id, "sampled": sampled.node_id}
