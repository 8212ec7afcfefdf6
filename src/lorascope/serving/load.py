"""The load generator both engines are measured with: a closed loop of C client threads, each
sending its next request as soon as its previous one answered, until N requests are done.

One implementation for PEFT in-process and vLLM over HTTP, so their numbers differ by the
engine only: a request is any callable `send(i)` that performs request i and returns when the
answer is there."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass
class LoadResult:
    """Per-request latencies (ms, in request order), wall seconds of the timed requests, and the
    most requests that were ever in flight at once (≤ concurrency by construction)."""

    latencies_ms: np.ndarray
    wall_s: float
    max_in_flight: int

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_ms) / self.wall_s


def closed_loop(send: Callable[[int], object], requests: int, concurrency: int, warmup: int = 0) -> LoadResult:
    """`warmup` untimed requests (numbered -warmup..-1, sent by the same clients so every thread
    and connection is warm), then exactly `requests` timed ones numbered 0..requests-1. The first
    error of any client stops the others and is raised here."""
    if requests < 1 or concurrency < 1:
        raise ValueError(f"a load needs requests ≥ 1 and concurrency ≥ 1, got {requests} and {concurrency}")
    if warmup:
        _run(send, range(-warmup, 0), concurrency)
    latencies = np.full(requests, np.nan)
    wall, peak = _run(send, range(requests), concurrency, latencies)
    return LoadResult(latencies, wall, peak)


def _run(send, numbers: range, concurrency: int, latencies: np.ndarray | None = None) -> tuple[float, int]:
    lock, todo = threading.Lock(), iter(numbers)
    state = {"in_flight": 0, "peak": 0, "error": None}
    clients = min(concurrency, len(numbers))
    # every client is alive before the clock starts: on a loaded machine creating a thread can take
    # longer than a request, and the first clients would otherwise run alone (seen in CI: 4 clients,
    # never 2 in flight) with the thread start-up counted in the wall time
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        ready.wait()
        while True:
            with lock:
                i = next(todo, None)
                if i is None or state["error"] is not None:
                    return
                state["in_flight"] += 1
                state["peak"] = max(state["peak"], state["in_flight"])
            start = time.perf_counter()
            try:
                send(i)
            except BaseException as err:  # noqa: BLE001 - handed to the caller below
                with lock:
                    state["error"] = state["error"] or err
                return
            finally:
                with lock:
                    state["in_flight"] -= 1
            if latencies is not None:
                latencies[i - numbers.start] = (time.perf_counter() - start) * 1e3

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if state["error"] is not None:
        raise state["error"]
    return wall, state["peak"]
