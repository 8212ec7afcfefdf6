"""Report section on the study's methods side by side (tables/methods.csv, the analyze stage):
per task, what each method costs (trainable parameters, training time and memory, saved size)
and what it buys or loses (quality, drift, forgetting, with their intervals over seeds), and the
learn/forget trade-off as one figure: quality against forgetting, one point per method."""

from __future__ import annotations

import pandas as pd

from lorascope.footprint import MB
from lorascope.hparams import LoraMethodConfig
from lorascope.report import format as fmt
from lorascope.report.document import Document
from lorascope.report.figures import finite, legend, method_color, method_label, panel_grid, plain_ticks
from lorascope.report.loader import StudyView


def methods_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Methods")
    table = view.tables["methods"]
    if table is None:
        doc.not_run(view.why["methods"])
        return
    ci = f"{view.confidence:.0%} CI"
    tasks = view.tasks(table)
    for task in tasks:
        rows = table[table["task"] == task]
        doc.heading(3, task)
        doc.table(
            [
                "method",
                "type",
                "runs (flagged)",
                f"{rows['metric'].iloc[0]}, mean [{ci}]",
                "trainable params",
                "training time (s)",
                "memory added (MB)",
                "saved (MB)",
                f"drift, mean [{ci}]",
                f"forgetting (points), mean [{ci}]",
                "separate vs merged latency (%) [interval]",
            ],
            [
                [
                    method_label(r.method),
                    r.type,
                    f"{int(r.runs)} ({int(r.flagged)})",
                    _with_interval(r.quality_mean, r.quality_low, r.quality_high),
                    f"{int(r.trainable_params):,}" if finite(r.trainable_params) else "—",
                    fmt.num(r.train_seconds, 1),
                    fmt.num(r.peak_rss_added_bytes / MB, 0) if finite(r.peak_rss_added_bytes) else "—",
                    fmt.num(r.artifact_bytes / MB, 1) if finite(r.artifact_bytes) else "—",
                    _with_interval(r.drift_mean, r.drift_low, r.drift_high),
                    _with_interval(r.forgetting_pp, r.forgetting_low, r.forgetting_high, 2),
                    _percent(r.separate_over_merged, r.separate_over_merged_low, r.separate_over_merged_high),
                ]
                for r in rows.itertuples()
            ],
        )
        versus = rows[rows["quality_gap_outcome"].notna()]
        if not versus.empty:
            reference = method_label(str(view.config.get("analysis", {}).get("reference", "full")))
            doc.table(
                [
                    f"against {reference}",
                    f"quality: {reference} − method (points) [{ci}]",
                    f"drift reduction [{ci}]",
                    f"forgetting: method − {reference} (points) [{ci}]",
                ],
                [
                    [method_label(r.method)]
                    + [_judged(r, name, digits) for name, digits in (("quality_gap", 2), ("drift_reduction", 3))]
                    + [_judged(r, "forgetting_gap", 2)]
                    for r in versus.itertuples()
                ],
            )
    ranks = sweep_ranks(view.config)
    figure = rank_figure(table, tasks, ranks)
    if figure is not None:
        doc.figure(
            view.save(figure, "methods_rank"),
            f"A rank sweep: quality, drift and forgetting against LoRA's rank (log axis) for the plain LoRA methods "
            f"({', '.join(f'{m} r={r}' for m, r in ranks.items())}), whiskers their {ci} over seeds; the dashed "
            "line is full fine-tuning's mean.",
        )
    figure = tradeoff_figure(table, tasks)
    if figure is not None:
        doc.figure(
            view.save(figure, "methods_tradeoff"),
            f"The learn/forget trade-off: each method's mean quality against its mean forgetting on the "
            f"other probed tasks, whiskers its {ci} over seeds (t-interval); up and left is better.",
        )
    doc.para(
        "Medians over a method's finished runs for the costs; means with t-intervals over seeds for quality, "
        "drift (1 − linear CKA to the base, mean pooling, mean over layers) and forgetting (points of linear-probe "
        "accuracy lost on the probed tasks a run did not train on). Against the reference: the verdict's "
        "criteria and thresholds (analysis.*), each method paired with the reference by seed, over the seed pairs "
        "without a flagged run. Separate vs merged: the deploy stage's latency of the method's adapter kept "
        "separate over the same adapter merged into the base (PEFT, one client, one example a request, "
        "natural length; — where deploy did not run). Methods and their PEFT types: docs/methods.md.",
        css="note",
    )


def _percent(ratio, low, high) -> str:
    """A latency ratio as an overhead in percent, its interval in brackets; — where not served."""
    if not finite(ratio):
        return "—"
    return f"{100 * (ratio - 1):+.1f}" + (f" [{100 * (low - 1):+.1f}, {100 * (high - 1):+.1f}]" if finite(low) else "")


