"""Where and how computation runs: device, the bf16 autocast policy, torch thread pinning and
the hardware description recorded beside every measurement.

Weights always stay fp32; forward passes run under bf16 autocast on CUDA by default and on
CPU when asked (`runtime.bf16: true`; CPUs with AVX-512 BF16 or AMX run bf16 products ~3x
faster than fp32). The reference study trained pure-bf16 weights and lost every update
smaller than ~0.4 % of a weight."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import warnings
from importlib import metadata
from pathlib import Path

import torch

from lorascope.config import RuntimeConfig
from lorascope.errors import InputError

PACKAGES = ("lorascope", "torch", "transformers", "peft", "datasets", "accelerate", "pydantic")


def pick_device(runtime: RuntimeConfig) -> torch.device:
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise InputError("runtime.device: cuda requested but no CUDA device is available")
    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(runtime.device)


def uses_bf16(runtime: RuntimeConfig, device: torch.device) -> bool:
    """Whether forward passes run under bf16 autocast (what results depend on, so fingerprinted):
    `runtime.bf16`, or when unset, on CUDA only."""
    return device.type == "cuda" if runtime.bf16 is None else runtime.bf16


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast over fp32 weights on `device` (CUDA or CPU); plain fp32 when `bf16` is false."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@contextlib.contextmanager
def threads(count: int | None):
    """torch's thread count pinned to `count` inside the block (None: left as it is), restored
    after. Small float64 products (CKA on [256 x 384] features) ran 15x slower on two threads
    than on one on a busy 2-core machine (spin-waiting), and timings need a fixed count."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def hardware(device: torch.device | None = None) -> dict:
    """What the numbers were measured on, including the load average (other processes)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    info = {
        "machine": platform.machine(),
        "processor": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "load_average": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device if device is not None and device.type == "cuda" else 0)
    return info


def versions() -> dict:
    """Versions of the packages results depend on (None: not installed), and Python's."""
    out = {}
    for package in PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out | {"python": sys.version.split()[0]}


def quiet_libraries() -> None:
    """Keep the terminal to progress bars and lorascope's own lines (the CLI and every worker)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight-loading bars; training bars stay
