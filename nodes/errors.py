"""Errors shown in ComfyUI's UI: which node, what is wrong, and how to fix it."""
from __future__ import annotations


class DOPSDInputError(ValueError):
    """Bad user input; raised before anything is changed, so models and files stay intact."""


def node_error(node, problem: str, fix: str) -> DOPSDInputError:
    name = node if isinstance(node, str) else node.__name__
    return DOPSDInputError(f"{name}: {problem}. How to fix: {fix}.")
