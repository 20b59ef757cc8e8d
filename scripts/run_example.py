"""The README's main job, headless: the example fine-tune-then-generate workflow on the small built-in world.

On the world's weights (world/weights, committed) it is the D-OPSD-vs-SFT experiment through the shipped Z-Image
workflow at the main job's size (world.experiment.main_job_scale): a table and a grid of base model, teacher, D-OPSD and
SFT on held-out prompts. Pointed at a folder without the world (--weights), the workflow runs on tiny random models
(noise images, a loss curve), as the fast tests do.

    python scripts/run_example.py [--out DIR] [--weights DIR] [--smoke]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devkit.paths import make_base_directory  # noqa: E402
from world import models  # noqa: E402


def run_on_world(out: Path, weights: Path, smoke: bool) -> None:
    from world.experiment import SMOKE, main_job_scale, run_experiment

    scale = SMOKE if smoke else main_job_scale()
    print(f"example: D-OPSD vs SFT on the world's weights ({weights}), {scale}", flush=True)
    result = run_experiment(out, scale, weights, log=lambda line: print(f"example: {line}", flush=True))
    print(result["table"])
    print(f"example: done in {result['seconds']:.0f} s")
    print(f"example: table       {out / 'table.md'}")
    print(f"example: grid        {out / 'grid.png'} (rows: methods; columns: held-out concept prompts at 8 and 32 steps, base prompts at 8)")


def run_on_tiny_models(out: Path) -> None:
    from devkit.comfy_runtime import ComfyRuntime
    from devkit.example_job import TINY_SETTINGS, WORKFLOW, prepare_base, run_example

    base = make_base_directory(out / "comfyui")
    prepare_base(base)
    runtime = ComfyRuntime.boot(base)
    print(f"example: running {WORKFLOW.relative_to(REPO)} with tiny-model settings {TINY_SETTINGS}", flush=True)
    start = time.perf_counter()
    result = run_example(runtime, out / "results")
    print(f"example: done in {time.perf_counter() - start:.0f} s")
    print(f"example: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over {len(result.losses)} steps")
    print(f"example: LoRA        {result.lora_file}")
    print(f"example: loss curve  {result.loss_curve}")
    for image in result.images:
        print(f"example: image       {image}")
    print(f"example: output folder {out / 'results'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "output" / "example")
    parser.add_argument("--weights", type=Path, default=models.WEIGHTS_DIR, help="the world's weights folder")
    parser.add_argument("--smoke", action="store_true", help="the world's experiment for a moment (the CI test)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    if models.world_is_built(args.weights):
        run_on_world(out, args.weights.resolve(), args.smoke)
    else:
        print(f"example: the world's weights are not in {args.weights} yet (world/builder.py builds them); "
              "running on tiny random models", flush=True)
        run_on_tiny_models(out)


if __name__ == "__main__":
    main()
