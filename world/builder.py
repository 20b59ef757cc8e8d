"""Builds the world's models in stages, each resumable, all through ComfyUI's own model classes.

    python -m world.builder [STAGE ...] [--minutes M] [--steps N] [--out DIR]

Stages, in order (default: all; a finished stage is skipped):
  encoders  the frozen text encoder and vision tower (seeded random networks of the real layouts)
  vae       a FLUX.1-layout VAE trained on renders, 64² -> 8 x 8 x 16 latents (the one in --weights, which is
            committed, when it is there)
  corpus    training scenes as the DiT sees them: latents, and the features of their captions, encoded by ComfyUI's
            text encoder alone or, for half of them, by the teacher node's Qwen3-VL with another rendering of the
            captioned object as the image and, half the time, the object named by a made-up word (the context the
            D-OPSD teacher gets: its prompts name the concept by the trigger word)
  pretrain  the Z-Image NextDiT trained from scratch by flow matching on both contexts, the objects' latent pixels
            weighted up
  trajectories  the pretrained model's many-step, guided ODE trajectories from noise, recorded at the sigmas of
            Z-Image-Turbo's 8 steps (ComfyUI's simple scheduler at shift 3)
  distill   the 8-step model: from each recorded state, one Euler step of the student must land where the teacher's
            trajectory went (trajectory distillation), for both contexts
  export    the shipped files into --weights (default world/weights): the distilled DiT in bf16 (as Z-Image ships),
            the VAE, the encoders, and the folder's sha256 manifest
Each trained stage checkpoints every few minutes under DIR/<stage>/ and stops, checkpointed, after `--minutes`;
run the same command again to continue. `--steps`, `--examples` and `--batches` shrink the stages (the CI test
runs each for a moment).
The models are built with ComfyUI's loaders from their files, trained as the torch modules ComfyUI made of them,
and written back in the layout those loaders read, so what ships is what ComfyUI loads.
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from world import models
from world.resumable import Progress, train_resumably
from world.scenes import (SHAPE_WORDS, SceneObject, Scene, caption, concept_scene, object_coverage, pick, render,
                          render_batch, rerender, with_motif, sample_scene)

# Two phases, the second starting from the first's weights: (name, steps, peak learning rate, edge weight). The
# edge term (L1 of the images' horizontal and vertical differences) is added once the colors are right, against the
# blur a pixel loss alone leaves at edges and on the patterns.
VAE_PHASES = (("a", 2000, 1e-3, 0.0), ("b", 2500, 5e-4, 1.0))
VAE_BATCH = 16
VAE_KL_WEIGHT = 1e-6
# Pulls each latent channel, after the FLUX.1 latent format's shift and scale, to zero mean and unit variance: the
# statistics the DiT's noise schedule assumes.
VAE_MOMENT_WEIGHT = 1e-2

CORPUS_EXAMPLES = 12000
CORPUS_SHARD_SIZE = 500
CORPUS_SEED = 21
CONTEXT_RATE = 0.5          # examples whose features are the teacher's (image + caption)
UNCONDITIONAL_RATE = 0.1    # text examples with an empty caption (classifier-free guidance for the distillation)
# Context examples whose shown object wears the concept's split motif (in other colors, on any shape; never the
# concept object). A model this small cannot draw a texture it never drew; what an image context can teach it is an
# object it has not seen, made of what it can draw. Text examples never show the motif, so the text path cannot
# draw the concept before fine-tuning, as a large model's text path lacks what only its image path has seen.
CONTEXT_MOTIF_RATE = 0.4
# Context examples whose caption names the shown object by a made-up word instead of its color and shape, so that
# the object's whole appearance comes from the image alone: what the D-OPSD teacher does with the concept's trigger
# word. The others describe it, and so also teach the object words. (Every caption described: the DiT ignored the
# image. Every caption named: after 6400 steps it read neither the image nor the object words of text examples.
# Half and half read both, if weakly.) The workflows' trigger word (sks) and the placeholder are not among the words.
NAMED_RATE = 0.5
MADE_UP_WORDS = ("zorp", "blick", "quav", "snib", "trel", "vusk", "grell", "plonk", "skree", "mib", "drax", "fenn",
                 "glim", "hurv", "jost", "kelb", "lurn", "morp", "nuzz", "pif", "rask", "tolv", "wemb", "yarn",
                 "zeb", "brin", "clute", "dorf", "emmet", "frizz", "gundo", "huff", "irko", "jabb", "krill", "lomp")

PRETRAIN_STEPS = 8000
PRETRAIN_BATCH = {"text": 32, "context": 16}   # about the same time per step: context features are ~4x longer
PRETRAIN_LEARNING_RATE = 1e-3
PRETRAIN_SEED = 31
# Each latent pixel's flow-matching error is weighted by 1 + OBJECT_LOSS_WEIGHT x the fraction of it that objects
# cover. Objects cover a fifth of the latent; unweighted, the backgrounds dominate the loss and the object's words
# and image are read late (800 steps continuing a pretrained DiT raised the object-color word reliance to +41 %
# with this weighting, +13 % without).
OBJECT_LOSS_WEIGHT = 4.0
EMA_DECAY = 0.998

NATIVE_STEPS = 8
TRAJECTORY_BATCHES = 96
TEACHER_SUBSTEPS = 3        # Euler steps of the teacher inside each of the 8 intervals
TEACHER_GUIDANCE = 3.0      # classifier-free guidance of the teacher; the distilled model runs at CFG 1
TRAJECTORY_SEED = 41
DISTILL_STEPS = 1500
DISTILL_LEARNING_RATE = 5e-5
DISTILL_SEED = 51


@dataclass
class Workshop:
    """A booted ComfyUI with the world's current files in its models folder."""
    out: Path
    runtime: object

    @classmethod
    def open(cls, out: Path) -> "Workshop":
        from devkit.comfy_runtime import ComfyRuntime
        from devkit.paths import make_base_directory

        base = make_base_directory(out / "comfy_base")
        return cls(out, ComfyRuntime.boot(base))

    @property
    def models_dir(self) -> Path:
        return self.runtime.base / "models"

    def training(self):
        """ComfyUI's model code in training mode (0.33 otherwise runs fused kernels that have no backward): the
        pack's own switch, which its training node uses."""
        from devkit.comfy_runtime import pack_module

        return pack_module("nodes.model_bridge").comfy_training_mode()

    def install(self, out: Path) -> None:
        """Put the newest built file of each world model into the models folder (as models.install_world does
        with the shipped ones)."""
        for name, path in built_files(out).items():
            if path.exists():
                target = self.models_dir / models.WEIGHT_FILES[name]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)


