"""DOPSDTrain's memory plan: before the first optimizer step, the peak memory the run will need, shown on the node,
and a stop with settings that fit when the training device does not have it."""
from __future__ import annotations

import logging
import math
from math import prod

import comfy.model_management
import torch

from ..dopsd_core import (
    MemoryPlan,
    StepMemoryCurve,
    Trainer,
    TrainingItem,
    TrainingPair,
    format_bytes,
    fp8_savings,
    plan_memory,
)
from ..dopsd_core.buckets import bucket_size
from .errors import node_error
from .model_bridge import ModelSession
from .training_set import EncodedItem

# Allocator fragmentation, and the rest of an optimizer step the roll-out step leaves out (clipping, AdamW's and the
# EMA's temporaries: about 2 % on the tiny models).
SAFETY_FACTOR = 1.1
# Buckets are multiples of at most this many pixels (the Dataset nodes' largest bucket_multiple is 256).
MAX_BUCKET_MULTIPLE = 256
MEGAPIXEL_TRIES = 8
# ComfyUI pads both families' latents to 2x2 patches; probes of even sides keep the token count exact.
PATCH_MULTIPLE = 2


def largest_item(training_set: list[EncodedItem]) -> EncodedItem:
    return max(training_set, key=lambda item: prod(item.latent.shape))


def probe_item(session: ModelSession, item: EncodedItem, shape: tuple[int, ...]) -> TrainingItem:
    """The item's first prompt variant on a latent of another size (zeros: memory does not depend on values)."""
    pair = item.pairs[0]
    variant = TrainingPair(session.prepare(pair.student, shape), session.prepare(pair.teacher, shape))
    return TrainingItem(variants=[variant], latent_shape=shape, sigmas=item.sigmas,
                        target_latent=torch.zeros(shape, device=session.device))


def measure_plan(session: ModelSession, trainer: Trainer, item: EncodedItem) -> tuple[MemoryPlan, StepMemoryCurve]:
    def measure_step(shape):
        return trainer.step_memory(probe_item(session, item, shape))

    return plan_memory(session.model.model.diffusion_model, trainer.adapters.student_parameters(),
                       tuple(item.latent.shape), measure_step, PATCH_MULTIPLE)


def available_bytes(session: ModelSession, plan: MemoryPlan, limit_gb: float) -> int:
    """What the run may still allocate: the device's free memory now that the model and its adapters are loaded, or
    the user's limit less what they already take."""
    free = comfy.model_management.get_free_memory(session.device)
    if limit_gb > 0:
        return min(free, int(limit_gb * 1e9) - plan.weights - plan.adapters)
    return free


def check_memory(node, session: ModelSession, trainer: Trainer, training_set: list[EncodedItem], limit_gb: float,
                 checkpointed_trainer) -> str:
    """Plan the run's memory and stop it, naming settings that fit, when the device cannot hold it (or a roll-out
    step ran out of memory while being measured). Returns the line the node shows. `checkpointed_trainer()` builds
    the same trainer with gradient checkpointing on (called only when this one has it off and does not fit)."""
    item = largest_item(training_set)
    try:
        plan, curve = measure_plan(session, trainer, item)
    except comfy.model_management.OOM_EXCEPTION as err:
        raise node_error(node, "the device ran out of memory measuring a roll-out step at half the images' area, so "
                               "the run cannot fit",
                         "load the model with weight_dtype fp8_e4m3fn, lower the Dataset node's megapixels, turn "
                         "gradient_checkpointing on, or free memory (close other programs)") from err
    available = available_bytes(session, plan, limit_gb)
    limit = f"the {limit_gb:g} GB memory_limit_gb" if limit_gb > 0 else f"{session.device}"
    note = f"memory plan: {plan.describe()}; {format_bytes(max(available, 0))} free for training on {limit}"
    logging.info("DOPSDTrain %s", note)
    if plan.step_measured and plan.training * SAFETY_FACTOR <= available:
        return note
    fixes = settings_that_fit(session, trainer, plan, curve, item, training_set, available, checkpointed_trainer)
    needs = (f"needs {format_bytes(plan.training * SAFETY_FACTOR)}" if plan.step_measured else
             f"ran out of memory in a roll-out step at the images' full size; it needs more than "
             f"{format_bytes(plan.training * SAFETY_FACTOR)}")
    raise node_error(node, f"this run {needs} for training on top of the loaded model and LoRA, but only "
                           f"{format_bytes(max(available, 0))} is free on {limit} ({plan.describe()})",
                     f"{'; or '.join(fixes)}. Nothing was trained and no file was written")


