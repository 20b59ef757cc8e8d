"""Framework-free D-OPSD training core: schedules, roll-outs, losses, dual LoRA, trainer, checkpoints.

Nothing here imports ComfyUI; the node layer adapts ComfyUI objects to these building blocks.
"""

from .adapters import (
    ROLES,
    AdapterState,
    DualLora,
    LoraSpec,
    adapter_state_from_tensors,
    find_target_modules,
    lora_tensors,
)
from .autograd_safety import allow_inplace_residuals, make_weights_autograd_safe
from .checkpoints import (
    Checkpoint,
    CheckpointSearch,
    checkpoint_damage,
    latest_checkpoint,
    load_adapter_state,
    load_checkpoint,
    newest_intact_checkpoint,
    prune_checkpoints,
    save_adapter_state,
)
from .data_parallel import DataParallel, micro_step_generator
from .full_weights import DualWeights, shard
from .gradient_checkpointing import gradient_checkpointing
from .losses import LOSS_SPACES, distillation_loss, flow_matching_loss, velocity_loss, x0_loss
from .memory_plan import AllocationPeak, MemoryPlan, StepMemoryCurve, format_bytes, fp8_savings, plan_memory
from .rollout import RolloutStep, append_dims, euler_step, noise_latent, rollout, rollout_preview
from .schedules import (
    ZIMAGE_TURBO_INFERENCE_SIGMAS_8,
    ZIMAGE_TURBO_TRAINING_SIGMAS_4,
    flux2_image_tokens,
    flux2_klein_mu,
    flux2_klein_sigmas,
    flux2_klein_training_sigmas,
    validate_sigmas,
    zimage_turbo_inference_sigmas,
    zimage_turbo_training_sigmas,
)
from .trainer import Denoiser, StepReport, TrainConfig, Trainer, TrainingCancelled, TrainingItem, TrainingPair

__all__ = [
    "ROLES",
    "AdapterState",
    "DualLora",
    "LoraSpec",
    "find_target_modules",
    "lora_tensors",
    "adapter_state_from_tensors",
    "allow_inplace_residuals",
    "make_weights_autograd_safe",
    "Checkpoint",
    "latest_checkpoint",
    "newest_intact_checkpoint",
    "prune_checkpoints",
    "checkpoint_damage",
    "CheckpointSearch",
    "load_adapter_state",
    "load_checkpoint",
    "save_adapter_state",
    "DataParallel",
    "micro_step_generator",
    "DualWeights",
    "shard",
    "gradient_checkpointing",
    "LOSS_SPACES",
    "distillation_loss",
    "flow_matching_loss",
    "velocity_loss",
    "x0_loss",
    "AllocationPeak",
    "MemoryPlan",
    "StepMemoryCurve",
    "format_bytes",
    "fp8_savings",
    "plan_memory",
    "RolloutStep",
    "append_dims",
    "euler_step",
    "noise_latent",
    "rollout",
    "rollout_preview",
    "ZIMAGE_TURBO_INFERENCE_SIGMAS_8",
    "ZIMAGE_TURBO_TRAINING_SIGMAS_4",
    "flux2_image_tokens",
    "flux2_klein_mu",
    "flux2_klein_sigmas",
    "flux2_klein_training_sigmas",
    "validate_sigmas",
    "zimage_turbo_inference_sigmas",
    "zimage_turbo_training_sigmas",
    "Denoiser",
    "StepReport",
    "TrainConfig",
    "Trainer",
    "TrainingCancelled",
    "TrainingItem",
    "TrainingPair",
]
