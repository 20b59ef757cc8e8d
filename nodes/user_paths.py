"""Paths typed by users, resolved inside the ComfyUI folder they belong to."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import node_error


def resolve_inside(root: str | os.PathLike, name: str, node, what: str) -> Path:
    """`root/name`, refusing empty names, absolute paths and anything that would leave `root` (e.g. '..')."""
    name = name.strip()
    if not name:
        raise node_error(node, f"the {what} is empty", f"type a name for the {what}")
    root = Path(root).resolve()
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise node_error(node, f"the {what} '{name}' points outside {root}",
                         "use a plain name or a sub-folder, without '..' or an absolute path")
    path = (root / name).resolve()
    if root != path and root not in path.parents:
        raise node_error(node, f"the {what} '{name}' resolves outside {root}", "use a plain name")
    return path
