"""DOPSDTrain against its own parts and against ComfyUI's native TrainLoraNode, inside the real ComfyUI.

One run boots the selected ComfyUI in this process (the test harness's in-process runtime: 0.3.75 from .venv, or
0.33 with DOPSD_COMFY_VERSION=0.33 and .venv-comfy033/bin/python), loads the tiny
real-architecture Z-Image checkpoints through ComfyUI's own loaders, and executes API-format graphs with the
real DOPSDTrain node and the stock TrainLoraNode. It prints ratios only (times in ms are context, not claims):

  (1) DOPSDTrain step / (K x (teacher forward + student forward/backward)), K = 4 and 8;       target <= 1.15
  (2) DOPSDTrain (objective SFT) step / TrainLoraNode step, same model, data, rank, dtype;       target <= 1.05
  (3) peak memory of DOPSDTrain (K = 2, 4, 8, SFT) vs TrainLoraNode;       target: flat in K, within one
      roll-out step's activations of SFT
  (4) share of a DOPSDTrain step spent outside the model calls (data, conditioning glue, optimizer, EMA,
      roll-out bookkeeping);                                                                    target < 5 %
  (+) gradient checkpointing: step with / without, and where its cost goes.

How it measures
- Step time: ComfyUI's progress hook fires once per optimizer step in both nodes; the time from one step's
  hook to the next is one step of the real node as the executor runs it (step 1 is not measured: optimizer
  state is created there). Repeats interleave the configurations (A/B pairs back to back; SFT vs native as
  A B B A); a ratio is formed within each repeat, and the table shows its median and range over repeats.
- Parts for (1): DOPSDTrain is run as is, with its Trainer swapped for a subclass whose only addition sits in
  the node's own on_step callback: after each step's progress update it times K teacher forwards (no grad,
  teacher adapter) and K student forward + x0 loss + backward passes through the very denoiser, adapters,
  conditionings and gradient-checkpointing scope the node built, then clears the gradients. The next step is
  timed from the end of that, so every step is paired with its parts measured just before it.
- Clock: process CPU time (one intra-op thread by default, so it is the work done whatever else loads the
  machine), and wall time in brackets; on an idle machine they agree.
- (4): the diffusion model's forward and every .backward() are timed while the node runs; "outside" is the
  step minus those. The breakdown times the ComfyUI model call, adapter switches, optimizer and EMA too.
- (3): CPU has no allocator-peak API; torch's profiler with profile_memory=True reports every CPU allocation
  and free with the running total, so the peak of that total while the training graph runs (upstream nodes
  cached) minus its value at the start is the CPU analogue of torch.cuda.max_memory_allocated (RSS would
  count the allocator's cached pages and the whole process). The unit "one roll-out step's activations" is
  the larger of the same peak over one teacher forward and over one student forward+backward, taken inside
  the node before training.

Run from the repository root (a few minutes on two CPU cores):
    .venv/bin/python benchmarks/bench_nodes.py                                               # ComfyUI 0.3.75
    DOPSD_COMFY_VERSION=0.33 .venv-comfy033/bin/python benchmarks/bench_nodes.py             # ComfyUI 0.33
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

# Imported before ComfyUI is put first on sys.path: ComfyUI ships a `tests` package of its own.
from tests.fixtures.tiny_dataset import write_concept_images  # noqa: E402
from tests.fixtures.tiny_models import ZIMAGE_DIM, ZIMAGE_NUM_LAYERS, ZIMAGE_NUM_REFINER_LAYERS, write_tiny_models  # noqa: E402
from tests.fixtures.tiny_vlm import MATCHING_VISION_FILE, write_tiny_vision_towers  # noqa: E402
from tests.harness.comfy_runtime import ComfyRuntime  # noqa: E402
from tests.harness.graph import Graph  # noqa: E402
from tests.harness.paths import comfy_version, make_base_directory  # noqa: E402

MIB = 2**20
DATASET_FOLDER = "dopsd/bench"
PROMPT = "a photo of sks fox number 0"


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
    """Swaps a Trainer subclass into the DOPSDTrain node's module for the duration of one graph run.

    mode "parts": after every optimizer step (inside the node's own on_step callback, after ComfyUI's progress
    update) the parts are timed once through the trainer's own denoiser, adapters, conditionings and
    gradient-checkpointing scope, so every step is paired with a measurement of its parts taken right before
    it. mode "probe": the allocator peak of one student forward+backward is taken before training.
    The training loop itself is the node's (Trainer.train, called once, as the node calls it)."""

    def __init__(self, runtime: ComfyRuntime):
        self.training = sys.modules[runtime.node_class("DOPSDTrain").__module__]
        self.core = importlib.import_module(self.training.Trainer.__module__.rsplit(".", 1)[0])
        self.mode: str | None = None
        self.result = Parts()

    @contextlib.contextmanager
    def active(self, mode: str | None):
        self.mode, self.result = mode, Parts()
        node_trainer = self.training.Trainer
        self.training.Trainer = self._subclass(node_trainer)
        try:
            yield self.result
        finally:
            self.training.Trainer = node_trainer
            self.mode = None

    def _subclass(self, base):
        harness = self

        class BenchTrainer(base):
            def train(self, num_steps=None, on_step=None, should_cancel=None):
                if harness.mode == "probe":
                    harness._probe_activations(self)
                if harness.mode == "parts":
                    with harness.core.gradient_checkpointing(self.checkpointed_modules):
                        harness._time_parts(self, keep=False)  # warm-up

                    def on_step_then_parts(report, node_on_step=on_step):
                        node_on_step(report)
                        harness._time_parts(self, keep=True)  # the trainer's checkpointing scope is active here
                        record("resume", report.step, self.config.steps)

                    on_step = on_step_then_parts
                with harness._timed_regions(self):
                    return super().train(num_steps, on_step, should_cancel)

        return BenchTrainer

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