def built_files(out: Path) -> dict[str, Path]:
    """Where the build leaves each shipped file (keys: the names in models.WEIGHT_FILES)."""
    return {"dit.safetensors": out / "distill" / "dit.safetensors",
            "vae.safetensors": out / "vae" / "vae.safetensors",
            "text_encoder.safetensors": out / "encoders" / "text_encoder.safetensors",
            "vision.safetensors": out / "encoders" / "vision.safetensors"}


def write_shards(folder: Path, stem: str, count: int, make, minutes: float | None, log) -> Path | None:
    """Writes <folder>/<stem>_<i>.pt = make(i) for each i not written yet, each atomically; stops (None) once
    `minutes` have passed, so that the next call writes the rest."""
    import time

    began = time.perf_counter()
    for index in range(count):
        path = folder / f"{stem}_{index:03d}.pt"
        if path.exists():
            continue
        if minutes is not None and time.perf_counter() - began > minutes * 60:
            return None
        content = make(index)
        folder.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        torch.save(content, staging)
        staging.replace(path)
        log(f"{stem} {index + 1}/{count} ({time.perf_counter() - began:.0f} s)")
    return folder


def _stage_log(stage: str):
    return lambda message: print(f"[{stage}] {message}", flush=True)


# ---------------------------------------------------------------- encoders

def build_encoders(out: Path) -> dict[str, Path]:
    folder = out / "encoders"
    paths = {"text_encoder": folder / "text_encoder.safetensors", "vision": folder / "vision.safetensors"}
    if all(p.exists() for p in paths.values()):
        return paths
    return models.write_frozen_encoders(folder)


# ---------------------------------------------------------------- vae

def vae_training_scene(rng) -> Scene:
    """What the VAE learns to reconstruct: ordinary scenes, and, like a VAE trained on everything, objects with the
    split pattern (one in ten) and the concept itself (one in twenty)."""
    draw = rng.random()
    if draw < 0.05:
        return concept_scene(rng, allow_held_out=True)
    scene = sample_scene(rng, allow_held_out=True)
    if draw < 0.15:
        scene = with_first_motif(scene, rng)
    return scene


