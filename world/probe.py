"""How well a stage's DiT follows prompts, before the next stage is built on it.

    python -m world.probe [--stage pretrain|distill] [--prompts 24]

Takes the stage's finished weights (<build>/<stage>/dit.safetensors), or else the EMA weights of its newest
checkpoint, puts them with the built VAE and encoders into a scratch ComfyUI folder, and samples held-out base
prompts through the stock nodes (world.generate) at 8 steps with CFG 1 and at 32 steps with CFG 3. It prints the
evaluator's attribute accuracy (with each attribute's chance level beside it), sharpness and Fréchet distance
against real renders of the same prompts. Then the ability the D-OPSD teacher relies on: held-out one-object
prompts whose object is named by a made-up word, with another rendering of the object as the image context (the
teacher node's Qwen3-VL encoding), against the same prompts without the image; the object's shape and colour can
only come from the image. And the teacher itself: held-out concept prompts (the trigger word in place of the
concept), each with its own render as the image context (as D-OPSD's teacher gets each training image with its own
prompt), against the same prompts without it, scored by the evaluator's concept probability: D-OPSD can teach the
student only what this teacher draws. Writes a grid
(rows: 8 steps, 32 steps, real, context images, with context, without, concept with and without) to
<build>/probe.png. Last, which caption words the DiT reads: for held-out one-object scenes, how much its denoising
error rises when one word of the caption is swapped for another of its kind (object colour, shape, size, background
colour) while the image stays the same; a word it ignores leaves the error unchanged; and how much it rises when
the named objects' image contexts are swapped among them. This shows reading before the samples do.
"""
from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from world import models
from world.builder import MADE_UP_WORDS, Encoders, Workshop, built_files, name_object
from world.evaluators import attribute_accuracy, concept_probability, frechet_distance, load_evaluator, sharpness
from world.experiment import TRIGGER_WORD
from world.scenes import (BACKGROUND_COLORS, OBJECT_COLORS, POSITIONS, SHAPE_WORDS, SHAPES, SIZE_WORDS, SIZES, TRIGGER,
                          caption, concept_caption, held_out_scenes, pick, render_batch,
                          rerender, restyle)

SAMPLINGS = ((8, 1.0), (32, 3.0))
PROBE_SEED = 7
SWAP_SIGMAS = (0.6, 0.85)   # noise levels where the caption decides the content: the layout is not yet fixed


