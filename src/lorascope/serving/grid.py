"""The serving grid: one cell model (concurrency x request size x sequence length) that every
engine plugs into, the requests of a cell, its measurement through the load generator
(serving.load), the overheads against `full` and `merged`, and the tables built from them.

A cell's requests are the same for every engine and strategy: request k carries `size`
consecutive examples of the interleaved stream of every task's eval examples (inputs.interleave),
from position (warmup + k) x size, padded to the cell's length; warm-up requests are numbered
below 0. The request kind (classify: one forward pass, class scores back; generate: streamed
tokens, serving.generation_grid) is a property of the workload; an engine's send function
performs requests of the kinds it serves and its answers are kept for the kind's tables."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from lorascope import stats
from lorascope.config import STRATEGIES, DeployConfig, DeployGridConfig
from lorascope.serving.inputs import Batch, pad_batch, request_rows
from lorascope.serving.load import Taken, Turns, say, take_turns, turns_of
from lorascope.study import Table

CLASSIFY = "classify"  # one forward pass, class scores back
GENERATE = "generate"  # a fixed number of greedy tokens, streamed (serving.generation_grid)
REFERENCES = ("full", "merged")  # every overhead is against one of these, in the same engine and cell
METHOD_MARK = "@"  # "separate@dora": a strategy serving another adapter method (served_name)


def served_name(strategy: str, method: str | None = None) -> str:
    """What the grid calls a strategy serving one of the further adapter methods (Models.methods);
    the study's first adapter method and full FT keep the strategy's plain name."""
    return f"{strategy}{METHOD_MARK}{method}" if method else strategy


def split_served(name: str, names: tuple[str, str] = ("", "")) -> tuple[str, str]:
    """(strategy, method) of a served name; a plain name serves `names` = (the first adapter
    method, the full FT method): its `full` the second, any other strategy the first."""
    strategy, _, method = name.partition(METHOD_MARK)
    return strategy, method or (names[1] if strategy == "full" else names[0])


DEPLOYMENT = Table(
    "deployment",
    (
        "strategy",
        "method",
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
    "deployment_times",
    ("strategy", "method", "batch_size", "seq_len", "repetition", "ms", "padded_tokens", "real_tokens"),
)
DEPLOYMENT_ENGINES = Table(
    "deployment_engines",
    (
        "engine",
        "strategy",
        "method",
        "concurrency",
        "batch_size",
        "requests",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "mean_ms",
        "requests_per_s",
        "examples_per_s",
        "tokens_per_s",
        "server_rss_mb",
        "server_gpu_mb",
        "overhead_vs_merged",
        "overhead_vs_merged_ci_low",
        "overhead_vs_merged_ci_high",
        "max_in_flight",
        "device",
        "status",
        "note",
        "overhead_vs_full",
        "overhead_vs_full_ci_low",
        "overhead_vs_full_ci_high",
    ),
)


@dataclasses.dataclass(frozen=True)
class Cell:
    """`concurrency` closed-loop clients sending requests of `size` examples (the tables'
    batch_size) at `seq_len` ("natural" or a number of tokens), of one request kind."""

    concurrency: int
    size: int
    seq_len: str | int = "natural"
    kind: str = CLASSIFY


def cells(grid: DeployGridConfig) -> list[Cell]:
    """The one-client cells (batch_sizes x seq_lens, lengths outer), then a cell of one-example
    natural-length requests per number of clients that is not among them."""
    out = [Cell(1, size, seq_len) for seq_len in grid.seq_lens for size in grid.batch_sizes]
    return out + [Cell(c, 1) for c in grid.concurrency if Cell(c, 1) not in out]


def timed_requests(grid: DeployGridConfig, cell: Cell) -> int:
    return grid.repeats if cell.concurrency == 1 else grid.requests


@dataclasses.dataclass(frozen=True)
class Request:
    """Request `number` of a cell: its examples (each with its task) and their padded tensors."""

    number: int
    rows: list[dict]
    batch: Batch
    kind: str = CLASSIFY


Send = Callable[[Request], object]  # performs one request, returns when the answer is there


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every engine is sent: the interleaved request stream, padded for `device` (on the
    left for generation, where new tokens follow every prompt's last one)."""

    pool: list[dict]
    pad_token_id: int
    input_names: tuple[str, ...]
    warmup: int
    device: torch.device | str = "cpu"
    kind: str = CLASSIFY

    def requests(self, cell: Cell, first: int, count: int) -> dict[int, Request]:
        """Requests `first`..count-1 of `cell` (first < 0: warm-up)."""
        length = None if cell.seq_len == "natural" else int(cell.seq_len)
        out = {}
        for k in range(first, count):
            rows = request_rows(self.pool, cell.size, (self.warmup + k) * cell.size)
            batch = pad_batch(rows, self.pad_token_id, self.input_names, length, left=self.kind == GENERATE)
            batch = batch.to(self.device)
            out[k] = Request(k, rows, batch, self.kind)
        return out


