"""Training jobs on 1 and 2 processes (torchrun, gloo, the CPU): scaling efficiency and communication share.

Exports one job from the tiny Z-Image graph through the real node (a batch of 2 roll-outs per optimizer step),
runs it with torchrun on one process (the batch by accumulation) and on two (one roll-out each), one thread per
process, and reads the per-step times the launcher logs (training_log.jsonl). It prints:

  scaling efficiency = (roll-outs per second on 2 processes) / (2 x roll-outs per second on 1 process)
  communication share = time in the gradient all_reduce / step time, on 2 processes

Both leave out the first step (the optimizer state is created there). On a GPU node the same job and the
same log give the figures for NCCL. Run from the repository root (about two minutes on two CPU cores):
    .venv/bin/python benchmarks/bench_multi_gpu.py
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from devkit.comfy_runtime import ComfyRuntime  # noqa: E402
from devkit.graph import Graph  # noqa: E402
from devkit.paths import make_base_directory  # noqa: E402
from devkit.tiny_dataset import write_concept_images  # noqa: E402
from devkit.tiny_models import ZIMAGE_DIT_FILE, write_tiny_models  # noqa: E402
from devkit.tiny_vlm import write_tiny_vision_towers  # noqa: E402
from devkit.training_jobs import export_node, torchrun, training_log  # noqa: E402
from tests.zimage.zimage_graphs import TRAIN_DEFAULTS, load_family, training_set  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (>= 3)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (multiple of 16)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    base = make_base_directory(Path(tempfile.mkdtemp(prefix="dopsd_bench_jobs_")))
    write_tiny_models(base / "models")
    write_tiny_vision_towers(base / "models")
    write_concept_images(base / "input" / "dopsd" / "bench", count=2, size=(args.size, args.size))
    runtime = ComfyRuntime.boot(base)
    model_file = base / "models" / ZIMAGE_DIT_FILE
    settings = {**TRAIN_DEFAULTS, "steps": args.steps, "gradient_accumulation": 2}
    runs = {}
    for processes in (1, 2):
        g = Graph()
        loader = load_family(g)
        pairs = training_set(g, loader, "dopsd/bench", megapixels=args.size ** 2 / 1e6)
        node = export_node(g, loader.out(0), pairs, loader.out(4), f"dopsd/jobs/bench_{processes}", settings,
                           checkpoint_every=0)
        run = runtime.run(g.to_api())
        if not run.success:
            raise SystemExit(f"export failed: {run.error or run.node_errors}")
        job = Path(run.output(node.node_id)[0])
        print(f"training on {processes} process(es) ...", flush=True)
        done = torchrun(job, processes, model_file)
        if done.returncode:
            raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
        runs[processes] = training_log(job)[1:]
    step = {n: statistics.median(e["seconds"] for e in log) for n, log in runs.items()}
    communication = statistics.median(e["communication_seconds"] / e["seconds"] for e in runs[2])
    efficiency = (2 / step[2]) / (2 * 2 / step[1])
    print(f"\n{args.size}² images, batch 2, {args.steps} steps (median over steps 2-{args.steps}), one thread per process")
    print(f"  1 process x 2 roll-outs: {step[1]:.3f} s per step")
    print(f"  2 processes x 1 roll-out: {step[2]:.3f} s per step")
    print(f"  scaling efficiency 1 -> 2 processes: {efficiency:.2f}  (1.00 = twice the roll-outs per second)")
    print(f"  communication share of a step on 2 processes: {communication:.1%}")


if __name__ == "__main__":
    main()