# ------------------------------------------------------------------------------------------------
# CPU allocator peak (via the profiler's memory events)
# ------------------------------------------------------------------------------------------------
class AllocationPeak:
    """Peak of bytes allocated (and not yet freed) since entering, from torch's CPU allocator reports."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        from torch._C._profiler import _EventType

        self._profile.__exit__(*exc)
        allocations = []
        stack = list(self._profile.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                allocations.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated))
            stack.extend(event.children)
        allocations.sort()
        if not allocations:
            self.peak = 0
            return
        start = allocations[0][2] - allocations[0][1]
        self.peak = max(total for _, _, total in allocations) - start


# ------------------------------------------------------------------------------------------------
# Graphs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    size: int
    rank: int
    steps: int
    lora_targets: str = ".*"  # every linear layer: what TrainLoraNode adapts


def upstream(g: Graph, setting: Setting, image_names: list[str]):
    """Identical in every graph (same node ids), so ComfyUI's cache keeps them between runs."""
    loader = g.node("DOPSDLoadModel", family="Z-Image-Turbo", diffusion_model="z_image_turbo_bf16.safetensors",
                    text_encoder="qwen_3_4b.safetensors", text_encoder_type="from preset", vae="ae.safetensors",
                    training_schedule="published (authors')")
    dataset = g.node("DOPSDDatasetFromFolder", folder=DATASET_FOLDER, trigger_word="sks fox", placeholder="[trigger]",
                     megapixels=setting.size**2 / 1e6, bucket_multiple=16, allow_outside_input=False)
    pairs = g.node("DOPSDTeacherContextVLM", clip=loader.out(1), vae=loader.out(2), dataset=dataset,
                   vision_weights=MATCHING_VISION_FILE.split("/", 1)[1])
    images = [g.node("LoadImage", image=name) for name in image_names]
    batch = g.node("ImageBatch", image1=images[0].out(0), image2=images[1].out(0))
    latent = g.node("VAEEncode", pixels=batch.out(0), vae=loader.out(2))
    # A list of single latents: TrainLoraNode of ComfyUI 0.3.75 fails on one LATENT input (`multi_res` unbound).
    latents = g.node("RebatchLatents", latents=latent.out(0), batch_size=1)
    positive = g.node("CLIPTextEncode", clip=loader.out(1), text=PROMPT)
    schedules = {k: g.node("BasicScheduler", model=loader.out(0), scheduler="simple", steps=k, denoise=1.0)
                 for k in (2, 4, 8)}
    return loader, pairs, latents, positive, schedules