def with_first_motif(scene: Scene, rng) -> Scene:
    """The scene with its first object wearing the split motif (`with_motif`)."""
    return Scene(scene.background, (with_motif(scene.objects[0], rng), *scene.objects[1:]))


def to_vae_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 3, H, W) in [-1, 1], what ComfyUI's VAE.encode hands the encoder."""
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1


def edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def build_vae(out: Path, workshop: Workshop, steps: int | None = None, minutes: float | None = None,
              batch_cap: int = VAE_BATCH, shipped: Path | None = None) -> Path | None:
    """`steps`: each phase's step count instead of VAE_PHASES' (a smoke run). A `shipped` VAE that exists (the
    committed one, checked against its folder's manifest) is used as it is, not trained again."""
    import comfy.latent_formats
    import comfy.sd

    from world.manifest import verify_manifest

    final = out / "vae" / "vae.safetensors"
    if final.exists():
        return final
    if shipped is not None and shipped.exists():
        verify_manifest(shipped.parent)
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shipped, final)
        _stage_log("vae")(f"the shipped {shipped} (delete it to train a new one)")
        return final
    vae = comfy.sd.VAE(sd=models.initial_vae_state_dict())
    autoencoder = vae.first_stage_model.float().train()
    latent_format = comfy.latent_formats.Flux()
    for index, (phase, phase_steps, peak, edge_weight) in enumerate(VAE_PHASES):
        phase_steps = steps or phase_steps
        done = out / "vae" / f"phase_{phase}.safetensors"
        if done.exists():
            autoencoder.load_state_dict(models.load_tensors(done))
            continue
        optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=peak, weight_decay=0.0)

        def train_step(step: int, rng) -> float:
            x = to_vae_input(render_batch([vae_training_scene(rng) for _ in range(min(VAE_BATCH, batch_cap))]))
            mean, logvar = autoencoder.encoder(x).chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
            reconstruction = autoencoder.decoder(z)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
            processed = latent_format.process_in(mean)
            moments = processed.mean(dim=(0, 2, 3)).pow(2).mean() + (processed.std(dim=(0, 2, 3)) - 1).pow(2).mean()
            error = reconstruction - x
            edge_error = sum((a - b).abs().mean() for a, b in zip(edges(reconstruction), edges(x)))
            loss = (error.abs().mean() + error.pow(2).mean() + edge_weight * edge_error + VAE_KL_WEIGHT * kl
                    + VAE_MOMENT_WEIGHT * moments)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), 1.0)
            optimizer.step()
            return loss.item()

        def learning_rate(step: int) -> float:
            warmup = min(1.0, (step + 1) / 100)
            return peak * warmup * 0.5 * (1 + np.cos(np.pi * step / phase_steps))

        progress = train_resumably(out / "vae" / f"checkpoint_{phase}.pt", {"vae": autoencoder}, optimizer,
                                   phase_steps, train_step, seed=models.VAE_SEED + index,
                                   learning_rate=learning_rate, minutes=minutes, log=_stage_log(f"vae {phase}"))
        if progress.step < phase_steps:
            return None
        state = {k: v.detach().float() for k, v in autoencoder.state_dict().items()}
        models.save_atomically(state, done, metadata=_training_metadata(progress))
    return models.save_atomically(models.load_tensors(done), final, metadata={"phases": str(len(VAE_PHASES))})


def _training_metadata(progress: Progress) -> dict[str, str]:
    return {"steps": str(progress.step), "train_seconds": f"{progress.seconds:.0f}",
            "final_loss": f"{progress.recent_loss:.5f}"}


# ---------------------------------------------------------------- corpus

def name_object(prompt: str, obj: SceneObject, word: str) -> str:
    """The caption with the object's "<color> <shape>" replaced by `word` (its first mention: objects are captioned
    in order, and a context example's shown object is the scene's first)."""
    for shape_word in SHAPE_WORDS[obj.shape]:
        described = f"{obj.color} {shape_word}"
        if described in prompt:
            return prompt.replace(described, word, 1)
    raise ValueError(f"{obj.color} {obj.shape} is not in {prompt!r}")


