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
    """Per-request latencies (ms, in request order), the most requests that were ever in flight
    at once (≤ concurrency by construction), and the loop's steady state: `answered` requests
    came back in `steady_s` seconds while every client had work (from the last client's first
    request out to the first client finding none left)."""

    latencies_ms: np.ndarray
    max_in_flight: int
    answered: int
    steady_s: float

    @property
    def requests_per_s(self) -> float:
        return self.answered / self.steady_s


def closed_loop(send: Callable[[int], object], requests: int, concurrency: int, warmup: int = 0) -> LoadResult:
    """`warmup` untimed requests (numbered -warmup..-1), then exactly `requests` timed ones
    numbered 0..requests-1, all from the same clients in one loop: with warmup ≥ concurrency
    every timed request is sent while the other clients are busy, so none sees an emptier queue
    than the load means (a loop restarted for the timed requests spent its first C of them
    ramping up: 16 of 20 requests in a round at C = 16). Throughput counts the answers while
    every client had work, warm-up ones included: timed requests over the time from the first
    timed one out to the last one back also counted the queue the warm-up left (one server at
    5 ms a request, 16 clients, 40 timed requests after 16 warm-up ones: 141 requests/s instead
    of 200). The first error of any client stops the others and is raised here."""
    if requests < 1 or concurrency < 1:
        raise ValueError(f"a load needs requests ≥ 1 and concurrency ≥ 1, got {requests} and {concurrency}")
    lock, todo = threading.Lock(), iter(range(-warmup, requests))
    latencies = np.full(requests, np.nan)
    state = {"in_flight": 0, "peak": 0, "error": None, "sent": 0, "full": None, "drained": None, "answered": 0}
    clients = min(concurrency, warmup + requests)
    # every client is alive before the first request: on a loaded machine creating a thread can take
    # longer than a request, and the first clients would otherwise run alone (seen in CI: 4 clients,
    # never 2 in flight)
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        ready.wait()
        while True:
            with lock:
                i = next(todo, None)
                if i is None or state["error"] is not None:
                    state["drained"] = state["drained"] or time.perf_counter()
                    return
                state["in_flight"] += 1
                state["sent"] += 1
                if state["sent"] == clients:
                    state["full"] = time.perf_counter()
                if i >= 0:
                    state["peak"] = max(state["peak"], state["in_flight"])
            start = time.perf_counter()
            try:
                send(i)
            except BaseException as err:
                with lock:
                    state["error"] = state["error"] or err
                return
            finally:
                with lock:
                    state["in_flight"] -= 1
                    state["answered"] += state["full"] is not None and state["drained"] is None
            if i >= 0:
                latencies[i] = (time.perf_counter() - start) * 1e3

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    for thread in threads:
        thread.join()
    if state["error"] is not None:
        raise state["error"]
    return LoadResult(latencies, state["peak"], state["answered"], state["drained"] - state["full"])
