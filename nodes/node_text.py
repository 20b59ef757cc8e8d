"""Text shown on the running node in the canvas (the frontend's progress-text preview), and logged."""
from __future__ import annotations

import logging

from comfy_execution.utils import get_executing_context
from server import PromptServer

from .errors import node_name


def running_node_id() -> str | None:
    """The id of the node being executed. It comes from the executor's context, not a hidden UNIQUE_ID input: ComfyUI
    puts the id of nodes that declare one into their cache key (V1 nodes in 0.3.75), and a copied node would rerun."""
    context = get_executing_context()
    return context.node_id if context is not None else None


def show_on_node(text: str, node_id: str | None) -> None:
    """Called as ComfyUI's own nodes call it (text, node id): headless runners stub exactly that."""
    if node_id is not None:
        PromptServer.instance.send_progress_text(text, node_id)


def report(node, text: str) -> None:
    """A notice the user should read (files passed over, a fallback taken): on the running node and in the log."""
    logging.warning("%s: %s", node_name(node), text)
    show_on_node(text, running_node_id())
