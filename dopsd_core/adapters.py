"""A trainable "student" and a frozen EMA "teacher" LoRA on one base model, via peft.

Each targeted linear layer computes ``W x + (alpha / rank) * up @ down @ x`` with the active
role's ``down`` (``[rank, in]``, peft's ``lora_A``) and ``up`` (``[out, rank]``, ``lora_B``).
Adapter weights are kept in float32 whatever the base dtype, so optimizer state and the EMA
are exact in float32.

A fused projection (one ``qkv`` linear for q, k and v) can be split into its output slices,
each with adapters of its own: ``W x = cat_i(W_i x)`` with ``W_i`` the rows of slice ``i``, so
the slices get ``cat_i(W_i x + s up_i down_i x)`` — three rank-r updates instead of one.
"""

import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn

Role = Literal["student", "teacher"]
ROLES: tuple[Role, ...] = ("student", "teacher")

AdapterState = dict[str, dict[str, Tensor | float]]
"""``{module_name: {"down": Tensor[rank, in], "up": Tensor[out, rank], "alpha": float}}``."""


@dataclass(frozen=True)
class LoraSpec:
    """LoRA shape and initialisation (the D-OPSD authors used rank 64, alpha 128, gaussian init).

    ``target_modules`` selects linear layers (``nn.Linear`` or subclasses) by qualified name:
    a regex that must match the whole name, or a list of name suffixes at a ``.`` boundary.
    ``init``: "gaussian" draws ``down`` from N(0, 1/rank²) (peft's "gaussian", the authors'
    choice); "default" is peft's Kaiming-uniform ``down``. ``up`` starts at zero either way, so
    both start as the identity edit. ``seed`` makes ``down`` reproducible (peft creates it in the
    base dtype, so it is rounded to that). ``dropout`` acts on the adapter input only while the
    adapted model is in train mode. ``output_slices`` maps a layer's qualified name to the sizes
    of consecutive output slices that get separate adapters, named ``<layer>.0``, ``<layer>.1``, …
    (e.g. q, k and v of a fused ``qkv``); a selected layer not listed gets one adapter.
    """

    rank: int = 64
    alpha: float = 128.0
    target_modules: str | Sequence[str] | None = None
    init: Literal["default", "gaussian"] = "gaussian"
    dropout: float = 0.0
    seed: int = 0
    output_slices: Mapping[str, Sequence[int]] = field(default_factory=dict)


