"""Report section on what training cost (tables/performance.csv, one row per run): per task, each
method's median over its finished runs of training time, throughput, peak memory, optimizer state
and saved size, and LoRA's median over full FT's. Medians, the one aggregation done here, because
a busy machine gives the odd slow run."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lorascope.footprint import MB
from lorascope.report import format as fmt
from lorascope.report.document import Document
from lorascope.report.figures import finite, legend, method_color, method_label, panel_grid, plain_ticks
from lorascope.report.loader import StudyView

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COSTS = (  # performance.csv column, what the report calls it, divisor to its unit
    ("train_seconds", "training time (s)", 1),
    ("train_tokens_per_second", "training tokens / s", 1),
    ("peak_rss_added_bytes", "peak resident memory added by training (MB)", MB),
    ("peak_rss_bytes", "peak resident memory of the process (MB)", MB),
    ("cuda_max_allocated_bytes", "peak CUDA memory allocated (MB)", MB),
    ("cuda_max_reserved_bytes", "peak CUDA memory reserved (MB)", MB),
    ("optimizer_state_bytes", "optimizer state (MB)", MB),
    ("artifact_bytes", "saved weights (MB)", MB),
)
METHODS = ("lora", "full")


def cost_medians(performance: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """One row per task and recorded cost: the medians of LoRA and full FT over finished runs, in
    the cost's unit, their ratio, and how many runs each median is of."""
    finished = performance[performance["status"] == "ok"]
    rows = []
    for task in tasks:
        runs = finished[finished["task"] == task]
        for column, cost, unit in COSTS:
            if column not in runs:
                continue
            values = {
                m: pd.to_numeric(runs.loc[runs["method"] == m, column], errors="coerce").dropna() for m in METHODS
            }
            if all(v.empty for v in values.values()):
                continue
            lora, full = (values[m].median() / unit if len(values[m]) else math.nan for m in METHODS)
            rows.append(
                {
                    "task": task,
                    "cost": cost,
                    "lora": lora,
                    "full": full,
                    "ratio": lora / full if finite(lora) and finite(full) and full else math.nan,
                    "n_lora": len(values["lora"]),
                    "n_full": len(values["full"]),
                }
            )
    return pd.DataFrame(rows, columns=["task", "cost", "lora", "full", "ratio", "n_lora", "n_full"])


def cost_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Training cost")
    performance = view.tables["performance"]
    if performance is None:
        doc.not_run(view.why["performance"])
        return
    medians = cost_medians(performance, view.tasks(performance))
    if medians.empty:
        doc.not_run("tables/performance.csv has no finished run of LoRA or full FT")
        return
    doc.figure(
        view.save(cost_figure(medians), "training_cost"),
        "Median over seeds of what training one run cost, LoRA beside full FT, per task (log scale); "
        "above each pair LoRA's median over full FT's.",
    )
    doc.table(
        ["task", "cost (median over runs)", "LoRA", "full FT", "LoRA / full FT", "runs LoRA / full FT"],
        [
            [r.task, r.cost, fmt.cell(r.lora), fmt.cell(r.full), fmt.cell(r.ratio), f"{r.n_lora} / {r.n_full}"]
            for r in medians.itertuples()
        ],
    )
    doc.para(
        "Per run (tables/performance.csv): wall-clock training time with its dev evaluations; non-padding "
        "tokens trained on per second of it; the process's peak resident set during training and what "
        "training added to the set it started with; on CUDA the allocator's peaks; the bytes of every "
        "tensor the optimizer keeps (AdamW: two moments per trained weight); the size of the saved "
        "weight files. Finished runs only.",
        css="note",
    )


def cost_figure(medians: pd.DataFrame) -> Figure:
    """One panel per training cost: the median of LoRA and of full FT per task, on a log scale
    (they differ by orders of magnitude), with LoRA / full FT written above each pair."""
    costs = list(dict.fromkeys(medians["cost"]))
    ncols = min(4, len(costs))
    fig, axes = panel_grid(len(costs), ncols, (3.5, 2.9), 0.6)
    handles = []
    for ax, cost in zip(axes.flat, costs):
        rows = medians[medians["cost"] == cost]
        x = np.arange(len(rows))
        for offset, method in ((-0.2, "lora"), (0.2, "full")):
            handles.append(
                ax.bar(x + offset, rows[method], width=0.4, color=method_color(method), label=method_label(method))
            )
        for xi, r in zip(x, rows.itertuples()):
            if finite(r.ratio):
                ax.annotate(
                    f"×{r.ratio:.3g}",
                    (xi, max(r.lora, r.full)),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    fontsize=8,
                )
        ax.set_yscale("log")
        shown = [v for v in (*rows["lora"], *rows["full"]) if finite(v) and v > 0]
        if shown:  # a decade of room below the smallest bar, so bar heights compare
            ax.set_ylim(min(shown) / 10, max(shown) * 3)
        plain_ticks(ax.yaxis)
        ax.set_xticks(x, list(rows["task"]))
        ax.set_title(cost, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(costs) :]:
        ax.set_visible(False)
    legend(fig, handles, ncol=2)
    return fig
