"""D-OPSD against plain fine-tuning (SFT) on the world's 8-step model, through the shipped Z-Image workflow.

The workflow file runs in ComfyUI's executor as the web UI queues it, on the world's model files, with the world's
image size and a CPU-sized run (`WORLD_SETTINGS`); the objective, learning rate and seed change per run. Every LoRA
is then judged on held-out prompts by the world's evaluators, sampled with the stock nodes (world/generate.py) at
the model's 8 steps and at 4x as many.

    python -m world.experiment [--seeds 3] [--out output/world_experiment] [--weights world/weights] [--smoke]

`--smoke` runs every part for a moment (2 training steps, one learning rate, a few prompts): the CI test.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from devkit.paths import REPO_ROOT, make_base_directory
from world import models
from world.evaluators import attribute_accuracy, concept_probability, frechet_distance, load_evaluator, sharpness
from world.generate import Sampling, generate, sample_conditionings
from world.scenes import (TRIGGER, caption, concept_caption, held_out_scenes, render_batch, restyle, save_png,
                          write_concept_folder)

CONCEPT_FOLDER = "dopsd/my_concept"
TEACHER_FOLDER = "dopsd/world_teacher_ceiling"
TRIGGER_WORD = "sks"          # the workflow's
CONCEPT_IMAGES = 6
NATIVE_STEPS = 8
WORLD_SETTINGS = {
    "DOPSDDatasetFromFolder": {"megapixels": 64 * 64 / 1_000_000, "bucket_multiple": 16},
    # One roll-out per optimizer step (the recipe's 4 are 4 GPUs); a rank that suits a 256-wide model.
    "DOPSDTrain": {"rank": 16, "alpha": 32.0, "gradient_accumulation": 1, "checkpoint_every": 0, "preview_every": 0},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
}


LEARNING_RATE_SEARCH = (3e-4, 1e-3, 3e-3)


@dataclass(frozen=True)
class Scale:
    train_steps: int = 200
    # Each objective's learning-rate search: every rate at seed 0, the best concept fidelity at 8 steps wins.
    dopsd_learning_rates: tuple[float, ...] = LEARNING_RATE_SEARCH
    sft_learning_rates: tuple[float, ...] = LEARNING_RATE_SEARCH
    seeds: int = 3
    concept_prompts: int = 16
    base_prompts: int = 48
    images_per_prompt: int = 2


RESULTS_DIR = models.WORLD_DIR / "results"


def main_job_scale(search: Path = RESULTS_DIR / "search.json") -> Scale:
    """The README's main job: each objective at the learning rate the committed experiment's search chose, one seed,
    fewer held-out prompts: minutes instead of the search's quarter hour."""
    chosen = {objective: tried["chosen"] for objective, tried in json.loads(search.read_text()).items()}
    return Scale(dopsd_learning_rates=(chosen["D-OPSD"],), sft_learning_rates=(chosen["SFT"],), seeds=1,
                 concept_prompts=8, base_prompts=16)


SMOKE = Scale(train_steps=2, dopsd_learning_rates=(1e-4,), sft_learning_rates=(1e-4,), seeds=1, concept_prompts=2,
              base_prompts=3, images_per_prompt=1)


@dataclass
class Prompts:
    """Held-out prompt combinations (world.scenes.is_held_out): concept prompts with the trigger word, ordinary
    ones, and real renders of each (restyled: other uncaptioned details, as real renders of a prompt vary)."""
    concept_scenes: list
    concept: list[str]
    base_scenes: list
    base: list[str]
    concept_real: np.ndarray
    base_real: np.ndarray

    images_per_prompt: int

    @classmethod
    def held_out(cls, scale: Scale, seed: int = 7) -> "Prompts":
        rng = np.random.default_rng(seed)
        concept_scenes = held_out_scenes("concept", scale.concept_prompts, seed)
        base_scenes = held_out_scenes("base", scale.base_prompts, seed)
        repeat = lambda scenes: [s for s in scenes for _ in range(scale.images_per_prompt)]  # noqa: E731
        return cls(
            concept_scenes=repeat(concept_scenes),
            concept=[concept_caption(s, rng).replace(TRIGGER, TRIGGER_WORD) for s in concept_scenes],
            base_scenes=repeat(base_scenes),
            base=[caption(s, rng) for s in base_scenes],
            concept_real=render_batch([restyle(s, rng) for s in repeat(concept_scenes)]),
            base_real=render_batch([restyle(s, rng) for s in repeat(base_scenes)]),
            images_per_prompt=scale.images_per_prompt,
        )


@dataclass
class Measured:
    concept_fidelity: float
    sharpness: float
    attribute_accuracy: float
    frechet_distance: float
    concept_fidelity_4x: float
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def row(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if k != "images"}


