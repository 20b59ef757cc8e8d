import pytest
import torch

import dopsd_core.checkpoints as checkpoints
from dopsd_core import (
    DualLora,
    LoraSpec,
    Trainer,
    TrainConfig,
    TrainingItem,
    TrainingPair,
    latest_checkpoint,
    load_adapter_state,
    load_checkpoint,
    save_adapter_state,
    zimage_turbo_training_sigmas,
)
from devkit.core_toys import LORA_TARGETS, ToyCond, ToyDiT, random_adapter_state

# Dropout draws from torch's global generator, so resuming must restore it too.
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=LORA_TARGETS, dropout=0.1)


def fresh_trainer(**config) -> Trainer:
    torch.manual_seed(0)
    model = ToyDiT()
    generator = torch.Generator().manual_seed(1)
    pairs = [
        TrainingPair(ToyCond(prompt), ToyCond(prompt, torch.randn(1, 4, 8, 8, generator=generator)))
        for prompt in torch.randn(3, 1, 8, generator=generator)
    ]
    items = [TrainingItem(pairs[:2], (4, 8, 8)), TrainingItem(pairs[2:], (4, 8, 8))]
    settings = dict(learning_rate=1e-3, gradient_accumulation=2, warmup_steps=4, seed=3) | config
    return Trainer(model, DualLora(model, SPEC), items, zimage_turbo_training_sigmas(), TrainConfig(**settings))


def adapter_tensors(trainer: Trainer) -> list[torch.Tensor]:
    return [entry[key] for role in ("student", "teacher") for entry in trainer.adapters.state(role).values()
            for key in ("down", "up")]


def test_resume_continues_bit_identically(tmp_path):
    uninterrupted = fresh_trainer()
    expected = [report.per_step_losses for report in uninterrupted.train(6)]

    first_half = fresh_trainer()
    losses = [report.per_step_losses for report in first_half.train(3)]
    first_half.save_checkpoint(tmp_path)
    torch.randn(100)  # anything in between may use the global generator
    resumed = fresh_trainer()
    resumed.resume(latest_checkpoint(tmp_path))
    losses += [report.per_step_losses for report in resumed.train(3)]

    assert resumed.step == 6
    assert losses == expected
    assert all(torch.equal(a, b) for a, b in zip(adapter_tensors(resumed), adapter_tensors(uninterrupted)))


def test_checkpoint_every_n_steps_and_latest(tmp_path):
    trainer = fresh_trainer(checkpoint_every=2, checkpoint_dir=str(tmp_path))
    trainer.train(5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000004"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000004"
    saved = load_checkpoint(tmp_path / "step_000004")
    assert saved.trainer_state["step"] == 4
    assert saved.trainer_state["config"]["checkpoint_every"] == 2
    assert saved.student.keys() == set(trainer.adapters.module_names)
    assert latest_checkpoint(tmp_path / "missing") is None


def test_a_failed_save_leaves_no_checkpoint_under_a_final_name(tmp_path, monkeypatch):
    trainer = fresh_trainer()
    trainer.train(1)
    trainer.save_checkpoint(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", crash)
    trainer.train(1)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]  # no step_000002, no staging folder left
    (tmp_path / "step_000009").mkdir()  # e.g. copied by hand, without trainer state
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000001"


def test_saving_a_step_again_replaces_the_old_folder(tmp_path):
    trainer = fresh_trainer()
    trainer.train(1)
    trainer.save_checkpoint(tmp_path)
    trainer.adapters.load_state(random_adapter_state(trainer.adapters, seed=5))
    trainer.save_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]
    saved = load_checkpoint(tmp_path / "step_000001").student
    assert all(torch.equal(saved[n]["up"], e["up"]) for n, e in trainer.adapters.student_state().items())


def test_adapter_files_round_trip(tmp_path):
    adapters = fresh_trainer().adapters
    state = random_adapter_state(adapters, seed=2)
    save_adapter_state(state, tmp_path / "lora.safetensors")
    loaded = load_adapter_state(tmp_path / "lora.safetensors")
    assert loaded.keys() == state.keys()
    for name, entry in state.items():
        assert torch.equal(loaded[name]["down"], entry["down"]) and torch.equal(loaded[name]["up"], entry["up"])
        assert loaded[name]["alpha"] == 8.0
    with pytest.raises(FileNotFoundError, match="not a D-OPSD checkpoint"):
        load_checkpoint(tmp_path)
