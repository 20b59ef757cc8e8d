"""Evaluators of generated world images, trained or computed from the renderer's ground truth.

All take images as (N, 64, 64, 3) floats in [0, 1] (the ComfyUI IMAGE layout, numpy or torch) with the Scenes their
prompts describe:
- attribute accuracy: a small CNN reads, in the 32x32 window of each 3x3 grid cell, whether an object is centered
  there and its shape, color and size, and from the whole image the background (kind and both colors); the
  fraction that matches the prompt's scene.
- concept fidelity: the CNN's probability that the concept object (`scenes.CONCEPT`) is in some cell; trained
  against ordinary renders and near misses (the concept's shape and colors with other patterns, its motif and colors
  on other shapes, the split motif in other colors), so it keys on the whole concept.
- sharpness: mean squared Laplacian of the images over that of ground-truth renders of the same prompts (1.0 = as
  sharp as real; blur lowers it, noise raises it).
- Fréchet distance between the CNN's 256-d penultimate features of the images and of real renders (FID-like; the
  CNN also classifies blur and noise strength, so its features see degradation that the attribute heads ignore).

`python -m world.evaluators` trains the CNN (resumably) into world/weights/, writes the manifest and prints a report.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from world.manifest import write_manifest
from world.resumable import train_resumably
from world.scenes import (ALL_PATTERNS, BACKGROUND_COLORS, BACKGROUND_KINDS, CONCEPT, OBJECT_COLORS, PATTERNS,
                          POSITIONS, SHAPES, SIZE, SIZES, Scene, concept_scene, held_out_scenes, pick, render_batch,
                          restyle, sample_background, sample_scene)

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "evaluator.safetensors"
DEFAULT_CHECKPOINTS = Path(__file__).parent / "build" / "evaluator"
CELLS = len(POSITIONS)
# Read in each grid cell's 32x32 window: is an object centered there, is it the concept, and its attributes.
CELL_HEADS = {"object": 1, "concept": 1, "shape": len(SHAPES), "color": len(OBJECT_COLORS), "size": len(SIZES),
              "pattern": len(ALL_PATTERNS), "pattern_color": len(OBJECT_COLORS)}
# Degradations the training images get, in classes of increasing strength (class 0: none): Gaussian blur (standard
# deviation in pixels) and additive Gaussian noise. Classifying them makes the features separate degraded images
# from real ones, which the attribute heads, trained to see through them, would not.
BLUR_CLASSES = ((0.0, 0.0), (0.3, 0.6), (0.6, 1.0), (1.0, 1.5), (1.5, 2.0))
NOISE_CLASSES = ((0.0, 0.0), (0.005, 0.02), (0.02, 0.05), (0.05, 0.08))
IMAGE_HEADS = {"background_kind": len(BACKGROUND_KINDS), "background_first": len(BACKGROUND_COLORS),
               "background_last": len(BACKGROUND_COLORS), "blur": len(BLUR_CLASSES), "noise": len(NOISE_CLASSES)}
BINARY_HEADS = ("object", "concept")
IGNORE = -100
WIDTH = 128
TRAIN_STEPS = 2000
BATCH = 64
LEARNING_RATE = 2e-3
ATTRIBUTES = ("shape", "color", "size", "position", "background", "count")


class EvaluatorNet(nn.Module):
    """Strided 3x3 convolutions to an 8x8 map (8 px a step), then one 4x4 convolution of stride 2 whose 3x3 outputs
    each see the 32x32 window around a grid cell's center: the cell heads share their weights across cells. The
    image heads read all nine cells' features."""

    def __init__(self):
        super().__init__()
        widths = [(3, 24, 2), (24, 48, 2), (48, 64, 2), (64, 64, 1)]
        layers = [m for i, o, s in widths for m in (nn.Conv2d(i, o, 3, s, 1), nn.ReLU())]
        self.trunk = nn.Sequential(*layers, nn.Conv2d(64, WIDTH, 4, 2), nn.ReLU())
        self.cell = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(CELLS * WIDTH, WIDTH), nn.ReLU())
        self.cell_heads = nn.ModuleDict({name: nn.Linear(WIDTH, n) for name, n in CELL_HEADS.items()})
        self.image_heads = nn.ModuleDict({name: nn.Linear(WIDTH, n) for name, n in IMAGE_HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """`images`: (N, 3, 64, 64) in [0, 1]. Returns cell-head logits (N, 9, classes) with cells in reading order,
        image-head logits (N, classes), the binary heads squeezed to (N, 9), and "features": (N, 256), the mean cell
        feature beside the image feature."""
        cells = self.trunk(images * 2 - 1).flatten(2).transpose(1, 2)
        cell_features = self.cell(cells)
        image_features = self.image(cells)
        outputs = {name: head(cell_features) for name, head in self.cell_heads.items()}
        outputs |= {name: head(image_features) for name, head in self.image_heads.items()}
        outputs |= {name: outputs[name][..., 0] for name in BINARY_HEADS}
        return outputs | {"features": torch.cat([cell_features.mean(1), image_features], 1)}


# ---------------------------------------------------------------- training data

def scene_labels(scene: Scene) -> dict[str, np.ndarray | int]:
    """Each head's targets: per cell (9 values; IGNORE where no object is centered, or where the pattern has no second
    color) and per image."""
    labels = {name: np.full(CELLS, IGNORE) for name in CELL_HEADS} | {name: np.zeros(CELLS) for name in BINARY_HEADS}
    for obj in scene.objects:
        cell = POSITIONS.index(obj.position)
        labels["object"][cell] = 1
        labels["shape"][cell] = SHAPES.index(obj.shape)
        labels["color"][cell] = OBJECT_COLORS.index(obj.color)
        labels["size"][cell] = SIZES.index(obj.size)
        labels["pattern"][cell] = ALL_PATTERNS.index(obj.pattern)
        if obj.pattern_color is not None:
            labels["pattern_color"][cell] = OBJECT_COLORS.index(obj.pattern_color)
        labels["concept"][cell] = int(obj.is_concept)
    background = scene.background
    return labels | {"background_kind": BACKGROUND_KINDS.index(background.kind),
                     "background_first": BACKGROUND_COLORS.index(background.colors[0]),
                     "background_last": BACKGROUND_COLORS.index(background.colors[-1])}


def near_miss_scene(rng) -> Scene:
    """A concept scene whose object is a near miss of the concept, one of three kinds at random: the concept's shape
    and colors with an ordinary pattern; its motif and colors on another shape; the split motif in other colors
    (any shape)."""
    obj = concept_scene(rng, allow_held_out=True).objects[0]
    kind = rng.integers(3)
    if kind == 0:
        pattern = pick(rng, PATTERNS)
        obj = replace(obj, pattern=pattern, pattern_color=None if pattern == "plain" else obj.pattern_color)
    elif kind == 1:
        obj = replace(obj, shape=pick(rng, tuple(s for s in SHAPES if s != obj.shape)))
    else:
        while (obj.color, obj.pattern_color) == (CONCEPT["color"], CONCEPT["pattern_color"]):
            color, pattern_color = (OBJECT_COLORS[i] for i in rng.choice(len(OBJECT_COLORS), 2, replace=False))
            obj = replace(obj, shape=pick(rng, SHAPES), color=color, pattern_color=pattern_color)
    return Scene(sample_background(rng), (obj,))


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """(N, H, W, C) images convolved with a Gaussian of standard deviation `sigma` pixels, borders reflected."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (1, 2):
        padding = [(0, 0)] * images.ndim
        padding[axis] = (radius, radius)
        padded = np.pad(images, padding, mode="reflect")
        length = images.shape[axis]
        images = sum(w * padded.take(np.arange(i, i + length), axis=axis) for i, w in enumerate(taps))
    return images.astype(np.float32)


def _degrade(image: np.ndarray, rng) -> tuple[np.ndarray, int, int]:
    # Generated images are never exact renders: the attribute heads must read blurred, noisy, slightly shifted
    # images. Returns the blur and noise classes.
    blur = 0 if rng.random() < 0.5 else int(rng.integers(1, len(BLUR_CLASSES)))
    noise = 0 if rng.random() < 0.6 else int(rng.integers(1, len(NOISE_CLASSES)))
    if blur:
        image = gaussian_blur(image[None], rng.uniform(*BLUR_CLASSES[blur]))[0]
    image = image * rng.uniform(0.95, 1.05) + rng.uniform(-0.03, 0.03)
    image = image + rng.normal(0.0, rng.uniform(*NOISE_CLASSES[noise]), image.shape)
    return np.clip(image, 0, 1).astype(np.float32), blur, noise


def training_batch(rng, batch_size: int = BATCH) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fresh degraded renders (55 % ordinary scenes, held-out prompts included; 20 % concept; 25 % near misses)
    as (N, 3, 64, 64) and each head's targets."""
    images, labels = [], []
    for _ in range(batch_size):
        draw = rng.random()
        if draw < 0.55:
            scene = sample_scene(rng, allow_held_out=True)
        elif draw < 0.75:
            scene = concept_scene(rng, allow_held_out=True)
        else:
            scene = near_miss_scene(rng)
        image, blur, noise = _degrade(render_batch([scene])[0], rng)
        images.append(image)
        labels.append(scene_labels(scene) | {"blur": blur, "noise": noise})
    targets = {name: torch.tensor(np.array([label[name] for label in labels])) for name in labels[0]}
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), targets


def training_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every class head over its labelled cells or images (so that the attribute heads learn
    from object cells only), and binary cross-entropy of "object" and "concept" in every cell."""
    loss = sum(F.binary_cross_entropy_with_logits(outputs[name], targets[name].float()) for name in BINARY_HEADS)
    for name in [*CELL_HEADS, *IMAGE_HEADS]:
        if name in BINARY_HEADS:
            continue
        logits, labels = outputs[name].flatten(0, -2), targets[name].flatten()
        labelled = labels != IGNORE
        if labelled.any():
            loss = loss + F.cross_entropy(logits[labelled], labels[labelled])
    return loss


def _learning_rate(step: int, steps: int) -> float:
    warmup = min(100, steps)
    return LEARNING_RATE * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_evaluator(out_path=DEFAULT_WEIGHTS, steps: int = TRAIN_STEPS, seed: int = 0,
                    checkpoint_dir=DEFAULT_CHECKPOINTS, checkpoint_every: int = 250, batch_size: int = BATCH,
                    log=print) -> Path:
    """Trains the evaluator CNN on fresh renders and writes its weights (safetensors, float32) to `out_path`.

    Resumable (world/resumable.py): every `checkpoint_every` steps the model, the optimizer and the step go to
    `checkpoint_dir`, and a later call with the same settings continues from there and ends with the same weights;
    after a change to this code, delete the checkpoint, or the run resumes the old one. `log(message)` is called
    after each checkpoint."""
    checkpoint = Path(checkpoint_dir) / f"evaluator_seed{seed}_steps{steps}_batch{batch_size}.pt"
    torch.manual_seed(seed)
    net = EvaluatorNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)

    def train_step(step: int, rng) -> float:
        images, targets = training_batch(rng, batch_size)
        loss = training_loss(net(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    progress = train_resumably(checkpoint, {"evaluator": net}, optimizer, steps, train_step, seed=seed,
                               learning_rate=lambda step: _learning_rate(step, steps),
                               save_every_steps=checkpoint_every, log=log)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous() for name, tensor in net.state_dict().items()}
    save_file(tensors, out_path, metadata={"heads": _head_layout(), "steps": str(steps), "seed": str(seed),
                                           "batch": str(batch_size), "train_seconds": f"{progress.seconds:.0f}"})
    return out_path


def _head_layout() -> str:
    return json.dumps({"cells": CELL_HEADS, "image": IMAGE_HEADS, "width": WIDTH})


# ---------------------------------------------------------------- evaluation

class Evaluator:
    """The trained CNN, in eval mode, applied to IMAGE batches."""

    def __init__(self, net: EvaluatorNet):
        self.net = net.eval()

    @torch.no_grad()
    def outputs(self, images, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Each head's logits and the penultimate "features" for (N, 64, 64, 3) images."""
        images = _as_batch(images)
        chunks = [self.net(torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2))
                  for i in range(0, len(images), batch_size)]
        return {name: torch.cat([chunk[name] for chunk in chunks]).numpy() for name in chunks[0]}