def stage_weights(out: Path, stage: str, raw: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The stage's DiT weights and where they came from; `raw`: a checkpoint's trained weights instead of their
    EMA (early on, the EMA still holds a share of the initial weights: decay**step)."""
    final = out / stage / "dit.safetensors"
    if final.exists():
        return models.load_tensors(final), str(final)
    checkpoint = out / stage / "checkpoint.pt"
    if not checkpoint.exists():
        raise SystemExit(f"{stage} has neither {final} nor {checkpoint}: build it first")
    state = torch.load(checkpoint, weights_only=True)
    kind = "dit" if raw else "ema"
    return ({k: v.float() for k, v in state["modules"][kind].items()},
            f"the {'trained' if raw else 'EMA'} weights of {checkpoint} at step {state['step']}")


def chance_levels() -> dict[str, float]:
    """What guessing scores on an object's attributes (a background is right only with its kind and both colours)."""
    return {"shape": 1 / len(SHAPES), "color": 1 / len(OBJECT_COLORS), "size": 1 / len(SIZES),
            "position": 1 / len(POSITIONS)}


def context_prompts(count: int, rng) -> tuple[list, list[str], np.ndarray]:
    """Held-out one-object scenes, their captions with the object named by a made-up word, and for each another
    rendering of the object (elsewhere, another size and background), as the corpus's context examples are made."""
    scenes = [scene for scene in held_out_scenes("base", 8 * count, PROBE_SEED + 1) if len(scene.objects) == 1][:count]
    prompts = [name_object(caption(scene, rng), scene.objects[0], pick(rng, MADE_UP_WORDS)) for scene in scenes]
    return scenes, prompts, render_batch([rerender(scene, rng) for scene in scenes])


def grid_row(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """The first `columns` images side by side."""
    return np.concatenate(list(images[:columns]), 1)


def object_accuracy(evaluator, images: np.ndarray, scenes: list) -> str:
    accuracy = attribute_accuracy(evaluator.outputs(images), scenes)
    return ", ".join(f"{k} {accuracy[k]:.2f}" for k in ("shape", "color", "size", "position"))


def _other(options, *taken):
    return next(option for option in options if option not in taken)


def swapped_caption(prompt: str, scene, attribute: str) -> str:
    """`prompt` (a caption of the one-object `scene`) with the words of one attribute replaced by another value's."""
    obj = scene.objects[0]
    shape_word = next(word for word in SHAPE_WORDS[obj.shape] if f"{obj.color} {word}" in prompt)
    size_word = next(word for word in SIZE_WORDS[obj.size] if f"{word} {obj.color}" in prompt)
    if attribute == "background color":
        colors = scene.background.colors
        return re.sub(rf"\b{colors[0]}\b", _other(BACKGROUND_COLORS, *colors), prompt)
    old, new = {
        "object color": (f"{obj.color} {shape_word}", f"{_other(OBJECT_COLORS, obj.color)} {shape_word}"),
        "shape": (f"{obj.color} {shape_word}", f"{obj.color} {SHAPE_WORDS[_other(SHAPES, obj.shape)][0]}"),
        "size": (f"{size_word} {obj.color}", f"{SIZE_WORDS[_other(SIZES, obj.size)][0]} {obj.color}"),
    }[attribute]
    return prompt.replace(old, new, 1)


def probe_latents(base_model, encoders, scenes: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The scenes' latents as the DiT sees them, and fixed noise for them."""
    x0 = base_model.process_latent_in(encoders.latents(render_batch(scenes)))
    return x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(PROBE_SEED))


def denoising_error(base_model, x0: torch.Tensor, noise: torch.Tensor, encoded: list[torch.Tensor]) -> float:
    """The DiT's mean x0 error over the examples at each of SWAP_SIGMAS, example i denoised with features
    encoded[i]."""
    errors = []
    for sigma in SWAP_SIGMAS:
        for i, features in enumerate(encoded):
            x_t = sigma * noise[i:i + 1] + (1 - sigma) * x0[i:i + 1]
            predicted = base_model.apply_model(x_t, torch.tensor([sigma]), c_crossattn=features,
                                               num_tokens=features.shape[1])
            errors.append((predicted - x0[i:i + 1]).pow(2).mean().item())
    return float(np.mean(errors))


@torch.no_grad()
def word_reliance(base_model, encoders, scenes: list, rng) -> dict[str, float]:
    """Per attribute, the relative rise of the DiT's x0 error (mean over `SWAP_SIGMAS`, same noise) when the
    caption's word for it is swapped: 0 when the DiT ignores that word."""
    x0, noise = probe_latents(base_model, encoders, scenes)
    prompts = [caption(scene, rng) for scene in scenes]

    def error(captions: list[str]) -> float:
        return denoising_error(base_model, x0, noise, [encoders.text(prompt)[None] for prompt in captions])

    true = error(prompts)
    return {attribute: error([swapped_caption(p, s, attribute) for p, s in zip(prompts, scenes)]) / true - 1
            for attribute in ("object color", "shape", "size", "background color")}


@torch.no_grad()
def image_reliance(base_model, encoders, scenes: list, prompts: list[str], images: np.ndarray) -> float:
    """The relative rise of the DiT's x0 error on prompts that name their object by a made-up word when each
    image context is swapped for the next scene's (another object): 0 when the DiT ignores the image."""
    x0, noise = probe_latents(base_model, encoders, scenes)

    def error(shown: np.ndarray) -> float:
        return denoising_error(base_model, x0, noise,
                               [encoders.context(image, prompt)[None] for image, prompt in zip(shown, prompts)])

    return error(np.roll(images, 1, axis=0)) / error(images) - 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("pretrain", "distill"), default="pretrain")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--out", type=Path, default=models.BUILD_DIR)
    parser.add_argument("--raw", action="store_true", help="a checkpoint's trained weights, not their EMA")
    args = parser.parse_args(argv)
    from PIL import Image

    from devkit.comfy_runtime import ComfyRuntime
    from devkit.paths import make_base_directory
    from world.generate import Sampling, generate, sample_conditionings

    weights, source = stage_weights(args.out, args.stage, args.raw)
    base = make_base_directory(Path(tempfile.mkdtemp(prefix="world_probe_")))
    for name, path in built_files(args.out).items():
        target = base / "models" / models.WEIGHT_FILES[name]
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == "dit.safetensors":
            models.save_atomically(weights, target)
        else:
            shutil.copyfile(path, target)
    runtime = ComfyRuntime.boot(base)
    rng = np.random.default_rng(PROBE_SEED)
    scenes = held_out_scenes("base", args.prompts, PROBE_SEED)
    prompts = [caption(scene, rng) for scene in scenes]
    real = render_batch([restyle(scene, rng) for scene in scenes])
    evaluator = load_evaluator()
    real_features = evaluator.outputs(real)["features"]
    print(f"{args.stage}: {source}; {args.prompts} held-out prompts; chance: "
          + ", ".join(f"{k} {v:.2f}" for k, v in chance_levels().items()), flush=True)
    rows = []
    for steps, cfg in SAMPLINGS:
        started = time.perf_counter()
        images = generate(runtime, prompts, Sampling(steps=steps, cfg=cfg, images_per_prompt=1))
        outputs = evaluator.outputs(images)
        accuracy = attribute_accuracy(outputs, scenes)
        print(f"  {steps} steps, CFG {cfg:g}: " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items())
              + f"; sharpness {sharpness(images, real):.2f}; FD {frechet_distance(outputs['features'], real_features):.0f}"
              f" ({time.perf_counter() - started:.0f} s)", flush=True)
        rows.append(grid_row(images))
    rows.append(grid_row(real))

    import nodes as comfy_nodes

    scenes, named, context_images = context_prompts(args.prompts, rng)
    encoders = Encoders(Workshop(args.out, runtime))
    model = comfy_nodes.UNETLoader().load_unet(Path(models.WEIGHT_FILES["dit.safetensors"]).name, "default")[0]
    negative = [[encoders.text("")[None], {}]]

    def compare(label: str, images: list[np.ndarray], prompts: list[str], score) -> None:
        """Samples each prompt with its image as the teacher node's context and as plain text, at each of SAMPLINGS;
        prints score(samples) of both and adds both to the grid at the first sampling."""
        with_image = [[[encoders.context(image, prompt)[None], {}]] for image, prompt in zip(images, prompts)]
        without = [[[encoders.text(prompt)[None], {}]] for prompt in prompts]
        for steps, cfg in SAMPLINGS:
            sampling = Sampling(steps=steps, cfg=cfg, images_per_prompt=1)
            shown = sample_conditionings(model, encoders.vae, with_image, negative, sampling)
            unseen = sample_conditionings(model, encoders.vae, without, negative, sampling)
            print(f"  {label}{steps} steps, CFG {cfg:g}: with the image {score(shown)}; without it {score(unseen)}",
                  flush=True)
            if steps == SAMPLINGS[0][0]:
                rows.extend([grid_row(shown), grid_row(unseen)])

    print(f"  context: {len(named)} one-object prompts naming the object by a made-up word (e.g. {named[0]!r})",
          flush=True)
    rows.append(grid_row(context_images))
    compare("", list(context_images), named, lambda samples: object_accuracy(evaluator, samples, scenes))
    concept_scenes = held_out_scenes("concept", args.prompts, PROBE_SEED)
    concept_prompts = [concept_caption(scene, rng).replace(TRIGGER, TRIGGER_WORD) for scene in concept_scenes]
    compare("concept, ", list(render_batch(concept_scenes)), concept_prompts,
            lambda samples: f"concept probability {concept_probability(evaluator.outputs(samples)).mean():.2f}")
    reliance = word_reliance(model.model, encoders, scenes, rng)
    print("  word reliance (x0 error rise when the word is swapped): "
          + ", ".join(f"{k} {v:+.1%}" for k, v in reliance.items()), flush=True)
    print("  image reliance (x0 error rise when the image context shows another object): "
          f"{image_reliance(model.model, encoders, scenes, named, context_images):+.1%}", flush=True)
    grid = Image.fromarray((np.concatenate(rows, 0) * 255).clip(0, 255).astype(np.uint8))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(args.out / "probe.png")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
