"""DOPSDTrain: D-OPSD (or plain SFT) LoRA training on any flow MODEL, through dopsd_core."""
from __future__ import annotations

import json
import logging
import time
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Protocol

import comfy.model_management
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io
from safetensors import SafetensorError

from ..dopsd_core import (
    DualLora,
    LoraSpec,
    StepReport,
    TrainConfig,
    Trainer,
    TrainingCancelled,
    TrainingItem,
    TrainingPair,
    allow_inplace_residuals,
    flux2_image_tokens,
    make_weights_autograd_safe,
    newest_intact_checkpoint,
    rollout,
    validate_sigmas,
)
from .training_set import TRAINING_SET, EncodedItem
from .errors import node_error
from .families import (
    CUSTOM_TARGETS,
    DEFAULT_IMAGE_TOKENS,
    LORA_TARGET_CHOICES,
    ZIMAGE_TURBO,
    lora_targets,
    schedule_name,
    transformer_blocks,
)
from .item_schedules import require_matching_step_count
from .loading import BASE_MODEL_NAME_OPTION
from .lora_io import TrainedLora, adapter_state_from_comfy_lora, apply_lora, comfy_lora_tensors, output_slice_layout
from .memory_check import check_memory
from .node_text import running_node_id, show_on_node
from .model_bridge import (
    ModelSession,
    explain_unreadable_conditioning,
    model_session,
    require_flow_model,
    require_latents_of,
)
from .user_paths import resolve_inside

OBJECTIVES = {"D-OPSD": "dopsd", "SFT": "sft"}
LORA_INITS = {"gaussian": "gaussian", "peft default (Kaiming)": "default"}
LORA_DTYPE = torch.bfloat16
NO_LORA = "none"
PREVIEW_SEED = 0


def base_model_name(model) -> str:
    return model.model_options.get(BASE_MODEL_NAME_OPTION) or f"{type(model.model.model_config).__name__} (stock loader)"


def hyperparameter_inputs() -> list:
    """The training hyper-parameters, as DOPSDTrain and the job export take them."""
    defaults, recipe, spec = TrainConfig(), ZIMAGE_TURBO.recipe, LoraSpec()
    return [
        io.Combo.Input("objective", options=list(OBJECTIVES), default="D-OPSD",
                       tooltip="D-OPSD keeps few-step quality. SFT is plain fine-tuning on noised targets, "
                               "for comparison: it learns the concept but blurs at few steps."),
        io.Int.Input("steps", default=recipe.steps, min=1, max=1_000_000,
                     tooltip="Optimizer steps in total (also when resuming). Authors: 2000 for Z-Image, 3000 for "
                             "klein."),
        io.Float.Input("learning_rate", default=recipe.learning_rate, min=0.0, max=1.0, step=1e-6,
                       round=False, tooltip="AdamW. Authors: 1e-4 for Z-Image, 2e-5 for klein 4B and 9B (concept "
                                            "and edit tuning)."),
        io.Int.Input("rank", default=spec.rank, min=1, max=1024,
                     tooltip="LoRA rank (authors: 64). Lower: a smaller file and fewer details learned."),
        io.Float.Input("alpha", default=spec.alpha, min=0.0, max=4096.0, step=1.0,
                       tooltip="LoRA scale numerator: updates are scaled by alpha / rank (authors: 128, twice "
                               "the rank). Change it together with rank."),
        io.Combo.Input("lora_init", options=list(LORA_INITS), default="gaussian",
                       tooltip="How the LoRA's down-projection starts (up starts at 0 either way). Authors: "
                               "gaussian, N(0, 1/rank²); peft's Kaiming default gives smaller early updates."),
        io.Float.Input("ema_decay", default=defaults.ema_decay, min=0.0, max=1.0, step=1e-5, round=False,
                       tooltip="The teacher adapter follows the student as an EMA with this decay."),
        io.Combo.Input("loss_space", options=["x0", "velocity"], default=defaults.loss_space,
                       tooltip="x0 (authors): MSE between student and teacher clean-image predictions. "
                               "velocity: the paper's form, the same loss weighted by 1/sigma² (more weight "
                               "on the late, low-noise steps)."),
        io.Int.Input("gradient_accumulation", default=recipe.gradient_accumulation, min=1, max=1024,
                     tooltip="Roll-outs averaged per optimizer step. The authors trained with one roll-out on "
                             "each of 4 GPUs (8 for klein edit tuning): 4 (8) here gives their batch."),
        io.Int.Input("warmup_steps", default=defaults.warmup_steps, min=0, max=100_000,
                     tooltip="The learning rate rises linearly over this many steps (authors: 0, constant)."),
        io.Int.Input("seed", default=defaults.seed, min=0, max=2**63 - 1, control_after_generate=False,
                     tooltip="Fixed, so queueing again reuses the trained result instead of retraining."),
        io.Combo.Input("lora_targets", options=list(LORA_TARGET_CHOICES), default=LORA_TARGET_CHOICES[0],
                       tooltip="'published': the layers the authors' LoRA reaches (Z-Image: attention and "
                               "feed-forward of every block; klein: the double blocks' attention only). "
                               "'attention + feed-forward': every block's attention and MLP. q, k and v get "
                               "separate adapters."),
        io.String.Input("custom_lora_targets", default="",
                        tooltip="With lora_targets 'custom regex': a regex matching whole module names of the "
                                "diffusion model, e.g. 'layers\\.\\d+\\.attention\\.(qkv|out)'."),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute block activations during backward: about 2.4x less memory for "
                                 "about 30% more time. Turn off only with memory to spare."),
    ]


class DOPSDTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDTrain",
            display_name="Train LoRA with D-OPSD",
            category="D-OPSD",
            description=(
                "On-policy self-distillation: the model rolls out its own few-step trajectory from the prompt alone "
                "(student) and is pulled, at every state, toward its own prediction given the prompt plus the target "
                "image (teacher, an EMA of the student). Keeps the few-step ability that plain fine-tuning loses. "
                "'SFT' trains the usual way on the same data, for comparison."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The step-distilled model. It is left unchanged."),
                TRAINING_SET.Input("training_set", tooltip="From a teacher-context node (klein: through Training "
                                                           "Schedule per Image Size)."),
                io.Sigmas.Input("training_sigmas", tooltip="The roll-out schedule; must end at 0."),
                *hyperparameter_inputs(),
                io.Int.Input("checkpoint_every", default=0, min=0, max=1_000_000,
                             tooltip="Save a resumable checkpoint every N steps (0: off)."),
                io.String.Input("checkpoint_folder", default="dopsd/checkpoints/my_concept",
                                tooltip="Inside ComfyUI's output folder."),
                io.Boolean.Input("resume", default=False, tooltip="Continue from the newest checkpoint in the folder."),
                io.Int.Input("preview_every", default=0, min=0, max=1_000_000,
                             tooltip="Every N steps, roll out the student for the first pair and show it (0: at the end only)."),
                io.Int.Input("keep_last", default=3, min=0, max=1_000_000,
                             tooltip="Keep only this many of the newest checkpoints in the folder (0: all), so long "
                                     "runs do not fill the disk. Damaged checkpoints are never deleted."),
                io.Combo.Input("start_from_lora", options=[NO_LORA, *folder_paths.get_filename_list("loras")],
                               default=NO_LORA,
                               tooltip="Start the student and the teacher from this LoRA instead of from zero: a "
                                       "second round of training, or D-OPSD on top of an SFT LoRA. It must have been "
                                       "trained by this node on the same model, targets, rank and alpha. A checkpoint "
                                       "to resume from takes precedence."),
                io.Float.Input("memory_limit_gb", default=0.0, min=0.0, max=4096.0, step=0.5,
                               tooltip="0: the training device's free memory. Before the first step the node measures "
                                       "what the run needs (shown on the node) and stops with settings that fit if it "
                                       "exceeds this, instead of running out of memory later. Set it to keep memory "
                                       "for other programs."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained LoRA applied."),
                io.LoraModel.Output(display_name="lora"),
                io.LossMap.Output(display_name="loss"),
                io.Latent.Output(display_name="previews", tooltip="The student's few-step result during training."),
            ],
        )

    @classmethod
    def execute(cls, model, training_set, training_sigmas, objective, steps, learning_rate, rank, alpha, lora_init,
                ema_decay, loss_space, gradient_accumulation, warmup_steps, seed, lora_targets, custom_lora_targets,
                gradient_checkpointing, checkpoint_every, checkpoint_folder, resume, preview_every,
                keep_last, start_from_lora, memory_limit_gb) -> io.NodeOutput:
        checkpoint_dir = None
        if checkpoint_every > 0 or resume:
            checkpoint_dir = resolve_inside(folder_paths.get_output_directory(), checkpoint_folder, cls, "checkpoint folder")
        run = RunSettings.check(
            cls, model, training_set, training_sigmas, objective=objective, steps=steps, learning_rate=learning_rate,
            rank=rank, alpha=alpha, lora_init=lora_init, ema_decay=ema_decay, loss_space=loss_space,
            gradient_accumulation=gradient_accumulation, warmup_steps=warmup_steps, seed=seed,
            lora_targets=lora_targets, custom_lora_targets=custom_lora_targets, checkpoint_every=checkpoint_every,
            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, keep_last=keep_last)
        with torch.inference_mode(False), torch.enable_grad():
            start = None if start_from_lora == NO_LORA else load_starting_lora(start_from_lora)
            lora, losses, previews = train(model, training_set, run.sigmas, run.config, run.spec, run.file_keys,
                                           gradient_checkpointing, resume, preview_every, start, memory_limit_gb)
        metadata = run.lora_metadata(model, training_set)
        if start is not None:
            metadata["dopsd.started_from"] = start_from_lora
        trained = TrainedLora(lora, metadata)
        return io.NodeOutput(apply_lora(model, trained), trained, {"loss": losses}, {"samples": previews})