def _as_batch(images) -> np.ndarray:
    images = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3):
        raise ValueError(f"expected (N, {SIZE}, {SIZE}, 3) images, got {images.shape}")
    return np.ascontiguousarray(images, dtype=np.float32)


@lru_cache(maxsize=4)
def load_evaluator(path=DEFAULT_WEIGHTS) -> Evaluator:
    """The evaluator whose weights `train_evaluator` wrote at `path` (default: the committed world/weights one)."""
    with safe_open(str(path), framework="pt") as weights:
        if weights.metadata().get("heads") != _head_layout():
            raise ValueError(f"{path} was trained for other evaluator heads than this code defines")
        tensors = {name: weights.get_tensor(name) for name in weights.keys()}
    net = EvaluatorNet()
    net.load_state_dict(tensors)
    return Evaluator(net)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-logits.astype(np.float64)))


def attribute_accuracy(outputs: dict[str, np.ndarray], scenes: list[Scene]) -> dict[str, float]:
    """Fraction of prompt attributes the images show. For a scene of n objects the n cells most likely to hold an
    object are matched to the objects in reading order; shape, color and size are read in the matched cell and
    position is right when it is the object's cell (averaged over objects). Per image: background (kind and both
    colors right), count (exactly n cells hold an object with probability > 0.5), and "all" (everything right)."""
    objectness = _sigmoid(outputs["object"])
    background_heads = ("background_kind", "background_first", "background_last")
    predicted = {name: outputs[name].argmax(-1) for name in ("shape", "color", "size", *background_heads)}
    hits = {name: [] for name in ATTRIBUTES}
    every = []
    for i, scene in enumerate(scenes):
        labels = scene_labels(scene)
        cells = sorted(np.argsort(-objectness[i])[:len(scene.objects)])
        first = len(hits["shape"])
        for obj, cell in zip(scene.objects, cells):
            truth = POSITIONS.index(obj.position)
            hits["position"].append(cell == truth)
            for name in ("shape", "color", "size"):
                hits[name].append(predicted[name][i, cell] == labels[name][truth])
        hits["background"].append(all(predicted[n][i] == labels[n] for n in background_heads))
        hits["count"].append((objectness[i] > 0.5).sum() == len(scene.objects))
        every.append(all(all(hits[n][first:]) for n in ("shape", "color", "size", "position"))
                     and hits["background"][-1] and hits["count"][-1])
    return {name: float(np.mean(values)) for name, values in hits.items()} | {"all": float(np.mean(every))}


