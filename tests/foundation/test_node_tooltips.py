"""Every input of every D-OPSD node says what it does: artists read tooltips, not the source."""
from __future__ import annotations

from devkit.comfy_runtime import pack_module


def test_every_input_of_every_node_has_a_tooltip(comfy):
    missing = [f"{node.__name__}.{entry.id}" for node in pack_module("nodes").NODES
               for entry in node.define_schema().inputs if not (getattr(entry, "tooltip", None) or "").strip()]
    assert not missing, f"inputs without a tooltip: {', '.join(missing)}"
