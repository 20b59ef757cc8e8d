"""DOPSDTrain's start_from_lora: the student and the EMA teacher start from a LoRA file instead of from zero."""
from __future__ import annotations

import safetensors.torch
import torch

from devkit.graph import Graph
from tests.node_errors import assert_node_error
from tests.zimage.zimage_graphs import load_family, train, training_set


def trained(comfy, concept_folder, lora_name: str, **inputs) -> tuple[dict, dict]:
    """Train and save `lora_name`; returns the LoRA the node output and the file's header."""
    g = Graph()
    loader = load_family(g)
    node = train(g, loader, training_set(g, loader, concept_folder), **inputs)
    g.node("DOPSDSaveLoRA", model=loader.out(0), lora=node.out(1), lora_name=lora_name, overwrite=True, strength=1.0)
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    lora = run.output(node.node_id)[1]
    return dict(lora), lora.metadata


def test_training_starts_from_the_files_weights(comfy, comfy_base, concept_folder):
    first, _ = trained(comfy, concept_folder, "dopsd/start_first", steps=2, seed=1)
    file = comfy_base / "models" / "loras" / "dopsd" / "start_first.safetensors"
    saved = safetensors.torch.load_file(file)

    # Learning rate 0: the student stays where it started, so its export is the file itself (bf16 both ways).
    unchanged, header = trained(comfy, concept_folder, "dopsd/start_unchanged", steps=1, seed=2, learning_rate=0.0,
                                start_from_lora="dopsd/start_first.safetensors", ema_decay=0.5, checkpoint_every=1,
                                checkpoint_folder="dopsd/checkpoints/start_unchanged")
    assert unchanged.keys() == saved.keys() and all(torch.equal(unchanged[k], saved[k]) for k in saved)
    assert header["dopsd.started_from"] == "dopsd/start_first.safetensors"
    # The teacher started there too: an EMA (decay 0.5) of equal adapters leaves them equal; from zero it would halve.
    checkpoint = comfy_base / "output" / "dopsd" / "checkpoints" / "start_unchanged" / "step_000001"
    student, teacher = (safetensors.torch.load_file(checkpoint / f"{role}.safetensors") for role in ("student", "teacher"))
    assert all(torch.equal(student[k], teacher[k]) for k in student)

    # From zero, the same step would export zeros for every up-projection: the start really came from the file.
    fresh, _ = trained(comfy, concept_folder, "dopsd/start_fresh", steps=1, seed=2, learning_rate=0.0)
    assert all(not fresh[k].any() for k in fresh if k.endswith("lora_up.weight"))
    assert any(saved[k].any() for k in saved if k.endswith("lora_up.weight"))


def test_a_lora_of_another_rank_is_refused_with_the_settings_that_fit(comfy, concept_folder):
    trained(comfy, concept_folder, "dopsd/start_rank8", steps=1, seed=3, rank=8, alpha=16.0)
    g = Graph()
    loader = load_family(g)
    node = train(g, loader, training_set(g, loader, concept_folder), steps=1, seed=3,
                 start_from_lora="dopsd/start_rank8.safetensors")
    g.node("PreviewAny", source=node.out(1))
    assert_node_error(comfy.run(g.to_api()), "DOPSDTrain", "has rank 8 and alpha 16, this run 4 and 8",
                      "set rank 8 and alpha 16")