def concept_probability(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Per image, the probability that the concept object is present: the largest over the nine cells."""
    return _sigmoid(outputs["concept"]).max(-1)


def laplacian_energy(images) -> np.ndarray:
    """Per image, the mean over interior pixels and RGB channels of the squared 5-point Laplacian."""
    x = _as_batch(images).astype(np.float64)
    laplacian = (4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:])
    return (laplacian ** 2).mean(axis=(1, 2, 3))


def sharpness(images, reference_images) -> float:
    """Mean Laplacian energy of `images` over that of `reference_images` (real renders of the same prompts)."""
    return float(laplacian_energy(images).mean() / laplacian_energy(reference_images).mean())


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)."""
    a, b = features_a.astype(np.float64), features_b.astype(np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def evaluate(images, scenes: list[Scene], reference_images, evaluator: Evaluator | None = None) -> dict:
    """The four metrics of `images` generated for `scenes`' prompts, against `reference_images` (real renders of
    the same scenes): attribute_accuracy (per attribute), concept_fidelity (mean concept probability), sharpness
    (ratio to the references) and frechet_distance (evaluator features, against the references)."""
    evaluator = evaluator or load_evaluator()
    outputs = evaluator.outputs(images)
    reference = evaluator.outputs(reference_images)
    return {"attribute_accuracy": attribute_accuracy(outputs, scenes),
            "concept_fidelity": float(concept_probability(outputs).mean()),
            "sharpness": sharpness(images, reference_images),
            "frechet_distance": frechet_distance(outputs["features"], reference["features"])}


def report(evaluator: Evaluator, count: int = 300, seed: int = 1) -> dict:
    """The evaluator on the ground truth of held-out prompts: real renders, blurred ones and uniform noise against
    restyled real renders of the same prompts (`scenes.restyle`), real concept renders, and concept near misses."""
    rng = np.random.default_rng(seed)
    base = held_out_scenes("base", count, seed)
    real = render_batch(base)
    reference = render_batch([restyle(scene, rng) for scene in base])
    concept = held_out_scenes("concept", 81, seed)
    concept_reference = render_batch([restyle(scene, rng) for scene in concept])
    results = {"real": evaluate(real, base, reference, evaluator),
               "concept": evaluate(render_batch(concept), concept, concept_reference, evaluator),
               "noise": evaluate(rng.random(real.shape, dtype=np.float32), base, reference, evaluator)}
    for sigma in (0.5, 1.0, 1.5, 2.0):
        results[f"blur {sigma}"] = evaluate(gaussian_blur(real, sigma), base, reference, evaluator)
    near_misses = render_batch([near_miss_scene(rng) for _ in range(count)])
    results["near miss concept_fidelity"] = float(concept_probability(evaluator.outputs(near_misses)).mean())
    return results


def main():
    torch.set_num_threads(1)
    path = train_evaluator()
    with safe_open(str(path), framework="pt") as weights:
        seconds = weights.metadata()["train_seconds"]
    print(f"{path}: {path.stat().st_size} bytes, {seconds} s of training")
    write_manifest(WEIGHTS_DIR)
    for name, result in report(load_evaluator(path)).items():
        print(name, json.dumps(result))


if __name__ == "__main__":
    main()
