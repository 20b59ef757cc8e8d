"""Full fine-tuning: every weight of the model is the student, and the teacher is an EMA copy of all of them.

``DualWeights`` is what ``DualLora`` is for LoRA training, as far as the ``Trainer`` is concerned:
``use(role)`` puts the role's network in its place for the calls inside the block, ``student_parameters``
are what the optimizer steps, and ``ema_update`` moves the teacher toward the student,
``teacher ← decay · teacher + (1 - decay) · student``. On several processes both networks are sharded
with FSDP2 (``shard``): every process keeps 1/N of the weights, gradients, AdamW moments and EMA
teacher, gathers a block's weights for its forward and backward, and FSDP averages the gradients
over the processes during the backward.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .adapters import Role


def shard(model: nn.Module, blocks: Sequence[nn.Module], mesh) -> None:
    """FSDP2 over ``mesh``: each block is its own unit (gathered for its own forward and backward), the rest of the
    model one more."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(tensor: Tensor) -> bool:
    return isinstance(tensor, DTensor)


class DualWeights:
    """The student is ``getattr(holder, attribute)``; ``teacher`` is a copy of it with its own weights. Used as a
    context manager, it leaves the student in place when the block ends."""

    def __init__(self, holder: Any, attribute: str, teacher: nn.Module):
        self.holder, self.attribute = holder, attribute
        self.student: nn.Module = getattr(holder, attribute).requires_grad_(True)
        self.teacher = teacher.requires_grad_(False)
        if len(list(self.student.parameters())) != len(list(self.teacher.parameters())):
            raise ValueError("the teacher must be a copy of the student")

    @contextmanager
    def use(self, role: Role) -> Iterator[None]:
        previous = getattr(self.holder, self.attribute)
        setattr(self.holder, self.attribute, self.student if role == "student" else self.teacher)
        try:
            yield
        finally:
            setattr(self.holder, self.attribute, previous)

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        for network in (self.teacher, self.student):
            # FSDP keeps the root unit's weights gathered after a forward (expecting a backward): shard them again.
            if hasattr(network, "reshard"):
                network.reshard()
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
            teacher.lerp_(student, 1.0 - decay)

    def student_state(self) -> dict[str, Tensor]:
        """The student's whole state dict on the CPU; with sharded weights every process must call it (it gathers
        them) and only rank 0 gets the tensors."""
        return _full_state(self.student)

    def teacher_state(self) -> dict[str, Tensor]:
        return _full_state(self.teacher)

    def load_state(self, student: dict[str, Tensor], teacher: dict[str, Tensor] | None = None) -> None:
        """Whole state dicts into the (possibly sharded) networks; every process passes the whole of them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.student, student, options=options)
        set_model_state_dict(self.teacher, student if teacher is None else teacher, options=options)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state keyed by parameter name, gathered whole (every process must call it; rank 0 gets
        it), so that any number of processes can continue from it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.student, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # Not strict: AdamW has no state for weights that never got a gradient (e.g. a layer the forward skips).
        set_optimizer_state_dict(self.student, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, strict=False))

    def __enter__(self) -> "DualWeights":
        return self

    def __exit__(self, *exc_info) -> None:
        setattr(self.holder, self.attribute, self.student)


def _full_state(module: nn.Module) -> dict[str, Tensor]:
    if not any(is_sharded(p) for p in module.parameters()):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