@dataclasses.dataclass
class Measured:
    """One strategy in one cell on one engine: its timed requests, their tokens, the turns they
    went in, the engine's memory for it, its overheads (`overheads`) and what each timed request
    answered (by request number)."""

    engine: str
    strategy: str
    cell: Cell
    taken: Taken
    padded_tokens: np.ndarray
    real_tokens: np.ndarray
    turns: list[range]
    memory: dict = dataclasses.field(default_factory=dict)
    overheads: dict = dataclasses.field(default_factory=dict)
    answers: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        """Latency percentiles (numpy's linear interpolation) over the timed requests; throughput
        over the turns' steady states (load.closed_loop); tokens/s at the cell's mean tokens a
        request, every padded position (tokens_per_s) or the attention-mask ones (real_)."""
        latencies, per_s, n = self.taken.latencies_ms, self.taken.requests_per_s, len(self.taken.latencies_ms)
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        return {
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
            "mean_ms": latencies.mean(),
            "requests": n,
            "requests_per_s": per_s,
            "examples_per_s": per_s * self.cell.size,
            "tokens_per_s": per_s * self.padded_tokens.mean(),
            "real_tokens_per_s": per_s * self.real_tokens.mean(),
            "mean_padded_length": self.padded_tokens.sum() / (self.cell.size * n),
            "max_in_flight": self.taken.max_in_flight,
        }


def measure(
    engine: str, sends: dict[str, Send], workload: Workload, cell: Cell, grid: DeployGridConfig, turns: Turns
) -> list[Measured]:
    """Every strategy of `sends` in one cell, taking turns (load.take_turns) on the same requests."""
    n = timed_requests(grid, cell)
    split = turns_of(n, cell.concurrency, turns, grid.rounds)
    first = turns.first_warmup(cell.concurrency, grid.warmup)
    stream = workload.requests(cell, -first, n)
    answers: dict[str, dict] = {s: {} for s in sends}

    def performer(strategy: str, send: Send) -> Callable[[int], object]:
        def perform(k: int) -> None:
            answer = send(stream[k])
            if k >= 0:
                answers[strategy][k] = answer

        return perform

    taken = take_turns({s: performer(s, send) for s, send in sends.items()}, split, cell.concurrency, first, turns)
    padded = np.array([stream[k].batch.padded_tokens for k in range(n)])
    real = np.array([stream[k].batch.real_tokens for k in range(n)])
    out = [Measured(engine, s, cell, taken[s], padded, real, split, answers=answers[s]) for s in sends]
    say(
        f"{engine} concurrency {cell.concurrency}, batch {cell.size}, seq_len {cell.seq_len}: p50 "
        + ", ".join(f"{m.strategy} {np.median(m.taken.latencies_ms):.2f} ms" for m in out)
    )
    return out


def sequential(engine: str, cell: Cell, times: dict[str, np.ndarray], padded, real) -> list[Measured]:
    """Measurements of one-client cells from per-request times alone (one request a turn, the
    steady state their sum): for tables written from recorded or synthetic times."""
    out = []
    for strategy, ms in times.items():
        ms = np.asarray(ms, dtype=float)
        taken = Taken(ms, len(ms), ms.sum() / 1e3, 1)
        turns = [range(i, i + 1) for i in range(len(ms))]
        out.append(Measured(engine, strategy, cell, taken, np.asarray(padded), np.asarray(real), turns))
    return out


def overheads(
    measured: list[Measured],
    bootstrap: int,
    value: Callable[[Measured], np.ndarray] = lambda m: m.taken.latencies_ms,
    prefix: str = "overhead",
) -> None:
    """Every strategy over `full` and over `merged` of the same engine and cell: the median of
    per-request ratios of `value` (latency; generation: time per output token; request k carried
    the same inputs under both), with a bootstrap
    interval that resamples whole turns (a turn's requests shared a queue and a spell of the
    machine; at one client on PEFT a turn is one request). See stats.median_paired_ratio. A
    further adapter method's strategies are compared with `full` and with its own `merged`."""
    by_cell = {(m.engine, m.cell, m.strategy): m for m in measured}
    for m in measured:
        method = split_served(m.strategy)[1]
        for ref in REFERENCES:
            other = by_cell.get((m.engine, m.cell, served_name(ref, method if ref == "merged" else None)))
            if other is None:
                continue
            values = stats.median_paired_ratio(value(m), value(other), bootstrap, blocks=m.turns)
            keys = (f"{prefix}_vs_{ref}", f"{prefix}_vs_{ref}_ci_low", f"{prefix}_vs_{ref}_ci_high")
            m.overheads.update(zip(keys, values))


# -- tables ---------------------------------------------------------------------------------------


def strategy_order(names) -> list[str]:
    known = [*STRATEGIES, "merged_compiled", "separate_compiled"]
    return sorted(dict.fromkeys(names), key=lambda s: known.index(s) if s in known else len(known))


