"""A training run written to a folder, to be run elsewhere (e.g. by torchrun on several GPUs).

A job folder holds ``job.json`` (format version, the model file's name, size and sha256, the
hyper-parameters, the LoRA layout and header, and the items with their conditionings' structure)
and ``tensors.safetensors`` (every latent, schedule and conditioning tensor). Conditionings are
written as trees of lists, tuples, dicts, scalars, strings and tensors, so every model family's
conditioning travels without code of its own. Everything was encoded once where the job was made:
the machine that runs it needs the diffusion model, not the text encoder, the VLM or the VAE.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from .adapters import LoraSpec
from .checkpoints import file_sha256
from .trainer import TrainConfig

JOB_FORMAT = 1
JOB_FILE = "job.json"
TENSORS_FILE = "tensors.safetensors"


class JobError(ValueError):
    """A job folder that cannot be run as it is; the message says why and what to do."""


@dataclass(frozen=True)
class ModelFile:
    """The diffusion-model file a job trains on, and how ComfyUI's loader is to keep its weights."""

    name: str
    size: int
    sha256: str
    weight_dtype: str = "default"

    @classmethod
    def of(cls, path: str | os.PathLike, name: str, weight_dtype: str = "default") -> "ModelFile":
        return cls(name, os.path.getsize(path), file_sha256(path), weight_dtype)

    def check(self, path: str | os.PathLike) -> None:
        """Raise JobError unless ``path`` is this very file (size, then sha256)."""
        if not os.path.isfile(path):
            raise JobError(f"the job's model file {self.name} is not at {path}; copy it there or pass its path")
        size = os.path.getsize(path)
        if size != self.size or file_sha256(path) != self.sha256:
            raise JobError(
                f"{path} is not the model file the job was exported with ({self.name}, {self.size} bytes, "
                f"sha256 {self.sha256[:12]}…; this one has {size} bytes"
                + ("" if size != self.size else ", another sha256")
                + "): copy the same file, or export the job again from this model"
            )


@dataclass(frozen=True)
class JobPair:
    prompt: str
    student: Any  # a CONDITIONING: the prompt alone
    teacher: Any  # a CONDITIONING: the prompt with the target image


@dataclass(frozen=True)
class JobItem:
    latent: Tensor  # the image's latent in the VAE's space, [1, C, h, w]
    pairs: tuple[JobPair, ...]
    sigmas: Tensor | None = None  # the item's own roll-out schedule, if it has one


@dataclass(frozen=True)
class TrainingJob:
    """``config.gradient_accumulation`` is the batch over all processes: each of N runs 1/N of it."""

    model: ModelFile
    items: tuple[JobItem, ...]
    training_sigmas: Tensor
    config: TrainConfig
    lora: LoraSpec
    lora_file_keys: dict[str, str]  # adapter name -> its key in the ComfyUI LoRA file
    lora_metadata: dict[str, str]  # the saved LoRA's header
    gradient_checkpointing: bool = True

    def per_process_accumulation(self, world_size: int) -> int:
        batch = self.config.gradient_accumulation
        if batch % world_size:
            raise JobError(
                f"the job's batch of {batch} roll-outs per optimizer step cannot be split over {world_size} "
                f"processes; run it on a number of processes that divides {batch}, or export it with a batch "
                f"(gradient_accumulation) that {world_size} divides"
            )
        return batch // world_size


def write_job(folder: str | os.PathLike, job: TrainingJob) -> Path:
    """Write ``job`` into ``folder``, which must not exist yet (assembled beside it, then renamed)."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    tensors: dict[str, Tensor] = {}
    described = {
        "format": JOB_FORMAT,
        "model": dataclasses.asdict(job.model),
        "config": dataclasses.asdict(job.config),
        "lora": {**dataclasses.asdict(job.lora), "output_slices": {k: list(v) for k, v in job.lora.output_slices.items()}},
        "lora_file_keys": job.lora_file_keys,
        "lora_metadata": job.lora_metadata,
        "gradient_checkpointing": job.gradient_checkpointing,
        "training_sigmas": _encode(job.training_sigmas, "training_sigmas", tensors),
        "items": [
            {
                "latent": _encode(item.latent, f"items.{i}.latent", tensors),
                "sigmas": _encode(item.sigmas, f"items.{i}.sigmas", tensors),
                "pairs": [
                    {
                        "prompt": pair.prompt,
                        "student": _encode(pair.student, f"items.{i}.pairs.{j}.student", tensors),
                        "teacher": _encode(pair.teacher, f"items.{i}.pairs.{j}.teacher", tensors),
                    }
                    for j, pair in enumerate(item.pairs)
                ],
            }
            for i, item in enumerate(job.items)
        ],
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        save_file(tensors, str(staging / TENSORS_FILE))
        (staging / JOB_FILE).write_text(json.dumps(described, indent=1))
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def read_job(folder: str | os.PathLike) -> TrainingJob:
    folder = Path(folder)
    if not (folder / JOB_FILE).is_file() or not (folder / TENSORS_FILE).is_file():
        raise JobError(f"{folder} is not a job folder (it needs {JOB_FILE} and {TENSORS_FILE}); export one with the "
                       "Export Training Job node")
    try:
        described = json.loads((folder / JOB_FILE).read_text())
    except json.JSONDecodeError as err:
        raise JobError(f"{folder / JOB_FILE} is damaged ({err}); export the job again") from err
    version = described.get("format")
    if not isinstance(version, int) or version > JOB_FORMAT:
        raise JobError(f"the job in {folder} has format {version!r}, newer than this pack reads ({JOB_FORMAT}); "
                       "update the pack on this machine to the version that exported the job")
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise JobError(f"{folder / TENSORS_FILE} is damaged ({err}); export the job again") from err
    lora = described["lora"]
    config = described["config"]
    return TrainingJob(
        model=ModelFile(**described["model"]),
        items=tuple(
            JobItem(
                latent=_decode(item["latent"], tensors),
                sigmas=_decode(item["sigmas"], tensors),
                pairs=tuple(JobPair(p["prompt"], _decode(p["student"], tensors), _decode(p["teacher"], tensors))
                            for p in item["pairs"]),
            )
            for item in described["items"]
        ),
        training_sigmas=_decode(described["training_sigmas"], tensors),
        config=TrainConfig(**{**config, "betas": tuple(config["betas"])}),
        lora=LoraSpec(**lora),
        lora_file_keys=described["lora_file_keys"],
        lora_metadata=described["lora_metadata"],
        gradient_checkpointing=described["gradient_checkpointing"],
    )


def _encode(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` under their path in the tree. Containers are tagged
    so that a dict of the data never reads as a tag."""
    if isinstance(value, Tensor):
        tensors[path] = value.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        return {"tensor": path}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}}
    raise TypeError(f"{path} is a {type(value).__name__}, which a job cannot hold")


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if not isinstance(value, dict):
        return value
    ((kind, content),) = value.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "list":
        return [_decode(v, tensors) for v in content]
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in content)
    return {k: _decode(v, tensors) for k, v in content.items()}
