"""Instrumentation of a DOPSDTrain run inside ComfyUI: per-region clocks, progress events, the observer that times a
step's parts, and allocator peaks (dopsd_core's AllocationPeak, which DOPSDTrain's memory plan uses)."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from devkit.comfy_runtime import ComfyRuntime
from dopsd_core.memory_plan import AllocationPeak

# ------------------------------------------------------------------------------------------------
# Clocks and instrumentation
# ------------------------------------------------------------------------------------------------
def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@dataclass
class Meter:
    """Accumulated (wall, cpu) seconds per named region."""

    totals: dict[str, list[float]] = field(default_factory=dict)
    depth: dict[str, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def region(self, name: str):
        # Nested entries of one region (a wrapped call that calls itself) count once.
        self.depth[name] = self.depth.get(name, 0) + 1
        if self.depth[name] > 1:
            try:
                yield
            finally:
                self.depth[name] -= 1
            return
        wall, cpu = now()
        try:
            yield
        finally:
            self.depth[name] -= 1
            w2, c2 = now()
            total = self.totals.setdefault(name, [0.0, 0.0])
            total[0] += w2 - wall
            total[1] += c2 - cpu

    def snapshot(self) -> dict[str, tuple[float, float]]:
        return {name: (w, c) for name, (w, c) in self.totals.items()}


METER = Meter()


@dataclass
class Event:
    """A progress-bar update ("step": `value` steps of `total` done) or the end of the benchmark's own
    measurements between two steps ("resume": the next step starts here)."""

    kind: str
    value: int
    total: int
    wall: float
    cpu: float
    regions: dict[str, tuple[float, float]]


EVENTS: list[Event] = []


def record(kind: str, value: int, total: int) -> None:
    wall, cpu = now()
    EVENTS.append(Event(kind, value, total, wall, cpu, METER.snapshot()))


DENOISER_REGION = "denoiser calls (ComfyUI glue + model forward)"
MODEL_REGIONS = ("model forward, teacher", "model forward, student", "backward (incl. recomputation)")


def install_instrumentation(runtime: ComfyRuntime) -> None:
    """Time every diffusion-model forward (teacher = no grad, student = grad) and every backward, and record
    a timestamp with a snapshot of those counters at each of ComfyUI's progress-bar updates."""
    import comfy.utils
    from comfy.ldm.lumina.model import NextDiT

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm output from the native node
    original_hook = runtime._progress_hook

    def hook(value, total, preview, prompt_id=None, node_id=None):
        record("step", value, total)
        return original_hook(value, total, preview, prompt_id=prompt_id, node_id=node_id)

    comfy.utils.set_progress_bar_global_hook(hook)
    forward = NextDiT.forward

    def timed_forward(self, *args, **kwargs):
        with METER.region(MODEL_REGIONS[1] if torch.is_grad_enabled() else MODEL_REGIONS[0]):
            return forward(self, *args, **kwargs)

    NextDiT.forward = timed_forward
    backward = torch.Tensor.backward

    def timed_backward(self, *args, **kwargs):
        with METER.region(MODEL_REGIONS[2]):
            return backward(self, *args, **kwargs)

    torch.Tensor.backward = timed_backward


# ------------------------------------------------------------------------------------------------
# The node's Trainer, with the parts timed between its steps
# ------------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """Per sample: (wall, cpu) of K teacher forwards and of K student forward+backward passes."""

    teacher: list[tuple[float, float]] = field(default_factory=list)
    student: list[tuple[float, float]] = field(default_factory=list)
    teacher_forward_peak: int | None = None
    student_step_peak: int | None = None


