"""Misuse an artist commits, run through ComfyUI's real executor (in-process, its own output cache included).

- Queueing the same training twice: ComfyUI's cache holds, nothing retrains.
- Changing only a sampler input downstream of training: only the sampler and what follows re-run.
- Editing the dataset folder between runs (captions or images): training re-runs.
- Saving onto a full disk or into a read-only folder: a clear node error, nothing partial under the final name,
  an earlier file of that name untouched. (Root mounts a size-limited / read-only tmpfs; without root the
  read-only case uses file permissions and the full-disk case is skipped — under CI=true, where the machine can
  create both conditions, a case that cannot fails instead of vanishing.)
- LoRA names that would leave models/loras, and dataset folders outside ComfyUI's input folder, are refused
  unless the user explicitly allows the latter.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

from devkit.tiny_dataset import write_concept_images
from devkit.comfy_runtime import pack_module
from devkit.graph import Graph
from tests.zimage.zimage_graphs import TINY_MEGAPIXELS, fine_tune_then_generate, load_family, train, training_set

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def executed_nodes(comfy) -> set[str]:
    """Nodes the last run actually executed (ComfyUI sends 'executing' for each; cached ones are skipped)."""
    return {str(data["node"]) for event, data in comfy.server.messages
            if event == "executing" and isinstance(data, dict) and data.get("node") is not None}


def cached_nodes(run) -> set[str]:
    return {str(n) for event, data in run.status_messages if event == "execution_cached" for n in data["nodes"]}


def assert_success(run):
    assert run.success, run.error or run.node_errors or run.validation_error


class Watched:
    """Runs graphs with a client id, as the web UI does, so ComfyUI reports every node it executes."""

    def __init__(self, comfy):
        self.comfy, self.server = comfy, comfy.server

    def run(self, graph):
        return self.comfy.run(graph, client_id="misuse-tests")


@pytest.fixture
def watched(comfy):
    return Watched(comfy)


@pytest.fixture
def fresh_folder(comfy_base, request):
    """A dataset folder of this test's own under input/, so editing it disturbs no other test."""
    name = f"dopsd/misuse_{request.node.name}"
    folder = comfy_base / "input" / name
    shutil.rmtree(folder, ignore_errors=True)
    write_concept_images(folder)
    return name, folder


def test_cache_holds_when_queued_twice_or_when_only_the_sampler_changes(watched, fresh_folder):
    comfy = watched
    graph, ids = fine_tune_then_generate(fresh_folder[0], "dopsd/misuse_twice", steps=2)  # 1 step: LossGraphNode divides by 0
    assert_success(comfy.run(graph))
    assert ids["train"] in executed_nodes(comfy)

    again = comfy.run(graph)
    assert_success(again)
    assert executed_nodes(comfy) == set(), "queueing the same graph again executed nodes"
    assert ids["train"] in cached_nodes(again)
    assert not [m for e, m in comfy.server.messages if e == "progress"], "training progressed on a cached run"

    graph[ids["sampled"]]["inputs"]["seed"] += 1
    graph[ids["sampled"]]["inputs"]["steps"] = 6
    changed = comfy.run(graph)
    assert_success(changed)
    executed = executed_nodes(comfy)
    assert ids["sampled"] in executed
    assert ids["train"] not in executed and ids["train"] in cached_nodes(changed), "training re-ran"
    assert ids["pairs"] not in executed, "the teacher context was re-encoded"

    # The Train node copied and pasted (a new node id, the same inputs): ComfyUI's cache still holds.
    copied = renumbered(graph, ids["train"], "900")
    pasted = comfy.run(copied)
    assert_success(pasted)
    assert "900" not in executed_nodes(comfy) and "900" in cached_nodes(pasted), "a copied Train node retrained"


def renumbered(graph: dict, node_id: str, new_id: str) -> dict:
    """The graph with one node under another id, its links followed."""
    moved = {new_id if k == node_id else k: v for k, v in graph.items()}
    for node in moved.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == node_id:
                node["inputs"][name] = [new_id, value[1]]
    return moved


def test_editing_the_dataset_folder_retrains(watched, fresh_folder):
    comfy = watched
    name, folder = fresh_folder
    g = Graph()
    loader = load_family(g)
    pairs = training_set(g, loader, name)
    trained = train(g, loader, pairs, steps=2)
    g.node("LossGraphNode", loss=trained.out(2), filename_prefix="misuse_edited")
    graph = g.to_api()
    assert_success(comfy.run(graph))

    def add_caption_line():
        with open(folder / "concept_0.txt", "a") as f:
            f.write("[trigger] seen from above\n")

    def add_image():
        [image] = write_concept_images(folder / "more", count=1)
        image.rename(folder / "concept_9.png")
        image.with_suffix(".txt").rename(folder / "concept_9.txt")
        shutil.rmtree(folder / "more")

    def remove_image():
        (folder / "concept_1.png").unlink()
        (folder / "concept_1.txt").unlink()

    for edit, expected_images in ((add_caption_line, 2), (add_image, 3), (remove_image, 2)):
        edited = comfy.run(graph)
        assert_success(edited)
        assert executed_nodes(comfy) == set(), "re-ran without an edit"
        edit()
        edited = comfy.run(graph)
        assert_success(edited)
        assert {pairs.node_id, trained.node_id} <= executed_nodes(comfy), f"{edit.__name__}: training did not re-run"
        items = edited.output(pairs.node_id)[0]
        assert len(items) == expected_images, edit.__name__
        if edit is add_caption_line:
            assert len(items[0].pairs) == 3