@dataclass(frozen=True)
class RunSettings:
    """A training run's settings, checked against the model and the training set: the roll-out schedule, the
    trainer's config, the LoRA layout and the LoRA file's key for each sliced adapter."""

    sigmas: torch.Tensor
    config: TrainConfig
    spec: LoraSpec
    file_keys: dict[str, str]
    objective: str
    lora_targets_choice: str

    @classmethod
    def check(cls, node, model, training_set: list[EncodedItem], training_sigmas, *, objective, steps, learning_rate,
              rank, alpha, lora_init, ema_decay, loss_space, gradient_accumulation, warmup_steps, seed, lora_targets,
              custom_lora_targets, checkpoint_every=0, checkpoint_dir=None, keep_last=0) -> "RunSettings":
        """The node's inputs as settings, or a node error that says what to connect or change."""
        require_flow_model(model, node)
        try:
            sigmas = validate_sigmas(training_sigmas)
        except ValueError as err:
            raise node_error(node, f"training_sigmas: {err}", "connect a schedule such as the loader's training_sigmas") from err
        if not training_set:
            raise node_error(node, "the training set is empty", "connect a teacher-context node fed by a dataset")
        require_latents_of(model, [item.latent for item in training_set], node)
        require_matching_step_count(training_set, sigmas, "training_sigmas", node)
        targets = lora_targets_for(model, lora_targets, custom_lora_targets, node)
        output_slices, file_keys = output_slice_layout(model.model, targets)
        config = TrainConfig(
            objective=OBJECTIVES[objective], steps=steps, learning_rate=learning_rate, ema_decay=ema_decay,
            loss_space=loss_space, gradient_accumulation=gradient_accumulation, warmup_steps=warmup_steps,
            seed=seed, checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir, keep_last=keep_last,
        )
        spec = LoraSpec(rank, alpha, targets, init=LORA_INITS[lora_init], seed=seed, output_slices=output_slices)
        return cls(sigmas, config, spec, file_keys, objective, lora_targets)

    def lora_metadata(self, model, training_set: list[EncodedItem]) -> dict[str, str]:
        return lora_metadata(model, training_set, self.sigmas, self.config, self.spec, self.objective,
                             self.lora_targets_choice)


def lora_metadata(model, training_set: list[EncodedItem], sigmas, config: TrainConfig, spec: LoraSpec,
                  objective: str, lora_targets_choice: str) -> dict[str, str]:
    """The saved LoRA's header: how it was trained, so a file found later explains itself."""
    metadata = {
        "dopsd.method": objective, "dopsd.base_model": base_model_name(model), "dopsd.steps": str(config.steps),
        "dopsd.rank": str(spec.rank), "dopsd.alpha": str(spec.alpha), "dopsd.lora_targets": spec.target_modules,
        "dopsd.lora_targets_choice": lora_targets_choice, "dopsd.lora_init": spec.init,
        "dopsd.fused_layers": "one adapter per slice (q, k, v)" if spec.output_slices else "one adapter per layer",
        "dopsd.rollout_schedule": rollout_schedule_name(sigmas, training_set),
        "dopsd.training_sigmas": json.dumps([round(s, 6) for s in sigmas.tolist()]),
        "dopsd.learning_rate": str(config.learning_rate),
        "dopsd.gradient_accumulation": str(config.gradient_accumulation),
        "dopsd.ema_decay": str(config.ema_decay), "dopsd.loss_space": config.loss_space,
        "dopsd.images": str(len(training_set)),
    }
    per_size = {f"{item.image.shape[2]}x{item.image.shape[1]}": [round(s, 6) for s in item.sigmas.tolist()]
                for item in training_set if item.sigmas is not None}
    if per_size:  # items rolled out on their own schedules instead of training_sigmas
        metadata["dopsd.training_sigmas_per_image_size"] = json.dumps(per_size)
    return metadata