def dopsd_graph(setting: Setting, images, *, k: int, seed: int, checkpointing: bool = True, objective="D-OPSD"):
    g = Graph()
    loader, pairs, _, _, schedules = upstream(g, setting, images)
    trained = g.node(
        "DOPSDTrain", model=loader.out(0), training_set=pairs, training_sigmas=schedules[k], objective=objective,
        steps=setting.steps, learning_rate=1e-4, rank=setting.rank, alpha=2.0 * setting.rank, ema_decay=0.9999,
        loss_space="x0", gradient_accumulation=1, warmup_steps=0, seed=seed, lora_targets="custom regex",
        custom_lora_targets=setting.lora_targets, lora_init="gaussian",
        gradient_checkpointing=checkpointing, checkpoint_every=0, checkpoint_folder="dopsd/checkpoints/bench",
        resume=False, preview_every=0,
    )
    g.node("LossGraphNode", loss=trained.out(2), filename_prefix="bench/dopsd_loss")
    return g.to_api()


# 0.33's TrainLoraNode no longer returns the MODEL first: its LOSS_MAP is output 1 there, 2 in 0.3.75.
NATIVE_LOSS_OUTPUT = {"0.33": 1}
# Inputs TrainLoraNode gained after 0.3.75, at the values that keep it the plain trainer 0.3.75 has.
NATIVE_TRAINER_EXTRAS = {"0.33": dict(quantized_backward=False, checkpoint_depth=1, offloading=False, bucket_mode=False,
                                      bypass_mode=False)}


def native_graph(setting: Setting, images, *, seed: int, checkpointing: bool = True):
    g = Graph()
    loader, _, latents, positive, _ = upstream(g, setting, images)
    trained = g.node(
        "TrainLoraNode", model=loader.out(0), latents=latents, positive=positive, batch_size=1,
        grad_accumulation_steps=1, steps=setting.steps, learning_rate=1e-4, rank=setting.rank, optimizer="AdamW",
        loss_function="MSE", seed=seed, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
        gradient_checkpointing=checkpointing, existing_lora="[None]", **NATIVE_TRAINER_EXTRAS.get(comfy_version(), {}),
    )
    g.node("LossGraphNode", loss=trained.out(NATIVE_LOSS_OUTPUT.get(comfy_version(), 2)), filename_prefix="bench/native_loss")
    return g.to_api()


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------
@dataclass
class StepTimes:
    """Per measured step (steps 2..N of one run): (wall, cpu) seconds, and the seconds spent in each region."""

    wall: list[float]
    cpu: list[float]
    regions: list[dict[str, tuple[float, float]]]

    def clock(self, cpu: bool) -> list[float]:
        return self.cpu if cpu else self.wall