# -- saving where it cannot be written ------------------------------------------------------------------------------

@contextlib.contextmanager
def unwritable_folder(folder, kind: str, earlier_name: str, earlier: bytes):
    """`folder` with an earlier file `earlier_name` in it, made full (a 4 KiB tmpfs that the earlier file and a
    filler fill up) or read-only. Root mounts a tmpfs; others get a chmod'ed folder (read-only only)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not IS_ROOT:
        if kind == "full":
            skip_or_fail_in_ci("simulating a full disk needs root (it mounts a size-limited tmpfs)")
        (folder / earlier_name).parent.mkdir(parents=True, exist_ok=True)
        (folder / earlier_name).write_bytes(earlier)
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(folder)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        skip_or_fail_in_ci(f"cannot mount a tmpfs here: {getattr(err, 'stderr', err)}")
    try:
        (folder / earlier_name).parent.mkdir(parents=True, exist_ok=True)
        (folder / earlier_name).write_bytes(earlier)
        if kind == "full":
            with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
                f.write(b"\0" * 8192)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip where the machine cannot create the condition; under CI, which can, that is a failure, not a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must be able to run this case: {reason}")
    pytest.skip(reason)


@pytest.mark.parametrize("kind, reason", [("full", "No space left on device"), ("readonly", "")])
def test_saving_the_lora_where_it_cannot_be_written(comfy, comfy_base, concept_folder, kind, reason):
    folder = comfy_base / "models" / "loras" / f"unwritable_{kind}"
    earlier = b"an earlier LoRA that a failed save must not damage"
    g = Graph()
    loader = load_family(g)
    trained = train(g, loader, training_set(g, loader, concept_folder))
    g.node("DOPSDSaveLoRA", model=loader.out(0), lora=trained.out(1), lora_name=f"unwritable_{kind}/concept",
           overwrite=True, strength=1.0)
    with unwritable_folder(folder, kind, "concept.safetensors", earlier):
        run = comfy.run(g.to_api())
        left = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "filler"}
    assert not run.success and run.error["event"] == "execution_error"
    assert run.error["node_type"] == "DOPSDSaveLoRA"
    message = run.error["exception_message"]
    assert message.startswith("DOPSDSaveLoRA: could not write") and "How to fix:" in message and reason in message, message
    assert left == {"concept.safetensors": earlier}, "a partial or temporary file was left, or the earlier one changed"


@pytest.mark.parametrize("kind", ["full", "readonly"])
def test_checkpoints_where_they_cannot_be_written(comfy, comfy_base, concept_folder, kind):
    folder = comfy_base / "output" / "dopsd" / f"unwritable_checkpoints_{kind}"
    g = Graph()
    loader = load_family(g)
    trained = train(g, loader, training_set(g, loader, concept_folder), checkpoint_every=1, steps=2,
                    checkpoint_folder=f"dopsd/unwritable_checkpoints_{kind}/run")
    g.node("LossGraphNode", loss=trained.out(2), filename_prefix="unwritable")
    earlier = b"an earlier checkpoint's file"
    with unwritable_folder(folder, kind, "run/step_000001/trainer_state.pt", earlier):
        run = comfy.run(g.to_api())
        left = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name != "filler")
        kept = (folder / "run" / "step_000001" / "trainer_state.pt").read_bytes()
    assert not run.success and run.error["node_type"] == "DOPSDTrain", run.error
    message = run.error["exception_message"]
    assert message.startswith("DOPSDTrain: could not write a checkpoint") and "How to fix:" in message, message
    assert ("No space left" if kind == "full" else "Read-only file system") in message
    assert kept == earlier
    assert left == ["run", "run/step_000001", "run/step_000001/trainer_state.pt"], left


# -- paths that leave their folder ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute_lora", "dopsd/../../escaped", "link_out/escaped",
                                  "", "   "])
def test_lora_names_that_leave_the_loras_folder_are_refused(comfy, comfy_base, tmp_path, name):
    lora_io = pack_module("nodes.lora_io")
    link = comfy_base / "models" / "loras" / "link_out"
    if not link.is_symlink():
        link.symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError) as refused:
        lora_io.lora_path_for(name, comfy.node_class("DOPSDSaveLoRA"))
    assert "DOPSDSaveLoRA:" in str(refused.value) and "How to fix:" in str(refused.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_dataset_outside_the_input_folder_needs_explicit_permission(comfy, comfy_base, tmp_path, where):
    write_concept_images(tmp_path / "elsewhere")
    folder = {"absolute": str(tmp_path / "elsewhere"),
              "dotdot": os.path.relpath(tmp_path / "elsewhere", comfy_base / "input"),
              "symlink": "dopsd/link_elsewhere"}[where]
    if where == "symlink":
        link = comfy_base / "input" / "dopsd" / "link_elsewhere"
        link.unlink(missing_ok=True)
        link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    node = comfy.node_class("DOPSDDatasetFromFolder")
    inputs = dict(folder=folder, trigger_word="sks", placeholder="[trigger]", megapixels=TINY_MEGAPIXELS,
                  bucket_multiple=16)
    with pytest.raises(ValueError) as refused:
        node.execute(**inputs, allow_outside_input=False)
    assert "outside ComfyUI's input folder" in str(refused.value) and "allow_outside_input" in str(refused.value)
    allowed = node.execute(**inputs, allow_outside_input=True)
    assert len(allowed.result[0]) == 2
