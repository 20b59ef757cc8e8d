"""D-OPSD (and plain SFT) training of a LoRA on a flow model whose denoiser predicts x0.

One D-OPSD optimization step with K = len(sigmas) - 1 roll-out steps and A accumulation
micro-steps: each micro-step draws an item, one of its prompt variants and fresh noise, starts
at the state ``s_0 = sigmas[0] * noise`` and for k = 0 .. K-1

    teacher_x0 = D(s_k, sigma_k, teacher_cond)   with the teacher adapter, no grad
    student_x0 = D(s_k, sigma_k, student_cond)   with the student adapter
    loss_k     = MSE(student_x0, teacher_x0)     (x0 space, or velocity space)
    backward(loss_k / (K A))
    s_{k+1}    = euler_step(s_k, student_x0.detach(), sigma_k, sigma_{k+1})

then clips the gradient norm, takes an AdamW step and moves the teacher toward the student by
EMA. Micro-step j of optimizer step s draws from its own generator, seeded by (seed, s, j), so a
run's draws do not depend on how its micro-steps are spread over processes (``DataParallel``). (x0 is always a clean-latent prediction; the noisy states are s_k.) Every s_k is detached, so backpropagating each loss_k at once gives the gradient of the mean
loss (what the reference computes with one backward over all K graphs) while only one step's
activations are alive.
"""

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .adapters import DualLora
from .checkpoints import load_checkpoint, prune_checkpoints, save_checkpoint
from .data_parallel import DataParallel, micro_step_generator
from .full_weights import DualWeights, is_sharded
from .gradient_checkpointing import gradient_checkpointing
from .losses import LOSS_SPACES, LossSpace, distillation_loss, flow_matching_loss
from .memory_plan import AllocationPeak
from .rollout import append_dims, noise_latent, rollout
from .schedules import validate_sigmas

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]
"""``denoiser(x, sigma, cond) -> x0``, with ``sigma`` of shape ``[B]``."""


@dataclass(frozen=True)
class TrainingPair:
    """One prompt variant: the student's conditioning (prompt alone, as at inference) and the
    teacher's (the prompt plus the target image). Both are opaque to the trainer."""

    student_cond: Any
    teacher_cond: Any


