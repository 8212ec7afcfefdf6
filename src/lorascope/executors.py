"""Where a study's independent units run (one training run, one baseline, one model's
features): in this process, in a pool of local worker processes, or as Ray tasks on a
cluster. Every unit writes its own outputs atomically under fingerprints, so what is done is
decided by the study directory, never by the executor: a study started on one resumes on
another, and a unit killed half-way is redone.

Stages never talk to an executor class: `run_units` sends their units to the executor the
study was started with (`started`), shows one progress bar with a line per finished unit,
and returns the results in unit order."""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from lorascope import runtime
from lorascope.config import RuntimeConfig
from lorascope.errors import InputError, first_line
from lorascope.processes import die_with_parent

RETRIES = 2  # times a unit is resubmitted after its worker died (Ray's default for tasks is 3)
MAX_CPU_WORKERS = 4  # default CPU workers: one per core up to this (each holds its own model copy)


@dataclasses.dataclass(frozen=True)
class Unit:
    """`fn(*args)` in a worker: `fn` is a module-level function (pickled by reference) and
    `args` are plain values (paths, the config), so any executor can send it anywhere."""

    fn: Callable[..., Any]
    args: tuple
    label: str


def cores() -> int:
    """CPU cores this process may use (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def execute(fn: Callable, args: tuple, threads: int | None) -> tuple[Any, float, str]:
    """What a worker runs for one unit: the unit under its thread count, timed, and where it ran."""
    started = time.perf_counter()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = fn(*args)
    finally:
        torch.set_num_threads(previous)
    return result, time.perf_counter() - started, f"{socket.gethostname()} pid {os.getpid()}"


class Serial:
    """Units one after another in this process, with the process's threads (the default before
    executors existed, and what a single worker means)."""

    name = "serial"

    def __init__(self, threads: int | None = None):
        self.workers, self.threads = 1, threads

    def map(self, units: list[Unit]) -> Iterator[tuple[int, tuple]]:
        for i, unit in enumerate(units):
            yield i, execute(unit.fn, unit.args, self.threads)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _children_inherit(**variables: str):
    """Environment variables for the processes spawned inside the block (they copy os.environ
    when they start); this process's own libraries read theirs at import, long before."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _init_worker(threads: int) -> None:
    """A pool worker: dies with the driver and pins its threads."""
    die_with_parent()
    torch.set_num_threads(threads)
    runtime.quiet_libraries()


