"""Report section on serving cost: PEFT's latency per strategy, batch size and length at one
client, overhead against full fine-tuning, the correctness checks run before timing, and memory
(deployment*.csv); then every engine's natural-length cells side by side, PEFT in-process and
vLLM (deployment_engine*.csv). docs/serving.md says what each number means."""

from __future__ import annotations

import pandas as pd

from lorascope.report import format as fmt
from lorascope.report.document import Document
from lorascope.report.figures import ENGINE_LABELS, engines_figure, finite, latency_figure, memory_figure, ordered
from lorascope.report.loader import StudyView
from lorascope.serving.grid import DEPLOYMENT_ENGINES, strategy_order
from lorascope.serving.vllm_engine import ENGINE_CHECKS, ENGINE_VERSIONS

STRATEGY_ORDER = ("full", "merged", "separate", "switch", "multi", "base")


def _overhead(row, key: str = "overhead_vs_full", low: str = "overhead_ci_low", high: str = "overhead_ci_high") -> str:
    if row is None or not finite(row.get(key)):
        return "—"
    text = f"{100 * (row[key] - 1):+.1f}"
    if finite(row.get(low)) and finite(row.get(high)):
        text += f" [{100 * (row[low] - 1):+.1f}, {100 * (row[high] - 1):+.1f}]"
    return text


def _grid(doc: Document, dep: pd.DataFrame) -> None:
    strategies = ordered(dep["strategy"].astype(str), STRATEGY_ORDER)
    batches = sorted(dep["batch_size"].dropna().astype(int).unique())
    for seq_len in ordered(dep["seq_len"], ("natural",)):
        part = dep[dep["seq_len"] == seq_len]
        latency, overhead = [], []
        for strategy in strategies:
            cells = [part[(part["strategy"] == strategy) & (part["batch_size"] == b)] for b in batches]
            first = [c.iloc[0] if not c.empty else None for c in cells]
            latency.append(
                [strategy]
                + [fmt.num(r["p50_ms"], 2) if r is not None else "—" for r in first]
                + [fmt.num(first[-1]["examples_per_s"], 1) if first[-1] is not None else "—"]
            )
            if not strategy.startswith("full"):
                overhead.append([strategy] + [_overhead(r) for r in first])
        doc.heading(3, f"Sequence length {seq_len}")
        doc.table(
            ["median latency per batch (ms)"]
            + [f"batch {b}" for b in batches]
            + [f"examples/s at batch {batches[-1]}"],
            latency,
        )
        if overhead:
            doc.table(["overhead vs full FT (%, interval)"] + [f"batch {b}" for b in batches], overhead)