def _judged(row, name: str, digits: int) -> str:
    """A criterion against the reference: value [interval], its outcome, seeds needed if any."""
    needed = getattr(row, f"{name}_seeds_needed")
    value = _with_interval(
        getattr(row, f"{name}_value"), getattr(row, f"{name}_low"), getattr(row, f"{name}_high"), digits
    )
    return f"{value}: {getattr(row, f'{name}_outcome')}" + (f" (seeds needed: {int(needed)})" if finite(needed) else "")


def _with_interval(mean, low, high, digits: int = 4) -> str:
    if not finite(mean):
        return "—"
    return fmt.num(mean, digits) + (f" {fmt.interval(low, high, digits)}" if finite(low) else "")


def tradeoff_figure(table: pd.DataFrame, tasks: list[str]):
    """Quality against forgetting, one point per method and task panel; None without forgetting."""
    tasks = [t for t in tasks if table.loc[table["task"] == t, "forgetting_pp"].notna().any()]
    if not tasks:
        return None
    fig, axes = panel_grid(len(tasks), min(3, len(tasks)), (4.0, 3.2), 0.6)
    handles = []
    for ax, task in zip(axes.flat, tasks):
        rows = table[(table["task"] == task) & table["forgetting_pp"].notna()]
        for r in rows.itertuples():
            x_err = [[r.forgetting_pp - r.forgetting_low], [r.forgetting_high - r.forgetting_pp]]
            y_err = [[r.quality_mean - r.quality_low], [r.quality_high - r.quality_mean]]
            handles.append(
                ax.errorbar(
                    r.forgetting_pp,
                    r.quality_mean,
                    xerr=x_err if finite(r.forgetting_low) else None,
                    yerr=y_err if finite(r.quality_low) else None,
                    fmt="o",
                    color=method_color(r.method),
                    capsize=3,
                    label=method_label(r.method),
                )
            )
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("forgetting (points)")
        ax.set_ylabel(rows["metric"].iloc[0])
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    legend(fig, handles, min(len({h.get_label() for h in handles}), 7))
    return fig


def sweep_ranks(config: dict) -> dict[str, int]:
    """Rank of every plain LoRA method of the study (type lora, no PEFT field but rank, scale
    and dropout: DoRA, rsLoRA or PiSSA are other methods), from its config.yaml."""
    training = config.get("training") or {}
    plain = set(LoraMethodConfig.model_fields)
    return {
        name: int(spec["r"])
        for name in config.get("methods") or []
        if isinstance(spec := training.get(name), dict) and spec.get("type", name) == "lora" and set(spec) <= plain
    }


def rank_figure(table: pd.DataFrame, tasks: list[str], ranks: dict[str, int]):
    """Quality, drift and forgetting against rank, a row of panels per task, one point per plain
    LoRA method, full FT as a dashed line; None without three ranks to draw."""
    if len(set(ranks.values())) < 3:
        return None
    measures = (  # mean, interval ends, title (quality's axis is labelled with the task's metric)
        ("quality_mean", "quality_low", "quality_high", "quality"),
        ("drift_mean", "drift_low", "drift_high", "drift"),
        ("forgetting_pp", "forgetting_low", "forgetting_high", "forgetting (points)"),
    )
    fig, axes = panel_grid(3 * len(tasks), 3, (3.4, 2.8), 0.2)
    for row, task in zip(axes, tasks):
        rows = table[table["task"] == task].set_index("method")
        for ax, (mean, low, high, label) in zip(row, measures):
            swept = rows.loc[sorted((m for m in ranks if m in rows.index), key=ranks.get)]
            r = [ranks[m] for m in swept.index]
            ax.set_title(f"{task}: {label}", fontsize=10)
            if not swept[mean].map(finite).any():  # e.g. forgetting of the one task a study probes
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="0.4")
                ax.set_xticks([]), ax.set_yticks([])
                continue
            ax.errorbar(
                r,
                swept[mean],
                yerr=[swept[mean] - swept[low], swept[high] - swept[mean]],
                fmt="o-",
                color=method_color("lora"),
                capsize=3,
            )
            if "full" in rows.index and finite(rows.loc["full", mean]):
                ax.axhline(rows.loc["full", mean], color=method_color("full"), ls="--", lw=1)
            ax.set_xscale("log", base=2)
            plain_ticks(ax.xaxis)
            ax.set_xlabel("rank r")
            ax.set_ylabel(rows["metric"].iloc[0] if mean == "quality_mean" else label)
    return fig