def measure(concept_native: np.ndarray, concept_4x: np.ndarray, base_native: np.ndarray, prompts: Prompts) -> Measured:
    evaluator = load_evaluator()
    base_outputs = evaluator.outputs(base_native)
    return Measured(
        concept_fidelity=float(concept_probability(evaluator.outputs(concept_native)).mean()),
        sharpness=sharpness(np.concatenate([concept_native, base_native]),
                            np.concatenate([prompts.concept_real, prompts.base_real])),
        attribute_accuracy=attribute_accuracy(base_outputs, prompts.base_scenes)["all"],
        frechet_distance=frechet_distance(base_outputs["features"], evaluator.outputs(prompts.base_real)["features"]),
        concept_fidelity_4x=float(concept_probability(evaluator.outputs(concept_4x)).mean()),
        images={"native": concept_native, "4x": concept_4x, "base": base_native},
    )


def prepare_base(base: Path, weights: Path = models.WEIGHTS_DIR) -> Path:
    """A ComfyUI base folder with the world's model files under the workflow's names and the concept folder."""
    make_base_directory(base)
    models.install_world(base / "models", weights)
    write_concept_folder(base / "input" / CONCEPT_FOLDER, count=CONCEPT_IMAGES)
    return base


def training_graph(runtime, objective: str, learning_rate: float, seed: int, lora_name: str, steps: int) -> dict:
    from devkit.example_job import workflow_graph

    graph = workflow_graph(runtime, WORLD_SETTINGS)
    for node in graph.values():
        if node["class_type"] == "DOPSDTrain":
            node["inputs"].update(objective=objective, learning_rate=learning_rate, seed=seed, steps=steps)
        if node["class_type"] == "DOPSDSaveLoRA":
            node["inputs"].update(lora_name=lora_name, overwrite=True)
    return graph


def train(runtime, objective: str, learning_rate: float, seed: int, steps: int) -> str:
    """Runs the workflow; returns the saved LoRA's name as LoraLoaderModelOnly lists it."""
    name = f"world/{objective.lower()}_lr{learning_rate:g}_seed{seed}"
    run = runtime.run(training_graph(runtime, objective, learning_rate, seed, name, steps))
    if not run.success:
        raise RuntimeError(f"{objective} training failed: {run.error or run.node_errors or run.validation_error}")
    return f"{name}.safetensors"


def sample_method(runtime, prompts: Prompts, lora: str | None) -> Measured:
    native = Sampling(steps=NATIVE_STEPS, images_per_prompt=prompts.images_per_prompt)
    many = Sampling(steps=4 * NATIVE_STEPS, images_per_prompt=prompts.images_per_prompt)
    return measure(generate(runtime, prompts.concept, native, lora), generate(runtime, prompts.concept, many, lora),
                   generate(runtime, prompts.base, native, lora), prompts)


def teacher_ceiling(runtime, base: Path, prompts: Prompts, base_model: Measured) -> Measured:
    """The base model given, with each held-out concept prompt, a real render of that prompt as the VLM context
    (what D-OPSD's teacher sees: each training image with its own prompt), sampled like the others; its base-prompt
    columns are the base model's (no context there)."""
    folder = base / "input" / TEACHER_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for index, prompt in enumerate(prompts.concept):
        save_png(prompts.concept_real[index * prompts.images_per_prompt], folder / f"concept_{index}.png")
        (folder / f"concept_{index}.txt").write_text(prompt.replace(TRIGGER_WORD, TRIGGER) + "\n")
    graph = training_graph(runtime, "D-OPSD", 1e-4, 0, "unused", 1)
    keep = {k for k, v in graph.items() if v["class_type"] in ("DOPSDLoadModel", "DOPSDDatasetFromFolder",
                                                               "DOPSDTeacherContextVLM")}
    graph = {k: v for k, v in graph.items() if k in keep}
    [dataset] = [v for v in graph.values() if v["class_type"] == "DOPSDDatasetFromFolder"]
    dataset["inputs"]["folder"] = TEACHER_FOLDER
    [vlm_id] = [k for k, v in graph.items() if v["class_type"] == "DOPSDTeacherContextVLM"]
    [loader_id] = [k for k, v in graph.items() if v["class_type"] == "DOPSDLoadModel"]
    graph["preview"] = {"class_type": "PreviewAny", "inputs": {"source": [vlm_id, 0]}}
    run = runtime.run(graph)
    if not run.success:
        raise RuntimeError(f"teacher encoding failed: {run.error or run.node_errors}")
    model, _, vae = run.output(loader_id)[:3]
    by_prompt = {pair.prompt: pair.teacher for item in run.output(vlm_id)[0] for pair in item.pairs}
    positives = [by_prompt[prompt] for prompt in prompts.concept]

    def sample(steps: int) -> np.ndarray:
        return sample_conditionings(model, vae, positives, None,
                                    Sampling(steps=steps, images_per_prompt=prompts.images_per_prompt))

    return measure(sample(NATIVE_STEPS), sample(4 * NATIVE_STEPS), base_model.images["base"], prompts)


def decoder_ceiling(base: Path, prompts: Prompts, seed: int = 8) -> Measured:
    """Other real renders of the held-out prompts encoded and decoded by the world's VAE: the best any model that
    draws through this decoder can score (the world's VAE is small and soft; every row is limited by it)."""
    import comfy.sd
    import comfy.utils
    import torch

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(base / "models" / models.WEIGHT_FILES["vae.safetensors"])))
    rng = np.random.default_rng(seed)

    @torch.inference_mode()
    def round_trip(scenes) -> np.ndarray:
        pixels = torch.from_numpy(render_batch([restyle(scene, rng) for scene in scenes]))
        return vae.decode(vae.encode(pixels)).float().numpy()

    concept = round_trip(prompts.concept_scenes)
    return measure(concept, concept, round_trip(prompts.base_scenes), prompts)


