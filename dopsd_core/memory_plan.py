"""The device memory a training run will need, known before its first optimizer step.

    peak = weights + adapters + optimizer state + one roll-out step

- weights: the denoiser's parameters and buffers as loaded (an fp8 weight is one byte).
- adapters: the student's and the teacher's LoRA weights.
- optimizer state: the student's gradients and AdamW's two moments, one of each per student parameter.
- one roll-out step: the activations autograd keeps for the student's backward, and the teacher's forward, on
  top of the above. Memory does not grow with K or with gradient accumulation (each roll-out step is
  back-propagated at once and accumulated gradients add into one buffer), so one step is the peak.

The roll-out step is measured with the run's own step function on the largest latent, not modelled: attention
kernels, padding and checkpointing differ between models, devices and versions. Two more measurements, at a quarter
and at half of that latent's area, give the curve of step memory over latent size (quadratic through the three
points: attention kernels that keep the L x L scores grow with the square of the tokens), from which the largest
image that fits is read. When the full-size step does not fit at all, the curve of the two small ones (a line,
a lower bound) is what remains.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor, nn

ADAM_MOMENTS = 2
FP8_BYTES = 1


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each part of a run's peak. ``step_measured`` is False when the full-size step ran out of memory and
    ``step`` is the small measurements' extrapolation (a lower bound)."""

    weights: int
    adapters: int
    optimizer_state: int
    step: int
    step_measured: bool = True

    @property
    def training(self) -> int:
        """What the run allocates on top of the loaded model and its attached adapters."""
        return self.optimizer_state + self.step

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.training

    def describe(self) -> str:
        step = format_bytes(self.step) if self.step_measured else f"more than {format_bytes(self.step)}"
        return (f"about {format_bytes(self.total)} at the peak (weights {format_bytes(self.weights)}, LoRA "
                f"{format_bytes(self.adapters)}, gradients and optimizer {format_bytes(self.optimizer_state)}, "
                f"one roll-out step {step})")


@dataclass(frozen=True)
class StepMemoryCurve:
    """Peak bytes of one roll-out step over the latent's size in elements: the polynomial through the measured
    ``points``, in increasing size (a parabola through three, a line through two, a constant for one)."""

    points: tuple[tuple[int, int], ...]

    def __call__(self, latent_elements: float) -> float:
        total = 0.0
        for i, (n_i, bytes_i) in enumerate(self.points):
            term = float(bytes_i)
            for j, (n_j, _) in enumerate(self.points):
                if j != i:
                    term *= (latent_elements - n_j) / (n_i - n_j)
            total += term
        return total

    def largest_latent(self, budget: float) -> float:
        """The largest latent size, between the smallest and the largest measured one, whose step fits in
        ``budget`` bytes; 0 if not even the smallest does (step memory grows with the latent)."""
        low, high = self.points[0][0], self.points[-1][0]
        if self(low) > budget:
            return 0.0
        if self(high) <= budget:
            return float(high)
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if self(middle) <= budget else (low, middle)
        return low


def format_bytes(count: float) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of distinct storages (a tensor that shares another's storage counts once)."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def module_bytes(module: nn.Module) -> int:
    return tensor_bytes([*module.parameters(), *module.buffers()])


def fp8_savings(module: nn.Module) -> int:
    """Bytes freed if every linear layer's weight were stored in fp8 (what a loader's fp8 weight_dtype does)."""
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Linear) and m.weight.element_size() > FP8_BYTES]
    return sum(w.numel() * (w.element_size() - FP8_BYTES) for w in weights)


def optimizer_state_bytes(student_parameters: Sequence[Tensor]) -> int:
    """Gradients plus AdamW's exp_avg and exp_avg_sq, each the size of the parameter."""
    return (1 + ADAM_MOMENTS) * tensor_bytes(student_parameters)


def probe_latent_shapes(latent_shape: Sequence[int], multiple: int = 2) -> list[tuple[int, ...]]:
    """Two latents of the same layout with about 1/4 and 1/2 of ``latent_shape``'s area (sides a multiple of
    ``multiple``): the points the roll-out step's memory line is fitted through. Half the area keeps fixed-size
    token padding (Z-Image pads to 32 tokens) from bending the line."""
    *lead, height, width = latent_shape

    def side(length: int, fraction: float) -> int:
        return max(multiple, round(length * fraction / multiple) * multiple)

    return [(*lead, side(height, f), side(width, f)) for f in (0.5, 0.5 ** 0.5)]


def plan_memory(denoiser_module: nn.Module, student_parameters: Sequence[Tensor], latent_shape: Sequence[int],
                measure_step: Callable[[tuple[int, ...]], int],
                multiple: int = 2) -> tuple[MemoryPlan, StepMemoryCurve]:
    """The plan for rolling out ``latent_shape`` latents: ``measure_step(shape)`` returns the peak bytes of one
    roll-out step on a latent of ``shape`` (beyond what is allocated before it, gradients already allocated), or
    raises ``torch.OutOfMemoryError``."""
    smaller = {prod(shape): shape for shape in probe_latent_shapes(latent_shape, multiple)
               if prod(shape) < prod(latent_shape)}  # a latent of a few patches has fewer distinct sizes
    points = [(size, measure_step(shape)) for size, shape in sorted(smaller.items())]
    try:
        points.append((prod(latent_shape), measure_step(tuple(latent_shape))))
        measured = True
    except torch.OutOfMemoryError:
        measured = False
    curve = StepMemoryCurve(tuple(points))
    student = tensor_bytes(student_parameters)
    plan = MemoryPlan(weights=module_bytes(denoiser_module), adapters=2 * student,
                      optimizer_state=optimizer_state_bytes(student_parameters),
                      step=round(curve(prod(latent_shape))), step_measured=measured)
    return plan, curve


class AllocationPeak:
    """Peak of the bytes allocated on ``device`` while inside, above what was allocated on entry: CUDA's allocator
    statistics on a GPU, the profiler's allocation events on the CPU (which keeps no statistics)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self) -> "AllocationPeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._profile.__exit__(*exc_info)
        self.peak = _profiled_cpu_peak(self._profile)


def _profiled_cpu_peak(profile) -> int:
    from torch._C._profiler import _EventType

    allocations, stack = [], list(profile.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated))
        stack.extend(event.children)
    if not allocations:
        return 0
    allocations.sort()
    before = allocations[0][2] - allocations[0][1]
    return max(total for _, _, total in allocations) - before
