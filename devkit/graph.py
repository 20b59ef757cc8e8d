"""A small builder for API-format graphs (what POST /prompt takes), so tests read like the canvas."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NodeRef:
    node_id: str

    def out(self, index: int) -> list:
        return [self.node_id, index]


class Graph:
    def __init__(self):
        self.nodes: dict[str, dict[str, Any]] = {}

    def node(self, class_type: str, **inputs) -> NodeRef:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {
            "class_type": class_type,
            "inputs": {k: v.out(0) if isinstance(v, NodeRef) else v for k, v in inputs.items()},
        }
        return NodeRef(node_id)

    def to_api(self) -> dict[str, dict[str, Any]]:
        return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in self.nodes.items()}
