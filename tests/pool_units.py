"""Units for the process-pool tests, in a module of their own: a spawned worker imports the
module a unit's function lives in, and this one imports nothing heavy."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def record_pid(folder: str, name: str) -> int:
    """Leaves a file per attempt; the first attempt of 'victim' kills its own worker, as the OOM
    killer would."""
    attempts = len(list(Path(folder).glob(f"{name}-*")))
    (Path(folder) / f"{name}-{attempts}").write_text(str(os.getpid()))
    if name == "victim" and attempts == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    return os.getpid()


def kill_myself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def square(n: int) -> int:
    return n * n
