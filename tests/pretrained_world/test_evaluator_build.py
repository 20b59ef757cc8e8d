"""The evaluator's build stage still trains, checkpoints, and resumes to the same weights as an unbroken run."""
import numpy as np
import pytest
from safetensors.torch import load_file

from world.evaluators import load_evaluator, train_evaluator


class Killed(Exception):
    pass


def test_build_stage_runs_and_resumes_from_its_checkpoint(tmp_path):
    settings = {"steps": 4, "seed": 3, "checkpoint_every": 2, "batch_size": 4}
    unbroken = train_evaluator(tmp_path / "unbroken.safetensors", checkpoint_dir=tmp_path / "a", **settings,
                               log=lambda message: None)

    def killed_at_first_checkpoint(message):
        raise Killed(message)
    with pytest.raises(Killed, match="step 2/4 "):
        train_evaluator(tmp_path / "resumed.safetensors", checkpoint_dir=tmp_path / "b", **settings,
                        log=killed_at_first_checkpoint)
    assert not (tmp_path / "resumed.safetensors").exists()
    messages = []
    resumed = train_evaluator(tmp_path / "resumed.safetensors", checkpoint_dir=tmp_path / "b", **settings,
                              log=messages.append)
    assert "resumed at step 2/4" in messages[0] and "step 4/4 " in messages[-1]
    first, second = load_file(unbroken), load_file(resumed)
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)
    assert resumed.stat().st_size < 2_000_000
    outputs = load_evaluator(resumed).outputs(np.zeros((2, 64, 64, 3), np.float32))
    assert outputs["features"].shape == (2, 256)
