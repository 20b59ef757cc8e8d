"""LoRA files: ComfyUI's key format, saving into models/loras, and applying a LoRA the way the stock loader does."""
from __future__ import annotations

import glob
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import comfy.lora
import comfy.sd
import comfy.utils
import folder_paths
import safetensors.torch
import torch
from comfy_api.latest import io

from ..dopsd_core import AdapterState, adapter_state_from_tensors, find_target_modules, lora_tensors
from .errors import node_error
from .user_paths import resolve_inside

DIFFUSION_MODEL_PREFIX = "diffusion_model."


class TrainedLora(dict):
    """A LORA_MODEL (ComfyUI's native type: a dict of tensors in LoRA key format) that also carries the
    training metadata written into the file header. Native SaveLoRA / LoraModelLoader accept it as a dict."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        super().__init__(tensors)
        self.metadata = metadata


def comfy_lora_tensors(adapter_state: AdapterState, dtype: torch.dtype, slice_keys: Mapping[str, str]
                       ) -> dict[str, torch.Tensor]:
    """The diffusion model's adapters as the tensors of a ComfyUI LoRA file: output slices under their keys from
    `output_slice_layout`, every other module under `diffusion_model.<module>` (what comfy.lora maps)."""
    return lora_tensors(adapter_state, file_keys(adapter_state, slice_keys), dtype)


def adapter_state_from_comfy_lora(tensors: Mapping[str, torch.Tensor], adapter_names: list[str],
                                  slice_keys: Mapping[str, str]) -> AdapterState:
    """The inverse of `comfy_lora_tensors`: the named adapters read from a LoRA file's tensors (KeyError names the
    first one the file lacks)."""
    return adapter_state_from_tensors(tensors, file_keys(adapter_names, slice_keys))


def file_keys(adapter_names, slice_keys: Mapping[str, str]) -> dict[str, str]:
    return {name: slice_keys.get(name, DIFFUSION_MODEL_PREFIX + name) for name in adapter_names}


def output_slice_layout(base_model, target_modules: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Which targeted layers get one adapter per output slice, and the LoRA key each slice's adapter is saved under:
    `({module: [slice sizes]}, {"<module>.<i>": LoRA key})`.

    These are the layers ComfyUI's LoRA loader also patches slice by slice: q, k and v of a fused `qkv` linear,
    which LoRA files of diffusers-style trainers address separately (`...attention.to_q` and so on). One adapter per
    slice is what those trainers (the D-OPSD authors' included) train, and the stock loader applies each at its
    slice's offset. Read from ComfyUI's own LoRA key map of `base_model` (a MODEL's `.model`), so it covers every
    architecture the loader maps this way; a layer counts only where its slices partition its outputs exactly."""
    diffusion_model = base_model.diffusion_model
    targets = set(find_target_modules(diffusion_model, target_modules))
    aliases = defaultdict(lambda: defaultdict(list))  # module -> (offset, size) -> LoRA keys
    for lora_key, target in comfy.lora.model_lora_keys_unet(base_model, {}).items():
        if not (isinstance(target, tuple) and len(target) == 2 and isinstance(target[1], tuple)):
            continue
        weight_key, (dim, offset, size) = target
        module = weight_key.removeprefix(DIFFUSION_MODEL_PREFIX).removesuffix(".weight")
        if dim == 0 and weight_key.endswith(".weight") and module in targets:
            aliases[module][(offset, size)].append(lora_key)
    sizes, keys = {}, {}
    for module, by_interval in sorted(aliases.items()):
        parts = _partition(list(by_interval), diffusion_model.get_submodule(module).out_features)
        if parts is not None:
            sizes[module] = [size for _, size in parts]
            keys |= {f"{module}.{i}": min(by_interval[part], key=_preferred_key) for i, part in enumerate(parts)}
    return sizes, keys


def _partition(intervals: list[tuple[int, int]], total: int) -> list[tuple[int, int]] | None:
    """Consecutive (offset, size) intervals from 0 to `total`, each the smallest starting where the last ended."""
    cursor, parts = 0, []
    while cursor < total:
        sizes = [size for offset, size in intervals if offset == cursor and size > 0]
        if not sizes:
            return None
        parts.append((cursor, min(sizes)))
        cursor += min(sizes)
    return parts if cursor == total else None


def _preferred_key(key: str) -> tuple:
    """One of a slice's aliases, the same every time: ComfyUI's own prefix, then the diffusers one."""
    return (not key.startswith(DIFFUSION_MODEL_PREFIX), not key.startswith("transformer."), len(key), key)


def apply_lora(model, lora: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of `model` with the LoRA patched in: the exact path of the stock LoRA loaders."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
    return patched


def lora_path_for(name: str, node) -> Path:
    """The .safetensors file a LoRA name stands for, inside the first models/loras folder."""
    path = resolve_inside(loras_root(), name, node, "LoRA name")
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def loras_root() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0]).resolve()


def save_lora_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: a temporary file in the same folder, renamed over the final name only when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{glob.escape(path.stem)}.*.tmp"):
        leftover.unlink(missing_ok=True)  # left by a save that was killed mid-write
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files; a LoRA is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def metadata_for_file(lora: dict) -> dict[str, str]:
    metadata = dict(getattr(lora, "metadata", {}) or {})
    metadata.setdefault("format", "comfyui-lora")
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


class DOPSDSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDSaveLoRA",
            display_name="Save LoRA (D-OPSD)",
            category="D-OPSD",
            description=(
                "Saves the trained LoRA into models/loras (Load LoRA lists it at once) with its training settings in "
                "the file header, then applies the saved file to the model exactly as Load LoRA would."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRA was trained on (not the trained output)."),
                io.LoraModel.Input("lora", tooltip="The lora output of Train LoRA with D-OPSD (or any LORA_MODEL)."),
                io.String.Input("lora_name", default="dopsd/my_concept",
                                tooltip="File name inside models/loras; '.safetensors' is added."),
                io.Boolean.Input("overwrite", default=True, tooltip="Replace an existing file of that name."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="How strongly the saved LoRA is applied to the MODEL output (the file is "
                                       "saved at full strength either way)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the saved LoRA applied."),
                io.String.Output(display_name="lora_name", tooltip="The name Load LoRA lists the file under."),
            ],
        )

    @classmethod
    def execute(cls, model, lora, lora_name, overwrite, strength) -> io.NodeOutput:
        path = lora_path_for(lora_name, cls)
        if path.exists() and not overwrite:
            raise node_error(cls, f"{path.name} already exists in the loras folder",
                             "choose another lora_name or enable overwrite")
        if not lora:
            raise node_error(cls, "the LoRA is empty", "connect the lora output of D-OPSD Train")
        try:
            save_lora_file(path, {k: v for k, v in lora.items()}, metadata_for_file(lora))
        except (OSError, safetensors.SafetensorError) as err:  # safetensors reports I/O errors (a full disk) as its own
            raise node_error(cls, f"could not write {path} ({getattr(err, 'strerror', None) or err})",
                             "free disk space or choose a writable models/loras folder; nothing was overwritten") from err
        saved = comfy.utils.load_torch_file(str(path), safe_load=True)
        relative = path.relative_to(loras_root()).as_posix()
        return io.NodeOutput(apply_lora(model, saved, strength), relative,
                             ui={"text": [f"saved models/loras/{relative}"]})
