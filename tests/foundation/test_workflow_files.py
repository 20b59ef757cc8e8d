"""The shipped workflow files are exactly what scripts/make_workflows.py writes from the current node definitions."""
from __future__ import annotations

import json

import pytest

from scripts.make_workflows import WORKFLOWS, build
from tests.harness.paths import REPO_ROOT

WORKFLOW_DIR = REPO_ROOT / "workflows"


def test_workflows_folder_holds_exactly_the_generated_files():
    assert sorted(p.name for p in WORKFLOW_DIR.glob("*.json")) == sorted(make().file for make in WORKFLOWS)


@pytest.mark.parametrize("make", WORKFLOWS, ids=lambda make: make.__name__)
def test_workflow_file_matches_the_node_definitions(comfy, make):
    shipped = json.loads((WORKFLOW_DIR / make().file).read_text())
    assert shipped == build(make(), comfy.nodes.NODE_CLASS_MAPPINGS), \
        "run `.venv/bin/python scripts/make_workflows.py` after changing a node's inputs"


@pytest.mark.parametrize("make", WORKFLOWS, ids=lambda make: make.__name__)
def test_groups_do_not_overlap_on_the_canvas(make):
    groups = json.loads((WORKFLOW_DIR / make().file).read_text())["groups"]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["bounding"], b["bounding"]
            apart = ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
            assert apart, f"groups {a['title']!r} and {b['title']!r} overlap"
