"""The node benchmark's report: ratios with their spread over repeats, verdicts against the targets, the breakdown of
a step, and the memory table."""
from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import platform
import time
from pathlib import Path

import torch

from devkit.tiny_models import ZIMAGE_DIM, ZIMAGE_NUM_LAYERS, ZIMAGE_NUM_REFINER_LAYERS

from .instrumentation import DENOISER_REGION, MODEL_REGIONS
from .measure import MEMORY_RUNS, STUDENT_PART, TEACHER_PART, UNIT, Collected, median

MIB = 2**20


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


