"""Training jobs on the tiny models: export one through the real node, run it with torchrun (gloo on the CPU), read
its log. Shared by tests/multi_gpu and benchmarks/bench_multi_gpu.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from devkit.graph import Graph, NodeRef
from devkit.paths import REPO_ROOT, comfyui_dir

LAUNCHER = REPO_ROOT / "devkit" / "tiny_train_job.py"
HYPERPARAMETERS = ("objective", "steps", "learning_rate", "rank", "alpha", "lora_init", "ema_decay", "loss_space",
                   "gradient_accumulation", "warmup_steps", "seed", "lora_targets", "custom_lora_targets",
                   "gradient_checkpointing")


def export_node(g: Graph, model, training_set, training_sigmas, job_folder: str, settings: dict,
                checkpoint_every: int = 2, keep_last: int = 0) -> NodeRef:
    return g.node("DOPSDExportTrainingJob", model=model, training_set=training_set, training_sigmas=training_sigmas,
                  **{k: settings[k] for k in HYPERPARAMETERS}, checkpoint_every=checkpoint_every, keep_last=keep_last,
                  job_folder=job_folder)


def torchrun(job: Path, processes: int, model_file: Path, *extra: str, threads: int = 1) -> subprocess.CompletedProcess:
    """multi_gpu/train.py on `processes` local processes (with the tiny-checkpoint patches), `threads` each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               str(LAUNCHER), str(job), "--comfyui", str(comfyui_dir()), "--model-file", str(model_file), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO_ROOT)


def training_log(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "training_log.jsonl").read_text().splitlines()]