def corpus_example(rng) -> dict:
    """One scene and its caption; for a context example also the image the teacher sees: the scene's first object
    alone, elsewhere, at another size, on another background."""
    scene = sample_scene(rng)
    kind = "context" if rng.random() < CONTEXT_RATE else "text"
    prompt = caption(scene, rng)
    example = {"scene": scene, "kind": kind, "prompt": prompt}
    if kind == "context":
        if rng.random() < CONTEXT_MOTIF_RATE:
            scene = example["scene"] = with_first_motif(scene, rng)
        example["context_image"] = render(rerender(scene, rng))
        if rng.random() < NAMED_RATE:
            example["prompt"] = name_object(prompt, scene.objects[0], pick(rng, MADE_UP_WORDS))
    elif rng.random() < UNCONDITIONAL_RATE:
        example["prompt"] = ""
    return example


class Encoders:
    """The world's text encoder, VLM teacher encoder and VAE, loaded as the nodes load them."""

    def __init__(self, workshop: Workshop):
        import os

        import comfy.text_encoders.z_image
        import nodes as comfy_nodes
        from devkit.comfy_runtime import pack_module

        self.training_set = pack_module("nodes.training_set")
        teacher_vlm = pack_module("nodes.teacher_vlm")
        self.clip = comfy_nodes.CLIPLoader().load_clip(Path(models.WEIGHT_FILES["text_encoder.safetensors"]).name,
                                                       "lumina2")[0]
        self.vae = comfy_nodes.VAELoader().load_vae(Path(models.WEIGHT_FILES["vae.safetensors"]).name)[0]
        clip_state = self.clip.get_sd()
        tokenizer_dir = os.path.join(os.path.dirname(comfy.text_encoders.z_image.__file__), "qwen25_tokenizer")
        self.teacher = teacher_vlm.VLMTeacherEncoder.build(
            clip_state, str(workshop.models_dir / models.WEIGHT_FILES["vision.safetensors"]), tokenizer_dir, "cpu",
            next(iter(clip_state.values())).dtype)

    def text(self, prompt: str) -> torch.Tensor:
        [[features, extras]] = self.training_set.encode_prompt(self.clip, prompt)
        mask = extras.get("attention_mask")
        assert mask is None or bool(mask.all()), "a single prompt's encoding has no padding"
        return features[0].float()

    def context(self, image: np.ndarray, prompt: str) -> torch.Tensor:
        return self.teacher.encode(torch.from_numpy(image), prompt)[0].float()

    def latents(self, images: np.ndarray) -> torch.Tensor:
        return self.vae.encode(torch.from_numpy(images)).float()


