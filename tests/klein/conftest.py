"""Datasets for the FLUX.2-klein tests, written under the session's ComfyUI input folder."""
from __future__ import annotations

import pytest

from tests.klein.klein_data import write_edit_folder, write_single_image_folder

REFERENCE_CAPTION = "a photo of [trigger] on a gradient"


@pytest.fixture(scope="session")
def klein_edit_folder(comfy_base) -> str:
    """Two (source, instruction, target) triples listed in metadata.jsonl."""
    write_edit_folder(comfy_base / "input" / "dopsd" / "klein_edit")
    return "dopsd/klein_edit"


@pytest.fixture(scope="session")
def klein_reference_folders(comfy_base) -> tuple[str, str]:
    """Two one-image folders with the same caption and different images."""
    for name, seed in (("klein_reference_a", 21), ("klein_reference_b", 34)):
        write_single_image_folder(comfy_base / "input" / "dopsd" / name, seed, REFERENCE_CAPTION)
    return "dopsd/klein_reference_a", "dopsd/klein_reference_b"


@pytest.fixture(scope="session")
def klein_edit_variant_folders(comfy_base) -> dict[str, str]:
    """Edit folders that differ from klein_edit in the targets only, or in the sources only."""
    base = comfy_base / "input" / "dopsd"
    write_edit_folder(base / "klein_edit_other_targets", target_disc_x=0.55)
    write_edit_folder(base / "klein_edit_other_sources", source_disc_x=0.45)
    return {"targets": "dopsd/klein_edit_other_targets", "sources": "dopsd/klein_edit_other_sources"}
