"""Memory and size of each strategy, measured in a fresh process per strategy after loading,
so loading never counts as inference memory and no other strategy's allocator state does.

`python -m lorascope.serving.memory SPEC.json` is the child process that measures one strategy."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import torch

from lorascope.runtime import autocast, threads
from lorascope.serving.inputs import Batch, Models
from lorascope.serving.strategies import REGISTRY
from lorascope.serving.timing import say
from lorascope.study import Table

MB = 2**20
RESULT_PREFIX = "LORASCOPE_MEMORY "
DEPLOYMENT_MEMORY = Table("deployment_memory", (
    "strategy", "load_seconds", "peak_mb", "loaded_mb", "inference_mb", "disk_mb", "adapter_disk_mb",
    "measure", "method", "device",
))  # fmt: skip


def _rss() -> int:
    return psutil.Process().memory_info().rss


@torch.no_grad()
def _touch(model: torch.nn.Module) -> None:
    """Read every weight once. Safetensors checkpoints are memory-mapped and paged in lazily:
    without this, reading the weights from disk would be counted as inference memory and the
    load would look free."""
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.sum()


def _trim_heap() -> None:
    """Hand freed loading buffers back to the OS, so post-load RSS is the model, not garbage."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRss:
    """Peak resident set of this process inside a block. Linux: the kernel's high-water mark
    (VmHWM), reset on entry through /proc/self/clear_refs; elsewhere psutil sampled every ms."""

    def __enter__(self) -> PeakRss:
        self._samples, self._stop, self._thread = [_rss()], threading.Event(), None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM reset via /proc/self/clear_refs after loading"
        except OSError:
            self.method = "psutil RSS sampled every 1 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._samples.append(_rss())

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            status = Path("/proc/self/status").read_text()
            self.peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(*self._samples, _rss())


def measure_memory(spec: dict) -> dict:
    """Load one strategy and run its workload; meant for a fresh process (see `main`). CPU:
    RSS after loading (weights paged in) and peak RSS during inference, both above the RSS
    before loading; CUDA: allocated after loading and max allocated after a reset that follows
    loading. load_seconds includes paging the weights in."""
    device = torch.device(spec["device"])
    models = Models(**spec["models"])
    strategy = REGISTRY[spec["strategy"]]
    batches = [Batch({k: torch.tensor(v) for k, v in b["inputs"].items()}, b["tasks"]).to(device)
               for b in spec["batches"]]  # fmt: skip
    gc.collect()
    before = _rss()
    start = time.perf_counter()
    model = strategy.load(models, spec["num_labels"], spec["pad_token_id"]).to(device)
    _touch(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_seconds = time.perf_counter() - start
    call = strategy.call(model, list(models.adapters))
    gc.collect()
    _trim_heap()
    with torch.inference_mode(), autocast(device, spec["bf16"]):
        if device.type == "cuda":
            loaded = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for i, batch in enumerate(batches):
                call(batch, i)
            torch.cuda.synchronize(device)
            peak, measure = torch.cuda.max_memory_allocated(device), "cuda allocated"
            method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats following load"
        else:
            loaded = _rss() - before
            with PeakRss() as tracker:
                for i, batch in enumerate(batches):
                    call(batch, i)
            peak, measure, method = tracker.peak - before, "cpu rss", tracker.method
    return {"strategy": spec["strategy"], "load_seconds": load_seconds, "loaded_mb": loaded / MB,
            "peak_mb": peak / MB, "inference_mb": (peak - loaded) / MB, "runtime_mb": before / MB,
            "measure": measure, "method": method, "device": device.type}  # fmt: skip


def memory_in_subprocess(spec: dict, timeout: float = 600) -> dict:
    """`measure_memory` in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "spec.json"
        path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "lorascope.serving.memory", str(path)],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement of {spec['strategy']} failed: {tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def weights_mb(folder: str | None) -> float:
    """Size of the weight files a load reads (safetensors if present, else .bin); NaN for a Hub id."""
    if folder is None or not Path(folder).is_dir():
        return float("nan")
    files = list(Path(folder).glob("*.safetensors")) or list(Path(folder).glob("*.bin"))
    return sum(f.stat().st_size for f in files) / MB


def disk_sizes(strategy: str, models: Models) -> tuple[float, float]:
    """(MB read to serve `strategy`, MB of adapters among them)."""
    serving = REGISTRY[strategy]
    if serving.full:
        return weights_mb(models.full), 0.0
    used = {"none": [], "first": [models.first], "all": list(models.adapters)}[serving.adapters]
    adapter_mb = sum(weights_mb(models.adapters[t]) for t in used)
    return weights_mb(models.base) + adapter_mb, adapter_mb


def memory_table(strategies: list[str], models: Models, spec: dict) -> pd.DataFrame:
    """One fresh process per strategy (compiled variants share their source's weights)."""
    rows = []
    for strategy in strategies:
        if REGISTRY[strategy].compiled_from:
            continue
        row = memory_in_subprocess(spec | {"strategy": strategy})
        row["disk_mb"], row["adapter_disk_mb"] = disk_sizes(strategy, models)
        rows.append(row)
        say(f"memory {strategy}: {row['loaded_mb']:.0f} MB loaded, +{row['inference_mb']:.0f} MB inference, "
            f"{row['load_seconds']:.2f} s load")  # fmt: skip
    return pd.DataFrame(rows).reindex(columns=[*DEPLOYMENT_MEMORY.columns, "runtime_mb"])


def main(argv: list[str] | None = None) -> int:
    """`python -m lorascope.serving.memory SPEC.json`: one strategy's memory, as JSON."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lorascope.serving.memory SPEC.json", file=sys.stderr)
        return 2
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    spec = json.loads(Path(args[0]).read_text())
    with threads(spec["threads"]):
        result = measure_memory(spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