def execute(runtime: ComfyRuntime, graph: dict, steps: int) -> StepTimes:
    """Run a graph; a step lasts from the previous step's progress update (or, when the benchmark timed the
    parts in between, from the end of that) to its own progress update. Step 1 is not measured."""
    EVENTS.clear()
    run = runtime.run(graph)
    if not run.success:
        raise RuntimeError(f"benchmark graph failed: {run.error or run.node_errors or run.validation_error}")
    times = StepTimes([], [], [])
    start = None
    for event in EVENTS:
        if event.total != steps or event.value < 1:
            continue
        if event.kind == "step" and start is not None and start.value == event.value - 1:
            times.wall.append(event.wall - start.wall)
            times.cpu.append(event.cpu - start.cpu)
            times.regions.append({name: (w - start.regions.get(name, (0.0, 0.0))[0],
                                         c - start.regions.get(name, (0.0, 0.0))[1])
                                  for name, (w, c) in event.regions.items()})
        start = event
    if not times.wall:
        raise RuntimeError("no step was measured (steps must be >= 2)")
    return times


def median(values) -> float:
    return statistics.median(list(values))


@dataclass
class Collected:
    steps: dict[str, list[StepTimes]] = field(default_factory=dict)
    parts: dict[str, list[Parts]] = field(default_factory=dict)

    def add(self, name: str, times: StepTimes, parts: Parts | None) -> None:
        self.steps.setdefault(name, []).append(times)
        if parts is not None:
            self.parts.setdefault(name, []).append(parts)


SPEED_RUNS = {
    # name: (graph kind, options, time the parts between steps)
    "D-OPSD K=4": ("dopsd", dict(k=4), True),
    "D-OPSD K=8": ("dopsd", dict(k=8), True),
    "D-OPSD K=4, no checkpointing": ("dopsd", dict(k=4, checkpointing=False), True),
    "DOPSDTrain SFT": ("dopsd", dict(k=4, objective="SFT"), False),
    "TrainLoraNode": ("native", {}, False),
    "TrainLoraNode, no checkpointing": ("native", dict(checkpointing=False), False),
}
# One repeat: A/B pairs back to back, SFT vs native as A B B A (cancels a drift of the machine's load).
REPEAT_ORDER = ["D-OPSD K=4", "D-OPSD K=4, no checkpointing", "D-OPSD K=8", "DOPSDTrain SFT", "TrainLoraNode",
                "TrainLoraNode", "DOPSDTrain SFT", "TrainLoraNode, no checkpointing"]


def graph_for(name: str, setting: Setting, images, seed: int, **overrides) -> dict:
    kind, options, _ = SPEED_RUNS[name]
    options = {**options, **overrides}
    if kind == "dopsd":
        return dopsd_graph(setting, images, seed=seed, **options)
    return native_graph(setting, images, seed=seed, **options)


def measure_speed(runtime, harness, setting, images, repeats) -> tuple[Collected, list[Collected]]:
    """All runs pooled, and per repeat (ratios are formed within a repeat, then their median is taken)."""
    everything, per_repeat = Collected(), []
    seed = 0
    for repeat in range(repeats):
        collected = Collected()
        for name in REPEAT_ORDER:
            seed += 1  # a new seed makes ComfyUI execute the training node again (upstream stays cached)
            with harness.active("parts" if SPEED_RUNS[name][2] else None) as parts:
                times = execute(runtime, graph_for(name, setting, images, seed), setting.steps)
            parts = parts if SPEED_RUNS[name][2] else None
            collected.add(name, times, parts)
            everything.add(name, times, parts)
            print(f"  repeat {repeat + 1}/{repeats}  {name:32s} median step {1e3 * median(times.cpu):8.1f} ms CPU, "
                  f"{1e3 * median(times.wall):8.1f} ms wall", flush=True)
        per_repeat.append(collected)
    return everything, per_repeat


MEMORY_RUNS = [("DOPSDTrain D-OPSD K=2", dict(k=2)), ("DOPSDTrain D-OPSD K=4", dict(k=4)),
               ("DOPSDTrain D-OPSD K=8", dict(k=8)), ("DOPSDTrain SFT", dict(k=4, objective="SFT")),
               ("TrainLoraNode", None)]
UNIT = "one roll-out step's activations"
TEACHER_PART = "teacher forward (no grad)"
STUDENT_PART = "student forward + backward"


