"""Accidents of long runs and real folders, through ComfyUI's real executor (in-process):

- resuming when the newest checkpoint is damaged (truncated, zero bytes, a file missing): the node passes over it to
  the previous intact one, says so on the node and in the log, leaves the damaged one in place, and ends with the
  LoRA of an uninterrupted run; with no intact checkpoint left it stops with the fix and changes nothing;
- caption files as editors save them (UTF-8 with a BOM, UTF-16, a Windows code page): the intended prompt reaches
  the text encoder, and a fallback is reported on the node; text that cannot be decoded is refused with the file;
- files in the dataset folder that are not part of the dataset (a caption without its image, a .psd) are reported
  on the node instead of being skipped silently.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from devkit.graph import Graph
from devkit.tiny_dataset import write_concept_images
from tests.node_errors import assert_node_error
from tests.zimage.zimage_graphs import load_family, train, training_set


def node_texts(comfy, node_id: str) -> list[str]:
    return [data["text"] for event, data in comfy.server.messages
            if event == "progress_text" and str(data["node"]) == str(node_id)]


def train_lora(comfy, folder: str, **inputs):
    g = Graph()
    loader = load_family(g)
    trained = train(g, loader, training_set(g, loader, folder), **inputs)
    g.node("LossGraphNode", loss=trained.out(2), filename_prefix="accidents")
    return comfy.run(g.to_api()), trained.node_id


def damage(path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "zero bytes":
        path.write_bytes(b"")
    else:
        path.unlink()


SETTINGS = dict(checkpoint_every=2, seed=4, ema_decay=0.5, keep_last=0)


@pytest.fixture(scope="module")
def runs(comfy, comfy_base, concept_folder):
    """A 6-step run never interrupted (its LoRA), and the checkpoints of steps 2 and 4 of the same run."""
    whole, train_id = train_lora(comfy, concept_folder, steps=6, checkpoint_folder="dopsd/checkpoints/whole_6",
                                 **SETTINGS)
    assert whole.success, whole.error
    expected = dict(whole.output(train_id)[1])  # read now: outputs come from ComfyUI's cache, which the next run replaces
    first, _ = train_lora(comfy, concept_folder, steps=4, checkpoint_folder="dopsd/checkpoints/first_4", **SETTINGS)
    assert first.success, first.error
    return expected, comfy_base / "output" / "dopsd" / "checkpoints" / "first_4"


@pytest.mark.parametrize("how, reason", [("truncated", "student.safetensors has "),
                                         ("zero bytes", "student.safetensors has 0 bytes"),
                                         ("missing", "student.safetensors is missing")])
def test_resume_passes_over_a_damaged_newest_checkpoint(comfy, comfy_base, concept_folder, runs, how, reason):
    expected, first_checkpoints = runs
    folder = f"dopsd/checkpoints/damaged_{how.replace(' ', '_')}"
    checkpoints = comfy_base / "output" / folder
    shutil.rmtree(checkpoints, ignore_errors=True)
    shutil.copytree(first_checkpoints, checkpoints)
    damage(checkpoints / "step_000004" / "student.safetensors", how)
    damaged = {p.name: p.read_bytes() for p in (checkpoints / "step_000004").iterdir()}

    resumed, train_id = train_lora(comfy, concept_folder, steps=6, checkpoint_folder=folder, resume=True, **SETTINGS)

    assert resumed.success, resumed.error
    plan, *during = node_texts(comfy, train_id)
    assert plan.startswith("memory plan: "), plan
    notices, progress = zip(*(text.split("\n") for text in during))
    assert notices[0].startswith(f"resumed from step_000002: step_000004 is damaged ({reason}"), notices
    assert notices[0].endswith(") and was left in place") and len(set(notices)) == 1, notices
    assert [line.split(" · ")[0] for line in progress] == ["step 3/6", "step 4/6", "step 5/6", "step 6/6"]
    kept = checkpoints / "step_000004.damaged"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == damaged, "the damaged checkpoint must be kept as it was"
    got = dict(resumed.output(train_id)[1])
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert len(resumed.output(train_id)[2]["loss"]) == 6, "the loss graph shows the whole run"


def test_resume_with_only_damaged_checkpoints_stops_with_the_fix(comfy, comfy_base, concept_folder, user_files):
    folder = "dopsd/checkpoints/all_damaged"
    checkpoints = comfy_base / "output" / folder
    shutil.rmtree(checkpoints, ignore_errors=True)
    first, _ = train_lora(comfy, concept_folder, steps=2, checkpoint_folder=folder, **SETTINGS)
    assert first.success, first.error
    damage(checkpoints / "step_000002" / "teacher.safetensors", "truncated")
    before = {p.name: p.read_bytes() for p in (checkpoints / "step_000002").iterdir()}

    run, _ = train_lora(comfy, concept_folder, steps=4, checkpoint_folder=folder, resume=True, **SETTINGS)

    assert_node_error(run, "DOPSDTrain", "no intact checkpoint to resume from", "step_000002 is damaged (teacher",
                      "turn resume off to start over")
    assert {p.name: p.read_bytes() for p in (checkpoints / "step_000002").iterdir()} == before


def encode_folder(comfy, folder: str):
    """The training set the VLM teacher node makes of `folder`, and the texts the Dataset node showed."""
    g = Graph()
    loader = load_family(g)
    pairs = training_set(g, loader, folder)
    g.node("PreviewAny", source=pairs)
    run = comfy.run(g.to_api())
    assert run.success, run.error or run.node_errors
    dataset_id = g.to_api()[pairs.node_id]["inputs"]["dataset"][0]
    return run.output(pairs.node_id)[0], node_texts(comfy, dataset_id)


CAPTION = "the artist’s café, a photo of [trigger]"
PROMPT = "the artist’s café, a photo of sks fox"


@pytest.mark.parametrize("encoding, notice", [
    ("utf-8", None), ("utf-8-sig", None), ("utf-16", None),  # Python's utf-16 writes a BOM
    ("cp1252", "read 1 caption(s) that are not UTF-8 as Windows-1252: concept_0.txt"),
])
def test_captions_in_the_encodings_editors_save_reach_the_encoder_as_written(comfy, comfy_base, encoding, notice):
    name = f"dopsd/caption_{encoding}"
    folder = comfy_base / "input" / name
    shutil.rmtree(folder, ignore_errors=True)
    write_concept_images(folder, count=1)
    (folder / "concept_0.txt").write_bytes(f"{CAPTION}\r\n\r\n{CAPTION} at night\r\n".encode(encoding))
    [item], shown = encode_folder(comfy, name)
    assert [pair.prompt for pair in item.pairs] == [PROMPT, f"{PROMPT} at night"]
    assert shown == ([notice] if notice else [])


def test_a_caption_whose_encoding_cannot_be_told_is_refused_with_the_file(comfy, comfy_base, user_files):
    name = "dopsd/caption_utf16_without_bom"
    folder = comfy_base / "input" / name
    shutil.rmtree(folder, ignore_errors=True)
    write_concept_images(folder, count=1)
    (folder / "concept_0.txt").write_bytes(CAPTION.encode("utf-16-le"))
    g = Graph()
    loader = load_family(g)
    g.node("PreviewAny", source=training_set(g, loader, name))
    assert_node_error(comfy.run(g.to_api()), "DOPSDDatasetFromFolder", "'concept_0.txt'", "save it as UTF-8")


def test_files_that_are_not_part_of_the_dataset_are_reported_on_the_node(comfy, comfy_base):
    name = "dopsd/untidy_folder"
    folder = comfy_base / "input" / name
    shutil.rmtree(folder, ignore_errors=True)
    write_concept_images(folder, count=2)
    (folder / "concept_1.png").rename(folder / "concept_1_renamed.psd")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / ".thumbnails").mkdir()
    (folder / ".thumbnails" / "concept_0.png").write_bytes((folder / "concept_0.png").read_bytes())
    items, shown = encode_folder(comfy, name)
    assert [item.name for item in items] == ["concept_0.png"]
    assert shown == [
        "1 caption(s) without an image were not used: concept_1.txt; 1 file(s) or folder(s) that are not "
        "png/jpg/jpeg/webp/bmp images were not used: concept_1_renamed.psd"]
