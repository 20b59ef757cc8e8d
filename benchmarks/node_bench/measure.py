"""The graphs the node benchmark runs (DOPSDTrain and ComfyUI's TrainLoraNode on the same tiny Z-Image) and the
runs that measure their step times and memory peaks."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace

from devkit.comfy_runtime import ComfyRuntime
from devkit.graph import Graph
from devkit.paths import comfy_version
from devkit.tiny_vlm import MATCHING_VISION_FILE

from .instrumentation import EVENTS, AllocationPeak, Parts

DATASET_FOLDER = "dopsd/bench"
PROMPT = "a photo of sks fox number 0"


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
                    training_schedule="published (authors')", weight_dtype="default")
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
        resume=False, preview_every=0, keep_last=0, start_from_lora="none", memory_limit_gb=0.0,
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