def settings_that_fit(session: ModelSession, trainer: Trainer, plan: MemoryPlan, curve: StepMemoryCurve,
                      item: EncodedItem, training_set: list[EncodedItem], available: int,
                      checkpointed_trainer) -> list[str]:
    fixes = []
    if checkpointed_trainer is not None:
        checkpointed, _ = measure_plan(session, checkpointed_trainer(), item)
        fits = checkpointed.step_measured and checkpointed.training * SAFETY_FACTOR <= available
        verdict = "fits" if fits else "is not enough alone"
        fixes.append(f"turn gradient_checkpointing on (training then needs "
                     f"{format_bytes(checkpointed.training * SAFETY_FACTOR)}: {verdict})")
    savings = fp8_savings(session.model.model.diffusion_model)
    if savings > 0:
        fits = plan.step_measured and plan.training * SAFETY_FACTOR <= available + savings
        verdict = "fits" if fits else "is not enough alone"
        fixes.append(f"load the model with weight_dtype fp8_e4m3fn (frees {format_bytes(savings)}: {verdict})")
    megapixels = fitting_megapixels(session, trainer, plan, curve, item, training_set, available)
    if megapixels is not None:
        height, width = item.image.shape[1:3]
        fixes.append(f"set the Dataset node's megapixels to {megapixels:g} or less (now {height * width / 1e6:.3g}: "
                     f"{width}x{height})")
    fixes.append("free memory on the device (other programs, other loaded models)")
    return fixes


def fitting_megapixels(session: ModelSession, trainer: Trainer, plan: MemoryPlan, curve: StepMemoryCurve,
                       item: EncodedItem, training_set: list[EncodedItem], available: int) -> float | None:
    """The largest Dataset megapixels (3 decimals) at which the roll-out step of the largest bucket it makes was
    measured to fit, starting from the curve's estimate and stepping down: images are cut to buckets of whole
    multiples (of other sizes for other aspect ratios) and models pad their tokens, so a size between two measured
    ones can cost more than the curve says. The teacher's context is measured as encoded now: encoded again from the
    smaller images its length can differ a little. None when nothing smaller fits."""
    step_budget = available / SAFETY_FACTOR - plan.optimizer_state
    latent_elements, fitting = prod(item.latent.shape), curve.largest_latent(step_budget)
    if not 0 < fitting < latent_elements:
        return None
    height, width = item.image.shape[1:3]
    megapixels = math.floor(height * width / 1e3 * fitting / latent_elements) / 1e3
    for _ in range(MEGAPIXEL_TRIES):
        if megapixels <= 0:
            return None
        shape, largest = max(((bucket_latent_shape(candidate, megapixels), candidate) for candidate in training_set),
                             key=lambda pair: prod(pair[0]))
        if trainer.step_memory(probe_item(session, largest, shape)) <= step_budget:
            return megapixels
        megapixels = math.floor(megapixels * 900) / 1e3
    return None


def bucket_latent_shape(item: EncodedItem, megapixels: float) -> tuple[int, ...]:
    """The latent shape `item` gets from the Dataset node at `megapixels` (its bucket multiple read off its size)."""
    *lead, latent_height, latent_width = item.latent.shape
    height, width = item.image.shape[1:3]
    multiple = math.gcd(height, width, MAX_BUCKET_MULTIPLE)
    bucket_width, bucket_height = bucket_size(width, height, int(megapixels * 1e6), multiple)
    return (*lead, bucket_height * latent_height // height, bucket_width * latent_width // width)
