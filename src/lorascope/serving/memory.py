"""The PEFT engine's memory: each strategy measured in a fresh process of its own after loading,
so loading never counts as inference memory and no other strategy's allocator state does; its
size on disk beside it. (vLLM's is the RSS of its server's process tree: serving.vllm_engine.)

The processes are forked from a forkserver that imported this module (torch, transformers,
peft) once: a fresh interpreter per strategy spent ~8 s of its 9 s importing them. A forked
child's heap holds only that import, never the driver's models or free lists."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import gc
import multiprocessing
import threading
import time

import pandas as pd
import torch
from tqdm import tqdm  # the class PEFT draws its bars with

from lorascope.errors import first_line
from lorascope.executors import cores
from lorascope.footprint import MB, PeakRss, rss, weights_mb
from lorascope.runtime import autocast, quiet_libraries, threads
from lorascope.serving.inputs import Batch, Models
from lorascope.serving.load import say
from lorascope.serving.strategies import REGISTRY
from lorascope.study import Table

DEPLOYMENT_MEMORY = Table(
    "deployment_memory",
    (
        "strategy",
        "load_seconds",
        "peak_mb",
        "loaded_mb",
        "inference_mb",
        "disk_mb",
        "adapter_disk_mb",
        "measure",
        "method",
        "device",
    ),
)


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


def measure_memory(spec: dict) -> dict:
    """Load one strategy and run its workload; meant for a fresh process (see `main`). CPU:
    RSS after loading (weights paged in) and peak RSS during inference, both above the RSS
    before loading; CUDA: allocated after loading and max allocated after a reset that follows
    loading. load_seconds includes paging the weights in. Also the whole process's peak RSS
    (`process_mb`; on CUDA its RSS after inference) and, on CUDA, torch's peak reserved memory
    (`gpu_mb`): PEFT's server_rss_mb / server_gpu_mb in the engines table."""
    device = torch.device(spec["device"])
    models = Models(**spec["models"])
    strategy = REGISTRY[spec["strategy"]]
    batches = [
        Batch({k: torch.tensor(v) for k, v in b["inputs"].items()}, b["tasks"]).to(device) for b in spec["batches"]
    ]
    gc.collect()
    before = rss()
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
            process_mb, gpu_mb = rss() / MB, torch.cuda.max_memory_reserved(device) / MB
        else:
            loaded = rss() - before
            with PeakRss() as tracker:
                for i, batch in enumerate(batches):
                    call(batch, i)
            peak, measure, method = tracker.peak - before, "cpu rss", tracker.method
            process_mb, gpu_mb = tracker.peak / MB, None
    return {
        "strategy": spec["strategy"],
        "load_seconds": load_seconds,
        "loaded_mb": loaded / MB,
        "peak_mb": peak / MB,
        "inference_mb": (peak - loaded) / MB,
        "runtime_mb": before / MB,
        "process_mb": process_mb,
        "gpu_mb": gpu_mb,
        "measure": measure,
        "method": method,
        "device": device.type,
    }


def _child(conn, spec: dict) -> None:
    quiet_libraries()  # PEFT's adapter load raises a transformers FutureWarning in every child
    # PEFT's merge draws a (disabled) tqdm bar, whose default lock is a multiprocessing semaphore
    # that a forked child never unlinks: Python warns of a leaked semaphore at exit
    tqdm.set_lock(threading.RLock())
    try:
        with threads(spec["threads"]):
            conn.send(("ok", measure_memory(spec)))
    except Exception as err:
        conn.send(("error", f"{type(err).__name__}: {first_line(err)}"))


def memory_in_subprocess(spec: dict, timeout: float = 600) -> dict:
    """`measure_memory` in a fresh process forked from the forkserver."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, spec), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise RuntimeError(f"memory measurement of {spec['strategy']} took more than {timeout:g} s")
        status, result = receive.recv()
    except EOFError:
        child.join(5)
        status, result = "error", f"the process died (exit code {child.exitcode})"
    finally:
        if child.is_alive():
            child.kill()
        child.join()
    if status != "ok":
        raise RuntimeError(f"memory measurement of {spec['strategy']} failed: {result}")
    return result


def disk_sizes(strategy: str, models: Models) -> tuple[float, float]:
    """(MB read to serve `strategy`, MB of adapters among them)."""
    serving = REGISTRY[strategy]
    if serving.full:
        return weights_mb(models.full), 0.0
    used = {"none": [], "first": [models.first], "all": list(models.adapters)}[serving.adapters]
    adapter_mb = sum(weights_mb(models.adapters[t]) for t in used)
    return weights_mb(models.base) + adapter_mb, adapter_mb


def memory_table(strategies: list[str], models: Models, spec: dict) -> pd.DataFrame:
    """One fresh process per strategy (compiled variants share their source's weights). On CPU
    as many at once as the cores hold at `spec["threads"]` each: a process's RSS is its own, and
    one at a time the quick study spent ~25 s here with a core idle."""
    measured = [s for s in strategies if not REGISTRY[s].compiled_from]
    parallel = max(1, cores() // spec["threads"]) if spec["device"] == "cpu" else 1
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda s: memory_in_subprocess(spec | {"strategy": s}), measured))
    rows = []
    for strategy, row in zip(measured, results):
        row["disk_mb"], row["adapter_disk_mb"] = disk_sizes(strategy, models)
        rows.append(row)
        say(
            f"memory {strategy}: {row['loaded_mb']:.0f} MB loaded, +{row['inference_mb']:.0f} MB inference, "
            f"{row['load_seconds']:.2f} s load"
        )
    return pd.DataFrame(rows).reindex(columns=[*DEPLOYMENT_MEMORY.columns, "runtime_mb", "process_mb", "gpu_mb"])
