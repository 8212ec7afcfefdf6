"""Atomic writes: every output is written to a temporary sibling and renamed into place, so a
reader never sees half a file or half a folder, and a killed process leaves only leftovers that
`remove_partials` clears. Below the study directory, so bundled models are written the same way."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

PARTIAL = ".partial-"


def _scratch(path: Path) -> Path:
    return path.with_name(f"{PARTIAL}{path.name}-{os.getpid()}")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Written beside the target and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = _scratch(path)
    try:
        scratch.write_bytes(data.encode() if isinstance(data, str) else data)
    except BaseException:  # a full disk: no partial file is left behind
        scratch.unlink(missing_ok=True)
        raise
    os.replace(scratch, path)


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yields an empty temporary folder that replaces `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = _scratch(target)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(scratch, target)


def remove_partials(root: Path) -> None:
    for leftover in root.rglob(f"{PARTIAL}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
