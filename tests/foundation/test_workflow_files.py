"""The shipped workflow files are exactly what scripts/make_workflows.py writes from the current node definitions."""
from __future__ import annotations

import json

import pytest

from scripts.make_workflows import WORKFLOWS, build
from tests.harness.paths import REPO_ROOT

WORKFLOW_DIR = REPO_ROOT / "workflows"


def test_workflows_folder_holds_exactly_the_generated_files(comfy):
    assert sorted(p.name for p in WORKFLOW_DIR.glob("*.json")) == sorted(make().file for make in WORKFLOWS)


@pytest.mark.parametrize("make", WORKFLOWS, ids=lambda make: make.__name__)
def test_workflow_file_matches_the_node_definitions(comfy, make):
    shipped = json.loads((WORKFLOW_DIR / make().file).read_text())
    assert shipped == build(make(), comfy.nodes.NODE_CLASS_MAPPINGS), \
        "run `.venv/bin/python scripts/make_workflows.py` after changing a node's inputs"