def measure_memory(runtime, harness, setting, images, checkpointing: bool) -> dict[str, int]:
    short = replace(setting, steps=2)
    peaks = {}
    with harness.active("probe") as probe:
        execute(runtime, dopsd_graph(short, images, k=4, seed=1000, checkpointing=checkpointing), short.steps)
    peaks[TEACHER_PART], peaks[STUDENT_PART] = probe.teacher_forward_peak, probe.student_step_peak
    peaks[UNIT] = max(probe.teacher_forward_peak, probe.student_step_peak)
    for index, (name, options) in enumerate(MEMORY_RUNS):
        seed = 2000 + index
        graph = (dopsd_graph(short, images, seed=seed, checkpointing=checkpointing, **options) if options is not None
                 else native_graph(short, images, seed=seed, checkpointing=checkpointing))
        with AllocationPeak() as peak:
            execute(runtime, graph, short.steps)
        peaks[name] = peak.peak
    return peaks


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def parts_ratio(collected: Collected, name: str, k: int, cpu: bool) -> float:
    """Median over the run's steps of step / (K teacher forwards + K student forward/backward), each step
    paired with the parts timed just before it."""
    del k  # the parts are already K calls each
    ratios = []
    for times, parts in zip(collected.steps[name], collected.parts[name]):
        index = 1 if cpu else 0
        # parts[i] were timed after step i+1; step times start at step 2, so step_times[i] pairs with parts[i].
        for step, teacher, student in zip(times.clock(cpu), parts.teacher, parts.student):
            ratios.append(step / (teacher[index] + student[index]))
    return median(ratios)


def step_median(collected: Collected, name: str, cpu: bool) -> float:
    return median(t for times in collected.steps[name] for t in times.clock(cpu))


def over_repeats(per_repeat: list[Collected], fn) -> tuple[float, float, float, float]:
    """(median, min, max) over repeats of fn(repeat, cpu=True), and the median of fn(repeat, cpu=False)."""
    cpu = [fn(c, True) for c in per_repeat]
    wall = [fn(c, False) for c in per_repeat]
    return median(cpu), min(cpu), max(cpu), median(wall)


def outside_share(collected: Collected, name: str, cpu: bool) -> tuple[float, dict[str, float]]:
    """Median over steps of (step - model calls) / step, and the median share of every region."""
    index = 1 if cpu else 0
    shares, regions = [], {}
    for times in collected.steps[name]:
        for step, spent in zip(times.clock(cpu), times.regions):
            model = sum(spent.get(region, (0.0, 0.0))[index] for region in MODEL_REGIONS)
            shares.append((step - model) / step)
            for region, value in spent.items():
                regions.setdefault(region, []).append(value[index] / step)
    return median(shares), {region: median(v) for region, v in regions.items()}


def row(label: str, values: tuple[float, float, float, float], target: str, ok: bool | None, percent=False) -> str:
    mid, low, high, wall = values
    if percent:
        numbers = f"{100 * mid:6.1f}% {100 * wall:7.1f}%  {100 * low:5.1f}-{100 * high:4.1f}%"
    else:
        numbers = f"{mid:7.3f} {wall:8.3f}  {low:5.3f}-{high:5.3f}"
    return f"{label:58s} {numbers}  {target:8s} {verdict(ok) if ok is not None else ''}".rstrip()


