"""Report section on serving cost: latency per strategy, batch size and length, overhead against
full fine-tuning, the correctness checks run before timing, and memory (deployment*.csv)."""

from __future__ import annotations

import pandas as pd

from lorascope.report import format as fmt
from lorascope.report.document import Document
from lorascope.report.figures import finite, latency_figure, memory_figure, ordered
from lorascope.report.loader import StudyView

STRATEGY_ORDER = ("full", "merged", "separate", "switch", "mixed", "base")


def _overhead(row) -> str:
    if row is None or not finite(row.get("overhead_vs_full")):
        return "—"
    text = f"{100 * (row['overhead_vs_full'] - 1):+.1f}"
    if finite(row.get("overhead_ci_low")) and finite(row.get("overhead_ci_high")):
        text += f" [{100 * (row['overhead_ci_low'] - 1):+.1f}, {100 * (row['overhead_ci_high'] - 1):+.1f}]"
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
            latency.append([strategy] + [fmt.num(r["p50_ms"], 2) if r is not None else "—" for r in first]
                           + [fmt.num(first[-1]["examples_per_s"], 1) if first[-1] is not None else "—"])  # fmt: skip
            if not strategy.startswith("full"):
                overhead.append([strategy] + [_overhead(r) for r in first])
        doc.heading(3, f"Sequence length {seq_len}")
        doc.table(["median latency per batch (ms)"] + [f"batch {b}" for b in batches]
                  + [f"examples/s at batch {batches[-1]}"], latency)  # fmt: skip
        if overhead:
            doc.table(["overhead vs full FT (%, interval)"] + [f"batch {b}" for b in batches], overhead)


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
        dep = dep.assign(seq_len=dep["seq_len"].astype(str))
        doc.figure(view.save(latency_figure(dep), "deployment_latency"),
                   "Median latency per batch against batch size, one panel per sequence "
                   "length (band: median to p95; log–log). LoRA strategies in LoRA's colour (hollow markers: "
                   "torch.compile variants), full FT in full FT's; the merged adapter should sit on the full-FT "
                   "line.")  # fmt: skip
        _grid(doc, dep)
        doc.para("Overhead: latency relative to full fine-tuning at the same batch size and length, minus 1, with "
                 "its bootstrap interval in brackets. Strategies: full = fully fine-tuned model; merged = LoRA merged "
                 "into the base weights; separate = LoRA kept as an adapter; switch = switching adapters between "
                 "batches; mixed = several adapters served in one batch from one base; base = the untouched base "
                 "model.", css="note")  # fmt: skip
        cols = list(dep.columns)
        doc.details(f"all {len(dep)} rows of tables/deployment.csv",
                    _plain_table(cols, [[fmt.cell(r[c]) for c in cols] for _, r in dep.iterrows()]))  # fmt: skip
    doc.heading(3, "Correctness checks (before timing)")
    if checks is None:
        doc.not_run(view.why["deployment_checks"])
    else:
        passed = list(checks.columns).index("passed")
        rows = []
        for r in checks.itertuples(index=False):
            cells = [fmt.cell(v) for v in r]
            cells[passed] = ("passed", "met") if fmt.truthy(r[passed]) else ("FAILED", "notmet")
            rows.append(cells)
        doc.table(list(checks.columns), rows)
    doc.heading(3, "Memory")
    if memory is None:
        doc.not_run(view.why["deployment_memory"])
    else:
        doc.figure(view.save(memory_figure(memory), "deployment_memory"),
                   "Per strategy: memory after loading with the extra peak during inference stacked on it (a fresh "
                   "process per strategy), size on disk of the weights it reads, and load time.")  # fmt: skip
        doc.table(list(memory.columns), [[fmt.cell(v) for v in r] for r in memory.itertuples(index=False)])
