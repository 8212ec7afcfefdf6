"""Report section on serving generation (deployment_generation.csv, serving.generation_grid):
output tokens/s against concurrency per engine and strategy, time to first token and time per
output token, what separate and multi cost over merged, memory, and the cells not timed. Shown
only for studies that served a generative task; every number is read from the table."""

from __future__ import annotations

import pandas as pd

from lorascope.report import format as fmt
from lorascope.report.document import Document
from lorascope.report.figures import (
    ENGINE_LABELS,
    GENERATION_STRATEGIES,
    finite,
    generation_latency_figure,
    generation_throughput_figure,
    ordered,
)
from lorascope.report.loader import StudyView

ADAPTERS = ("separate", "multi")  # what the overhead table sets against merged


def _label(engine: str) -> str:
    return ENGINE_LABELS.get(engine, engine)


def _pairs(rows: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(engine, strategy, its rows) in the report's engine and strategy order."""
    return [
        (engine, strategy, rows[(rows["engine"] == engine) & (rows["strategy"] == strategy)])
        for engine in ordered(rows["engine"].astype(str), tuple(ENGINE_LABELS))
        for strategy in ordered(rows.loc[rows["engine"] == engine, "strategy"].astype(str), GENERATION_STRATEGIES)
    ]


def _at(rows: pd.DataFrame, concurrency: int) -> pd.Series | None:
    found = rows[rows["concurrency"] == concurrency]
    return found.iloc[0] if not found.empty else None


def _top(rows: pd.DataFrame, engine: str) -> int:
    """An engine's highest concurrency: where batching, or queueing without it, shows most."""
    return int(rows.loc[rows["engine"] == engine, "concurrency"].max())


def _percentiles(r: pd.Series | None, name: str) -> str:
    if r is None:
        return "—"
    return f"{fmt.num(r[f'{name}_p50_ms'], 1)} ({fmt.num(r[f'{name}_p95_ms'], 1)} / {fmt.num(r[f'{name}_p99_ms'], 1)})"


def _over(r: pd.Series | None, key: str) -> str:
    """A stored ratio as percent over its reference, with its bootstrap interval when there is one."""
    if r is None or not finite(r[key]):
        return "—"
    text = f"{100 * (r[key] - 1):+.1f}"
    if finite(r[f"{key}_ci_low"]) and finite(r[f"{key}_ci_high"]):
        text += f" [{100 * (r[f'{key}_ci_low'] - 1):+.1f}, {100 * (r[f'{key}_ci_high'] - 1):+.1f}]"
    return text


def _throughput(doc: Document, single: pd.DataFrame) -> None:
    """(a) One table per engine: output tokens/s per strategy and number of clients."""
    for engine in ordered(single["engine"].astype(str), tuple(ENGINE_LABELS)):
        mine = single[single["engine"] == engine]
        clients = sorted(mine["concurrency"].astype(int).unique())
        rows = []
        for _, strategy, cells in _pairs(mine):
            found = [_at(cells, c) for c in clients]
            rows.append([strategy, *(fmt.num(r["output_tokens_per_s"], 1) if r is not None else "—" for r in found)])
        doc.table([f"{_label(engine)}: output tokens/s", *(f"concurrency {c}" for c in clients)], rows)


def _latency(doc: Document, single: pd.DataFrame) -> None:
    """(b) TTFT and TPOT percentiles at one client and at each engine's highest concurrency."""
    rows = []
    for engine, strategy, mine in _pairs(single):
        for clients in sorted({1, _top(single, engine)}):
            r = _at(mine, clients)
            rows.append([_label(engine), strategy, str(clients), _percentiles(r, "ttft"), _percentiles(r, "tpot")])
    doc.table(["engine", "strategy", "clients", "TTFT ms: p50 (p95 / p99)", "TPOT ms: p50 (p95 / p99)"], rows)


def _overheads(doc: Document, single: pd.DataFrame) -> None:
    """(c) Separate and multi over merged: time per output token with its interval at one client
    and at the highest concurrency, and output tokens/s there."""
    rows = []
    for engine, strategy, mine in _pairs(single[single["strategy"].isin(ADAPTERS)]):
        top = _top(single, engine)
        high = _at(mine, top)
        ratio = fmt.num(high["tokens_per_s_vs_merged"], 3) if high is not None else "—"
        rows.append(
            [
                _label(engine),
                strategy,
                _over(_at(mine, 1), "tpot_overhead_vs_merged"),
                str(top),
                _over(high, "tpot_overhead_vs_merged"),
                ratio,
            ]
        )
    if rows:
        doc.table(
            [
                "engine",
                "strategy",
                "TPOT over merged, 1 client (%, interval)",
                "highest concurrency",
                "TPOT over merged there (%, interval)",
                "output tokens/s / merged there",
            ],
            rows,
        )


def _memory(doc: Document, ok: pd.DataFrame) -> None:
    """(d) The serving process's resident memory, and vLLM's GPU memory, the largest over cells;
    strategies whose engine recorded neither are left out."""
    columns = ["server_rss_mb", *(["server_gpu_mb"] if ok["server_gpu_mb"].notna().any() else [])]
    rows = [
        [_label(engine), strategy, *(fmt.num(rows[c].max(), 0) for c in columns)]
        for engine, strategy, rows in _pairs(ok)
        if rows[columns].notna().any(axis=None)
    ]
    if rows:
        doc.table(
            ["engine", "strategy", "resident memory of the serving process (MiB, largest over cells)"]
            + ["GPU memory (MiB)"] * (len(columns) - 1),
            rows,
        )


def _not_ok(doc: Document, table: pd.DataFrame) -> None:
    """(e) The strategies an engine did not time, or whose check failed, with the reason."""
    missing = table[table["status"] != "ok"].drop_duplicates(["engine", "strategy", "status", "note"])
    if not missing.empty:
        doc.table(
            ["engine", "strategy", "status", "note"],
            [[_label(r.engine), r.strategy, r.status, fmt.cell(r.note)] for r in missing.itertuples()],
        )


def _workload(table: pd.DataFrame) -> str:
    """(f) What was sent: the prompts' lengths, the fixed output length, and how each engine batches."""
    prompts = table[["prompt_tokens_mean", "prompt_tokens_p50", "prompt_tokens_p95"]].dropna()
    lengths = (
        f"Prompts are {prompts.iloc[0, 0]:.1f} tokens long on average (median {prompts.iloc[0, 1]:.0f}, "
        f"p95 {prompts.iloc[0, 2]:.0f}); "
        if not prompts.empty
        else ""
    )
    outputs = ", ".join(str(int(n)) for n in sorted(table["output_tokens"].dropna().unique())) or "—"
    batching = "; ".join(
        f"{_label(engine)}: {text}" for engine, text in table.drop_duplicates("engine")[["engine", "batching"]].values
    )
    return (
        f"{lengths}every request generates exactly {outputs} tokens per prompt, greedy, ignoring end-of-sequence, "
        "so every strategy decodes the same number of tokens and its time per token compares directly. "
        f"Batching: {batching}."
    )


def generation_section(doc: Document, view: StudyView) -> None:
    table = view.tables["deployment_generation"]
    if table is None:  # no generative task was served: nothing to say
        return
    doc.heading(2, "Generation serving")
    ok = table[table["status"] == "ok"]
    single = ok[ok["prompts"] == 1]
    doc.para(_workload(table), css="note")
    if single.empty:
        doc.not_run("no cell of one prompt per request was timed")
    else:
        doc.figure(
            view.save(generation_throughput_figure(table), "generation_throughput"),
            "Output tokens/s in steady state against concurrent clients (closed loop, one prompt per request), one "
            "line per engine and strategy; vLLM filled markers, PEFT hollow.",
        )
        doc.figure(
            view.save(generation_latency_figure(table), "generation_latency"),
            "At one client: time to first token (from sending the request, queueing included) and time per "
            "output token after the first; bar = p50, thick whisker to p95, thin to p99.",
        )
        _throughput(doc, single)
        _latency(doc, single)
        _overheads(doc, single)
        doc.para(
            "TPOT over merged: median over requests of the ratio of their times per output token (request k "
            "carried the same prompt under both) minus 1, bootstrap interval over turns. Output tokens/s / "
            "merged: steady-state throughput ratio in the same cell.",
            css="note",
        )
    _memory(doc, ok)
    _not_ok(doc, table)
    doc.details(
        f"all {len(table)} rows of tables/deployment_generation.csv",
        table.map(fmt.cell).to_string(index=False),
    )