class LocalPool:
    """`workers` spawned processes on this machine, `threads` torch threads each. A worker that
    dies (OOM killer, kill -9) breaks the whole pool in concurrent.futures: the pool is started
    again and every unfinished unit resubmitted, at most `retries` times per unit. Workers live
    for the study (imports cost seconds) and die with the driver."""

    name = "process pool"

    def __init__(self, workers: int, threads: int, retries: int = RETRIES):
        self.workers, self.threads, self.retries = workers, threads, retries
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _started(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads,),
            )
        return self._pool

    def map(self, units: list[Unit]) -> Iterator[tuple[int, tuple]]:
        todo, attempts = set(range(len(units))), dict.fromkeys(range(len(units)), 0)
        while todo:
            pool = self._started()
            # workers spawn on submit; they draw no progress bars (tqdm reads TQDM_DISABLE at import):
            # the training loop's would tear the driver's bar, whose line per finished unit replaces them
            with _children_inherit(TQDM_DISABLE="1"):
                futures = {pool.submit(execute, units[i].fn, units[i].args, self.threads): i for i in sorted(todo)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    yield i, future.result()
                    todo.discard(i)
            except concurrent.futures.process.BrokenProcessPool:
                self.close()
                for i in todo:
                    attempts[i] += 1
                    if attempts[i] > self.retries:
                        raise RuntimeError(
                            f"a worker died {attempts[i]} times while running {units[i].label}"
                        ) from None
                tqdm.write(f"a worker died; restarting the pool and resubmitting {len(todo)} unfinished unit(s)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayTasks:
    """One Ray task per unit with its resources declared (`num_cpus` = threads, one GPU each
    on CUDA), so Ray places it, sets CUDA_VISIBLE_DEVICES and retries it when its worker dies.
    `address`: "local" starts a Ray instance for this study (stopped with it), "auto" joins
    the cluster this machine belongs to, anything else is a cluster address (host:port or
    ray://host:port)."""

    name = "Ray"

    def __init__(self, address: str, workers: int | None, threads: int, gpus: int):
        try:
            import ray
        except ImportError:
            raise InputError(
                "runtime.ray_address is set but Ray is not installed; pip install 'lorascope[ray]'"
            ) from None
        self._ray, self.address, self.threads, self.gpus = ray, address, threads, gpus
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address not in ("local", "auto"):
            _check_answers(address)
        try:
            if address == "local":  # "local", not None: None would join $RAY_ADDRESS or a `ray start` cluster
                ray.init(
                    address="local",
                    num_cpus=(workers or 1) * threads,
                    num_gpus=torch.cuda.device_count(),
                    include_dashboard=False,
                    log_to_driver=False,
                )
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise InputError(f"runtime.ray_address: no Ray cluster answers at {address}: {first_line(err)}") from None
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < threads:
            ray.shutdown()
            raise InputError(f"runtime.threads: {threads} per task, but the Ray cluster at {address} has {cpus} CPUs")
        self.workers = max(1, cpus // threads)
        self._remote = ray.remote(execute).options(num_cpus=threads, num_gpus=gpus, max_retries=RETRIES)

    def map(self, units: list[Unit]) -> Iterator[tuple[int, tuple]]:
        refs = {self._remote.remote(unit.fn, unit.args, self.threads): i for i, unit in enumerate(units)}
        pending = list(refs)
        try:
            while pending:
                done, pending = self._ray.wait(pending, num_returns=1)
                yield refs[done[0]], self._ray.get(done[0])
        finally:
            for ref in pending:  # an error or Ctrl-C: nothing of this study keeps running
                self._ray.cancel(ref, force=True)

    def close(self) -> None:
        self._ray.shutdown()


def _check_answers(address: str, timeout: float = 5.0) -> None:
    """A cluster address must accept a TCP connection: ray.init retries an address that does not
    answer for minutes, logging, instead of failing."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except ValueError:
        raise InputError(f"runtime.ray_address: {address!r} is not local, auto, host:port or ray://host:port") from None
    except OSError as err:
        raise InputError(f"runtime.ray_address: no Ray cluster answers at {address} ({err.strerror or err})") from None


def auto_workers(device: str) -> int:
    """Workers when runtime.workers is unset: one per GPU on CUDA; on CPU one per core, at most
    MAX_CPU_WORKERS (small-batch training leaves a process's second core half idle). Measured on
    2 cores (README Scale-out): the quick profile's train stage took 341 s on a 2 x 1-thread pool
    against 394 s serially (benchmarks/scale_out.py), and the whole quick study's parallel stages
    were faster on the pool (train 311 vs 399 s, weights 25 vs 40, forget 42 vs 51, represent 42
    vs 47; baselines 78 vs 73)."""
    if device != "cpu" and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return min(cores(), MAX_CPU_WORKERS)


def for_runtime(rc: RuntimeConfig):
    """The executor `rc` asks for; bad values are an InputError before anything starts."""
    cuda = rc.device != "cpu" and torch.cuda.is_available()
    if rc.ray_address:
        return RayTasks(rc.ray_address, rc.workers, rc.threads or 1, 1 if cuda else 0)
    available = cores()
    workers = rc.workers or auto_workers(rc.device)
    if workers == 1:
        return Serial(rc.threads)
    threads = rc.threads or max(1, available // workers)
    if workers * threads > available:
        raise InputError(
            f"runtime.workers: {workers} workers x {threads} threads need {workers * threads} cores; "
            f"this machine gives {available}"
        )
    if cuda and workers > torch.cuda.device_count():
        raise InputError(f"runtime.workers: {workers} workers but {torch.cuda.device_count()} GPU(s); one GPU each")
    return LocalPool(workers, threads)


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("executor", default=None)


@contextlib.contextmanager
def started(rc: RuntimeConfig):
    """The executor for `rc`, current inside the block (stages reach it through run_units),
    always closed after: pool workers and a local Ray instance end with the block."""
    executor = for_runtime(rc)
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)
        executor.close()


def current():
    """The executor of the running study; serial outside `started` (library use, tests)."""
    return _CURRENT.get() or Serial()


def run_units(
    units: list[Unit], desc: str, progress: bool = True, describe: Callable[[Any], str] | None = None
) -> list[Any]:
    """Every unit on the current executor; one bar with ETA for all of them and a line per
    finished unit (its label, `describe(result)`, seconds, where it ran). Results in unit order."""
    executor, results = current(), [None] * len(units)
    if not units:
        return results
    with tqdm(total=len(units), desc=desc, unit="unit", disable=not progress) as bar:
        for i, (result, seconds, where) in executor.map(units):
            results[i] = result
            if progress:
                detail = f": {describe(result)}" if describe else ""
                where = "" if executor.name == "serial" else f", {where}"
                bar.write(f"{units[i].label}{detail} ({seconds:.1f} s{where})")
            bar.update()
    return results
