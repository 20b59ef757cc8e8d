"""A run killed with SIGKILL resumes after ComfyUI restarts and ends with the LoRA of a run never killed.

A real ComfyUI server runs the Z-Image fine-tune-then-generate graph with `resume` on (how a long run is queued to
survive crashes). It is killed -9 at three points in turn (devkit/crash_points sends the signal from inside, at an
exact place): mid roll-out, mid checkpoint write and mid LoRA save. After each, the server is started again and the
same graph queued. The last start finishes; its LoRA file must equal, tensor for tensor, the file of an uninterrupted
run with the same seed (CPU: bit-identical), and what each crash left must be what was complete before it.
"""
from __future__ import annotations

import shutil
import signal

import pytest
import safetensors.torch
import torch

from devkit.comfy_server import ComfyServer
from devkit.paths import REPO_ROOT, make_base_directory
from devkit.tiny_dataset import write_concept_images
from devkit.tiny_models import write_tiny_models
from devkit.tiny_vlm import write_tiny_vision_towers
from dopsd_core import checkpoint_damage
from tests.zimage.zimage_graphs import fine_tune_then_generate

STEPS, EVERY, KEEP = 6, 2, 2
ROLLOUT_STEPS = 4  # the Z-Image published schedule: 4 roll-out steps per optimizer step, one roll-out per step
SETTINGS = dict(steps=STEPS, checkpoint_every=EVERY, keep_last=KEEP, resume=True, seed=9, ema_decay=0.5)
EARLIER_LORA = b"an earlier LoRA of the same name"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = make_base_directory(tmp_path_factory.mktemp("kill_base"))
    (base / "custom_nodes" / "dopsd_crash_points").symlink_to(REPO_ROOT / "devkit" / "crash_points",
                                                             target_is_directory=True)
    write_tiny_models(base / "models")
    write_tiny_vision_towers(base / "models")
    write_concept_images(base / "input" / "dopsd" / "kill")
    return base


def start(base, log, crash_at: str | None = None) -> ComfyServer:
    return ComfyServer(base, log, env={"DOPSD_CRASH_AT": crash_at or ""}).wait_ready()


def run_until_killed(server: ComfyServer, graph: dict) -> None:
    reply = server.queue(graph)
    assert "prompt_id" in reply, reply
    server.process.wait(timeout=600)
    assert server.process.returncode == -signal.SIGKILL, server.log()
    server.stop()


def run_to_the_end(server: ComfyServer, graph: dict) -> dict:
    reply = server.queue(graph)
    entry = server.wait_history(reply["prompt_id"], timeout=600)
    assert entry["status"]["status_str"] == "success", server.log()
    return entry


def step_folders(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step_"))


def test_a_run_killed_three_times_ends_with_the_lora_of_an_uninterrupted_run(base, tmp_path):
    crashy, ids = fine_tune_then_generate("dopsd/kill", "dopsd/killed", checkpoint_folder="dopsd/kill/crashy",
                                          **SETTINGS)
    whole, _ = fine_tune_then_generate("dopsd/kill", "dopsd/whole", checkpoint_folder="dopsd/kill/whole",
                                       **SETTINGS)
    checkpoints = base / "output" / "dopsd" / "kill" / "crashy"
    lora_file = base / "models" / "loras" / "dopsd" / "killed.safetensors"
    shutil.rmtree(checkpoints, ignore_errors=True)
    lora_file.parent.mkdir(parents=True, exist_ok=True)
    lora_file.write_bytes(EARLIER_LORA)

    # 1. Mid roll-out of optimizer step 4 (after the checkpoint of step 2): step_000002 is all there is.
    run_until_killed(start(base, tmp_path / "1.log", f"rollout:{3 * ROLLOUT_STEPS + 2}"), crashy)
    assert step_folders(checkpoints) == ["step_000002"]
    assert checkpoint_damage(checkpoints / "step_000002") is None

    # 2. Resumed from step 2, killed while writing the checkpoint of step 4: no step_000004, nothing damaged.
    run_until_killed(start(base, tmp_path / "2.log", "checkpoint:1"), crashy)
    assert step_folders(checkpoints) == ["step_000002"]
    assert any(p.name.endswith(".partial") for p in checkpoints.iterdir()), "the crash should hit a save in progress"

    # 3. Resumed from step 2 again, trained to the end (checkpoints 4 and 6, keep_last 2), killed writing the LoRA.
    run_until_killed(start(base, tmp_path / "3.log", "lora_save"), crashy)
    assert step_folders(checkpoints) == ["step_000004", "step_000006"]
    assert not any(p.name.endswith(".partial") for p in checkpoints.iterdir()), "a later save clears what a crash left"
    assert lora_file.read_bytes() == EARLIER_LORA, "a killed save must not touch the file of that name"

    # 4. Resumed at the end: nothing left to train; the LoRA is saved. Then the same run, never killed.
    server = start(base, tmp_path / "4.log")
    try:
        run_to_the_end(server, crashy)
        assert "resumed from" in server.log() and "step 6" in server.log()
        run_to_the_end(server, whole)
    finally:
        server.stop()
    resumed = safetensors.torch.load_file(lora_file)
    expected = safetensors.torch.load_file(base / "models" / "loras" / "dopsd" / "whole.safetensors")
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert not [p.name for p in lora_file.parent.iterdir() if p.name.endswith(".tmp")], "the killed save's leftover"
