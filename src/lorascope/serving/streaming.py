"""Timing a streamed generation request: when it was sent and when each prompt's tokens arrived,
and the latencies serving benchmarks report from that (vLLM's `bench serve` defines them the same
way): time to first token, time per output token after the first, inter-token latencies.

A request may carry several prompts (a PEFT batch, a vLLM list of prompts); every figure is per
prompt, averaged over the request's prompts. Server-sent events are read here with the standard
library, so a fake server in the tests and vLLM are timed by the same code."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Iterator


@dataclasses.dataclass
class Streamed:
    """One request: `sent` (perf_counter seconds) and, per prompt, the arrival time of each output
    token (a chunk of k tokens counts k arrivals at its time), and when the answer was complete."""

    sent: float
    arrivals: list[list[float]]
    done: float = 0.0

    @classmethod
    def start(cls, prompts: int) -> Streamed:
        return cls(time.perf_counter(), [[] for _ in range(prompts)])

    def arrived(self, prompt: int, tokens: int = 1) -> None:
        self.arrivals[prompt].extend([time.perf_counter()] * tokens)

    def finish(self) -> Streamed:
        self.done = time.perf_counter()
        return self

    @property
    def output_tokens(self) -> int:
        return sum(map(len, self.arrivals))

    @property
    def ttft_ms(self) -> float:
        """Time to each prompt's first token, from the moment the request was sent (queueing
        included), averaged over the request's prompts."""
        return 1e3 * sum(times[0] - self.sent for times in self.arrivals) / len(self.arrivals)

    @property
    def tpot_ms(self) -> float:
        """Decode time per output token after the first: (last - first) / (n - 1) per prompt,
        averaged; NaN when a prompt got fewer than two tokens."""
        per = [(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else float("nan") for t in self.arrivals]
        return 1e3 * sum(per) / len(per)

    @property
    def itl_ms(self) -> list[float]:
        """Every gap between consecutive arrivals of a prompt's tokens (0 within one chunk)."""
        return [1e3 * (b - a) for t in self.arrivals for a, b in itertools.pairwise(t)]

    @property
    def tokens_per_chunk(self) -> float:
        """Output tokens per arrival: 1 when every token came alone; more when the server sent
        several in one chunk (vLLM coalesces a request's tokens while its API process lags), which
        inflates time to first token and deflates time per output token as a client sees them."""
        return self.output_tokens / sum(len(set(times)) for times in self.arrivals)

    @property
    def e2e_ms(self) -> float:
        return 1e3 * (self.done - self.sent)


def server_sent_events(response) -> Iterator[dict]:
    """The JSON payload of each `data:` line of an HTTP response body, as it arrives (read line by
    line, never buffered whole), until `data: [DONE]` or the end of the body."""
    while line := response.readline():
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)