def lora_targets_for(model, choice: str, custom_regex: str, node) -> str:
    targets = lora_targets(model.model.diffusion_model, choice, custom_regex)
    if targets is None and choice == CUSTOM_TARGETS:
        raise node_error(node, "lora_targets is 'custom regex' but custom_lora_targets is empty",
                         "type a regex over the diffusion model's linear-layer names (e.g. '.*attn.*') or pick a preset")
    if targets is None:
        raise node_error(node, f"the '{choice}' LoRA targets do not cover a "
                               f"{type(model.model.diffusion_model).__name__} model",
                         "choose lora_targets 'custom regex' and type a regex over its linear-layer names "
                         "(e.g. '.*attn.*')")
    return targets


def rollout_schedule_name(sigmas, training_set: list[EncodedItem]) -> str:
    """The schedule the run rolled out on, for the LoRA header: "published (authors')", "sampling grid", "custom", or
    "mixed". Items without their own schedule use `sigmas`, which for klein is the loader's 1024² schedule."""
    names = {schedule_name(sigmas if item.sigmas is None else item.sigmas,
                           {flux2_image_tokens(*item.image.shape[1:3]), DEFAULT_IMAGE_TOKENS})
             for item in training_set}
    return names.pop() if len(names) == 1 else "mixed"


def progress_text(step: int, total: int, loss: float, seconds_per_step: float) -> str:
    """What the node shows while training: the step, the last loss and the time left at the pace so far."""
    text = f"step {step}/{total} · loss {loss:.4f}"
    if step < total:
        minutes_left = (total - step) * seconds_per_step / 60
        hours, minutes = divmod(round(minutes_left), 60)
        text += f" · about {hours} h {minutes:02d} min left" if hours else f" · about {max(minutes, 1)} min left"
    return text


class TrainingObserver(Protocol):
    """Something that watches the node's training from outside, e.g. benchmarks/bench_nodes.py timing the parts of
    each step. Register it in TRAINING_OBSERVERS; every DOPSDTrain run calls it."""

    def watching(self, trainer: Trainer) -> AbstractContextManager:
        """Entered just before Trainer.train and left after it, with the trainer the node built."""

    def after_step(self, trainer: Trainer, report: StepReport) -> None:
        """Called after each optimizer step, once the node has shown its progress."""


TRAINING_OBSERVERS: list[TrainingObserver] = []


def train(model, training_set: list[EncodedItem], sigmas, config: TrainConfig, spec: LoraSpec,
          file_keys: dict[str, str], gradient_checkpointing: bool, resume: bool, preview_every: int,
          start: tuple[str, dict] | None = None, memory_limit_gb: float = 0.0):
    """Train inside a loaded model session: prepare the items, attach the adapters (starting from `start`, a LoRA's
    name and tensors, if given), check the memory plan, resume, run the trainer while showing progress, export the
    student. The adapters are always removed again, also on error.

    Items that carry their own schedule (EncodedItem.sigmas) are rolled out on it, the others on `sigmas`."""
    latent_shape = tuple(training_set[0].latent.shape)
    diffusion_model = model.model.diffusion_model
    blocks = transformer_blocks(diffusion_model)
    with model_session(model, latent_shape, training=True) as session:
        make_weights_autograd_safe(diffusion_model)
        items = prepare_items(session, training_set, latent_shape)
        adapters = attach_adapters(diffusion_model, spec)
        with adapters, allow_inplace_residuals(blocks):
            if start is not None:
                start_from(adapters, *start, file_keys, spec)

            def make_trainer(checkpointing: bool) -> Trainer:
                return Trainer(session.predict_x0, adapters, items, sigmas.to(session.device), config, session.device,
                               checkpointed_modules=blocks if checkpointing else ())

            trainer = make_trainer(gradient_checkpointing)
            checkpointed_trainer = None if gradient_checkpointing else lambda: make_trainer(True)
            plan = check_memory(DOPSDTrain, session, trainer, training_set, memory_limit_gb, checkpointed_trainer)
            show_on_node(plan, running_node_id())
            notice = resume_from_newest_intact(trainer, config.checkpoint_dir) if resume else None
            monitor = TrainingMonitor(session, model.model.latent_format, trainer, preview_every, notice)
            run_to_the_end(trainer, monitor)
            lora = comfy_lora_tensors(adapters.student_state(), LORA_DTYPE, file_keys)
            # The whole run's losses, also those of the steps before a resume (the loss graph shows the run).
            return lora, list(trainer.loss_history), monitor.previews()


