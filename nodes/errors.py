"""Errors shown in ComfyUI's UI: which node, what is wrong, and how to fix it."""
from __future__ import annotations


class DOPSDInputError(ValueError):
    """Bad user input; raised before anything is changed, so models and files stay intact."""


def node_name(node) -> str:
    # ComfyUI runs a V3 node as a shallow clone of its class named '<Node>Clone'; name the node itself.
    return node if isinstance(node, str) else next(
        (c.__name__ for c in node.__mro__ if not c.__name__.endswith("Clone")), node.__name__)


def node_error(node, problem: str, fix: str) -> DOPSDInputError:
    return DOPSDInputError(f"{node_name(node)}: {problem}. How to fix: {fix}.")