def build_corpus(out: Path, workshop: Workshop, examples: int = CORPUS_EXAMPLES, minutes: float | None = None):
    workshop.install(out)
    encoders = functools.cache(lambda: Encoders(workshop))  # loaded for the first shard that is written

    def shard(index: int) -> dict:
        encode = encoders()
        rng = np.random.default_rng([CORPUS_SEED, index])
        batch = [corpus_example(rng) for _ in range(min(CORPUS_SHARD_SIZE, examples - index * CORPUS_SHARD_SIZE))]
        features = [encode.context(e["context_image"], e["prompt"]) if e["kind"] == "context"
                    else encode.text(e["prompt"]) for e in batch]
        latents = encode.latents(render_batch([e["scene"] for e in batch]))
        return {"latents": latents, "object_cover": latent_coverage([e["scene"] for e in batch], latents.shape[-1]),
                "features": features, "kinds": [e["kind"] for e in batch], "prompts": [e["prompt"] for e in batch],
                "unconditional": encode.text("")}

    return write_shards(out / "corpus", "shard", -(-examples // CORPUS_SHARD_SIZE), shard, minutes,
                        _stage_log("corpus"))


def latent_coverage(scenes, latent_side: int) -> torch.Tensor:
    """(N, latent_side, latent_side): the fraction of each latent pixel's image area that the scene's objects cover."""
    import einops

    covered = np.stack([object_coverage(scene) for scene in scenes])
    return torch.from_numpy(einops.reduce(covered, "n (h a) (w b) -> n h w", "mean", h=latent_side, w=latent_side))


@dataclass
class Corpus:
    """The corpus in memory, its examples grouped by kind and feature length: a batch takes one group, because the
    DiT pads a caption with its own learned token and a batch must not add any."""
    latents: torch.Tensor
    object_cover: torch.Tensor
    """(N, H, W) at the latents' resolution: the fraction of each latent pixel that objects cover."""
    features: list[torch.Tensor]
    groups: dict[tuple[str, int], np.ndarray]
    unconditional: torch.Tensor
    """The text encoder's features of the empty prompt (what ComfyUI's negative CLIPTextEncode "" gives)."""

    @classmethod
    def load(cls, folder: Path) -> "Corpus":
        latents, covers, features, kinds = [], [], [], []
        for path in sorted(folder.glob("shard_*.pt")):
            shard = torch.load(path, weights_only=True)
            latents.append(shard["latents"])
            covers.append(shard["object_cover"])
            features += shard["features"]
            kinds += shard["kinds"]
        keys = [(kind, f.shape[0]) for kind, f in zip(kinds, features)]
        groups = {key: np.array([i for i, k in enumerate(keys) if k == key]) for key in sorted(set(keys))}
        return cls(torch.cat(latents), torch.cat(covers), features, groups, shard["unconditional"])

    def batch(self, rng, kind: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`size` examples of one group of `kind`, the group drawn in proportion to its size: (latents, features,
        object cover)."""
        keys = [key for key in self.groups if key[0] == kind]
        counts = np.array([len(self.groups[key]) for key in keys], dtype=float)
        members = self.groups[keys[rng.choice(len(keys), p=counts / counts.sum())]]
        chosen = rng.choice(members, size=size, replace=len(members) < size)
        return self.latents[chosen], torch.stack([self.features[i] for i in chosen]), self.object_cover[chosen]


# ---------------------------------------------------------------- pretrain

def load_world_dit(state_dict: dict[str, torch.Tensor]):
    """ComfyUI's Z-Image model (a ModelPatcher) made from a state dict, in float32, as UNETLoader makes it."""
    import comfy.sd

    from dopsd_core.autograd_safety import make_weights_autograd_safe

    patcher = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options={"dtype": torch.float32})
    patcher.model.float()
    # ComfyUI loads for inference (0.33: weights frozen, possibly inference tensors); the builder trains them.
    make_weights_autograd_safe(patcher.model.diffusion_model)
    patcher.model.diffusion_model.requires_grad_(True)
    return patcher


def flow_matching_loss(base_model, x0: torch.Tensor, features: torch.Tensor,
                       pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Velocity MSE at sigma = shift(t), t ~ logit-normal: the model's x0 prediction turned into a velocity;
    `pixel_weights` (N, H, W) weight each latent pixel's error."""
    import comfy.model_sampling

    t = torch.sigmoid(torch.randn(x0.shape[0])).clamp(1e-3, 1.0)
    sigma = comfy.model_sampling.time_snr_shift(base_model.model_sampling.shift, t)
    noise = torch.randn_like(x0)
    s = sigma.view(-1, 1, 1, 1)
    x_t = s * noise + (1 - s) * x0
    x0_predicted = base_model.apply_model(x_t, sigma, c_crossattn=features, num_tokens=features.shape[1])
    error = ((x_t - x0_predicted) / s - (noise - x0)).pow(2)
    return error.mean() if pixel_weights is None else (error * pixel_weights[:, None]).mean()


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for averaged, current in zip(ema.parameters(), model.parameters()):
        averaged.lerp_(current, 1 - decay)


def batch_size(kind: str, cap: int | None) -> int:
    return PRETRAIN_BATCH[kind] if cap is None else min(PRETRAIN_BATCH[kind], cap)


def train_dit(out: Path, stage: str, start: dict[str, torch.Tensor], loss, *, steps: int, learning_rate: float,
              warmup: int, seed: int, minutes: float | None) -> Path | None:
    """Trains the DiT from the `start` weights on `loss(base_model, step, rng)`: AdamW, gradient clipping at 1, linear
    warmup to a constant `learning_rate`, an EMA of the weights (EMA_DECAY), resumably under <out>/<stage>/. Writes
    the EMA weights to <out>/<stage>/dit.safetensors when done; None while steps remain."""
    import copy

    base_model = load_world_dit(start).model
    dit = base_model.diffusion_model.train()
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=learning_rate, weight_decay=0.0)

    def train_step(step: int, rng) -> float:
        value = loss(base_model, step, rng)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, dit, EMA_DECAY)
        return value.item()

    progress = train_resumably(out / stage / "checkpoint.pt", {"dit": dit, "ema": ema}, optimizer, steps, train_step,
                               seed=seed, learning_rate=lambda step: learning_rate * min(1.0, (step + 1) / warmup),
                               minutes=minutes, log=_stage_log(stage))
    if progress.step < steps:
        return None
    state = {k: v.detach().float() for k, v in ema.state_dict().items()}
    return models.save_atomically(state, out / stage / "dit.safetensors", metadata=_training_metadata(progress))