def deployment_table(
    measured: list[Measured],
    strategies: list[str],
    skipped: dict[str, str],
    cfg: DeployConfig,
    threads: int,
    device: str,
    names: tuple[str, str] = ("", ""),
) -> pd.DataFrame:
    """PEFT's one-client cells: one row per served strategy (see served_name; `names` as in
    split_served) x batch size x seq_len; skipped strategies keep their rows with the reason in
    `note`."""
    found = {(m.strategy, m.cell): m for m in measured if m.engine == "peft" and m.cell.concurrency == 1}
    rows = []
    for strategy in strategies:
        for seq_len in cfg.grid.seq_lens:
            for size in cfg.grid.batch_sizes:
                row = {
                    **dict(zip(("strategy", "method"), split_served(strategy, names))),
                    "batch_size": size,
                    "seq_len": str(seq_len),
                    "threads": threads,
                    "repeats": cfg.grid.repeats,
                    "warmup": cfg.grid.warmup,
                    "device": device,
                }
                m = found.get((strategy, Cell(1, size, seq_len)))
                if m is None:
                    rows.append(row | {"status": "skipped", "note": skipped.get(strategy, "not measured")})
                    continue
                row |= m.summary() | {"status": "ok", "note": ""}
                o = m.overheads
                row |= {
                    "overhead_vs_full": o.get("overhead_vs_full"),
                    "overhead_ci_low": o.get("overhead_vs_full_ci_low"),
                    "overhead_ci_high": o.get("overhead_vs_full_ci_high"),
                    **{k: o.get(k) for k in DEPLOYMENT.columns if k.startswith("overhead_vs_merged")},
                }
                rows.append(row)
    return pd.DataFrame(rows).reindex(columns=DEPLOYMENT.columns)


def times_table(measured: list[Measured], names: tuple[str, str] = ("", "")) -> pd.DataFrame:
    """Every timed request of PEFT's one-client cells (long format), so any statistic can be
    recomputed from the raw data."""
    rows = [
        {
            **dict(zip(("strategy", "method"), split_served(m.strategy, names))),
            "batch_size": m.cell.size,
            "seq_len": str(m.cell.seq_len),
            "repetition": r,
            "ms": v,
            "padded_tokens": m.padded_tokens[r],
            "real_tokens": m.real_tokens[r],
        }
        for m in measured
        if m.engine == "peft" and m.cell.concurrency == 1
        for r, v in enumerate(m.taken.latencies_ms)
    ]
    return DEPLOYMENT_TIMES.frame(pd.DataFrame(rows, columns=DEPLOYMENT_TIMES.columns))


def not_measured(
    engine: str, strategy: str, where: list[Cell], status: str, note: str, device: str, method: str = ""
) -> list[dict]:
    """Rows of the engines table for a strategy an engine did not time, with the reason."""
    return [
        {
            "engine": engine,
            "strategy": strategy,
            "method": method,
            "concurrency": c.concurrency,
            "batch_size": c.size,
            "requests": 0,
            "device": device,
            "status": status,
            "note": note,
        }
        for c in where
    ]


def engine_cells(grid: DeployGridConfig) -> list[Cell]:
    """The cells of the engines table: every natural-length cell."""
    return [c for c in cells(grid) if c.seq_len == "natural"]


def engines_table(
    measured: list[Measured], extra: list[dict], device: str, names: tuple[str, str] = ("", "")
) -> pd.DataFrame:
    """Every engine's natural-length cells; tokens_per_s counts real tokens (vLLM pads nothing)."""
    rows = []  # measured first: the first adapter method's strategies precede further methods' rows
    for m in measured:
        if m.cell.seq_len != "natural":
            continue
        summary = m.summary()
        rows.append(
            {
                "engine": m.engine,
                **dict(zip(("strategy", "method"), split_served(m.strategy, names))),
                "concurrency": m.cell.concurrency,
                "batch_size": m.cell.size,
                **{k: summary[k] for k in ("requests", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "requests_per_s")},
                "examples_per_s": summary["examples_per_s"],
                "tokens_per_s": summary["real_tokens_per_s"],
                "max_in_flight": summary["max_in_flight"],
                **m.memory,
                **m.overheads,
                "device": device,
                "status": "ok",
                "note": "",
            }
        )
    rows += [r | {"method": r.get("method") or split_served(r["strategy"], names)[1]} for r in extra]
    table = pd.DataFrame(rows).reindex(columns=DEPLOYMENT_ENGINES.columns)
    return DEPLOYMENT_ENGINES.frame(in_strategy_order(table, "batch_size"))


def in_strategy_order(table: pd.DataFrame, size: str) -> pd.DataFrame:
    """Rows by engine, strategy (in the config's order), request size (column `size`), clients."""
    order = {s: i for i, s in enumerate(strategy_order(table["strategy"]))}
    methods = {m: i for i, m in enumerate(dict.fromkeys(table["method"]))} if "method" in table else {}
    table = table.sort_values(
        ["engine", "strategy", *(["method"] if methods else []), size, "concurrency"],
        key=lambda c: c.map(order) if c.name == "strategy" else c.map(methods) if c.name == "method" else c,
        kind="stable",
    )
    return table.reset_index(drop=True)