def print_report(setting, everything, per_repeat, memory, repeats, threads, started) -> None:
    print()
    print("=" * 112)
    print(f"D-OPSD node benchmark, {datetime.date.today().isoformat()}, {cpu_model()} ({os.cpu_count()} logical CPUs), "
          f"torch {torch.__version__} with {threads} intra-op thread(s), ComfyUI {comfyui_version()}")
    print(f"Tiny Z-Image DiT (dim {ZIMAGE_DIM}, {ZIMAGE_NUM_LAYERS} layers + {2 * ZIMAGE_NUM_REFINER_LAYERS} refiner "
          f"blocks, real key layout) loaded by ComfyUI, {setting.size}x{setting.size} images "
          f"({(setting.size // 16) ** 2} image tokens), batch 1, float32 on CPU, LoRA rank {setting.rank} on every "
          f"linear layer in both nodes, AdamW; gradient checkpointing on unless stated.")
    print(f"{setting.steps} steps per run (step 1 not measured), {repeats} interleaved repeats. Ratio = median over "
          f"repeats, by process CPU time; [wall] the same by wall clock; range = min-max over repeats.")
    print("=" * 112)
    print(f"{'measure':58s} {'ratio':>7s} {'[wall]':>8s}  {'range':>11s}  target")
    print("-" * 112)
    for name, k in (("D-OPSD K=4", 4), ("D-OPSD K=8", 8)):
        values = over_repeats(per_repeat, lambda c, cpu, name=name, k=k: parts_ratio(c, name, k, cpu))
        print(row(f"(1) {name}: step / {k} x (teacher fwd + student fwd/bwd)", values, "<= 1.15", values[0] <= 1.15))
    values = over_repeats(per_repeat, lambda c, cpu: parts_ratio(c, "D-OPSD K=4, no checkpointing", 4, cpu))
    print(row("(1) the same, K=4, gradient checkpointing off", values, "(info)", None))
    values = over_repeats(per_repeat, lambda c, cpu: step_median(c, "DOPSDTrain SFT", cpu)
                          / step_median(c, "TrainLoraNode", cpu))
    print(row("(2) DOPSDTrain (SFT) step / TrainLoraNode step", values, "<= 1.05", values[0] <= 1.05))
    for name in ("D-OPSD K=4", "D-OPSD K=8"):
        values = over_repeats(per_repeat, lambda c, cpu, name=name: outside_share(c, name, cpu)[0])
        print(row(f"(4) {name}: share of the step outside the model calls", values, "< 5 %", values[0] < 0.05,
                  percent=True))
    values = over_repeats(per_repeat, lambda c, cpu: step_median(c, "D-OPSD K=4", cpu)
                          / step_median(c, "D-OPSD K=4, no checkpointing", cpu))
    print(row("(+) D-OPSD K=4 step, gradient checkpointing on / off", values, "(info)", None))
    values = over_repeats(per_repeat, lambda c, cpu: step_median(c, "TrainLoraNode", cpu)
                          / step_median(c, "TrainLoraNode, no checkpointing", cpu))
    print(row("(+) TrainLoraNode step, gradient checkpointing on / off", values, "(info)", None))

    _, regions = outside_share(everything, "D-OPSD K=4", True)
    share, _ = outside_share(everything, "D-OPSD K=4", True)
    print()
    print("(4) where a D-OPSD K=4 step goes (median share of the step over all repeats, CPU time):")
    calls = regions.pop(DENOISER_REGION, 0.0)
    regions.pop("benchmark's own part timing", None)
    regions["ComfyUI glue around the model call"] = calls - sum(regions.get(name, 0.0) for name in MODEL_REGIONS[:2])
    regions["rest (draws, loss, Euler step, progress)"] = share - sum(
        value for name, value in regions.items() if name not in MODEL_REGIONS)
    for name, value in sorted(regions.items(), key=lambda kv: (kv[0] not in MODEL_REGIONS, -kv[1])):
        print(f"      {name:48s} {100 * value:6.1f}%")
    print(f"      {'outside the model calls (rows 4 and below)':48s} {100 * share:6.1f}%")

    for checkpointing, peaks in memory.items():
        unit, sft, native = peaks[UNIT], peaks["DOPSDTrain SFT"], peaks["TrainLoraNode"]
        print()
        print(f"(3) peak memory, gradient checkpointing {'on' if checkpointing else 'off'}: CPU allocator peak while "
              f"the training graph runs (upstream cached)")
        print(f"      unit = {UNIT} = the larger of its {TEACHER_PART} {peaks[TEACHER_PART] / MIB:.1f} MiB and its "
              f"{STUDENT_PART} {peaks[STUDENT_PART] / MIB:.1f} MiB")
        print(f"      {'run':26s} {'/ TrainLoraNode':>15s} {'- DOPSDTrain SFT (units)':>25s}")
        for name, _ in MEMORY_RUNS:
            print(f"      {name:26s} {peaks[name] / native:15.3f} {(peaks[name] - sft) / unit:+25.2f}")
        ks = [peaks[f"DOPSDTrain D-OPSD K={k}"] for k in (2, 4, 8)]
        growth = (ks[-1] - ks[0]) / unit
        above = max(ks) - sft
        print(f"      growth K=2 -> K=8: {growth:+.2f} units ({verdict(abs(growth) <= 0.5)}: flat, |growth| <= 0.5 unit)")
        print(f"      D-OPSD above SFT, worst K: {above / unit:+.2f} units ({verdict(above <= unit)}: <= 1 unit)")
        print(f"      (context: TrainLoraNode peak {native / MIB:.1f} MiB, DOPSDTrain SFT {sft / MIB:.1f} MiB)")
    print(f"\nbenchmark wall time {time.perf_counter() - started:.0f} s")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def comfyui_version() -> str:
    with contextlib.suppress(Exception):
        return importlib.import_module("comfyui_version").__version__
    return "?"


