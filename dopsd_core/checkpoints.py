"""Training checkpoints: one folder ``step_{N:06d}`` per save, written atomically.

A folder holds ``student.safetensors`` and ``teacher.safetensors`` (one adapter each, keys
``{module}.lora_down.weight``, ``{module}.lora_up.weight``, ``{module}.alpha``) and
``trainer_state.pt`` (optimizer, step, random generator states, config). It is assembled in a
hidden temporary folder beside its final name and renamed into place, so a crash never leaves a
partial checkpoint under a ``step_*`` name.
"""

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .adapters import AdapterState, lora_tensors

STUDENT_FILE = "student.safetensors"
TEACHER_FILE = "teacher.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
_CHECKPOINT_NAME = re.compile(r"step_(\d{6,})")


@dataclass(frozen=True)
class Checkpoint:
    student: AdapterState
    teacher: AdapterState
    trainer_state: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def save_adapter_state(state: AdapterState, path: str | os.PathLike) -> None:
    save_file(lora_tensors(state), os.fspath(path))


def load_adapter_state(path: str | os.PathLike) -> AdapterState:
    tensors = load_file(os.fspath(path))
    names = [key.removesuffix(".alpha") for key in tensors if key.endswith(".alpha")]
    return {
        name: {
            "down": tensors[f"{name}.lora_down.weight"],
            "up": tensors[f"{name}.lora_up.weight"],
            "alpha": tensors[f"{name}.alpha"].item(),
        }
        for name in names
    }


def save_checkpoint(
    folder: str | os.PathLike, step: int, student: AdapterState, teacher: AdapterState, trainer_state: dict[str, Any]
) -> Path:
    """Write ``folder/step_{step:06d}`` atomically (replacing an older one of that name) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=folder))
    try:
        save_adapter_state(student, staging / STUDENT_FILE)
        save_adapter_state(teacher, staging / TEACHER_FILE)
        torch.save(trainer_state, staging / TRAINER_STATE_FILE)
        for file in staging.iterdir():
            _fsync(file)
        if final.exists():
            # Directories cannot be renamed onto non-empty ones; move the old one aside first.
            superseded = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=folder))
            os.replace(final, superseded / final.name)
            os.replace(staging, final)
            shutil.rmtree(superseded)
        else:
            os.replace(staging, final)
        _fsync(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a D-OPSD checkpoint (no {TRAINER_STATE_FILE})")
    return Checkpoint(
        student=load_adapter_state(path / STUDENT_FILE),
        teacher=load_adapter_state(path / TEACHER_FILE),
        trainer_state=torch.load(path / TRAINER_STATE_FILE, map_location="cpu", weights_only=True),
    )


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``folder``, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = {
        int(match[1]): entry
        for entry in folder.iterdir()
        if (match := _CHECKPOINT_NAME.fullmatch(entry.name)) and (entry / TRAINER_STATE_FILE).is_file()
    }
    return steps[max(steps)] if steps else None


def _fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():
        return  # Windows cannot open a folder to fsync it.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