def split_methods(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of full FT and of the first adapter method, rows of further adapter methods): the
    grid lists the first adapter method's strategies before any further method's."""
    if "method" not in table:
        return table, table.iloc[:0]
    methods = table["method"].fillna("")
    adapters = methods[(table["strategy"] != "full") & (table["status"] == "ok")]
    main = (table["strategy"] == "full") | (methods == (adapters.iloc[0] if len(adapters) else ""))
    return table[main], table[~main]


def _further_methods(doc: Document, further: pd.DataFrame) -> None:
    """Each further adapter method merged and separate, timed in the same turns as the others."""
    batches = sorted(further["batch_size"].dropna().astype(int).unique())
    for seq_len in ordered(further["seq_len"], ("natural",)):
        part = further[further["seq_len"] == seq_len]
        rows = []
        for (method, strategy), group in part.groupby(["method", "strategy"], sort=False):
            cells = [group[group["batch_size"] == b] for b in batches]
            first = [c.iloc[0] if not c.empty else None for c in cells]
            rows.append(
                [str(method), strategy]
                + [fmt.num(r["p50_ms"], 2) if r is not None else "—" for r in first]
                + [_overhead(r) for r in first]
                + [
                    _overhead(r, "overhead_vs_merged", "overhead_vs_merged_ci_low", "overhead_vs_merged_ci_high")
                    if r is not None and strategy == "separate"
                    else ""
                    for r in first
                ]
            )
        doc.table(
            ["method", "strategy"]
            + [f"p50 ms, batch {b}" for b in batches]
            + [f"vs full FT (%), batch {b}" for b in batches]
            + [f"separate vs its merged (%), batch {b}" for b in batches],
            rows,
        )
        doc.para(
            f"Further adapter methods of the study at sequence length {seq_len}: each one's adapter of the "
            "first task, merged into the base and kept separate, timed in the same turns as the strategies "
            "above (PEFT in-process, one client).",
            css="note",
        )


def _plain_table(headers, rows) -> str:
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def deployment_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Deployment cost")
    dep, checks, memory = (view.tables[name] for name in ("deployment", "deployment_checks", "deployment_memory"))
    if dep is None:
        doc.not_run(view.why["deployment"])
    else:
        dep, further = split_methods(dep.assign(seq_len=dep["seq_len"].astype(str)))
        doc.figure(
            view.save(latency_figure(dep), "deployment_latency"),
            "Median latency per batch against batch size, one panel per sequence "
            "length (band: median to p95; log–log). LoRA strategies in LoRA's colour (hollow markers: "
            "torch.compile variants), full FT in full FT's; the merged adapter should sit on the full-FT "
            "line.",
        )
        _grid(doc, dep)
        doc.para(
            "Overhead: latency relative to full fine-tuning at the same batch size and length, minus 1, with "
            "its bootstrap interval in brackets. Strategies: full = fully fine-tuned model; merged = LoRA merged "
            "into the base weights; separate = LoRA kept as an adapter; switch = every adapter loaded on one "
            "base, set_adapter between requests; multi = one batch holding examples of several adapters on one "
            "base; base = the untouched base model. PEFT in-process, one client, sequential requests; "
            "strategies take turns request by request on the same requests.",
            css="note",
        )
        if not further.empty:
            doc.heading(3, "Every adapter method, merged and separate")
            _further_methods(doc, further)
        cols = list(dep.columns)
        doc.details(
            f"all {len(dep)} rows of tables/deployment.csv",
            _plain_table(cols, [[fmt.cell(r[c]) for c in cols] for _, r in dep.iterrows()]),
        )
    doc.heading(3, "Correctness checks (before timing)")
    if checks is None:
        doc.not_run(view.why["deployment_checks"])
    else:
        _checks_table(doc, checks)
    doc.heading(3, "Memory")
    if memory is None:
        doc.not_run(view.why["deployment_memory"])
    else:
        doc.figure(
            view.save(memory_figure(memory), "deployment_memory"),
            "PEFT, per strategy: memory after loading with the extra peak during inference stacked on it, "
            "measured in a fresh process per strategy serving its largest requests, size on disk of the "
            "weights it reads, and load time.",
        )
        doc.table(list(memory.columns), [[fmt.cell(v) for v in r] for r in memory.itertuples(index=False)])
    engines_section(doc, view)


def _checks_table(doc: Document, checks: pd.DataFrame) -> None:
    passed = list(checks.columns).index("passed")
    rows = []
    for r in checks.itertuples(index=False):
        cells = [fmt.cell(v) for v in r]
        cells[passed] = ("passed", "met") if fmt.truthy(r[passed]) else ("FAILED", "notmet")
        rows.append(cells)
    doc.table(list(checks.columns), rows)


def _engine_cells(doc: Document, ok: pd.DataFrame, key: str, title: str, cell) -> None:
    """One row per engine and strategy, one column per value of `key` (the other of concurrency /
    batch size held at 1)."""
    other = "batch_size" if key == "concurrency" else "concurrency"
    part = ok[ok[other] == 1]
    values = sorted(part[key].astype(int).unique())
    rows = []
    for engine in ordered(part["engine"].astype(str), tuple(ENGINE_LABELS)):
        for strategy in strategy_order(part.loc[part["engine"] == engine, "strategy"].astype(str)):
            mine = part[(part["engine"] == engine) & (part["strategy"] == strategy)]
            found = [mine[mine[key] == v] for v in values]
            rows.append(
                [ENGINE_LABELS.get(engine, engine), strategy] + [cell(f.iloc[0]) if not f.empty else "—" for f in found]
            )
    doc.table([title, "strategy"] + [f"{key.replace('_', ' ')} {v}" for v in values], rows)


def engines_section(doc: Document, view: StudyView) -> None:
    """Every engine on the same cells, requests and load generator (serving.grid, serving.load)."""
    doc.heading(3, "Engines: PEFT in-process and vLLM")
    grid, checks, versions = (t.read(view.study.tables) for t in (DEPLOYMENT_ENGINES, ENGINE_CHECKS, ENGINE_VERSIONS))
    if grid is None:
        doc.not_run("no engine was measured at natural length")
        return
    grid, further = split_methods(grid)
    if set(grid["engine"]) == {"peft"}:
        doc.para(
            "Only PEFT in-process was measured; add vllm to deploy.engines (after `make vllm`) for the engine "
            "comparison, and clients to deploy.grid.concurrency for the load cells.",
            css="note",
        )
    ok = grid[grid["status"] == "ok"]
    if ok["batch_size"].eq(1).any():
        doc.figure(
            view.save(engines_figure(grid), "deployment_engines"),
            "Per engine: latency of one-example requests against concurrent clients (line = p50, thick "
            "whisker to p95, thin to p99) and throughput; same strategies, requests and load generator.",
        )
    _engine_cells(
        doc,
        ok,
        "concurrency",
        "p50 / p95 / p99 ms, one example per request",
        lambda r: f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f} / {r['p99_ms']:.1f} ({r['examples_per_s']:.0f}/s)",
    )
    _engine_cells(
        doc,
        ok,
        "batch_size",
        "p50 ms (examples/s), batched requests at concurrency 1",
        lambda r: f"{r['p50_ms']:.1f} ({r['examples_per_s']:.0f}/s)",
    )
    adapters = ok[~ok["strategy"].isin(["full", "merged"])]
    if adapters["overhead_vs_merged"].notna().any():
        _engine_cells(
            doc,
            adapters,
            "concurrency",
            "over merged (%, interval)",
            lambda r: _overhead(r, "overhead_vs_merged", "overhead_vs_merged_ci_low", "overhead_vs_merged_ci_high"),
        )
    lora_on_cpu = ok[(ok["engine"] == "vllm") & ok["strategy"].isin(["separate", "multi"]) & (ok["device"] == "cpu")]
    if not lora_on_cpu.empty:
        doc.para(
            "vLLM on CPU serves a server with LoRA enabled without torch.compile (its CPU platform turns "
            "compilation off), while full and merged folders are compiled: vLLM's separate over merged "
            "includes that gain (docs/benchmarks.md measures it apart). The LoRA server wraps only "
            "the modules the adapters train (--lora-target-modules).",
            css="note",
        )
    gpu = "server_gpu_mb" in ok and ok["server_gpu_mb"].notna().any()
    memory = ok.groupby(["engine", "strategy"], sort=False)[["server_rss_mb", *(["server_gpu_mb"] if gpu else [])]]
    doc.table(
        ["engine", "strategy", "resident memory of the serving process (MiB)", *(["GPU memory (MiB)"] if gpu else [])],
        [
            [ENGINE_LABELS.get(engine, engine), strategy, *(fmt.num(v, 0) for v in row)]
            for (engine, strategy), row in memory.max().iterrows()
        ],
    )
    missing = grid[grid["status"] != "ok"].drop_duplicates(["engine", "strategy"])
    for r in missing.itertuples():
        doc.para(f"{ENGINE_LABELS.get(r.engine, r.engine)} {r.strategy}: {r.status} — {r.note}", css="note")
    for r in further[further["status"] != "ok"].drop_duplicates(["engine", "method"]).itertuples():
        doc.para(f"{ENGINE_LABELS.get(r.engine, r.engine)}, {r.method}: {r.status} — {r.note}", css="note")
    requests = sorted(ok["requests"].dropna().astype(int).unique())
    doc.para(
        f"Each cell: {', '.join(map(str, requests)) or '—'} timed requests after warm-up, so p99 is "
        "interpolated below the slowest requests. Closed loop: each client sends its next request when its "
        "previous answer arrived; every strategy of an engine takes turns on the same requests (the "
        "interleaved eval examples of every task). PEFT at concurrency C: C clients share one in-process model "
        "that serves one request at a time (a single-worker server without batching; latency includes the "
        "queue); vLLM batches concurrent requests itself, over HTTP with the token ids PEFT uses, in float32. "
        "Over merged: median of per-request latency ratios (request i carries the same inputs under both), "
        "bootstrap interval over turns. Memory of PEFT: peak resident set of a fresh process serving only that "
        "strategy (deployment_memory.csv); of vLLM: resident set of its server's process tree after each cell "
        "(pages shared between processes counted in each), the largest shown.",
        css="note",
    )
    if versions is not None:
        doc.table(
            ["engine", "package", "version"], [[fmt.cell(v) for v in r] for r in versions.itertuples(index=False)]
        )
    doc.heading(4, "Engine correctness (vLLM probabilities vs PEFT, before timing)")
    if checks is None:
        doc.not_run("no vLLM strategy was served")
    else:
        _checks_table(doc, checks)
