"""DOPSDExportTrainingJob: a training run written to a job folder instead of run, for torchrun on several GPUs."""
from __future__ import annotations

import shlex
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..dopsd_core.training_job import JobItem, JobPair, ModelFile, TrainingJob, write_job
from .errors import node_error
from .loading import BASE_MODEL_NAME_OPTION, WEIGHT_DTYPE_OPTION
from .training import RunSettings, hyperparameter_inputs
from .training_set import TRAINING_SET
from .user_paths import resolve_inside

LAUNCHER = Path(__file__).resolve().parents[1] / "multi_gpu" / "train.py"
CHECKPOINTS = "checkpoints"  # inside the job folder


class DOPSDExportTrainingJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDExportTrainingJob",
            display_name="Export Training Job (several GPUs)",
            category="D-OPSD",
            description=(
                "Writes what Train LoRA with D-OPSD would train (the encoded training set, the schedules, the "
                "settings and which model file) into a job folder, to run with torchrun on one or more machines "
                "with several GPUs. The node shows the command. gradient_accumulation is the batch over all GPUs: "
                "on 4 GPUs a batch of 4 is one roll-out on each."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="Loaded with Load Step-Distilled Model (D-OPSD), which records its "
                                                "file; the machine that runs the job needs the same file."),
                TRAINING_SET.Input("training_set", tooltip="From a teacher-context node."),
                io.Sigmas.Input("training_sigmas", tooltip="The roll-out schedule; must end at 0."),
                *hyperparameter_inputs(),
                io.Int.Input("checkpoint_every", default=100, min=0, max=1_000_000,
                             tooltip="Save a resumable checkpoint into the job folder every N steps (0: off). A job "
                                     "started again continues from the newest one, on any number of GPUs."),
                io.Int.Input("keep_last", default=3, min=0, max=1_000_000,
                             tooltip="Keep only this many of the newest checkpoints (0: all)."),
                io.String.Input("job_folder", default="dopsd/jobs/my_concept",
                                tooltip="A new folder inside ComfyUI's output folder."),
            ],
            outputs=[io.String.Output(display_name="job_folder", tooltip="The job folder's full path.")],
        )

    @classmethod
    def execute(cls, model, training_set, training_sigmas, objective, steps, learning_rate, rank, alpha, lora_init,
                ema_decay, loss_space, gradient_accumulation, warmup_steps, seed, lora_targets, custom_lora_targets,
                gradient_checkpointing, checkpoint_every, keep_last, job_folder) -> io.NodeOutput:
        folder = resolve_inside(folder_paths.get_output_directory(), job_folder, cls, "job folder")
        if folder.exists():
            raise node_error(cls, f"{folder} already exists (a job's folder also holds its checkpoints and LoRA)",
                             "type a new job_folder name")
        run = RunSettings.check(
            cls, model, training_set, training_sigmas, objective=objective, steps=steps, learning_rate=learning_rate,
            rank=rank, alpha=alpha, lora_init=lora_init, ema_decay=ema_decay, loss_space=loss_space,
            gradient_accumulation=gradient_accumulation, warmup_steps=warmup_steps, seed=seed,
            lora_targets=lora_targets, custom_lora_targets=custom_lora_targets, checkpoint_every=checkpoint_every,
            checkpoint_dir=CHECKPOINTS, keep_last=keep_last)
        job = TrainingJob(
            model=model_file(model),
            items=tuple(JobItem(item.latent, tuple(JobPair(p.prompt, p.student, p.teacher) for p in item.pairs),
                                item.sigmas) for item in training_set),
            training_sigmas=run.sigmas, config=run.config, lora=run.spec, lora_file_keys=run.file_keys,
            lora_metadata=run.lora_metadata(model, training_set), gradient_checkpointing=gradient_checkpointing,
        )
        try:
            write_job(folder, job)
        except TypeError as err:
            raise node_error(cls, f"the training set's conditioning cannot be written into a job ({err})",
                             "train this training set with Train LoRA with D-OPSD instead") from err
        except OSError as err:
            raise node_error(cls, f"could not write {folder} ({err.strerror or err})",
                             "free disk space or choose a writable job_folder") from err
        command = launch_command(folder, gradient_accumulation)
        return io.NodeOutput(str(folder), ui={"text": [f"job written to {folder}\nrun it with:\n{command}"]})


def model_file(model) -> ModelFile:
    """The MODEL's file, as the machine that runs the job will find and check it."""
    name = model.model_options.get(BASE_MODEL_NAME_OPTION)
    if name is None:
        raise node_error(DOPSDExportTrainingJob, "the MODEL does not say which file it was loaded from",
                         "load it with Load Step-Distilled Model (D-OPSD), which records the file for the job")
    if model.patches:
        raise node_error(DOPSDExportTrainingJob, "the MODEL has patches applied (e.g. a LoRA), which a job cannot "
                                                 "carry to another machine",
                         "connect the loader's MODEL directly")
    path = folder_paths.get_full_path("diffusion_models", name)
    if path is None:
        raise node_error(DOPSDExportTrainingJob, f"{name} is no longer in models/diffusion_models",
                         "put the file back or load the model again")
    return ModelFile.of(path, name, model.model_options.get(WEIGHT_DTYPE_OPTION, "default"))


def launch_command(folder: Path, processes: int) -> str:
    return f"torchrun --nproc-per-node {processes} {shlex.quote(str(LAUNCHER))} {shlex.quote(str(folder))}"