def load_starting_lora(name: str) -> tuple[str, dict]:
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise node_error(DOPSDTrain, f"start_from_lora: '{name}' is not in the loras folder any more",
                         "pick another file or 'none'")
    return name, comfy.utils.load_torch_file(path, safe_load=True)


def start_from(adapters: DualLora, name: str, tensors: dict, file_keys: dict[str, str], spec: LoraSpec) -> None:
    """Student and teacher both start from the LoRA file's weights."""
    try:
        state = adapter_state_from_comfy_lora(tensors, adapters.module_names, file_keys)
    except KeyError as err:
        raise node_error(DOPSDTrain, f"start_from_lora: '{name}' has no {err.args[0]}, so it was not trained on "
                                     "these LoRA targets of this model",
                         "pick a LoRA this node trained with the same lora_targets, or 'none'") from err
    rank, alpha = next((entry["down"].shape[0], entry["alpha"]) for entry in state.values())
    if (rank, alpha) != (spec.rank, spec.alpha):
        raise node_error(DOPSDTrain, f"start_from_lora: '{name}' has rank {rank} and alpha {alpha:g}, this run "
                                     f"{spec.rank} and {spec.alpha:g}", f"set rank {rank} and alpha {alpha:g}")
    try:
        adapters.load_state(state)
    except ValueError as err:
        raise node_error(DOPSDTrain, f"start_from_lora: '{name}' does not fit this model ({err})",
                         "pick a LoRA trained on this model, or 'none'") from err


def prepare_items(session: ModelSession, training_set: list[EncodedItem], latent_shape) -> list[TrainingItem]:
    with explain_unreadable_conditioning(DOPSDTrain):
        items = [to_training_item(session, item) for item in training_set]
        first = items[0].variants[0]
        session.check_reads([first.student_cond, first.teacher_cond], latent_shape)
    return items


def attach_adapters(diffusion_model, spec: LoraSpec) -> DualLora:
    try:
        return DualLora(diffusion_model, spec)
    except ValueError as err:
        raise node_error(DOPSDTrain, f"lora_targets: {err}",
                         "pick a preset or a custom regex that matches linear layers") from err


def run_to_the_end(trainer: Trainer, monitor: "TrainingMonitor") -> None:
    """Trainer.train with ComfyUI's cancel, the observers, a last checkpoint, and errors a user can act on."""
    config = trainer.config

    def on_step(report):
        monitor.on_step(report)
        for observer in TRAINING_OBSERVERS:
            observer.after_step(trainer, report)

    try:
        with ExitStack() as watched:
            for observer in TRAINING_OBSERVERS:
                watched.enter_context(observer.watching(trainer))
            trainer.train(on_step=on_step, should_cancel=comfy.model_management.processing_interrupted)
        if config.checkpoint_every > 0 and trainer.step % config.checkpoint_every != 0:
            trainer.save_checkpoint()
    except (TrainingCancelled, comfy.model_management.InterruptProcessingException):
        # Cancel is seen either between roll-out steps (TrainingCancelled) or by ComfyUI's progress hook.
        logging.info("DOPSDTrain cancelled after %d completed steps; the model is unchanged", trainer.step)
        raise comfy.model_management.InterruptProcessingException()
    except (OSError, SafetensorError) as err:
        raise node_error(DOPSDTrain, f"could not write a checkpoint in {config.checkpoint_dir} ({err})",
                         "free disk space or choose a writable checkpoint_folder; earlier checkpoints are "
                         "intact") from err