@dataclass(frozen=True)
class TrainingItem:
    """One training image with its prompt variants.

    ``latent_shape`` is the shape of the state handed to the denoiser; a 3-entry ``(C, H, W)``
    gets a batch dimension of 1. ``target_latent`` is the image's clean latent, needed for SFT.
    ``sigmas``, when given, is this item's own roll-out schedule (e.g. a resolution-dependent
    one, since aspect buckets differ in size); otherwise the trainer's schedule is used. It is
    validated and stored as float32.
    """

    variants: Sequence[TrainingPair]
    latent_shape: tuple[int, ...]
    target_latent: Tensor | None = None
    sigmas: Tensor | None = None

    def __post_init__(self):
        if self.sigmas is not None:
            try:
                sigmas = validate_sigmas(self.sigmas)
            except ValueError as err:
                raise ValueError(f"TrainingItem sigmas: {err}") from err
            object.__setattr__(self, "sigmas", sigmas)

    @property
    def batched_shape(self) -> tuple[int, ...]:
        return with_batch_dim(self.latent_shape)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; the defaults are the D-OPSD authors' per-device settings for Z-Image-Turbo
    (their effective batch of 4 came from 4 GPUs: ``gradient_accumulation=4`` gives it on one).

    ``grad_clip``: maximum global gradient norm, 0 for none. ``warmup_steps``: the learning rate
    rises linearly over this many optimizer steps. ``mixed_precision``: "auto" is bf16 autocast
    on CUDA and float32 elsewhere. ``loss_space`` applies to D-OPSD; SFT always uses the
    rectified-flow velocity loss. SFT draws its noise level as ``sigmoid(N(sft_logit_mean,
    sft_logit_std^2))`` for "logit_normal" (SD3's choice, weighting mid-trajectory levels) or
    from U(0, 1] for "uniform". ``checkpoint_every`` > 0 saves to ``checkpoint_dir`` that often, keeping the
    ``keep_last`` newest intact checkpoints there (0: all).
    """

    objective: Literal["dopsd", "sft"] = "dopsd"
    steps: int = 2000
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    loss_space: LossSpace = "x0"
    gradient_accumulation: int = 1
    warmup_steps: int = 0
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    keep_last: int = 0
    sft_sigma_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    sft_logit_mean: float = 0.0
    sft_logit_std: float = 1.0

    def __post_init__(self):
        choices = {
            "objective": ("dopsd", "sft"),
            "loss_space": LOSS_SPACES,
            "mixed_precision": ("auto", "no", "bf16"),
            "sft_sigma_sampling": ("logit_normal", "uniform"),
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.gradient_accumulation < 1:
            raise ValueError(f"gradient_accumulation must be at least 1, got {self.gradient_accumulation}")
        if self.keep_last < 0:
            raise ValueError(f"keep_last must be 0 (keep all) or more, got {self.keep_last}")
        if self.checkpoint_every > 0 and not self.checkpoint_dir:
            raise ValueError("checkpoint_every > 0 needs a checkpoint_dir")


@dataclass(frozen=True)
class StepReport:
    """One optimizer step. ``step`` counts completed steps from 1; ``loss`` is the objective's
    mean; ``per_step_losses`` is the loss at each roll-out step (one entry for SFT), averaged
    over accumulation micro-steps (and processes); ``grad_norm`` is measured before clipping;
    ``communication_seconds`` is the part of ``seconds`` spent averaging over processes."""

    step: int
    loss: float
    per_step_losses: tuple[float, ...]
    grad_norm: float
    lr: float
    seconds: float
    communication_seconds: float = 0.0


class TrainingCancelled(Exception):
    """``should_cancel`` asked to stop; the adapters, optimizer and random state are as after the
    last completed optimizer step."""


class Trainer:
    """Trains ``adapters``' student on ``items`` with D-OPSD or SFT; see the module docstring.
    ``adapters`` is a DualLora (LoRA training) or a DualWeights (full fine-tuning).

    The denoiser, model and adapters must already live on ``device``. ``checkpointed_modules``
    are wrapped with gradient checkpointing while ``train`` runs. With ``data_parallel`` this
    process runs its ``config.gradient_accumulation`` micro-steps of each optimizer step and the
    gradients are averaged over all processes (only rank 0 writes checkpoints).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        adapters: DualLora | DualWeights,
        items: Sequence[TrainingItem],
        sigmas: Tensor | Sequence[float],
        config: TrainConfig = TrainConfig(),
        device: torch.device | str = "cpu",
        checkpointed_modules: Sequence[nn.Module] = (),
        data_parallel: DataParallel = DataParallel(),
    ):
        if not items or not all(item.variants for item in items):
            raise ValueError("training needs at least one item, each with at least one prompt variant")
        if config.objective == "sft":
            for index, item in enumerate(items):
                if item.target_latent is None:
                    raise ValueError(f"SFT needs a target_latent for every item; item {index} has none")
                if with_batch_dim(item.target_latent.shape) != item.batched_shape:
                    raise ValueError(
                        f"item {index}: target_latent shape {tuple(item.target_latent.shape)} "
                        f"does not fit latent_shape {tuple(item.latent_shape)}"
                    )
        self.denoiser, self.adapters, self.items, self.config = denoiser, adapters, list(items), config
        self.device = torch.device(device)
        self.sigmas = validate_sigmas(sigmas).to(self.device)
        for index, item in enumerate(items):
            # Per-step losses are averaged over micro-steps, so every schedule has the same step count.
            if item.sigmas is not None and len(item.sigmas) != len(self.sigmas):
                raise ValueError(
                    f"item {index}: its own sigmas have {len(item.sigmas) - 1} steps but the trainer's have "
                    f"{len(self.sigmas) - 1}; per-item schedules must keep the step count"
                )
        self.checkpointed_modules = list(checkpointed_modules)
        self.data_parallel = data_parallel
        self._fine_tuning = "full" if isinstance(adapters, DualWeights) else "lora"
        self.batch_size = config.gradient_accumulation * data_parallel.world_size
        self.step = 0
        self.loss_history: list[float] = []  # one loss per completed step, kept across resumes
        self.optimizer = torch.optim.AdamW(
            adapters.student_parameters(),
            lr=config.learning_rate,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            fused=True if self.device.type == "cuda" else None,
        )
        precision = config.mixed_precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "no"
        self._autocast_dtype = torch.bfloat16 if precision == "bf16" else None

    def train(
        self,
        num_steps: int | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> list[StepReport]:
        """Run ``num_steps`` optimizer steps (default: up to ``config.steps`` in total).

        ``should_cancel`` is polled before every roll-out step; when it returns True,
        ``TrainingCancelled`` is raised.
        """
        last_step = self.config.steps if num_steps is None else self.step + num_steps
        reports = []
        with self._training_scope():
            while self.step < last_step:
                reports.append(self._optimizer_step(should_cancel or _never))
                self.loss_history.append(reports[-1].loss)
                if on_step is not None:
                    on_step(reports[-1])
                if self.config.checkpoint_every > 0 and self.step % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
        return reports

    def save_checkpoint(self, folder: str | Path | None = None) -> Path | None:
        """Save the complete training state under ``folder`` (default ``config.checkpoint_dir``). With several
        processes every one must call it (sharded weights are gathered) and rank 0 writes (others get None)."""
        folder = folder or self.config.checkpoint_dir
        if folder is None:
            raise ValueError("no checkpoint folder given and config.checkpoint_dir is not set")
        student, teacher = self.adapters.student_state(), self.adapters.teacher_state()
        optimizer_state = self.adapters.optimizer_state(self.optimizer)
        if self.data_parallel.rank != 0:
            return None
        trainer_state = {
            "step": self.step,
            "batch_size": self.batch_size,
            "fine_tuning": self._fine_tuning,
            "optimizer": optimizer_state,
            "random": self._random_state(),
            "losses": list(self.loss_history),
            "config": dataclasses.asdict(self.config),
        }
        saved = save_checkpoint(folder, self.step, student, teacher, trainer_state)
        prune_checkpoints(folder, self.config.keep_last)
        return saved

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint written by ``save_checkpoint``; on CPU the continuation is
        bit-identical to never having stopped. Any number of processes may continue a run as long as
        the batch (micro-steps per optimizer step, over all of them) stays the same."""
        checkpoint = load_checkpoint(path)
        saved_kind = checkpoint.trainer_state.get("fine_tuning", "lora")  # older checkpoints are all LoRA ones
        if saved_kind != self._fine_tuning:
            raise ValueError(f"the checkpoint is of a {saved_kind} fine-tune and this run is a {self._fine_tuning} one")
        saved_batch = checkpoint.trainer_state.get("batch_size", self.batch_size)  # older checkpoints: unchecked
        if saved_batch != self.batch_size:
            raise ValueError(
                f"the checkpoint was trained with {saved_batch} roll-outs per optimizer step and this run has "
                f"{self.batch_size}; continue it with the same batch"
            )
        self.adapters.load_state(checkpoint.student, checkpoint.teacher)
        self.adapters.load_optimizer_state(self.optimizer, checkpoint.trainer_state["optimizer"])
        self.step = checkpoint.trainer_state["step"]
        self.loss_history = list(checkpoint.trainer_state.get("losses", []))  # older checkpoints have none
        self._set_random_state(checkpoint.trainer_state["random"])

    def accumulate_gradients(self, micro_step: int, should_cancel: Callable[[], bool] | None = None) -> Tensor:
        """Micro-step ``micro_step`` (0 .. batch - 1) of the coming optimizer step: draw its example
        and add its share of the objective's gradient to the student's ``.grad``. Returns its
        losses, one per roll-out step (D-OPSD) or a single one (SFT)."""
        generator = micro_step_generator(self.config.seed, self.step, micro_step)
        micro = self._dopsd_micro_step if self.config.objective == "dopsd" else self._sft_micro_step
        with self.adapters.use("student"):
            return micro(generator, should_cancel or _never)

    def _optimizer_step(self, should_cancel: Callable[[], bool]) -> StepReport:
        start = time.perf_counter()
        try:
            losses = torch.stack([
                self.accumulate_gradients(index, should_cancel)
                for index in self.data_parallel.micro_steps(self.config.gradient_accumulation)
            ])
        except BaseException:
            # Leave no trace of the unfinished step, so a checkpoint taken now resumes exactly.
            self.optimizer.zero_grad(set_to_none=True)
            raise
        per_step_losses = losses.mean(0)
        # Sharded weights' gradients were averaged by FSDP during the backward.
        unsharded = [p.grad for p in self.adapters.student_parameters() if not is_sharded(p)]
        communication = self.data_parallel.average_(unsharded + [per_step_losses])
        lr = self._learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = nn.utils.clip_grad_norm_(
            self.adapters.student_parameters(), self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        )
        if is_sharded(grad_norm):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.objective == "dopsd":
            self.adapters.ema_update(self.config.ema_decay)
        self.step += 1
        return StepReport(
            step=self.step,
            loss=per_step_losses.mean().item(),
            per_step_losses=tuple(per_step_losses.tolist()),
            grad_norm=grad_norm.item(),
            lr=lr,
            seconds=time.perf_counter() - start,
            communication_seconds=communication,
        )

    def schedule_for(self, item: TrainingItem) -> Tensor:
        """The roll-out schedule of ``item``: its own ``sigmas`` if set, else the trainer's."""
        return self.sigmas if item.sigmas is None else item.sigmas.to(self.device)

    def _dopsd_micro_step(self, generator: torch.Generator, should_cancel: Callable[[], bool]) -> Tensor:
        item, pair = self._draw_example(generator)
        noise = self._draw_noise(item.batched_shape, generator)
        sigmas = self.schedule_for(item)
        loss_scale = 1.0 / ((len(sigmas) - 1) * self.config.gradient_accumulation)
        losses = []

        def train_on_state(x: Tensor, sigma: Tensor) -> Tensor:
            if should_cancel():
                raise TrainingCancelled(f"cancelled during optimizer step {self.step + 1}")
            student_x0, loss = self._distill_on_state(pair, x, sigma, loss_scale)
            losses.append(loss)
            return student_x0

        rollout(train_on_state, noise, sigmas)
        return torch.stack(losses)

    def _distill_on_state(
        self, pair: TrainingPair, x: Tensor, sigma: Tensor, loss_scale: float
    ) -> tuple[Tensor, Tensor]:
        """One roll-out step's teacher forward, student forward and backward; returns the student's x0 and the loss."""
        with torch.no_grad(), self.adapters.use("teacher"), self._autocast():
            teacher_x0 = self.denoiser(x, sigma, pair.teacher_cond)
        with self._autocast():
            student_x0 = self.denoiser(x, sigma, pair.student_cond)
        loss = distillation_loss(self.config.loss_space, student_x0, teacher_x0, x, append_dims(sigma, x.ndim))
        # Still under the student adapter, which gradient checkpointing's recomputation relies on.
        (loss * loss_scale).backward()
        return student_x0, loss.detach()

    def _sft_micro_step(self, generator: torch.Generator, should_cancel: Callable[[], bool]) -> Tensor:
        item, pair = self._draw_example(generator)
        if should_cancel():
            raise TrainingCancelled(f"cancelled during optimizer step {self.step + 1}")
        return self._sft_on_item(item, pair, generator)

    def _sft_on_item(self, item: TrainingItem, pair: TrainingPair, generator: torch.Generator) -> Tensor:
        x0 = item.target_latent.reshape(item.batched_shape).to(self.device, torch.float32)
        noise = self._draw_noise(x0.shape, generator)
        sigma = self._draw_sft_sigma(x0.shape[0], generator).to(self.device)
        x = noise_latent(x0, noise, append_dims(sigma, x0.ndim))
        with self._autocast():
            predicted_x0 = self.denoiser(x, sigma, pair.student_cond)
        loss = flow_matching_loss(predicted_x0, x0, noise, x, append_dims(sigma, x0.ndim))
        (loss / self.config.gradient_accumulation).backward()
        return loss.detach()[None]

    def step_memory(self, item: TrainingItem) -> int:
        """Peak bytes one roll-out step on ``item`` allocates on the device (one micro-step for SFT), with the
        student's gradients already allocated: the measurement ``memory_plan.plan_memory`` is made of. Leaves no
        gradients."""
        generator = micro_step_generator(self.config.seed, self.step, 0)
        pair = item.variants[0]
        parameters = self.adapters.student_parameters()
        for p in parameters:
            p.grad = torch.zeros_like(p)
        try:
            with self._training_scope(), self.adapters.use("student"), AllocationPeak(self.device) as peak:
                if self.config.objective == "dopsd":
                    sigma = self.schedule_for(item)[:1].expand(item.batched_shape[0])
                    x = sigma[0] * self._draw_noise(item.batched_shape, generator)
                    self._distill_on_state(pair, x, sigma, 1.0)
                else:
                    self._sft_on_item(item, pair, generator)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        return peak.peak

    def _draw_example(self, generator: torch.Generator) -> tuple[TrainingItem, TrainingPair]:
        item = self.items[int(torch.randint(len(self.items), (), generator=generator))]
        return item, item.variants[int(torch.randint(len(item.variants), (), generator=generator))]

    def _draw_noise(self, shape: Sequence[int], generator: torch.Generator) -> Tensor:
        # Drawn on the CPU so a seed gives the same noise on every device.
        return torch.randn(tuple(shape), generator=generator).to(self.device)

    def _draw_sft_sigma(self, batch_size: int, generator: torch.Generator) -> Tensor:
        if self.config.sft_sigma_sampling == "uniform":
            return 1.0 - torch.rand(batch_size, generator=generator)  # (0, 1]: sigma = 0 has no velocity
        normal = torch.randn(batch_size, generator=generator)
        return torch.sigmoid(self.config.sft_logit_mean + self.config.sft_logit_std * normal)

    def _learning_rate(self, step: int) -> float:
        if self.config.warmup_steps <= 0:
            return self.config.learning_rate
        return self.config.learning_rate * min(1.0, (step + 1) / self.config.warmup_steps)

    def _autocast(self):
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    @contextmanager
    def _training_scope(self) -> Iterator[None]:
        with ExitStack() as stack:
            if self.device.type == "cuda":
                stack.enter_context(_tf32_matmuls())
            stack.enter_context(gradient_checkpointing(self.checkpointed_modules))
            yield

    def _random_state(self) -> dict[str, Tensor | None]:
        return {
            "torch_cpu": torch.get_rng_state(),
            "torch_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def _set_random_state(self, state: dict[str, Tensor | None]) -> None:
        torch.set_rng_state(state["torch_cpu"])
        if state["torch_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["torch_cuda"], self.device)


def _never() -> bool:
    return False


def with_batch_dim(shape: Sequence[int]) -> tuple[int, ...]:
    """A latent's shape with a batch dimension: ``(C, H, W)`` becomes ``(1, C, H, W)``."""
    return (1, *shape) if len(shape) == 3 else tuple(shape)


@contextmanager
def _tf32_matmuls() -> Iterator[None]:
    # The fp32_precision settings, not allow_tf32: torch refuses to read state set through a mix of both APIs.
    settings = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [setting.fp32_precision for setting in settings]
    for setting in settings:
        setting.fp32_precision = "tf32"
    try:
        yield
    finally:
        for setting, precision in zip(settings, saved):
            setting.fp32_precision = precision
