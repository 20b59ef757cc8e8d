"""A `sha256sum`-format manifest of a weights folder, so that committed weights can be checked byte for byte."""
from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "MANIFEST.sha256"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listed_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder) -> Path:
    """Writes `folder/MANIFEST.sha256` listing every other file under `folder` (checkable with `sha256sum -c`)."""
    folder = Path(folder)
    lines = [f"{_digest(p)}  {p.relative_to(folder).as_posix()}\n" for p in _listed_files(folder)]
    path = folder / MANIFEST
    path.write_text("".join(lines))
    return path


def verify_manifest(folder) -> None:
    """Raises ValueError naming every file under `folder` that is missing from the manifest, listed but absent, or
    whose SHA-256 differs from the listed one."""
    folder = Path(folder)
    listed = {}
    for line in (folder / MANIFEST).read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    present = {p.relative_to(folder).as_posix(): p for p in _listed_files(folder)}
    problems = [f"{name}: not in the manifest" for name in sorted(present.keys() - listed.keys())]
    problems += [f"{name}: listed but missing" for name in sorted(listed.keys() - present.keys())]
    problems += [f"{name}: sha256 differs from the manifest" for name in sorted(listed.keys() & present.keys())
                 if _digest(present[name]) != listed[name]]
    if problems:
        raise ValueError(f"{folder / MANIFEST}: " + "; ".join(problems))