def lora_tensors(state: AdapterState, keys: Mapping[str, str] = {}, dtype: torch.dtype | None = None
                 ) -> dict[str, Tensor]:
    """``state`` in the LoRA file layout ComfyUI (and kohya) read: ``<key>.lora_down.weight``,
    ``<key>.lora_up.weight`` and ``<key>.alpha`` per adapted module, ``<key>`` from ``keys`` or else
    the module's name; on the CPU, contiguous, in ``dtype`` (default: as stored)."""
    tensors = {}
    for name, entry in state.items():
        key = keys.get(name, name)
        tensors[f"{key}.lora_down.weight"] = entry["down"].detach().to("cpu", dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = entry["up"].detach().to("cpu", dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(entry["alpha"]))
    return tensors


def adapter_state_from_tensors(tensors: Mapping[str, Tensor], keys: Mapping[str, str]) -> AdapterState:
    """The inverse of ``lora_tensors``: the adapters ``keys`` names (adapter name -> its key in the file), as float32
    tensors. Raises KeyError naming the first tensor the file lacks."""
    state = {}
    for name, key in keys.items():
        down, up, alpha = (f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha")
        missing = next((k for k in (down, up, alpha) if k not in tensors), None)
        if missing is not None:
            raise KeyError(missing)
        state[name] = {"down": tensors[down].float(), "up": tensors[up].float(), "alpha": tensors[alpha].item()}
    return state


def find_target_modules(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Qualified names of the linear layers of ``model`` that ``target_modules`` selects."""

    def selected(name: str) -> bool:
        if isinstance(target_modules, str):
            return re.fullmatch(target_modules, name) is not None
        return any(name == suffix or name.endswith("." + suffix) for suffix in target_modules)

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and selected(name)]


class LinearRows(nn.Linear):
    """Rows ``[start, start + size)`` of ``linear`` as a linear layer of its own: its weight and bias are views of
    ``linear``'s (no copy, frozen). Like ComfyUI's layers, it computes in the input's dtype."""

    def __init__(self, linear: nn.Linear, start: int, size: int):
        super().__init__(linear.in_features, size, bias=linear.bias is not None, device="meta")
        rows = slice(start, start + size)
        self.weight = nn.Parameter(linear.weight[rows], requires_grad=False)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias[rows], requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class OutputSlicedLinear(nn.ModuleList):
    """``linear`` computed as its consecutive output slices, ``y = cat_i(W_i x + b_i)``, so that each slice (a
    ``LinearRows``, child ``i``) can carry an adapter of its own."""

    def __init__(self, linear: nn.Linear, sizes: Sequence[int]):
        if sum(sizes) != linear.out_features or min(sizes) < 1:
            raise ValueError(f"output slices {list(sizes)} do not partition the {linear.out_features} outputs")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        super().__init__(LinearRows(linear, start, size) for start, size in zip(starts, sizes))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([rows(x) for rows in self], dim=-1)


class DualLora:
    """Attach "student" and "teacher" adapters to ``model`` in place; ``remove()`` undoes it exactly.

    The teacher starts equal to the student and only changes through ``ema_update`` or
    ``load_state``; its parameters never require grad. The base model's parameters are frozen
    while attached. Also a context manager that removes the adapters on exit.
    """

    def __init__(self, model: nn.Module, spec: LoraSpec):
        if spec.target_modules is None:
            raise ValueError("LoraSpec.target_modules must name the layers to adapt")
        if spec.init not in ("default", "gaussian"):
            raise ValueError(f'LoraSpec.init must be "default" or "gaussian", got {spec.init!r}')
        targets = find_target_modules(model, spec.target_modules)
        if not targets:
            raise ValueError(f"no linear layer matches target_modules={spec.target_modules!r}")
        self.model, self.spec = model, spec
        self._base_layers = {name: model.get_submodule(name) for name in targets}
        self._base_requires_grad = {p: p.requires_grad for p in model.parameters()}
        self._peft_config_before = model.__dict__.get("peft_config")
        self._removed = False
        try:
            self._attach(targets)
        except BaseException:
            self.remove()
            raise

    def _attach(self, targets: list[str]) -> None:
        spec, model = self.spec, self.model
        self.module_names = names = tuple(self._split_outputs(targets))
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            init_lora_weights=True if spec.init == "default" else "gaussian",
            # Exact names: a regex or suffix would also hit peft's own ".base_layer" on the second injection.
            target_modules="|".join(map(re.escape, names)),
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft warns that a second adapter on one model is for experts; two adapters is the design.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            torch.manual_seed(spec.seed)
            for role in ROLES:
                inject_adapter_in_model(config, model, adapter_name=role)
        self._layers = [model.get_submodule(name) for name in names]
        for layer in self._layers:
            for role in ROLES:
                layer.lora_A[role].float()
                layer.lora_B[role].float()
        self._params = {
            role: [p for layer in self._layers for p in (layer.lora_A[role].weight, layer.lora_B[role].weight)]
            for role in ROLES
        }
        for p in self._base_requires_grad:
            p.requires_grad_(False)
        with torch.no_grad():
            torch._foreach_copy_(self._params["teacher"], self._params["student"])
        self.active_role: Role = "student"
        for layer in self._layers:
            layer.set_adapter("student")
        self._pin_trainable_role()
        # Training switches roles twice per roll-out step. peft's set_adapter also re-flags requires_grad on
        # every adapter parameter (undone right after, as above), ~20 us per layer; what a LoRA layer's forward
        # reads is only its active-adapter list, so a switch sets just that when peft keeps it where we expect.
        self._fast_switch = all(layer.active_adapters == ["student"] and hasattr(layer, "_active_adapter")
                                for layer in self._layers)

    def _split_outputs(self, targets: list[str]) -> Iterator[str]:
        """Replace the layers of ``spec.output_slices`` by their slices; yield the names of the layers to adapt."""
        for name in targets:
            sizes = self.spec.output_slices.get(name)
            if sizes is None:
                yield name
                continue
            _set_submodule(self.model, name, OutputSlicedLinear(self._base_layers[name], sizes))
            yield from (f"{name}.{i}" for i in range(len(sizes)))

    def activate(self, role: Role) -> None:
        """Make ``role``'s adapter the one every adapted layer applies."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if self._fast_switch:
            for layer in self._layers:
                layer._active_adapter = [role]
        else:
            for layer in self._layers:
                layer.set_adapter(role)
            self._pin_trainable_role()
        self.active_role = role

    def _pin_trainable_role(self) -> None:
        # peft's set_adapter makes the active adapter trainable and the other frozen; here the roles are fixed.
        for p in self._params["student"]:
            p.requires_grad_(True)
        for p in self._params["teacher"]:
            p.requires_grad_(False)

    @contextmanager
    def use(self, role: Role) -> Iterator[None]:
        """Apply ``role``'s adapter inside the block, then the previously active one."""
        previous = self.active_role
        self.activate(role)
        try:
            yield
        finally:
            self.activate(previous)

    def student_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, in a fixed order (down, up per layer)."""
        return list(self._params["student"])

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        """``teacher <- teacher * decay + student * (1 - decay)``, each product and the sum rounded to float32."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        torch._foreach_mul_(self._params["teacher"], decay)
        torch._foreach_add_(self._params["teacher"], torch._foreach_mul(self._params["student"], 1.0 - decay))

    def state(self, role: Role) -> AdapterState:
        """A detached copy of ``role``'s adapter, keyed by the adapted module's name."""
        return {
            name: {
                "down": layer.lora_A[role].weight.detach().clone(),
                "up": layer.lora_B[role].weight.detach().clone(),
                "alpha": float(layer.lora_alpha[role]),
            }
            for name, layer in zip(self.module_names, self._layers)
        }

    def student_state(self) -> AdapterState:
        return self.state("student")

    def teacher_state(self) -> AdapterState:
        return self.state("teacher")

    @torch.no_grad()
    def load_state(self, student: AdapterState, teacher: AdapterState | None = None) -> None:
        """Overwrite the adapters; the teacher copies the student when ``teacher`` is None.
        Nothing is changed unless both states fit."""
        states = {"student": student, "teacher": student if teacher is None else teacher}
        for role, state in states.items():
            self._check_fits(role, state)
        for role, state in states.items():
            for name, layer in zip(self.module_names, self._layers):
                layer.lora_A[role].weight.copy_(state[name]["down"])
                layer.lora_B[role].weight.copy_(state[name]["up"])

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """What a checkpoint keeps of the optimizer that steps ``student_parameters``."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def _check_fits(self, role: Role, state: AdapterState) -> None:
        missing, unexpected = set(self.module_names) - state.keys(), state.keys() - set(self.module_names)
        if missing or unexpected:
            raise ValueError(
                f"{role} state does not fit the adapted layers: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        for name, layer in zip(self.module_names, self._layers):
            entry, alpha = state[name], float(layer.lora_alpha[role])
            if float(entry["alpha"]) != alpha:
                raise ValueError(f"{role} state for {name} has alpha {entry['alpha']}, expected {alpha}")
            for key, weight in (("down", layer.lora_A[role].weight), ("up", layer.lora_B[role].weight)):
                if entry[key].shape != weight.shape:
                    raise ValueError(
                        f"{role} state for {name}.{key} has shape {tuple(entry[key].shape)}, "
                        f"expected {tuple(weight.shape)}"
                    )

    def remove(self) -> None:
        """Put the original modules back and restore their ``requires_grad`` flags."""
        if self._removed:
            return
        for name, base_layer in self._base_layers.items():
            _set_submodule(self.model, name, base_layer)
        for p, requires_grad in self._base_requires_grad.items():
            p.requires_grad_(requires_grad)
        if self._peft_config_before is None:
            self.model.__dict__.pop("peft_config", None)
        else:
            self.model.peft_config = self._peft_config_before
        self._removed = True

    def __enter__(self) -> "DualLora":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)
