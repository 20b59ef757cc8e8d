"""TEST-ONLY: kill -9 the ComfyUI server at an exact point of a D-OPSD run, to test that runs survive it.

Installed as a custom node (after the pack: ComfyUI loads custom nodes in name order) in a test's own ComfyUI base
directory; it registers no nodes. $DOPSD_CRASH_AT chooses the point, and the process sends itself SIGKILL there:

- ``rollout:N``      in the N-th roll-out step's loss (N counts from 1 over the whole run: mid optimizer step);
- ``checkpoint:N``   in the N-th checkpoint save, after its student file is written and before the rest;
- ``lora_save``      in the LoRA file's write, after half of its bytes.

Unset, it changes nothing. Never ship this with the pack.
"""
from __future__ import annotations

import os
import signal
import sys

import safetensors.torch

NODE_CLASS_MAPPINGS: dict = {}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def pack_module(suffix: str):
    return next(module for name, module in sys.modules.items() if name.endswith(f"comfyui-dopsd.{suffix}"))


def count_down(n: int, function):
    """`function`, except that its n-th call dies."""
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            die()
        return function(*args, **kwargs)

    return wrapped


def install(point: str) -> None:
    kind, _, number = point.partition(":")
    if kind == "rollout":
        trainer = pack_module("dopsd_core.trainer")
        trainer.distillation_loss = count_down(int(number), trainer.distillation_loss)
    elif kind == "checkpoint":
        checkpoints = pack_module("dopsd_core.checkpoints")
        save, saves = checkpoints.save_adapter_state, 0

        def save_then_die(state, path):
            nonlocal saves
            save(state, path)
            saves += 1
            if saves == 2 * int(number) - 1:  # the student file of that save; the teacher and trainer state never come
                die()

        checkpoints.save_adapter_state = save_then_die
    elif kind == "lora_save":
        write = safetensors.torch.save_file

        def half_then_die(tensors, filename, metadata=None):
            write(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as file:
                file.truncate(os.path.getsize(filename) // 2)
            die()

        safetensors.torch.save_file = half_then_die
    else:
        raise ValueError(f"DOPSD_CRASH_AT={point!r}: expected rollout:N, checkpoint:N or lora_save")


if os.environ.get("DOPSD_CRASH_AT"):
    install(os.environ["DOPSD_CRASH_AT"])
