"""Runs a job folder written by the Export Training Job node, on one process or many (torchrun).

    torchrun --nproc-per-node 4 custom_nodes/comfyui-dopsd/multi_gpu/train.py JOB_FOLDER
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        custom_nodes/comfyui-dopsd/multi_gpu/train.py JOB_FOLDER

ComfyUI is used as a library (its model loader and model code, no server): by default the ComfyUI whose
custom_nodes folder holds this pack, else --comfyui. The model file is looked up in that ComfyUI's
models/diffusion_models (or given with --model-file) and must be the file the job was exported with.
Every process runs the same Trainer on its share of each optimizer step's batch; the gradients are
averaged (dopsd_core.data_parallel); rank 0 writes the checkpoints into JOB_FOLDER/checkpoints (--full:
JOB_FOLDER/checkpoints_full) and the
LoRA, in ComfyUI's format with the header Save LoRA writes, as JOB_FOLDER/lora.safetensors. Started
again, a job continues from its newest intact checkpoint, on any number of processes that divides its
batch.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "comfyui_dopsd"
LORA_FILE = "lora.safetensors"
FULL_MODEL_FILE = "diffusion_model.safetensors"
FULL_MODEL_DTYPE = torch.bfloat16  # as Z-Image and FLUX.2 ship their weights
LOG_FILE = "training_log.jsonl"  # a line per optimizer step: step, loss, grad_norm, lr, seconds, communication_seconds


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path, help="the job folder")
    parser.add_argument("--comfyui", type=Path, default=None,
                        help="the ComfyUI folder (default: the one this pack is installed in)")
    parser.add_argument("--model-file", type=Path, default=None,
                        help="the diffusion model file (default: the job's file name in models/diffusion_models)")
    parser.add_argument("--full", action="store_true",
                        help="full fine-tuning: every weight of the diffusion model trained, the teacher an EMA of "
                             "all of them, sharded over the processes with FSDP2; writes JOB_FOLDER/" + "diffusion_model"
                             ".safetensors for Load Diffusion Model instead of a LoRA")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="stop after this optimizer step, with a checkpoint, e.g. to fit a cluster's time limit; "
                             "run the same command again to continue")
    return parser.parse_args(argv)


def comfyui_folder(chosen: Path | None) -> Path:
    folder = chosen or (PACK_ROOT.parents[1] if PACK_ROOT.parent.name == "custom_nodes" else None)
    if folder is None or not (folder / "comfy").is_dir():
        raise SystemExit(f"error: no ComfyUI at {folder}: pass --comfyui with the folder that holds ComfyUI's "
                         "main.py")
    return folder.resolve()


def use_comfyui(comfyui: Path) -> None:
    """ComfyUI's modules on the path, first (the pack has a `nodes` package, ComfyUI a `nodes` module), set to the
    CPU where there is no GPU (what its --cpu flag does). Imported as a library, ComfyUI parses no command line."""
    if str(comfyui) not in sys.path:
        sys.path.insert(0, str(comfyui))
    # ComfyUI's `utils` package before anything of comfy's: once comfy/ is on the path, `utils` is comfy/utils.py.
    import utils.extra_config  # noqa: F401
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


def import_comfy_and_pack(comfyui: Path):
    """ComfyUI as a library and the pack imported as a package; returns the pack."""
    use_comfyui(comfyui)
    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, PACK_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(PACK_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_MODULE]


def start_processes() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; the process group is set up when there are several."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # before ComfyUI picks its device
    if world_size > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world_size


def extremes(value: int, world_size: int) -> tuple[int, int]:
    """The smallest and the largest `value` over the processes (every process must call it)."""
    if world_size == 1:
        return value, value
    device = "cuda" if torch.cuda.is_available() else "cpu"
    low, high = torch.tensor([value], device=device), torch.tensor([value], device=device)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return int(low.item()), int(high.item())


def checked_job(args, rank: int, world_size: int):
    """The job, its model file and each process's accumulation, after every check that needs no model; an error
    on any process stops all of them before any work."""
    from comfyui_dopsd.dopsd_core.training_job import JobError, read_job

    error = None
    try:
        job = read_job(args.job)
        accumulation = job.per_process_accumulation(world_size)
        if args.stop_at_step is not None and job.config.checkpoint_every <= 0:
            raise JobError("--stop-at-step needs checkpoints to continue from: export the job with checkpoint_every "
                           "above 0")
        if args.full and job.model.weight_dtype != "default":
            raise JobError(f"full fine-tuning trains the weights themselves, which cannot be kept in "
                           f"{job.model.weight_dtype}: export the job with the loader's weight_dtype 'default'")
        model_path = args.model_file or model_in_comfyui(job.model.name)
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one check per machine: each has its own copy
            job.model.check(model_path)
    except JobError as err:
        error = err
    if extremes(int(error is None), world_size)[0] == 0:  # some process found an error
        raise SystemExit(f"error: {error}" if error else "error: another process found the job unusable (see its "
                                                         "message)")
    return job, accumulation, model_path


def model_in_comfyui(name: str) -> Path:
    import folder_paths

    found = folder_paths.get_full_path("diffusion_models", name)
    return Path(found) if found else Path(folder_paths.get_folder_paths("diffusion_models")[0]) / name


def train(job, accumulation: int, model_path: Path, job_folder: Path, rank: int, world_size: int,
          stop_at_step: int | None = None, full: bool = False) -> None:
    """The job's training on this process, up to its last step or `stop_at_step`; rank 0 logs each step to
    LOG_FILE, writes the checkpoints and, at the end, the LoRA (or with `full` the whole diffusion model)."""
    import dataclasses
    import json

    import comfy.sd
    from tqdm import tqdm

    from comfyui_dopsd.dopsd_core import DataParallel, Trainer, allow_inplace_residuals, make_weights_autograd_safe
    from comfyui_dopsd.dopsd_core import newest_intact_checkpoint
    from comfyui_dopsd.nodes.families import transformer_blocks
    from comfyui_dopsd.nodes.loading import WEIGHT_DTYPES
    from comfyui_dopsd.nodes.lora_io import TrainedLora, comfy_lora_tensors, metadata_for_file, save_lora_file
    from comfyui_dopsd.nodes.model_bridge import model_session
    from comfyui_dopsd.nodes.training import LORA_DTYPE, attach_adapters, prepare_items

    model = comfy.sd.load_diffusion_model(str(model_path), model_options=dict(WEIGHT_DTYPES[job.model.weight_dtype]))
    config = dataclasses.replace(job.config, gradient_accumulation=accumulation,
                                 checkpoint_dir=str(job_folder / job.config.checkpoint_dir)
                                 if job.config.checkpoint_dir else None)
    if full and config.checkpoint_dir:  # a LoRA run of the same job keeps its own
        config = dataclasses.replace(config, checkpoint_dir=config.checkpoint_dir + "_full")
    latent_shape = tuple(job.items[0].latent.shape)
    diffusion_model = model.model.diffusion_model
    blocks = transformer_blocks(diffusion_model)
    with torch.inference_mode(False), torch.enable_grad(), model_session(model, latent_shape, training=True) as session:
        make_weights_autograd_safe(diffusion_model)
        items = prepare_items(session, list(job.items), latent_shape)
        adapters = (full_weights(model.model, blocks, world_size, session.device) if full
                    else attach_adapters(diffusion_model, job.lora))
        with adapters, allow_inplace_residuals(blocks):
            trainer = Trainer(session.predict_x0, adapters, items, job.training_sigmas.to(session.device), config,
                              session.device, checkpointed_modules=blocks if job.gradient_checkpointing else (),
                              data_parallel=DataParallel(rank, world_size))
            if config.checkpoint_dir:
                found = newest_intact_checkpoint(config.checkpoint_dir)
                for path, reason in found.skipped:
                    log(rank, f"passing over the damaged checkpoint {path} ({reason}); it is left in place")
                if found.checkpoint is not None:
                    trainer.resume(found.checkpoint)
                    log(rank, f"continuing from {found.checkpoint} at step {trainer.step}")
                low, high = extremes(trainer.step, world_size)
                if low != high:
                    raise SystemExit("error: the processes found different checkpoints in the job folder: put the job "
                                     "folder on a filesystem every machine shares")
            last_step = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
            bar = tqdm(total=config.steps, initial=trainer.step, disable=rank != 0, desc="D-OPSD")

            def on_step(report):
                bar.update(1)
                bar.set_postfix(loss=f"{report.loss:.4f}")
                log(rank, f"step {report.step}/{config.steps} loss {report.loss:.5f} grad-norm {report.grad_norm:.3f}")
                if rank == 0:
                    with open(job_folder / LOG_FILE, "a") as file:
                        file.write(json.dumps({"step": report.step, "loss": report.loss, "grad_norm": report.grad_norm,
                                               "lr": report.lr, "seconds": report.seconds,
                                               "communication_seconds": report.communication_seconds}) + "\n")

            trainer.train(max(0, last_step - trainer.step), on_step=on_step)
            bar.close()
            # Every process takes part in a save (sharded weights are gathered); rank 0 writes.
            if config.checkpoint_every > 0 and trainer.step % config.checkpoint_every:
                trainer.save_checkpoint()
            if trainer.step < config.steps:
                log(rank, f"stopped after step {trainer.step} of {config.steps}; run the same command to continue")
                return
            if full:
                state = adapters.student_state()
                if rank == 0:
                    save_lora_file(job_folder / FULL_MODEL_FILE, {k: v.to(FULL_MODEL_DTYPE) for k, v in state.items()},
                                   full_model_metadata(job.lora_metadata))
                    log(rank, f"wrote {job_folder / FULL_MODEL_FILE}")
                return
            if rank != 0:
                return
            lora = TrainedLora(comfy_lora_tensors(adapters.student_state(), LORA_DTYPE, job.lora_file_keys),
                               job.lora_metadata)
            save_lora_file(job_folder / LORA_FILE, dict(lora), metadata_for_file(lora))
            log(rank, f"wrote {job_folder / LORA_FILE}")


def full_weights(base_model, blocks, world_size: int, device):
    """The diffusion model as the student, an EMA copy of it as the teacher, both sharded with FSDP2 on several
    processes."""
    import copy

    from comfyui_dopsd.dopsd_core import DualWeights, shard
    from comfyui_dopsd.nodes.families import transformer_blocks

    teacher = copy.deepcopy(base_model.diffusion_model)
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(torch.device(device).type, (world_size,))
        shard(base_model.diffusion_model, blocks, mesh)
        shard(teacher, transformer_blocks(teacher), mesh)
    return DualWeights(base_model, "diffusion_model", teacher)


def full_model_metadata(lora_metadata: dict[str, str]) -> dict[str, str]:
    """The run's settings without the LoRA's own."""
    lora_only = ("dopsd.rank", "dopsd.alpha", "dopsd.lora_targets", "dopsd.lora_targets_choice", "dopsd.lora_init",
                 "dopsd.fused_layers")
    return {**{k: v for k, v in lora_metadata.items() if k not in lora_only}, "dopsd.fine_tuning": "full"}


def log(rank: int, message: str) -> None:
    if rank == 0:
        logging.info("D-OPSD job: %s", message)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    rank, world_size = start_processes()
    try:
        import_comfy_and_pack(comfyui_folder(args.comfyui))
        job, accumulation, model_path = checked_job(args, rank, world_size)
        log(rank, f"{world_size} process(es) × {accumulation} roll-out(s) per optimizer step, model {model_path}")
        train(job, accumulation, model_path, args.job.resolve(), rank, world_size, args.stop_at_step, args.full)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