class Harness:
    """Watches DOPSDTrain's training through the node's own seam (nodes/training.py: TRAINING_OBSERVERS), one graph
    run at a time.

    mode "parts": after every optimizer step (after the node's progress update) the parts are timed once through
    the trainer's own denoiser, adapters, conditionings and gradient-checkpointing scope, so every step is paired
    with a measurement of its parts taken right before it. mode "probe": the allocator peak of one student
    forward+backward is taken before training. The training loop itself is the node's, untouched."""

    def __init__(self, runtime: ComfyRuntime):
        self.training = sys.modules[runtime.node_class("DOPSDTrain").__module__]
        self.core = importlib.import_module(self.training.Trainer.__module__.rsplit(".", 1)[0])
        self.mode: str | None = None
        self.result = Parts()

    @contextlib.contextmanager
    def active(self, mode: str | None):
        self.mode, self.result = mode, Parts()
        self.training.TRAINING_OBSERVERS.append(self)
        try:
            yield self.result
        finally:
            self.training.TRAINING_OBSERVERS.remove(self)
            self.mode = None

    @contextlib.contextmanager
    def watching(self, trainer):
        if self.mode == "probe":
            self._probe_activations(trainer)
        if self.mode == "parts":
            with self.core.gradient_checkpointing(trainer.checkpointed_modules):
                self._time_parts(trainer, keep=False)  # warm-up
        with self._timed_regions(trainer):
            yield

    def after_step(self, trainer, report) -> None:
        if self.mode == "parts":
            self._time_parts(trainer, keep=True)  # the trainer's checkpointing scope is active here
            record("resume", report.step, trainer.config.steps)

    @contextlib.contextmanager
    def _timed_regions(self, trainer):
        """Attribute the ComfyUI model call, adapter switches, optimizer and EMA update, for the breakdown of (4)."""
        saved = trainer.denoiser, torch.nn.utils.clip_grad_norm_

        def wrap(name, fn):
            def wrapped(*args, **kwargs):
                with METER.region(name):
                    return fn(*args, **kwargs)

            return wrapped

        trainer.denoiser = wrap(DENOISER_REGION, trainer.denoiser)
        trainer.adapters.activate = wrap("adapter role switches", trainer.adapters.activate)
        trainer.optimizer.step = wrap("optimizer (clip, AdamW, zero_grad)", trainer.optimizer.step)
        trainer.optimizer.zero_grad = wrap("optimizer (clip, AdamW, zero_grad)", trainer.optimizer.zero_grad)
        trainer.adapters.ema_update = wrap("EMA teacher update", trainer.adapters.ema_update)
        torch.nn.utils.clip_grad_norm_ = wrap("optimizer (clip, AdamW, zero_grad)", saved[1])
        try:
            yield
        finally:
            del trainer.optimizer.step, trainer.optimizer.zero_grad
            del trainer.adapters.ema_update, trainer.adapters.activate
            trainer.denoiser, torch.nn.utils.clip_grad_norm_ = saved

    def _example(self, trainer):
        """The first pair's conditionings, the roll-out's states (noise scaled to each sigma) and a target."""
        item = trainer.items[0]
        pair = item.variants[0]
        generator = torch.Generator().manual_seed(123)
        noise = torch.randn(item.batched_shape, generator=generator).to(trainer.device)
        states = [(noise * sigma, sigma.reshape(1)) for sigma in trainer.sigmas[:-1]]
        with torch.no_grad(), trainer.adapters.use("teacher"):
            target = trainer.denoiser(states[0][0], states[0][1], pair.teacher_cond)
        return pair, states, target

    def _time_parts(self, trainer, keep: bool) -> None:
        pair, states, target = self._example(trainer)
        adapters, denoiser = trainer.adapters, trainer.denoiser
        autocast = (torch.autocast(trainer.device.type, dtype=torch.bfloat16) if trainer.device.type == "cuda"
                    else contextlib.nullcontext())  # what the trainer's mixed_precision="auto" does
        with METER.region("benchmark's own part timing"), autocast:
            wall, cpu = now()
            with torch.no_grad(), adapters.use("teacher"):
                for x, sigma in states:
                    denoiser(x, sigma, pair.teacher_cond)
            w2, c2 = now()
            with adapters.use("student"):
                for x, sigma in states:
                    self.core.x0_loss(denoiser(x, sigma, pair.student_cond), target).backward()
            w3, c3 = now()
        for p in adapters.student_parameters():
            p.grad = None  # leave no trace in the node's next step
        if keep:
            self.result.teacher.append((w2 - wall, c2 - cpu))
            self.result.student.append((w3 - w2, c3 - c2))

    def _probe_activations(self, trainer) -> None:
        """Allocator peaks of one roll-out step's two parts, in the node's setting: the teacher forward (no
        grad, teacher context) and the student forward + x0 loss + backward."""
        pair, states, target = self._example(trainer)
        x, sigma = states[len(states) // 2]
        with self.core.gradient_checkpointing(trainer.checkpointed_modules):
            with torch.no_grad(), trainer.adapters.use("teacher"), AllocationPeak() as teacher:
                trainer.denoiser(x, sigma, pair.teacher_cond)
            with trainer.adapters.use("student"), AllocationPeak() as student:
                self.core.x0_loss(trainer.denoiser(x, sigma, pair.student_cond), target).backward()
        self.result.teacher_forward_peak, self.result.student_step_peak = teacher.peak, student.peak
        for p in trainer.adapters.student_parameters():
            p.grad = None


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines, ComfyUI's import warnings)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)