class TrainingMonitor:
    """What the user sees while training: ComfyUI's progress bar with a preview image every `preview_every` steps, the
    step, loss and time left as the node's text (after `notice`, e.g. a damaged checkpoint passed over), and a log
    line per step. Keeps the preview latents."""

    def __init__(self, session: ModelSession, latent_format, trainer: Trainer, preview_every: int,
                 notice: str | None = None):
        self.session, self.steps, self.preview_every, self.notice = session, trainer.config.steps, preview_every, notice
        first = trainer.items[0]
        self.preview = StudentPreview(session, first, trainer.schedule_for(first), trainer.adapters)
        self.previewer = latent_preview.get_previewer(session.device, latent_format)
        self.progress = comfy.utils.ProgressBar(self.steps)
        self.progress.update_absolute(trainer.step)
        self.node_id = running_node_id()
        self.start_step, self.started = trainer.step, time.perf_counter()
        self.preview_latents: list[torch.Tensor] = []

    def on_step(self, report: StepReport) -> None:
        shown = None
        if self.preview_every and report.step % self.preview_every == 0:
            latent = self.render_preview()
            if self.previewer is not None:
                shown = self.previewer.decode_latent_to_preview_image("JPEG", latent)
        self.progress.update_absolute(report.step, self.steps, shown)
        seconds_per_step = (time.perf_counter() - self.started) / (report.step - self.start_step)
        text = progress_text(report.step, self.steps, report.loss, seconds_per_step)
        show_on_node(f"{self.notice}\n{text}" if self.notice else text, self.node_id)
        logging.info("DOPSDTrain step %d/%d loss %.5f grad-norm %.3f", report.step, self.steps, report.loss,
                     report.grad_norm)

    def render_preview(self) -> torch.Tensor:
        latent = self.preview.render()
        self.preview_latents.append(self.session.to_vae_space(latent).float().cpu())
        return latent

    def previews(self) -> torch.Tensor:
        """The previews taken during training, or the final student's when none was (preview_every 0)."""
        if not self.preview_latents or self.preview_every == 0:
            self.render_preview()
        return torch.cat(self.preview_latents)


def to_training_item(session: ModelSession, item: EncodedItem) -> TrainingItem:
    shape = tuple(item.latent.shape)
    return TrainingItem(
        variants=[TrainingPair(session.prepare(p.student, shape), session.prepare(p.teacher, shape)) for p in item.pairs],
        latent_shape=shape,
        target_latent=session.to_model_space(item.latent),
        sigmas=item.sigmas,
    )


def resume_from_newest_intact(trainer: Trainer, folder: str) -> str | None:
    """Load the newest intact checkpoint in `folder` into `trainer` (none yet: start at step 0). Damaged newer ones
    are passed over and left in place; returns what the node should tell the user about them, or None."""
    search = newest_intact_checkpoint(folder)
    passed_over = "; ".join(f"{path.name} is damaged ({reason}) and was left in place" for path, reason in search.skipped)
    for path, reason in search.skipped:
        logging.warning("DOPSDTrain: passing over the damaged checkpoint %s: %s", path, reason)
    if search.checkpoint is None:
        if search.skipped:
            raise node_error(DOPSDTrain, f"no intact checkpoint to resume from in {folder}: {passed_over}",
                             "restore a checkpoint from a backup, or turn resume off to start over")
        logging.info("DOPSDTrain: no checkpoint in %s yet; starting from step 0", folder)
        return None
    try:
        trainer.resume(search.checkpoint)
    except (ValueError, KeyError) as err:
        raise node_error(DOPSDTrain, f"the checkpoint {search.checkpoint} does not fit this run ({err})",
                         "use the rank, alpha and LoRA targets it was trained with, or another checkpoint_folder") from err
    logging.info("DOPSDTrain: resumed from %s at step %d", search.checkpoint, trainer.step)
    return f"resumed from {search.checkpoint.name}: {passed_over}" if search.skipped else None


class StudentPreview:
    """The student's few-step result for one pair, from fixed noise, so previews are comparable over training."""

    def __init__(self, session: ModelSession, item: TrainingItem, sigmas, adapters: DualLora):
        self.session, self.cond, self.adapters = session, item.variants[0].student_cond, adapters
        self.sigmas = sigmas.to(session.device)
        generator = torch.Generator().manual_seed(PREVIEW_SEED)
        self.noise = torch.randn(item.batched_shape, generator=generator).to(session.device)

    @torch.no_grad()
    def render(self) -> torch.Tensor:
        """The roll-out's final latent, in the model's latent space."""
        with self.adapters.use("student"):
            return rollout(lambda x, s: self.session.predict_x0(x, s, self.cond), self.noise, self.sigmas)
