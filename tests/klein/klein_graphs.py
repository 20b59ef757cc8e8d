"""API-format graphs of the FLUX.2-klein pipelines (concept LoRA, edit tuning) on the tiny models.

On ComfyUI 0.3.75, which has no FLUX.2-klein text encoder (CLIPType FLUX2 arrived in the 0.4x line), the loader is
given text_encoder_type "lumina2": 0.3.75 loads the tiny Qwen3 file as its one Qwen3 encoder, whose feature width
the tiny FLUX.2 DiT is built for there (devkit/tiny_models.py). On 0.33 the tests keep "from preset", as
users do.
"""
from __future__ import annotations

from devkit.graph import Graph, NodeRef
from devkit.paths import comfy_version

# 0.3.75 has no klein text encoder: its one Qwen3 encoder ("lumina2") reads the tiny file, and the tiny FLUX.2 DiT is
# built for its width. 0.33 runs klein natively: "from preset" (CLIPType FLUX2, layers 9/18/27), as users do.
TEXT_ENCODER_TYPE_0_3_75 = "lumina2" if comfy_version() == "0.3.75" else "from preset"
TINY_MEGAPIXELS = 64 * 64 / 1_000_000
IMAGE_SCALE_MIN_MEGAPIXELS = 0.01  # ImageScaleToTotalPixels' minimum: about 102x102 px
TRAIN_DEFAULTS = dict(
    objective="D-OPSD", steps=3, learning_rate=2e-3, rank=4, alpha=8.0, ema_decay=0.9999, loss_space="x0",
    gradient_accumulation=1, warmup_steps=0, seed=0, lora_targets="published", custom_lora_targets="",
    lora_init="gaussian", gradient_checkpointing=True,
    checkpoint_every=0, checkpoint_folder="dopsd/checkpoints/klein_test", resume=False, preview_every=0, keep_last=0, start_from_lora="none", memory_limit_gb=0.0,
)
GENERATION_STEPS = 4
PUBLISHED_SCHEDULE = "published (authors')"
CONCEPT_INSTRUCTION = "Keep the subject consistent with the reference image."
EDIT_INSTRUCTION = "The last reference image is the expected result."


def load_klein(g: Graph, text_encoder_type: str = TEXT_ENCODER_TYPE_0_3_75) -> NodeRef:
    return g.node("DOPSDLoadModel", family="FLUX.2-klein 4B", diffusion_model="flux-2-klein-4b.safetensors",
                  text_encoder="qwen_3_4b.safetensors", text_encoder_type=text_encoder_type, vae="flux2-vae.safetensors",
                  training_schedule=PUBLISHED_SCHEDULE, weight_dtype="default")


def dataset(g: Graph, folder: str, trigger_word: str = "sks") -> NodeRef:
    return g.node("DOPSDDatasetFromFolder", folder=folder, trigger_word=trigger_word, placeholder="[trigger]",
                  megapixels=TINY_MEGAPIXELS, bucket_multiple=16, allow_outside_input=False)


def reference_teacher(g: Graph, loader: NodeRef, data: NodeRef, **inputs) -> NodeRef:
    return g.node("DOPSDTeacherContextReference", clip=loader.out(1), vae=loader.out(2), dataset=data,
                  **{"instruction": CONCEPT_INSTRUCTION, **inputs})


def edit_teacher(g: Graph, loader: NodeRef, data: NodeRef, **inputs) -> NodeRef:
    return g.node("DOPSDTeacherContextEdit", clip=loader.out(1), vae=loader.out(2), dataset=data,
                  **{"instruction": EDIT_INSTRUCTION, **inputs})


def per_image_schedule(g: Graph, loader: NodeRef, pairs: NodeRef, schedule: str = PUBLISHED_SCHEDULE) -> NodeRef:
    return g.node("DOPSDScheduleFlux2PerImage", training_set=pairs, training_sigmas=loader.out(4), schedule=schedule)


def train(g: Graph, loader: NodeRef, pairs: NodeRef, **overrides) -> NodeRef:
    """D-OPSD Train, every image on klein's schedule for its own size."""
    return g.node("DOPSDTrain", model=loader.out(0), training_set=per_image_schedule(g, loader, pairs),
                  training_sigmas=loader.out(4), **{**TRAIN_DEFAULTS, **overrides})


def generate(g: Graph, model, clip, vae, prompt: str, prefix: str, width: int = 64, height: int = 64, seed: int = 7,
             reference_image: NodeRef | None = None) -> NodeRef:
    """klein's own 4-step recipe: Flux2Scheduler at the output size, Euler, guidance-free (CFG 1) sampling;
    for an edit, the source image VAE-encoded as a reference latent."""
    positive = g.node("CLIPTextEncode", clip=clip, text=prompt)
    if reference_image is not None:
        positive = g.node("ReferenceLatent", conditioning=positive,
                          latent=g.node("VAEEncode", pixels=reference_image, vae=vae))
    sampled = g.node(
        "SamplerCustomAdvanced",
        noise=g.node("RandomNoise", noise_seed=seed),
        guider=g.node("BasicGuider", model=model, conditioning=positive),
        sampler=g.node("KSamplerSelect", sampler_name="euler"),
        sigmas=g.node("Flux2Scheduler", steps=GENERATION_STEPS, width=width, height=height),
        latent_image=g.node("EmptyFlux2LatentImage", width=width, height=height, batch_size=1),
    )
    g.node("SaveImage", images=g.node("VAEDecode", samples=sampled, vae=vae), filename_prefix=prefix)
    return sampled


def concept_fine_tune_then_generate(folder: str, lora_name: str, **train_overrides) -> tuple[dict, dict[str, str]]:
    g = Graph()
    loader = load_klein(g)
    pairs = reference_teacher(g, loader, dataset(g, folder))
    preview = g.node("DOPSDRolloutPreview", model=loader.out(0), vae=loader.out(2), training_set=pairs,
                     sigmas=loader.out(4), image_index=0, prompt_variant=0, seed=0)
    g.node("PreviewImage", images=preview)
    trained = train(g, loader, pairs, **train_overrides)
    saved = g.node("DOPSDSaveLoRA", model=loader.out(0), lora=trained.out(1), lora_name=lora_name, overwrite=True,
                   strength=1.0)
    sampled = generate(g, saved.out(0), loader.out(1), loader.out(2), "a photo of sks", "dopsd_klein_tuned")
    return g.to_api(), {"loader": loader.node_id, "pairs": pairs.node_id, "preview": preview.node_id,
                        "train": trained.node_id, "save": saved.node_id, "sampled": sampled.node_id}


def edit_fine_tune_then_generate(folder: str, source_image: str, lora_name: str,
                                 **train_overrides) -> tuple[dict, dict[str, str]]:
    g = Graph()
    loader = load_klein(g)
    pairs = edit_teacher(g, loader, dataset(g, folder))
    trained = train(g, loader, pairs, **train_overrides)
    saved = g.node("DOPSDSaveLoRA", model=loader.out(0), lora=trained.out(1), lora_name=lora_name, overwrite=True,
                   strength=1.0)
    source = g.node("LoadImage", image=source_image)
    sampled = generate(g, saved.out(0), loader.out(1), loader.out(2), "move the sks disc to the right",
                       "dopsd_klein_edit_tuned", reference_image=source)
    return g.to_api(), {"loader": loader.node_id, "pairs": pairs.node_id, "train": trained.node_id,
                        "save": saved.node_id, "sampled": sampled.node_id}
