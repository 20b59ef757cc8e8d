import re

import pytest
import torch

import dopsd_core.checkpoints as checkpoints
from dopsd_core import (
    CheckpointSearch,
    DualLora,
    LoraSpec,
    Trainer,
    TrainConfig,
    TrainingItem,
    TrainingPair,
    checkpoint_damage,
    latest_checkpoint,
    load_adapter_state,
    load_checkpoint,
    newest_intact_checkpoint,
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
    # The loss history is the whole run's, for the node's loss graph of a resumed run.
    assert resumed.loss_history == uninterrupted.loss_history and len(resumed.loss_history) == 6
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


def damage(path, how: str) -> None:
    """What crashes and failing disks leave behind."""
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero bytes":
        path.write_bytes(b"")
    elif how == "missing":
        path.unlink()
    elif how == "one bit flipped":
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, reason", [
    ("truncated", r"student\.safetensors has \d+ bytes, \d+ were written"),
    ("zero bytes", r"student\.safetensors has 0 bytes, \d+ were written"),
    ("missing", r"student\.safetensors is missing"),
    ("one bit flipped", r"student\.safetensors does not match the checksum written with it"),
])
def test_resume_passes_over_a_damaged_newest_checkpoint_to_the_previous_intact_one(tmp_path, how, reason):
    trainer = fresh_trainer(checkpoint_every=2, checkpoint_dir=str(tmp_path))
    trainer.train(4)
    newest = tmp_path / "step_000004"
    assert checkpoint_damage(newest) is None and checkpoint_damage(tmp_path / "step_000002") is None
    damage(newest / "student.safetensors", how)

    search = newest_intact_checkpoint(tmp_path)

    assert search.checkpoint == tmp_path / "step_000002"
    assert [path for path, _ in search.skipped] == [newest]
    assert re.fullmatch(reason, search.skipped[0][1]), search.skipped
    assert newest.is_dir(), "the damaged checkpoint must be left for the user"


def test_a_damaged_manifest_or_trainer_state_is_damage_too(tmp_path):
    trainer = fresh_trainer()
    trainer.train(1)
    first = trainer.save_checkpoint(tmp_path)
    trainer.train(1)
    second = trainer.save_checkpoint(tmp_path)
    damage(second / "trainer_state.pt", "truncated")
    damage(first / "manifest.json", "truncated")
    assert checkpoint_damage(second).startswith("trainer_state.pt has ")
    assert checkpoint_damage(first).startswith("manifest.json is unreadable")
    assert newest_intact_checkpoint(tmp_path) == CheckpointSearch(None, [(second, checkpoint_damage(second)),
                                                                         (first, checkpoint_damage(first))])


def test_a_checkpoint_from_before_manifests_is_checked_by_reading_it(tmp_path):
    trainer = fresh_trainer()
    trainer.train(1)
    old_format = trainer.save_checkpoint(tmp_path)
    (old_format / "manifest.json").unlink()
    assert checkpoint_damage(old_format) is None
    damage(old_format / "teacher.safetensors", "truncated")
    assert checkpoint_damage(old_format).startswith("unreadable (")


def test_keep_last_bounds_the_checkpoints_and_never_deletes_a_damaged_one(tmp_path):
    trainer = fresh_trainer(checkpoint_every=1, checkpoint_dir=str(tmp_path), keep_last=2)
    trainer.train(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000003"]
    damage(tmp_path / "step_000003" / "teacher.safetensors", "zero bytes")
    stale = tmp_path / ".step_000004.abc.partial"  # what a save killed mid-write leaves
    stale.mkdir()
    trainer.train(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004", "step_000005"]
    with pytest.raises(ValueError, match="keep_last"):
        fresh_trainer(keep_last=-1)


def test_saving_again_over_a_damaged_checkpoint_keeps_the_damaged_one_aside(tmp_path):
    trainer = fresh_trainer(checkpoint_every=2, checkpoint_dir=str(tmp_path))
    trainer.train(4)
    damage(tmp_path / "step_000004" / "student.safetensors", "truncated")
    damaged_bytes = (tmp_path / "step_000004" / "student.safetensors").read_bytes()
    resumed = fresh_trainer(checkpoint_every=2, checkpoint_dir=str(tmp_path))
    resumed.resume(newest_intact_checkpoint(tmp_path).checkpoint)
    resumed.train(2)
    assert checkpoint_damage(tmp_path / "step_000004") is None
    assert (tmp_path / "step_000004.damaged" / "student.safetensors").read_bytes() == damaged_bytes
