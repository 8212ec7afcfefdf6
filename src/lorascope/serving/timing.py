"""Timing the strategies: every strategy of a cell sees the same batches; warm-up calls use
batches that are not timed; strategies are interleaved round robin (the first one rotates) so
machine drift hits all of them alike; CUDA is synchronised around every timed call. Overhead
is the median of per-round latency ratios with a bootstrap interval over rounds."""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import psutil
import torch

from lorascope import stats
from lorascope.config import DeployConfig
from lorascope.runtime import autocast
from lorascope.serving.inputs import Batch, make_batches
from lorascope.study import Table

DEPLOYMENT = Table(
    "deployment",
    (
        "strategy",
        "batch_size",
        "seq_len",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "mean_ms",
        "examples_per_s",
        "overhead_vs_full",
        "tokens_per_s",
        "overhead_ci_low",
        "overhead_ci_high",
        "threads",
        "repeats",
        "warmup",
        "real_tokens_per_s",
        "mean_padded_length",
        "overhead_vs_merged",
        "overhead_vs_merged_ci_low",
        "overhead_vs_merged_ci_high",
        "device",
        "status",
        "note",
    ),
)
DEPLOYMENT_TIMES = Table(
    "deployment_times", ("strategy", "batch_size", "seq_len", "repetition", "ms", "padded_tokens", "real_tokens")
)


def say(message: str) -> None:
    print(f"deploy: {message}", file=sys.stderr, flush=True)


def others_busy_cores(window: float = 1.0) -> float:
    """Cores' worth of CPU that processes other than this one used over the next `window`
    seconds. The load average lags by a minute: after the parallel stages it still counts
    their workers (2.1 on 2 cores in the quick study), which are idle by the time serving is timed."""

    def busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def mine() -> float:
        t = psutil.Process().cpu_times()
        return t.user + t.system

    busy_start, mine_start = busy(), mine()
    time.sleep(window)
    return max(0.0, (busy() - busy_start) - (mine() - mine_start)) / window


def round_robin(strategies: list[str], repeats: int) -> list[list[str]]:
    """Order of the timed calls: each repetition calls every strategy once, and the first one
    rotates, so neither machine drift nor position in the round favours a strategy."""
    n = len(strategies)
    return [strategies[r % n :] + strategies[: r % n] for r in range(repeats)]


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call; on CUDA the queue is drained before and after, so the time is
    the call's own work and not the launch of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


@contextlib.contextmanager
def _gc_paused():
    """A garbage-collector pass would land on a random call of a random strategy."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_cell(
    calls: dict[str, Callable], warm: list[Batch], timed: list[Batch], device: torch.device, bf16: bool
) -> dict[str, np.ndarray]:
    """Warm-up calls on `warm` (never timed), then one timed call per strategy and batch of
    `timed`, strategies interleaved round robin; all strategies see the same batches."""
    times = {s: np.empty(len(timed)) for s in calls}
    with torch.inference_mode(), autocast(device, bf16), _gc_paused():
        for call in calls.values():
            for i, batch in enumerate(warm):
                call(batch, i)
        for rep, order in enumerate(round_robin(list(calls), len(timed))):
            for strategy in order:
                times[strategy][rep] = time_call(lambda: calls[strategy](timed[rep], rep), device)  # noqa: B023
    return times


def summarize(times_ms: np.ndarray, batch_size: int, padded_tokens: np.ndarray, real_tokens: np.ndarray) -> dict:
    """Latency percentiles (numpy's linear interpolation) and throughput over all timed calls.
    tokens_per_s counts every position the model computes (padding included), real_tokens_per_s
    only the attention-mask ones."""
    p50, p95, p99 = np.percentile(times_ms, [50, 95, 99])
    seconds = times_ms.sum() / 1e3
    return {
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "mean_ms": times_ms.mean(),
        "examples_per_s": batch_size * len(times_ms) / seconds,
        "tokens_per_s": padded_tokens.sum() / seconds,
        "real_tokens_per_s": real_tokens.sum() / seconds,
        "mean_padded_length": padded_tokens.sum() / (batch_size * len(times_ms)),
    }


def time_grid(
    calls: dict[str, Callable],
    pool: list[dict],
    cfg: DeployConfig,
    pad_token_id: int,
    input_names,
    device: torch.device,
    bf16: bool,
) -> dict[tuple, tuple]:
    """Every (batch size, seq_len) cell: {strategy: times}, padded and real tokens per batch."""
    results = {}
    for seq_len in cfg.seq_lens:
        for batch_size in cfg.batch_sizes:
            batches = [
                b.to(device)
                for b in make_batches(pool, batch_size, seq_len, cfg.warmup + cfg.repeats, pad_token_id, input_names)
            ]
            timed = batches[cfg.warmup :]
            times = time_cell(calls, batches[: cfg.warmup], timed, device, bf16)
            tokens = (np.array([b.padded_tokens for b in timed]), np.array([b.real_tokens for b in timed]))
            results[(batch_size, seq_len)] = (times, tokens)
            say(
                f"batch {batch_size}, seq_len {seq_len}: p50 "
                + ", ".join(f"{s} {np.median(t):.2f} ms" for s, t in times.items())
            )
    return results


def times_table(results: dict) -> pd.DataFrame:
    """Every timed call (long format), so any statistic can be recomputed from the raw data."""
    rows = []
    for (batch_size, seq_len), (times, (padded, real)) in results.items():
        for strategy, values in times.items():
            rows += [
                {
                    "strategy": strategy,
                    "batch_size": batch_size,
                    "seq_len": str(seq_len),
                    "repetition": r,
                    "ms": v,
                    "padded_tokens": padded[r],
                    "real_tokens": real[r],
                }
                for r, v in enumerate(values)
            ]
    return DEPLOYMENT_TIMES.frame(pd.DataFrame(rows, columns=DEPLOYMENT_TIMES.columns))


def timing_table(
    results: dict, strategies: list[str], skipped: dict[str, str], cfg: DeployConfig, threads: int, device: torch.device
) -> pd.DataFrame:
    """One row per strategy x batch size x seq_len; skipped strategies keep their rows with the
    reason in `note`. Overheads are medians of per-round latency ratios (1.0 = as fast as the
    reference; see `stats.median_paired_ratio`)."""
    rows = []
    for strategy in strategies:
        for seq_len in cfg.seq_lens:
            for batch_size in cfg.batch_sizes:
                row = {
                    "strategy": strategy,
                    "batch_size": batch_size,
                    "seq_len": str(seq_len),
                    "threads": threads,
                    "repeats": cfg.repeats,
                    "warmup": cfg.warmup,
                    "device": device.type,
                }
                if strategy in skipped:
                    rows.append(row | {"status": "skipped", "note": skipped[strategy]})
                    continue
                times, (padded, real) = results[(batch_size, seq_len)]
                row |= summarize(times[strategy], batch_size, padded, real) | {"status": "ok", "note": ""}
                for ref, names in (
                    ("full", ("overhead_vs_full", "overhead_ci_low", "overhead_ci_high")),
                    ("merged", ("overhead_vs_merged", "overhead_vs_merged_ci_low", "overhead_vs_merged_ci_high")),
                ):
                    if ref in times:
                        row |= dict(zip(names, stats.median_paired_ratio(times[strategy], times[ref], cfg.bootstrap)))
                rows.append(row)
    return pd.DataFrame(rows).reindex(columns=DEPLOYMENT.columns)
