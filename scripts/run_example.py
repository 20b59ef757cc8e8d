"""Headless run of the example fine-tune-then-generate workflow on the small built-in models (see README)."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devkit.paths import make_base_directory  # noqa: E402


def main() -> None:
    out = REPO / "output" / "example"
    shutil.rmtree(out, ignore_errors=True)
    base = make_base_directory(out / "comfyui")
    from devkit.example_job import TINY_SETTINGS, WORKFLOW, prepare_base, run_example
    from devkit.comfy_runtime import ComfyRuntime

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


if __name__ == "__main__":
    main()