GRID_SECTIONS = (("native", f"concept prompts, {NATIVE_STEPS} steps"), ("4x", f"concept prompts, {4 * NATIVE_STEPS} steps"),
                 ("base", f"base prompts, {NATIVE_STEPS} steps"))


def save_grid(rows: dict[str, Measured], path: Path, images_per_prompt: int, columns: int = 6) -> Path:
    """Rows: methods; columns: the first image of each of the first held-out prompts, in three sections: concept
    prompts at the native steps and at 4x, base prompts at the native steps (where forgetting shows)."""
    cell, gap = 96, 16
    label = 12 + int(max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(name) for name in rows))
    width = label + (cell * columns + gap) * len(GRID_SECTIONS)
    grid = Image.new("RGB", (width, 24 + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for s, (_, title) in enumerate(GRID_SECTIONS):
        draw.text((label + s * (cell * columns + gap), 6), title, fill="black")
    for r, (name, measured) in enumerate(rows.items()):
        draw.text((4, 24 + r * cell + cell // 2 - 6), name, fill="black")
        for s, (section, _) in enumerate(GRID_SECTIONS):
            for c, image in enumerate(measured.images[section][::images_per_prompt][:columns]):
                tile = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).resize((cell, cell),
                                                                                                       Image.NEAREST)
                grid.paste(tile, (label + s * (cell * columns + gap) + c * cell, 24 + r * cell))
    grid.save(path)
    return path


def markdown_table(rows: dict[str, dict[str, tuple[float, float]]]) -> str:
    header = ("| | concept fidelity @ 8 steps | sharpness @ 8 steps | attribute accuracy (base prompts) | "
              "Fréchet distance | concept fidelity @ 32 steps |\n|---|---|---|---|---|---|\n")
    keys = ("concept_fidelity", "sharpness", "attribute_accuracy", "frechet_distance", "concept_fidelity_4x")
    lines = []
    for name, row in rows.items():
        cells = [f"{row[k][0]:.3f} ± {row[k][1]:.3f}" if row[k][1] else f"{row[k][0]:.3f}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return header + "\n".join(lines) + "\n"


def summarize(runs: list[Measured]) -> dict[str, tuple[float, float]]:
    rows = [m.row() for m in runs]
    return {k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))) for k in rows[0]}


def run_experiment(out: Path, scale: Scale = Scale(), weights: Path = models.WEIGHTS_DIR, log=print) -> dict:
    from devkit.comfy_runtime import ComfyRuntime

    runtime = ComfyRuntime.boot(prepare_base(out / "comfyui", weights))
    prompts = Prompts.held_out(scale)
    began = time.perf_counter()
    base_model = sample_method(runtime, prompts, None)
    rows = {"real renders through the VAE (ceiling)": [decoder_ceiling(out / "comfyui", prompts)],
            "base model (no LoRA)": [base_model],
            "teacher (base + image context)": [teacher_ceiling(runtime, out / "comfyui", prompts, base_model)]}
    log(f"base and teacher measured ({time.perf_counter() - began:.0f} s)")
    search = {}
    for objective, learning_rates in (("D-OPSD", scale.dopsd_learning_rates), ("SFT", scale.sft_learning_rates)):
        tried = {lr: sample_method(runtime, prompts, train(runtime, objective, lr, 0, scale.train_steps))
                 for lr in learning_rates}
        best = max(tried, key=lambda lr: tried[lr].concept_fidelity)
        search[objective] = {f"{lr:g}": tried[lr].row() for lr in tried} | {"chosen": best}
        runs = [tried[best]] + [sample_method(runtime, prompts, train(runtime, objective, best, seed, scale.train_steps))
                                for seed in range(1, scale.seeds)]
        rows[f"{objective} LoRA (lr {best:g})"] = runs
        log(f"{objective}: lr {best:g} chosen, {scale.seeds} seeds ({time.perf_counter() - began:.0f} s)")
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table({name: summarize(runs) for name, runs in rows.items()})
    (out / "table.md").write_text(table)
    (out / "search.json").write_text(json.dumps(search, indent=2))
    save_grid({name: runs[0] for name, runs in rows.items()}, out / "grid.png", prompts.images_per_prompt)
    return {"table": table, "search": search, "seconds": time.perf_counter() - began}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=Scale.seeds)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "output" / "world_experiment")
    parser.add_argument("--weights", type=Path, default=models.WEIGHTS_DIR)
    parser.add_argument("--smoke", action="store_true", help="every part for a moment (the CI test)")
    args = parser.parse_args(argv)
    scale = SMOKE if args.smoke else Scale(seeds=args.seeds)
    result = run_experiment(args.out.resolve(), scale, args.weights.resolve())
    print(result["table"])
    print(f"grid: {args.out / 'grid.png'}; {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
