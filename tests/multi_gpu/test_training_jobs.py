"""Training jobs: exported by the node from the Z-Image graph, run by torchrun on the CPU (gloo) with 1, 2 or 3
processes, on the tiny Z-Image checkpoint.

Tolerances: one process with a batch of 2 and two processes with one roll-out each draw exactly the same examples
and noise; their gradients differ only in the order of the float sums (and in the threads each process has), so the
per-step losses and gradient norms agree to 1e-4 relative and the LoRAs, written in bf16, to one bf16 rounding step
(rel. 1/128)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from devkit.graph import Graph
from devkit.training_jobs import HYPERPARAMETERS, export_node, torchrun, training_log
from tests.conftest import snapshot
from tests.zimage.zimage_graphs import TRAIN_DEFAULTS, generate, load_family, train, training_set

# Four steps of a batch of two, checkpoints every two: what every run below trains.
SETTINGS = {**{k: TRAIN_DEFAULTS[k] for k in HYPERPARAMETERS}, "steps": 4, "gradient_accumulation": 2, "seed": 5}
BF16_STEP = 1 / 128


def export_job(comfy, folder: str, job_folder: str, **overrides) -> Path:
    g = Graph()
    loader = load_family(g)
    job = export_node(g, loader.out(0), training_set(g, loader, folder), loader.out(4), job_folder,
                      {**SETTINGS, **overrides})
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    path = Path(run.output(job.node_id)[0])
    command = run.ui_outputs[job.node_id]["text"][0]
    assert "torchrun --nproc-per-node 2" in command and str(path) in command
    return path


def run_ok(job: Path, processes: int, model_file: Path, *extra: str) -> None:
    done = torchrun(job, processes, model_file, *extra)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def assert_same_run(ours: Path, reference: Path) -> None:
    """Same losses and gradient norms step by step, and the same LoRA up to bf16 rounding."""
    assert_same_log(ours, reference)
    assert_same_lora(load_file(ours / "lora.safetensors"), load_file(reference / "lora.safetensors"))


def assert_same_log(ours: Path, reference: Path) -> None:
    logs = training_log(ours), training_log(reference)
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([e[key] for e in logs[0]]), torch.tensor([e[key] for e in logs[1]]),
                                   rtol=1e-4, atol=0)


def assert_same_lora(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    ups = [k for k in reference if k.endswith("lora_up.weight")]
    assert max(reference[k].float().abs().max() for k in ups) > 1e-3, "the LoRA must have learned something"
    assert_within_a_bf16_step(ours, reference)


def assert_within_a_bf16_step(ours: dict, reference: dict) -> None:
    """Every tensor within one bf16 rounding step of the reference's largest value."""
    for key in reference:
        scale = reference[key].float().abs().max().clamp_min(1e-6)
        assert (ours[key].float() - reference[key].float()).abs().max() <= BF16_STEP * scale, key


@pytest.fixture(scope="module")
def model_file(comfy_base) -> Path:
    return comfy_base / "models" / "diffusion_models" / "z_image_turbo_bf16.safetensors"


@pytest.fixture(scope="module")
def one_process_run(comfy, concept_folder, model_file) -> Path:
    """The reference: the whole job on one process, a batch of 2 by accumulation."""
    job = export_job(comfy, concept_folder, "dopsd/jobs/reference")
    run_ok(job, 1, model_file)
    return job


def test_two_processes_train_what_one_process_trains_with_twice_the_accumulation(comfy, concept_folder, model_file,
                                                                                 one_process_run):
    job = export_job(comfy, concept_folder, "dopsd/jobs/two_processes")
    run_ok(job, 2, model_file)
    assert_same_run(job, one_process_run)
    saved = load_file(job / "lora.safetensors")
    with safe_open(str(job / "lora.safetensors"), framework="pt") as file:
        header = file.metadata()
    assert header["dopsd.method"] == "D-OPSD" and header["dopsd.gradient_accumulation"] == "2"
    assert all(saved[k].dtype == torch.bfloat16 for k in saved if k.endswith("weight"))


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_checkpoint_continues_on_another_number_of_processes(comfy, concept_folder, model_file, one_process_run,
                                                               first, then):
    job = export_job(comfy, concept_folder, f"dopsd/jobs/resume_{first}_then_{then}")
    run_ok(job, first, model_file, "--stop-at-step", "2")
    assert not (job / "lora.safetensors").exists()
    assert [p.name for p in (job / "checkpoints").iterdir()] == ["step_000002"]
    run_ok(job, then, model_file)
    assert_same_run(job, one_process_run)


def test_the_jobs_lora_generates_what_the_graphs_lora_generates(comfy, comfy_base, concept_folder, one_process_run):
    """The job's LoRA through the stock Load LoRA, against training the same settings in the graph with the batch by
    accumulation, then generating with both from the same noise."""
    loras = comfy_base / "models" / "loras"
    shutil.copy(one_process_run / "lora.safetensors", loras / "from_job.safetensors")
    g = Graph()
    loader = load_family(g)
    trained = train(g, loader, training_set(g, loader, concept_folder), **SETTINGS)
    in_graph = generate(g, trained.out(0), loader.out(1), loader.out(2), "a photo of sks fox", "in_graph")
    from_job = g.node("LoraLoaderModelOnly", model=loader.out(0), lora_name="from_job.safetensors", strength_model=1.0)
    by_job = generate(g, from_job, loader.out(1), loader.out(2), "a photo of sks fox", "from_job")
    untuned = generate(g, loader.out(0), loader.out(1), loader.out(2), "a photo of sks fox", "untuned")
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    assert_same_lora(load_file(one_process_run / "lora.safetensors"), dict(run.output(trained.node_id)[1]))
    images = {name: run.output(node.node_id)[0]["samples"] for name, node in
              (("graph", in_graph), ("job", by_job), ("untuned", untuned))}
    distance = (images["job"] - images["graph"]).norm() / (images["untuned"] - images["graph"]).norm()
    print(f"\njob LoRA vs graph LoRA, 8-step latents: {distance:.2%} of the LoRA's own effect")
    assert distance < 0.02


