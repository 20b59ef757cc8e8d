"""One resumable training loop for every trained part of the world (evaluator, VAE, DiT pretraining, distillation).

A session here ends, and kills what still runs, after a few hours on two cores: each loop saves its modules, its
optimizer and its progress atomically every few minutes and, called again with the same checkpoint, continues from
there. Batch `step` draws from numpy's default_rng([seed, step]) and torch's generator seeded with (seed, step), so a
resumed run ends with the weights of an uninterrupted one.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch


@dataclass
class Progress:
    step: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def recent_loss(self) -> float:
        tail = self.losses[-50:]
        return float(np.mean(tail)) if tail else float("nan")


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer, progress: Progress) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    torch.save({"modules": {name: module.state_dict() for name, module in modules.items()},
                "optimizer": optimizer.state_dict(), "step": progress.step, "seconds": progress.seconds,
                "losses": progress.losses}, staging)
    os.replace(staging, path)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer) -> Progress:
    if not path.exists():
        return Progress()
    state = torch.load(path, weights_only=True)
    for name, module in modules.items():
        module.load_state_dict(state["modules"][name])
    optimizer.load_state_dict(state["optimizer"])
    return Progress(state["step"], state["seconds"], list(state["losses"]))


def train_resumably(checkpoint: Path, modules: dict[str, torch.nn.Module], optimizer, steps: int,
                    train_step: Callable[[int, np.random.Generator], float], *, seed: int = 0,
                    learning_rate: Callable[[int], float] | None = None, save_every_s: float = 180.0,
                    save_every_steps: int | None = None, minutes: float | None = None,
                    log: Callable[[str], None] = print) -> Progress:
    """Runs `train_step(step, rng)` (one optimizer step, returns its loss) from the checkpoint's step up to `steps`,
    saving every `save_every_s` seconds (or every `save_every_steps` steps) and at the end, each save logged.

    Stops early, after saving, once `minutes` of wall time have passed in this call; `progress.step < steps` then
    says the loop has more to do. `learning_rate(step)` sets every parameter group's lr before the step."""
    progress = load_checkpoint(checkpoint, modules, optimizer)
    if progress.step:
        log(f"{checkpoint.name}: resumed at step {progress.step}/{steps}")
    began = last_save = time.perf_counter()
    seconds_before = progress.seconds
    while progress.step < steps:
        if learning_rate is not None:
            for group in optimizer.param_groups:
                group["lr"] = float(learning_rate(progress.step))
        torch.manual_seed(seed * 1_000_003 + progress.step)
        progress.losses.append(float(train_step(progress.step, np.random.default_rng([seed, progress.step]))))
        progress.step += 1
        now = time.perf_counter()
        progress.seconds = seconds_before + now - began
        out_of_time = minutes is not None and now - began > minutes * 60
        due = (progress.step % save_every_steps == 0) if save_every_steps else now - last_save > save_every_s
        if progress.step == steps or out_of_time or due:
            save_checkpoint(checkpoint, modules, optimizer, progress)
            last_save = now
            log(f"{checkpoint.name}: step {progress.step}/{steps} loss {progress.recent_loss:.4f} "
                f"({progress.seconds:.0f} s)")
        if out_of_time:
            break
    return progress