# ------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every configuration")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed run (>= 3)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (multiple of 16)")
    parser.add_argument("--rank", type=int, default=16)
    # One thread: on a small shared machine spinning intra-op threads make timings erratic, and with one
    # thread the process CPU time is the work done whatever else runs.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base", type=Path, default=None, help="ComfyUI base directory to create (default: a temp dir)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # ComfyUI's start-up warnings (missing torchaudio) and per-step info lines
    # TrainLoraNode autocasts to its training dtype; float32 autocast on CPU is a no-op that warns every step.
    warnings.filterwarnings("ignore", message="In CPU autocast")
    setting = Setting(size=args.size, rank=args.rank, steps=args.steps)

    base = args.base or Path(tempfile.mkdtemp(prefix="dopsd_bench_"))
    make_base_directory(base)
    write_tiny_models(base / "models")
    write_tiny_vision_towers(base / "models")
    paths = write_concept_images(base / "input" / DATASET_FOLDER, count=2, size=(args.size, args.size))
    images = []
    for path in paths:  # LoadImage lists the input folder's top level
        shutil.copy(path, base / "input" / f"bench_{path.name}")
        images.append(f"bench_{path.name}")
    print(f"booting ComfyUI in-process (base {base}) ...", flush=True)
    with quiet_stderr():
        runtime = ComfyRuntime.boot(base)
    install_instrumentation(runtime)
    harness = Harness(runtime)

    print("warm-up (caches the loader, dataset and conditioning nodes) ...", flush=True)
    warm = replace(setting, steps=2)
    execute(runtime, dopsd_graph(warm, images, k=2, seed=0), 2)
    execute(runtime, native_graph(warm, images, seed=0), 2)
    print("speed ...", flush=True)
    everything, per_repeat = measure_speed(runtime, harness, setting, images, args.repeats)
    memory = {}
    if not args.skip_memory:
        for checkpointing in (True, False):
            print(f"memory, gradient checkpointing {'on' if checkpointing else 'off'} ...", flush=True)
            with quiet_stderr():
                memory[checkpointing] = measure_memory(runtime, harness, setting, images, checkpointing)
    print_report(setting, everything, per_repeat, memory, args.repeats, args.threads, started)
    from benchmarks import cost_model  # noqa: E402  (pure arithmetic; printed so one command shows both)

    print()
    cost_model.main([])


if __name__ == "__main__":
    main()
