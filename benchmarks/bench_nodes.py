"""DOPSDTrain against its own parts and against ComfyUI's native TrainLoraNode, inside the real ComfyUI.

One run boots the selected ComfyUI in this process (the test harness's in-process runtime: 0.3.75 from .venv, or
0.33 with DOPSD_COMFY_VERSION=0.33 and .venv-comfy033/bin/python), loads the tiny
real-architecture Z-Image checkpoints through ComfyUI's own loaders, and executes API-format graphs with the
real DOPSDTrain node and the stock TrainLoraNode. It prints ratios only (times in ms are context, not claims):

  (1) DOPSDTrain step / (K x (teacher forward + student forward/backward)), K = 4 and 8;       target <= 1.15
  (2) DOPSDTrain (objective SFT) step / TrainLoraNode step, same model, data, rank, dtype;       target <= 1.05
  (3) peak memory of DOPSDTrain (K = 2, 4, 8, SFT) vs TrainLoraNode;       target: flat in K, within one
      roll-out step's activations of SFT
  (4) share of a DOPSDTrain step spent outside the model calls (data, conditioning glue, optimizer, EMA,
      roll-out bookkeeping);                                                                    target < 5 %
  (+) gradient checkpointing: step with / without, and where its cost goes.

How it measures
- Step time: ComfyUI's progress hook fires once per optimizer step in both nodes; the time from one step's
  hook to the next is one step of the real node as the executor runs it (step 1 is not measured: optimizer
  state is created there). Repeats interleave the configurations (A/B pairs back to back; SFT vs native as
  A B B A); a ratio is formed within each repeat, and the table shows its median and range over repeats.
- Parts for (1): DOPSDTrain is run as is, watched through its observer seam (TRAINING_OBSERVERS): after each
  step's progress update the observer times K teacher forwards (no grad, teacher adapter) and K student
  forward + x0 loss + backward passes through the very denoiser, adapters, conditionings and
  gradient-checkpointing scope the node built, then clears the gradients. The next step is
  timed from the end of that, so every step is paired with its parts measured just before it.
- Clock: process CPU time (one intra-op thread by default, so it is the work done whatever else loads the
  machine), and wall time in brackets; on an idle machine they agree.
- (4): the diffusion model's forward and every .backward() are timed while the node runs; "outside" is the
  step minus those. The breakdown times the ComfyUI model call, adapter switches, optimizer and EMA too.
- (3): CPU has no allocator-peak API; torch's profiler with profile_memory=True reports every CPU allocation
  and free with the running total, so the peak of that total while the training graph runs (upstream nodes
  cached) minus its value at the start is the CPU analogue of torch.cuda.max_memory_allocated (RSS would
  count the allocator's cached pages and the whole process). The unit "one roll-out step's activations" is
  the larger of the same peak over one teacher forward and over one student forward+backward, taken inside
  the node before training.

Run from the repository root (a few minutes on two CPU cores):
    .venv/bin/python benchmarks/bench_nodes.py                                               # ComfyUI 0.3.75
    DOPSD_COMFY_VERSION=0.33 .venv-comfy033/bin/python benchmarks/bench_nodes.py             # ComfyUI 0.33
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from devkit.tiny_dataset import write_concept_images  # noqa: E402
from devkit.tiny_models import write_tiny_models  # noqa: E402
from devkit.tiny_vlm import write_tiny_vision_towers  # noqa: E402
from devkit.comfy_runtime import ComfyRuntime  # noqa: E402
from devkit.paths import make_base_directory  # noqa: E402
from benchmarks.node_bench.instrumentation import Harness, install_instrumentation, quiet_stderr  # noqa: E402
from benchmarks.node_bench.measure import (  # noqa: E402
    DATASET_FOLDER, Setting, dopsd_graph, execute, measure_memory, measure_speed, native_graph)
from benchmarks.node_bench.report import print_report  # noqa: E402

# ------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every configuration")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed run (>= 3)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (multiple of 16)")
    parser.add_argument("--rank", type=int, default=16)
    # One thread: on a small shared machine spinning intra-op threads make timings erratic, and with one
    # thread the process CPU time is the work done whatever else runs.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base", type=Path, default=None, help="ComfyUI base directory to create (default: a temp dir)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # ComfyUI's start-up warnings (missing torchaudio) and per-step info lines
    # TrainLoraNode autocasts to its training dtype; float32 autocast on CPU is a no-op that warns every step.
    warnings.filterwarnings("ignore", message="In CPU autocast")
    setting = Setting(size=args.size, rank=args.rank, steps=args.steps)

    base = args.base or Path(tempfile.mkdtemp(prefix="dopsd_bench_"))
    make_base_directory(base)
    write_tiny_models(base / "models")
    write_tiny_vision_towers(base / "models")
    paths = write_concept_images(base / "input" / DATASET_FOLDER, count=2, size=(args.size, args.size))
    images = []
    for path in paths:  # LoadImage lists the input folder's top level
        shutil.copy(path, base / "input" / f"bench_{path.name}")
        images.append(f"bench_{path.name}")
    print(f"booting ComfyUI in-process (base {base}) ...", flush=True)
    with quiet_stderr():
        runtime = ComfyRuntime.boot(base)
    install_instrumentation(runtime)
    harness = Harness(runtime)

    print("warm-up (caches the loader, dataset and conditioning nodes) ...", flush=True)
    warm = replace(setting, steps=2)
    execute(runtime, dopsd_graph(warm, images, k=2, seed=0), 2)
    execute(runtime, native_graph(warm, images, seed=0), 2)
    print("speed ...", flush=True)
    everything, per_repeat = measure_speed(runtime, harness, setting, images, args.repeats)
    memory = {}
    if not args.skip_memory:
        for checkpointing in (True, False):
            print(f"memory, gradient checkpointing {'on' if checkpointing else 'off'} ...", flush=True)
            with quiet_stderr():
                memory[checkpointing] = measure_memory(runtime, harness, setting, images, checkpointing)
    print_report(setting, everything, per_repeat, memory, args.repeats, args.threads, started)
    from benchmarks import cost_model  # noqa: E402  (pure arithmetic; printed so one command shows both)

    print()
    cost_model.main([])


if __name__ == "__main__":
    main()
