"""Errors a user can fix. The CLI prints them as one line and exits with code 2 (InputError)
or 1 (the others)."""

from __future__ import annotations

import difflib
import errno
import shutil
from pathlib import Path


def first_line(err: BaseException) -> str:
    """An exception as one line: its message's first line, or its type when it has none."""
    return (str(err).strip() or type(err).__name__).splitlines()[0]


class InputError(Exception):
    """Bad config, bad data or a bad path: the message says what is wrong and where."""


class Diverged(Exception):
    """Training loss became NaN or inf; the run is recorded as `diverged`, the study goes on."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step = step
        self.loss = loss


def did_you_mean(name: str, valid) -> str:
    """The hint after an unknown name: the closest valid one, or the list of them."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"


class DiskFull(RuntimeError):
    """A write found no space left on the device: the stage stops at once (every later write
    would fail the same way), finished results are kept, and a rerun resumes."""

    @classmethod
    def at(cls, target: Path) -> DiskFull:
        """The error for a write to `target`, saying how much space is free there. (A plain
        message, so it crosses a process boundary as it is.)"""
        free = shutil.disk_usage(next(p for p in (target, *target.parents) if p.exists())).free
        return cls(
            f"no space left on the device while writing {target} ({free / 1e6:,.0f} MB free there); "
            "free some space and rerun: finished results are kept"
        )


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is "no space left on device" (ENOSPC;
    safetensors and tokenizers say so only in their message)."""
    seen: BaseException | None = err
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