def test_bad_jobs_stop_before_any_work(comfy, concept_folder, model_file, tmp_path):
    job = export_job(comfy, concept_folder, "dopsd/jobs/bad")

    changed = tmp_path / model_file.name
    shutil.copy(model_file, changed)
    with open(changed, "r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last[0] ^ 1]))
    assert_refused(torchrun(job, 1, changed), "is not the model file the job was exported with", job)
    assert_refused(torchrun(job, 1, tmp_path / "missing.safetensors"), "is not at", job)
    assert_refused(torchrun(job, 3, model_file), "cannot be split over 3 processes", job)

    described = json.loads((job / "job.json").read_text())
    (job / "job.json").write_text(json.dumps({**described, "format": 99}))
    assert_refused(torchrun(job, 1, model_file), "newer than this pack reads", job)


def assert_refused(done: subprocess.CompletedProcess, message: str, job: Path) -> None:
    assert done.returncode != 0
    assert message in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in job.iterdir()) == ["job.json", "tensors.safetensors"], "nothing may be written"


def test_the_export_node_refuses_what_a_job_cannot_carry(comfy, concept_folder):
    g = Graph()
    stock = g.node("UNETLoader", unet_name="z_image_turbo_bf16.safetensors", weight_dtype="default")
    loader = load_family(g)
    export_node(g, stock, training_set(g, loader, concept_folder), loader.out(4), "dopsd/jobs/stock", SETTINGS)
    run = comfy.run(g.to_api())
    assert not run.success
    assert "load it with Load Step-Distilled Model (D-OPSD)" in run.error["exception_message"]

    taken = export_job(comfy, concept_folder, "dopsd/jobs/taken")
    before = snapshot(taken)
    g = Graph()
    loader = load_family(g)
    # Other settings, so that ComfyUI runs the node again instead of answering from its cache.
    export_node(g, loader.out(0), training_set(g, loader, concept_folder), loader.out(4), "dopsd/jobs/taken",
                {**SETTINGS, "seed": 6})
    run = comfy.run(g.to_api())
    assert not run.success and "already exists" in run.error["exception_message"]
    assert snapshot(taken) == before


def test_full_fine_tuning_shards_over_two_processes_continues_on_any_count_and_loads_in_the_stock_loader(
        comfy, comfy_base, concept_folder, model_file):
    """--full (FSDP2 on several processes): 1 process all the way, against 2 processes to a checkpoint then 1, and 1
    then 2: the same run; the written model loads in Load Diffusion Model, samples, and is not the model it started
    from."""
    jobs = {name: export_job(comfy, concept_folder, f"dopsd/jobs/full_{name}", learning_rate=1e-4)
            for name in ("whole", "2_then_1", "1_then_2")}
    run_ok(jobs["whole"], 1, model_file, "--full")
    for name, (first, then) in (("2_then_1", (2, 1)), ("1_then_2", (1, 2))):
        run_ok(jobs[name], first, model_file, "--full", "--stop-at-step", "2")
        assert [p.name for p in (jobs[name] / "checkpoints_full").iterdir()] == ["step_000002"]
        assert not (jobs[name] / "diffusion_model.safetensors").exists()
        run_ok(jobs[name], then, model_file, "--full")
    base = load_file(model_file)
    whole = load_file(jobs["whole"] / "diffusion_model.safetensors")
    # Every weight the loaded model has (ComfyUI 0.33 builds Z-Image without the file's unused norm_final).
    assert whole.keys() <= base.keys() and len(whole) >= len(base) - 1
    assert sum(not torch.equal(whole[k], base[k].to(whole[k].dtype)) for k in whole) > len(whole) // 2, \
        "most weights must train"
    for name in ("2_then_1", "1_then_2"):
        assert_same_log(jobs[name], jobs["whole"])
        resumed = load_file(jobs[name] / "diffusion_model.safetensors")
        assert resumed.keys() == whole.keys()
        assert_within_a_bf16_step(resumed, whole)
    assert not (jobs["whole"] / "lora.safetensors").exists()

    shutil.copy(jobs["1_then_2"] / "diffusion_model.safetensors",
                comfy_base / "models" / "diffusion_models" / "full_tuned.safetensors")
    g = Graph()
    loader = load_family(g)
    tuned = g.node("UNETLoader", unet_name="full_tuned.safetensors", weight_dtype="default")
    by_tuned = generate(g, tuned, loader.out(1), loader.out(2), "a photo of sks fox", "full_tuned")
    by_base = generate(g, loader.out(0), loader.out(1), loader.out(2), "a photo of sks fox", "full_base")
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    tuned_latent, base_latent = (run.output(n.node_id)[0]["samples"] for n in (by_tuned, by_base))
    assert torch.isfinite(tuned_latent).all() and not torch.equal(tuned_latent, base_latent)
