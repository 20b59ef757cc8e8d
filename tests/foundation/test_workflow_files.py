"""The shipped workflow files are exactly what scripts/make_workflows.py writes from the current node definitions."""
from __future__ import annotations

import json

import pytest

from scripts.make_workflows import WORKFLOWS, build
from devkit.paths import REPO_ROOT, comfy_version

WORKFLOW_DIR = REPO_ROOT / "workflows"
GENERATED_WITH = "0.33"  # the primary target; 0.3.75's web UI and converter ignore the extra widget values


def test_workflows_folder_holds_exactly_the_generated_files(comfy):
    assert sorted(p.name for p in WORKFLOW_DIR.glob("*.json")) == sorted(make().file for make in WORKFLOWS)


@pytest.mark.parametrize("make", WORKFLOWS, ids=lambda make: make.__name__)
def test_workflow_file_matches_the_node_definitions(comfy, make):
    if comfy_version() != GENERATED_WITH:
        pytest.skip(f"the files are written from ComfyUI {GENERATED_WITH}'s node definitions, which have inputs "
                    f"{comfy_version()} lacks (ImageScaleToTotalPixels.resolution_steps); the workflow tests and the "
                    f"browser tests run them on {comfy_version()}")
    shipped = json.loads((WORKFLOW_DIR / make().file).read_text())
    assert shipped == build(make(), comfy.nodes.NODE_CLASS_MAPPINGS), \
        "run `DOPSD_COMFY_VERSION=0.33 .venv-comfy033/bin/python scripts/make_workflows.py` after changing a node's inputs"

