"""Small synthetic datasets for the FLUX.2-klein tests: concept pairs in two aspect buckets, and edit triples."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def scene(width: int, height: int, seed: int, disc_x: float = 0.5, background: float = 0.3) -> np.ndarray:
    """A colored disc on a gradient; `seed` picks the disc color, `disc_x` its horizontal position."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx / width, yy / height, np.full(xx.shape, background)], -1)
    image[(xx - width * disc_x) ** 2 + (yy - height / 2) ** 2 < (min(width, height) / 4) ** 2] = rng.uniform(0.2, 1.0, 3)
    return image


def save(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def write_concept_folder(folder: Path, sizes=((96, 64), (64, 64)), seed: int = 0) -> list[Path]:
    """One image per size (different aspect buckets), captioned with two `[trigger]` prompt variants each."""
    paths = []
    for index, (width, height) in enumerate(sizes):
        path = save(scene(width, height, seed + index, disc_x=0.3 + 0.4 * index), folder / f"concept_{index}.png")
        path.with_suffix(".txt").write_text(f"a photo of [trigger] number {index}\n[trigger] on a gradient background\n")
        paths.append(path)
    return paths


def write_edit_folder(folder: Path, count: int = 2, size=(64, 64), seed: int = 10, target_disc_x: float = 0.7,
                      source_disc_x: float = 0.3) -> list[dict]:
    """Edit triples: a source scene, and as target the same scene with the disc moved right and a darker
    background; metadata.jsonl lists them with two instruction variants each."""
    records = []
    for index in range(count):
        width, height = size
        source = save(scene(width, height, seed + index, disc_x=source_disc_x), folder / f"source_{index}.png")
        target = save(scene(width, height, seed + index, disc_x=target_disc_x, background=0.05),
                      folder / f"target_{index}.png")
        records.append({"sources": [source.name], "target": target.name,
                        "prompts": ["move the [trigger] disc to the right", "[trigger]: shift the disc right, dark sky"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def write_single_image_folder(folder: Path, seed: int, caption: str, size=(64, 64)) -> Path:
    """One image with a caption; folders differing only in `seed` hold different images for the same prompts."""
    width, height = size
    path = save(scene(width, height, seed, disc_x=0.3 + 0.1 * (seed % 5), background=0.1 * (seed % 7)),
                folder / "image.png")
    path.with_suffix(".txt").write_text(caption + "\n")
    return path