def build_pretrained_dit(out: Path, workshop: Workshop, steps: int = PRETRAIN_STEPS, minutes: float | None = None,
                         batch_cap: int | None = None):
    final = out / "pretrain" / "dit.safetensors"
    if final.exists():
        return final
    corpus = Corpus.load(out / "corpus")

    def loss(base_model, step: int, rng) -> torch.Tensor:
        kind = "context" if step % 2 else "text"
        latents, features, object_cover = corpus.batch(rng, kind, batch_size(kind, batch_cap))
        return flow_matching_loss(base_model, base_model.process_latent_in(latents), features,
                                  1 + OBJECT_LOSS_WEIGHT * object_cover)

    return train_dit(out, "pretrain", models.initial_dit_state_dict(), loss, steps=steps,
                     learning_rate=PRETRAIN_LEARNING_RATE, warmup=200, seed=PRETRAIN_SEED, minutes=minutes)


# ---------------------------------------------------------------- trajectories and distillation

def native_sigmas(base_model, steps: int = NATIVE_STEPS) -> torch.Tensor:
    """The sigmas Z-Image-Turbo samples with in ComfyUI: the simple scheduler on the model's shifted schedule."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(base_model.model_sampling, "simple", steps).float()


def guided_x0(base_model, x: torch.Tensor, sigma: float, features: torch.Tensor, unconditional: torch.Tensor,
              guidance: float) -> torch.Tensor:
    sigmas = torch.full((x.shape[0],), float(sigma))
    conditional = base_model.apply_model(x, sigmas, c_crossattn=features, num_tokens=features.shape[1])
    if guidance == 1.0:
        return conditional
    empty = unconditional.expand(x.shape[0], -1, -1)
    plain = base_model.apply_model(x, sigmas, c_crossattn=empty, num_tokens=empty.shape[1])
    return plain + guidance * (conditional - plain)


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x_next = x + (x - x0)/sigma * (sigma_next - sigma), sigma broadcast per sample."""
    return x + (x - x0) / sigma * (sigma_next - sigma)


@torch.no_grad()
def teacher_trajectory(base_model, noise, features, unconditional, sigmas, substeps: int, guidance: float):
    """States at every sigma of `sigmas`, from `noise` at sigmas[0], each interval crossed in `substeps` guided
    Euler steps: [len(sigmas), B, C, H, W]."""
    states, x = [noise], noise
    for high, low in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        for a, b in zip(np.linspace(high, low, substeps + 1)[:-1], np.linspace(high, low, substeps + 1)[1:]):
            x = euler_step(x, guided_x0(base_model, x, a, features, unconditional, guidance), a, b)
        states.append(x)
    return torch.stack(states)


def build_trajectories(out: Path, workshop: Workshop, batches: int = TRAJECTORY_BATCHES,
                       minutes: float | None = None, batch_cap: int | None = None):
    corpus = Corpus.load(out / "corpus")
    patcher = load_world_dit(models.load_tensors(out / "pretrain" / "dit.safetensors"))
    base_model = patcher.model.eval()
    sigmas = native_sigmas(base_model)
    unconditional = corpus.unconditional[None]

    def batch(index: int) -> dict:
        rng = np.random.default_rng([TRAJECTORY_SEED, index])
        torch.manual_seed(TRAJECTORY_SEED * 1_000_003 + index)
        kind = "context" if index % 2 else "text"
        _, features, _ = corpus.batch(rng, kind, batch_size(kind, batch_cap))
        noise = torch.randn(features.shape[0], *corpus.latents.shape[1:])
        states = teacher_trajectory(base_model, noise, features, unconditional, sigmas, TEACHER_SUBSTEPS,
                                    TEACHER_GUIDANCE)
        return {"states": states, "features": features, "sigmas": sigmas}

    return write_shards(out / "trajectories", "batch", batches, batch, minutes, _stage_log("trajectories"))


