"""Training checkpoints: one folder ``step_{N:06d}`` per save, written atomically, that verifies itself.

A folder holds ``student.safetensors`` and ``teacher.safetensors`` (one adapter each, keys
``{module}.lora_down.weight``, ``{module}.lora_up.weight``, ``{module}.alpha``; for full fine-tuning
the whole model's state dict, marked as such in the file's header),
``trainer_state.pt`` (optimizer, step, random generator states, config) and, written last,
``manifest.json`` with every file's size and sha256. It is assembled in a hidden temporary folder
beside its final name and renamed into place, so a crash never leaves a partial checkpoint under a
``step_*`` name; a checkpoint damaged afterwards (a truncated copy, a failing disk) no longer matches
its manifest, and ``newest_intact_checkpoint`` passes over it (without deleting it) to an older one.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .adapters import AdapterState, adapter_state_from_tensors, lora_tensors

STUDENT_FILE = "student.safetensors"
TEACHER_FILE = "teacher.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = (STUDENT_FILE, TEACHER_FILE, TRAINER_STATE_FILE)
_CHECKPOINT_NAME = re.compile(r"step_(\d{6,})")
_STAGING_NAME = re.compile(r"\.step_\d{6,}\..*\.(partial|old)")


WeightState = AdapterState | dict[str, Tensor]
"""What a checkpoint keeps of each role: a LoRA's adapter state or, for full fine-tuning, a whole state dict."""
_FULL_STATE = {"dopsd.state": "full state dict"}  # the header that tells the two apart in a file


@dataclass(frozen=True)
class Checkpoint:
    student: WeightState
    teacher: WeightState
    trainer_state: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def save_adapter_state(state: WeightState, path: str | os.PathLike) -> None:
    if all(isinstance(value, Tensor) for value in state.values()):
        save_file({k: v.contiguous() for k, v in state.items()}, os.fspath(path), metadata=_FULL_STATE)
    else:
        save_file(lora_tensors(state), os.fspath(path))


def load_adapter_state(path: str | os.PathLike) -> WeightState:
    with safe_open(os.fspath(path), framework="pt") as file:
        full = (file.metadata() or {}) == _FULL_STATE
    tensors = load_file(os.fspath(path))
    if full:
        return tensors
    names = [key.removesuffix(".alpha") for key in tensors if key.endswith(".alpha")]
    return adapter_state_from_tensors(tensors, {name: name for name in names})


def save_checkpoint(
    folder: str | os.PathLike, step: int, student: WeightState, teacher: WeightState, trainer_state: dict[str, Any]
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
        for name in CHECKPOINT_FILES:
            _fsync(staging / name)
        (staging / MANIFEST_FILE).write_text(json.dumps(
            {name: {"bytes": (staging / name).stat().st_size, "sha256": file_sha256(staging / name)}
             for name in CHECKPOINT_FILES}, indent=1))
        _fsync(staging / MANIFEST_FILE)
        if final.exists() and checkpoint_damage(final) is not None:
            # A damaged checkpoint is the user's evidence and maybe recoverable: keep it under another name.
            os.replace(final, _unused_name(folder, f"{final.name}.damaged"))
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


def checkpoint_damage(path: str | os.PathLike, check_hashes: bool = True) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted, or None when every file matches its manifest (sizes, and
    sha256 sums unless ``check_hashes`` is off). Checkpoints written before manifests existed are checked by reading
    them whole."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        try:
            load_checkpoint(path)
        except Exception as err:  # noqa: BLE001 — any failure to read it is damage, reported with its cause
            return f"unreadable ({type(err).__name__}: {err})"
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = {name: (int(manifest[name]["bytes"]), str(manifest[name]["sha256"])) for name in CHECKPOINT_FILES}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({err})"
    for name, (size, digest) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if (actual := file.stat().st_size) != size:
            return f"{name} has {actual} bytes, {size} were written"
        if check_hashes and file_sha256(file) != digest:
            return f"{name} does not match the checksum written with it"
    return None


@dataclass(frozen=True)
class CheckpointSearch:
    """The newest checkpoint fit to resume from (None if there is none), and the newer ones passed over with the
    reason, newest first."""

    checkpoint: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def newest_intact_checkpoint(folder: str | os.PathLike) -> CheckpointSearch:
    """Walk the ``step_*`` checkpoints in ``folder`` from the newest down and stop at the first intact one."""
    skipped = []
    for path in reversed(_checkpoints(folder)):
        damage = checkpoint_damage(path)
        if damage is None:
            return CheckpointSearch(path, skipped)
        skipped.append((path, damage))
    return CheckpointSearch(None, skipped)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``folder``, or None (damage is not checked: see
    ``newest_intact_checkpoint``)."""
    complete = [path for path in _checkpoints(folder) if (path / TRAINER_STATE_FILE).is_file()]
    return complete[-1] if complete else None


def prune_checkpoints(folder: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest intact checkpoints in ``folder`` (0 keeps all), and the staging
    folders a killed save left behind. Damaged checkpoints are never deleted. Returns what was deleted."""
    folder = Path(folder)
    deleted = [entry for entry in folder.iterdir() if entry.is_dir() and _STAGING_NAME.fullmatch(entry.name)] \
        if folder.is_dir() else []
    if keep_last > 0:
        # Sizes only: hashing every kept checkpoint at each save would cost seconds per gigabyte.
        intact = [path for path in _checkpoints(folder) if checkpoint_damage(path, check_hashes=False) is None]
        deleted += intact[:-keep_last]
    for path in deleted:
        shutil.rmtree(path)
    return deleted


def _checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``step_*`` folders in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = {int(match[1]): entry for entry in folder.iterdir()
             if (match := _CHECKPOINT_NAME.fullmatch(entry.name)) and entry.is_dir()}
    return [steps[step] for step in sorted(steps)]


def _unused_name(folder: Path, name: str) -> Path:
    candidates = (folder / (name if n == 0 else f"{name}-{n}") for n in range(1_000_000))
    return next(path for path in candidates if not path.exists())


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():
        return  # Windows cannot open a folder to fsync it.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
