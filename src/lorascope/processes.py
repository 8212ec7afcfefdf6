"""Child-process lifetime, standard library only (vllm_server must not import torch)."""

from __future__ import annotations

import signal


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: this process gets `sig` when the process that started it dies, so a driver killed
    with -9 leaves no worker or server behind. Call it in the child (an initializer, a preexec_fn).
    Elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass
