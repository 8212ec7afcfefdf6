"""The load generator every engine is measured with: closed-loop clients, and turns in which every
strategy of an engine sends its share of a cell's requests.

A request is any callable `send(k)` that performs request k of the cell and returns when the
answer is there, so PEFT in-process and vLLM over HTTP differ by the engine only. What a request
is (its kind: classify today) is the sender's business; the generator only counts and times."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import psutil

from lorascope.serving.vllm_server import IDLE_SPIN_S


def say(message: str) -> None:
    print(f"deploy: {message}", file=sys.stderr, flush=True)


def others_busy_cores(window: float = 1.0) -> float:
    """Cores' worth of CPU that processes other than this one used over the next `window`
    seconds. The load average lags by a minute: after the parallel stages it still counts
    their workers, which are idle by the time serving is timed."""

    def busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def mine() -> float:
        t = psutil.Process().cpu_times()
        return t.user + t.system

    busy_start, mine_start = busy(), mine()
    time.sleep(window)
    return max(0.0, (busy() - busy_start) - (mine() - mine_start)) / window


@dataclasses.dataclass
class LoadResult:
    """Per-request latencies (ms, in request order), the most requests that were ever in flight
    at once (≤ concurrency by construction), and the loop's steady state: `answered` requests
    came back in `steady_s` seconds while every client had work (from the first timed request
    sent at full load to the first client finding none left)."""

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
    than the load means. Throughput counts the answers that arrive from the first timed request
    sent at full load (every client busy) until a client finds no work left, warm-up answers
    in that window included. One client sends from the caller's thread: sequential calls, as a
    plain loop makes them. The first error of any client stops the others and is raised here."""
    if requests < 1 or concurrency < 1:
        raise ValueError(f"a load needs requests ≥ 1 and concurrency ≥ 1, got {requests} and {concurrency}")
    lock, todo = threading.Lock(), iter(range(-warmup, requests))
    latencies = np.full(requests, np.nan)
    state = {"in_flight": 0, "peak": 0, "error": None, "sent": 0, "start": None, "drained": None, "answered": 0}
    clients = min(concurrency, warmup + requests)

    def client() -> None:
        while True:
            with lock:
                i = next(todo, None)
                if i is None or state["error"] is not None:
                    state["drained"] = state["drained"] or time.perf_counter()
                    return
                state["in_flight"] += 1
                state["sent"] += 1
                if state["start"] is None and i >= 0 and state["sent"] >= clients:
                    state["start"] = time.perf_counter()
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
                    state["answered"] += state["start"] is not None and state["drained"] is None
            if i >= 0:
                latencies[i] = (time.perf_counter() - start) * 1e3

    if clients == 1:
        client()
    else:
        # every client is alive before the first request: on a loaded machine creating a thread can
        # take longer than a request, and the first clients would otherwise run alone
        ready = threading.Barrier(clients + 1)

        def waiting_client() -> None:
            ready.wait()
            client()

        threads = [threading.Thread(target=waiting_client, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        ready.wait()
        for thread in threads:
            thread.join()
    if state["error"] is not None:
        raise state["error"]
    return LoadResult(latencies, state["peak"], state["answered"], state["drained"] - state["start"])


@dataclasses.dataclass(frozen=True)
class Turns:
    """How an engine's strategies take turns in a cell: `settle_s` of quiet before each turn, and
    at least `min_requests` timed requests a turn (at concurrency C, at least C). Short turns keep
    a slow spell of the machine from landing on one strategy: two identical processes taking
    turns of 20 requests read 24.6 % apart in one 30-s window (whole run +1.3 % [0.9, 1.7]) where,
    alternating request by request, every window stayed within 1.6 points and the whole run read
    +0.0 % [-0.3, 0.2] (docs/benchmarks.md)."""

    settle_s: float = 0.0
    min_requests: int = 1

    def warmup(self, concurrency: int) -> int:
        """Untimed requests a turn after the first starts with, so that its timed ones meet the full
        load: C, or none at one client when nothing went quiet before it (no queue to fill)."""
        return concurrency if concurrency > 1 or self.settle_s > 0 else 0

    def first_warmup(self, concurrency: int, warmup: int) -> int:
        """Untimed requests of a strategy's first turn in a cell: `warmup` per client, at least
        what a later turn starts with."""
        return max(concurrency * warmup, self.warmup(concurrency))


# PEFT in-process alternates request by request. A vLLM server polls for IDLE_SPIN_S after its last
# request on the core the next server computes on, so each vLLM turn first waits twice that; and
# shorter vLLM turns did not bring runs closer (turns of 5 requests: separate over merged 30.3 and
# 21.1 points apart in two runs on fresh servers; of 20: 0.2-4.0), so vLLM keeps turns of 20.
TURNS = {"peft": Turns(), "vllm": Turns(settle_s=2 * IDLE_SPIN_S, min_requests=20)}


def round_robin(names: list[str], rounds: int) -> list[list[str]]:
    """Order of the turns: each round gives every strategy one turn, and the first one rotates,
    so neither machine drift nor position in the round favours a strategy."""
    n = len(names)
    return [names[r % n :] + names[: r % n] for r in range(rounds)]


def turns_of(requests: int, concurrency: int, turns: Turns, rounds: int | None = None) -> list[range]:
    """A cell's timed request numbers in consecutive rounds: `rounds` of them, else turns of
    max(concurrency, turns.min_requests) requests."""
    k = rounds or max(1, requests // max(concurrency, turns.min_requests))
    return [range(r * requests // k, (r + 1) * requests // k) for r in range(k)]


@dataclasses.dataclass
class Taken:
    """One strategy's timed requests in one cell: latencies by request number, answers and time
    of the turns' steady states, the most requests in flight."""

    latencies_ms: np.ndarray
    answered: int = 0
    steady_s: float = 0.0
    max_in_flight: int = 0

    @property
    def requests_per_s(self) -> float:
        return self.answered / self.steady_s


@contextlib.contextmanager
def gc_paused():
    """A garbage-collector pass would land on a random request of a random strategy."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def take_turns(
    sends: dict[str, Callable[[int], object]], split: list[range], concurrency: int, first_warmup: int, turns: Turns
) -> dict[str, Taken]:
    """One cell of every strategy through the closed loop, interleaved: in each round every
    strategy sends its turn's requests (the order rotating by round), so a slow spell of the
    machine or of a server hits all strategies alike and request k of two strategies ran a turn
    or two apart. Each strategy's first turn starts with `first_warmup` untimed requests (numbered
    below 0), every later one with turns.warmup, the timed requests before it again; each turn
    waits `turns.settle_s` first. `sends[s](k)` performs request k."""
    requests = split[-1].stop
    taken = {s: Taken(np.full(requests, np.nan)) for s in sends}
    with gc_paused():
        for r, (numbers, order) in enumerate(zip(split, round_robin(list(sends), len(split)))):
            for strategy in order:
                if turns.settle_s:
                    time.sleep(turns.settle_s)
                send, start = sends[strategy], numbers.start
                result = closed_loop(
                    lambda i: send(start + i),  # noqa: B023 - called before the loop moves on
                    len(numbers),
                    concurrency,
                    first_warmup if r == 0 else turns.warmup(concurrency),
                )
                mine = taken[strategy]
                mine.latencies_ms[numbers.start : numbers.stop] = result.latencies_ms
                mine.steady_s += result.steady_s
                mine.answered += result.answered
                mine.max_in_flight = max(mine.max_in_flight, result.max_in_flight)
    return taken