def distillation_loss(base_model, trajectory: dict, rng) -> torch.Tensor:
    """Each sample at a random one of the 8 states: the student's x0 at that state must be the x0 whose Euler step
    reaches the teacher's next state, x0* = x_k - (x_k+1 - x_k) * sigma_k / (sigma_k+1 - sigma_k) (the teacher's
    final state itself for the last step); the error is weighted as a velocity error, by 1/sigma_k."""
    states, features, sigmas = trajectory["states"], trajectory["features"], trajectory["sigmas"]
    batch = states.shape[1]
    k = torch.from_numpy(rng.integers(0, len(sigmas) - 1, batch))
    rows = torch.arange(batch)
    x, x_next = states[k, rows], states[k + 1, rows]
    sigma, sigma_next = sigmas[k].view(-1, 1, 1, 1), sigmas[k + 1].view(-1, 1, 1, 1)
    target = x - (x_next - x) * sigma / (sigma_next - sigma)
    predicted = base_model.apply_model(x, sigmas[k], c_crossattn=features, num_tokens=features.shape[1])
    return ((predicted - target) / sigma).pow(2).mean()


def build_distilled_dit(out: Path, workshop: Workshop, steps: int = DISTILL_STEPS, minutes: float | None = None):
    final = out / "distill" / "dit.safetensors"
    if final.exists():
        return final
    trajectories = [torch.load(p, weights_only=True) for p in sorted((out / "trajectories").glob("batch_*.pt"))]

    def loss(base_model, step: int, rng) -> torch.Tensor:
        return distillation_loss(base_model, trajectories[rng.integers(len(trajectories))], rng)

    return train_dit(out, "distill", models.load_tensors(out / "pretrain" / "dit.safetensors"), loss, steps=steps,
                     learning_rate=DISTILL_LEARNING_RATE, warmup=1, seed=DISTILL_SEED, minutes=minutes)


# ---------------------------------------------------------------- export

def export_weights(out: Path, weights: Path) -> Path:
    from world.manifest import write_manifest

    sources = built_files(out)
    missing = [str(path) for path in sources.values() if not path.exists()]
    if missing:
        raise FileNotFoundError(f"build the earlier stages first: {', '.join(missing)} missing")
    weights.mkdir(parents=True, exist_ok=True)
    dit = {k: v.to(torch.bfloat16) for k, v in models.load_tensors(sources.pop("dit.safetensors")).items()}
    models.save_atomically(dit, weights / "dit.safetensors")
    for name, path in sources.items():
        shutil.copyfile(path, weights / name)
    return write_manifest(weights)


# ---------------------------------------------------------------- command line

STAGES = ("encoders", "vae", "corpus", "pretrain", "trajectories", "distill", "export")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="*", metavar="STAGE", help=f"any of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--out", type=Path, default=models.BUILD_DIR)
    parser.add_argument("--weights", type=Path, default=models.WEIGHTS_DIR, help="where export writes")
    parser.add_argument("--minutes", type=float, default=None, help="stop (checkpointed) after this many minutes")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of each trained stage")
    parser.add_argument("--examples", type=int, default=None, help="examples in the corpus")
    parser.add_argument("--batches", type=int, default=None, help="batches of recorded trajectories")
    parser.add_argument("--batch-size", type=int, default=None, help="at most this many examples per batch")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage {', '.join(unknown)}: the stages are {', '.join(STAGES)}")
    out = args.out.resolve()
    sizes = {"vae": ("steps", args.steps), "corpus": ("examples", args.examples), "pretrain": ("steps", args.steps),
             "trajectories": ("batches", args.batches), "distill": ("steps", args.steps)}
    builders = {"vae": build_vae, "corpus": build_corpus, "pretrain": build_pretrained_dit,
                "trajectories": build_trajectories, "distill": build_distilled_dit}
    workshop = None
    for stage in [s for s in STAGES if s in (args.stages or STAGES)]:
        if stage == "encoders":
            build_encoders(out)
            continue
        if stage == "export":
            print(f"[export] done: {export_weights(out, args.weights.resolve())}", flush=True)
            continue
        workshop = workshop or Workshop.open(out)
        name, value = sizes[stage]
        sizes_given = {} if value is None else {name: value}
        if args.batch_size is not None and stage in ("vae", "pretrain", "trajectories"):
            sizes_given["batch_cap"] = args.batch_size
        if stage == "vae":
            sizes_given["shipped"] = args.weights.resolve() / "vae.safetensors"
        with workshop.training():
            built = builders[stage](out, workshop, minutes=args.minutes, **sizes_given)
        if built is None:
            print(f"[{stage}] stopped before the end; run the same command again to continue", flush=True)
            return 3
        print(f"[{stage}] done: {built}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
