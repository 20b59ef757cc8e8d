"""Job folders (dopsd_core.training_job) and the draws that make a run independent of its process count."""
import dataclasses
import json

import pytest
import torch

from dopsd_core import DataParallel, LoraSpec, TrainConfig, micro_step_generator, zimage_turbo_training_sigmas
from dopsd_core.training_job import JobError, JobItem, JobPair, ModelFile, TrainingJob, read_job, write_job

from .test_core_checkpoints import fresh_trainer


def conditioning(seed: int) -> list:
    """A CONDITIONING of the shapes families use: features, a mask, reference latents, a string and a tuple."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(1, 5, 8, generator=generator)
    return [[features, {"attention_mask": torch.ones(1, 5, dtype=torch.long), "pooled_output": None,
                        "reference_latents": [torch.randn(1, 4, 2, 2, generator=generator)],
                        "reference_latents_method": "offset", "guidance": 3.5, "area": (8, 8, 0, 0),
                        "shared": features}]]


def make_job(tmp_path, batch: int = 4) -> TrainingJob:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights" * 100)
    items = tuple(JobItem(torch.randn(1, 4, 8, 8), (JobPair("a photo of sks", conditioning(i), conditioning(10 + i)),),
                          sigmas=torch.tensor([1.0, 0.5, 0.0]) if i else None) for i in range(2))
    return TrainingJob(ModelFile.of(model, "model.safetensors", "fp8_e4m3fn"), items, zimage_turbo_training_sigmas(),
                       TrainConfig(steps=7, gradient_accumulation=batch, checkpoint_every=2, checkpoint_dir="checkpoints"),
                       LoraSpec(4, 8.0, r"blocks\.\d+\.qkv", output_slices={"blocks.0.qkv": [8, 8, 8]}),
                       {"blocks.0.qkv.0": "diffusion_model.blocks.0.q"}, {"dopsd.method": "D-OPSD"}, False)


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (JobItem, JobPair)):
        assert type(a) is type(b)
        for field in dataclasses.fields(a):
            assert_same(getattr(a, field.name), getattr(b, field.name))
    else:
        assert a == b


def test_a_job_reads_back_as_written(tmp_path):
    job = make_job(tmp_path)
    read = read_job(write_job(tmp_path / "job", job))
    for field in dataclasses.fields(TrainingJob):
        assert_same(getattr(read, field.name), getattr(job, field.name))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no staging folder is left"


def test_a_job_refuses_what_it_cannot_hold_and_an_existing_folder(tmp_path):
    job = make_job(tmp_path)
    odd = dataclasses.replace(job.items[0], pairs=(JobPair("p", [[torch.ones(1), {"hook": object()}]], []),))
    with pytest.raises(TypeError, match=r"items\.0\.pairs\.0\.student\.0\.1\.hook is a object"):
        write_job(tmp_path / "odd", dataclasses.replace(job, items=(odd,)))
    assert not (tmp_path / "odd").exists()
    write_job(tmp_path / "job", job)
    with pytest.raises(FileExistsError):
        write_job(tmp_path / "job", job)


def test_bad_job_folders_say_what_to_do(tmp_path):
    folder = write_job(tmp_path / "job", make_job(tmp_path))
    with pytest.raises(JobError, match="is not a job folder"):
        read_job(tmp_path)
    described = json.loads((folder / "job.json").read_text())
    (folder / "job.json").write_text(json.dumps({**described, "format": 2}))
    with pytest.raises(JobError, match="format 2, newer than this pack reads"):
        read_job(folder)
    (folder / "job.json").write_text(json.dumps(described))
    (folder / "tensors.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(JobError, match="tensors.safetensors is damaged"):
        read_job(folder)


def test_the_batch_splits_only_over_process_counts_that_divide_it(tmp_path):
    job = make_job(tmp_path, batch=4)
    assert [job.per_process_accumulation(n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(JobError, match="batch of 4 roll-outs per optimizer step cannot be split over 3 processes"):
        job.per_process_accumulation(3)


def test_the_model_file_must_be_the_exported_one(tmp_path):
    job = make_job(tmp_path)
    job.model.check(tmp_path / "model.safetensors")
    with pytest.raises(JobError, match="is not at"):
        job.model.check(tmp_path / "elsewhere.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"weightz" * 100)  # same size, other content
    with pytest.raises(JobError, match="another sha256"):
        job.model.check(tmp_path / "model.safetensors")


def test_each_process_runs_its_own_micro_steps_and_their_draws_depend_on_nothing_else():
    assert [list(DataParallel(rank, 3).micro_steps(2)) for rank in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError):
        DataParallel(2, 2)
    draws = {(step, index): torch.randn(4, generator=micro_step_generator(7, step, index))
             for step in range(3) for index in range(3)}
    assert all(torch.equal(torch.randn(4, generator=micro_step_generator(7, s, i)), d) for (s, i), d in draws.items())
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(draws)
    assert not torch.equal(torch.randn(4, generator=micro_step_generator(8, 0, 0)), draws[0, 0])


def test_a_checkpoint_continues_only_with_the_same_batch(tmp_path):
    trainer = fresh_trainer(gradient_accumulation=2)
    trainer.train(1)
    saved = trainer.save_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="trained with 2 roll-outs per optimizer step and this run has 4"):
        fresh_trainer(gradient_accumulation=4).resume(saved)
