"""Report section on forgetting: transfer retention of every run on every probed task, the
LM-loss change, and whether drift predicted forgetting. Numbers come from forgetting.csv and
lm_forgetting.csv (the forget stage) and forget_statistics.csv, forget_drift.csv and
forget_correlation.csv (the analyze stage)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from lorascope.forgetting import OTHER_TASKS, OWN_HEAD
from lorascope.report import format as fmt
from lorascope.report.document import Document
from lorascope.report.figures import finite, legend, method_color, method_label, method_order, new_figure, ordered
from lorascope.report.loader import ANALYZE, StudyView

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _points(value, low, high) -> str:
    """A forgetting (fraction of accuracy) in points, with its interval when there is one."""
    if not finite(value):
        return "—"
    text = f"{100 * value:+.1f}"
    return text + (f" [{100 * low:+.1f}, {100 * high:+.1f}]" if finite(low) and finite(high) else "")


def forgetting_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Forgetting")
    table = view.tables["forgetting"]
    if table is None:
        doc.not_run(f"transfer retention: {view.why['forgetting']} (linear probes need a classification task)")
        if view.tables["lm_forgetting"] is not None:
            _lm(doc, view)
        return
    last = table[table["layer"] == table["layer"].max()]
    probed = ordered(last["probe_task"].astype(str), list(view.config.get("tasks") or {}))
    sizes = ", ".join(f"{t} {int(n)}" for t, n in last.groupby("probe_task")["n_train"].first().items())
    doc.para(
        f"Transfer retention: a linear probe (logistic regression on standardised pooled features of layer "
        f"{int(last['layer'].iloc[0])}, regularisation chosen by cross-validation on the probe's training "
        f"examples: {sizes}, from each task's dev split, which no run trains on) is trained on each model's "
        "features and scored on the task's eval examples. **Forgetting = probe accuracy of the base − "
        "that of the run**, in points, with the bootstrap interval over eval examples: positive on another task "
        "is what fine-tuning cost there; on the run's own task (*own*) it is negative, the gain."
    )
    base = last[last["method"] == "base"].set_index("probe_task")
    rows = [
        [
            "base model",
            "",
            "",
            *(f"accuracy {fmt.num(base.loc[t, 'score'], 3)} (n={int(base.loc[t, 'n_eval'])})" for t in probed),
        ]
    ]
    runs = last[last["method"] != "base"]
    for task in view.tasks(runs):
        for method in method_order(runs.loc[runs["task"] == task, "method"]):
            sel = runs[(runs["task"] == task) & (runs["method"] == method)]
            for seed in sorted(sel["seed"].dropna().astype(int).unique()):
                cells = sel[sel["seed"] == seed].set_index("probe_task")
                rows.append(
                    [
                        task,
                        method_label(method),
                        str(seed),
                        *(
                            _points(*cells.loc[t, ["forgetting", "ci_low", "ci_high"]])
                            + (" *own*" if cells.loc[t, "own_task"] else "")
                            if t in cells.index
                            else "—"
                            for t in probed
                        ),
                    ]
                )
    doc.table(
        [
            "trained on",
            "method",
            "seed",
            *(f"forgetting on {t}, points [{view.confidence:.0%} bootstrap]" for t in probed),
        ],
        rows,
    )
    _seed_table(doc, view, probed)
    _lm(doc, view)
    _drift(doc, view)


def _seed_table(doc: Document, view: StudyView, probed: list[str]) -> None:
    statistics = view.tables["forget_statistics"]
    if statistics is None:
        doc.not_run(f"forgetting over seeds: {view.why['forget_statistics']}; {ANALYZE}")
        return
    last = statistics[statistics["layer"] == statistics["layer"].max()]
    rows = []
    for task in view.tasks(last):
        for method in method_order(last.loc[last["task"] == task, "method"]):
            cells = last[(last["task"] == task) & (last["method"] == method)].set_index("probe_task")
            rows.append(
                [
                    task,
                    method_label(method),
                    *(
                        f"{_points(*cells.loc[t, ['mean', 'ci_low', 'ci_high']])} (n={int(cells.loc[t, 'n'])})"
                        if t in cells.index
                        else "—"
                        for t in probed
                    ),
                ]
            )
    doc.table(["trained on", "method", *(f"forgetting on {t}: mean over seeds [t-interval]" for t in probed)], rows)
    doc.para(
        "The verdict's forgetting row compares the two methods on the tasks a run did not train on (the mean "
        "over them), paired by seed. Every probed layer: tables/forgetting.csv.",
        css="note",
    )


def _lm(doc: Document, view: StudyView) -> None:
    doc.heading(3, "Language-modelling loss")
    lm = view.tables["lm_forgetting"]
    if lm is None:
        doc.not_run(view.why["lm_forgetting"])
        return
    skipped = lm[lm["status"] != "ok"]
    if not skipped.empty:
        doc.not_run(f"{skipped['objective'].iloc[0]}-LM loss: {skipped['note'].iloc[0]}")
        return
    heads = lm["objective"].nunique() > 1  # generative runs: also under their own LM head
    rows = [
        [
            r.task,
            method_label(r.method),
            str(int(r.seed)),
            *(["the run's own" if r.objective == OWN_HEAD else "the base's"] if heads else []),
            f"{int(r.documents)} ({int(r.tokens)} tokens)",
            fmt.num(r.base_loss),
            fmt.num(r.run_loss),
            fmt.num(r.difference),
            fmt.interval(r.ci_low, r.ci_high),
        ]
        for r in lm.itertuples()
    ]
    doc.para(
        f"The run's backbone under the base model's {lm['objective'].iloc[0]}-LM head (a tied head stays the "
        "base's embeddings) on held-out documents it did not train on: mean token cross-entropy in nats, run − "
        "base, with a bootstrap interval over documents. Positive = the run lost language modelling."
        + (
            " A run of a generative task is a causal LM itself: its rows under its own LM head say what its "
            "users get (LoRA leaves the head as it was, so its two rows agree; full fine-tuning of tied "
            "embeddings moved it)."
            if heads
            else ""
        )
    )
    doc.table(
        [
            "trained on",
            "method",
            "seed",
            *(["LM head"] if heads else []),
            "documents",
            "base loss",
            "run loss",
            "run − base",
            f"{view.confidence:.0%} bootstrap",
        ],
        rows,
    )


def _drift(doc: Document, view: StudyView) -> None:
    doc.heading(3, "Does drift predict forgetting?")
    points, correlation = view.tables["forget_drift"], view.tables["forget_correlation"]
    if points is None or correlation is None:
        doc.not_run(f"{view.why['forget_drift']} (needs the drift tables and other probed tasks); {ANALYZE}")
        return
    mean = points[(points["probe_task"] == OTHER_TASKS) & points["layer"].isna()]
    doc.figure(
        view.save(forgetting_figure(mean), "forgetting_vs_drift"),
        "One point per run: drift (1 − linear CKA to the base, mean over layers, on its own task's probe "
        "examples) against its forgetting on the tasks it did not train on (mean, points).",
    )
    overall = correlation[(correlation["probe_task"] == OTHER_TASKS) & correlation["layer"].isna()]
    rows = [
        [
            method_label(r.method) if r.method != "all" else "all runs",
            str(int(r.n)),
            fmt.num(r.spearman, 3),
            fmt.interval(r.ci_low, r.ci_high, 3),
            fmt.p_value(r.p_value),
        ]
        for r in overall.itertuples()
    ]
    for r in correlation[
        (correlation["probe_task"] != OTHER_TASKS) & correlation["layer"].isna() & (correlation["method"] == "all")
    ].itertuples():
        rows.append(
            [
                f"all runs, forgetting on {r.probe_task}",
                str(int(r.n)),
                fmt.num(r.spearman, 3),
                fmt.interval(r.ci_low, r.ci_high, 3),
                fmt.p_value(r.p_value),
            ]
        )
    doc.table(["runs", "n", "Spearman ρ (drift, forgetting)", f"{view.confidence:.0%} bootstrap over runs", "p"], rows)
    doc.para(drift_answer(overall))
    doc.para(
        "Per layer (the drift of one layer instead of the mean) and per probed task within each method: "
        "tables/forget_correlation.csv. The interval resamples runs; with a handful of runs per method it is "
        "wide, and runs of different tasks and methods are pooled in the first row.",
        css="note",
    )


def drift_answer(overall: pd.DataFrame) -> str:
    """The plain answer, from the correlation over all runs (mean over layers, other tasks)."""
    every = overall[overall["method"] == "all"]
    if every.empty or not finite(every["spearman"].iloc[0]):
        return "**Could not tell** whether less drift went with less forgetting: too few runs, or no variation."
    r = every.iloc[0]
    where = f"ρ = {r['spearman']:.2f} over {int(r['n'])} runs"
    if finite(r["ci_low"]) and r["ci_low"] > 0:
        return f"**In this study, less drift went with less forgetting** ({where}, interval above 0)."
    if finite(r["ci_high"]) and r["ci_high"] < 0:
        return f"**In this study, less drift went with more forgetting** ({where}, interval below 0)."
    return (
        f"**In this study, drift did not clearly predict forgetting** ({where}; the interval includes 0, so the "
        "runs cannot tell a relation from none)."
    )


def forgetting_figure(points: pd.DataFrame) -> Figure:
    """Does drift predict forgetting? One point per run: its drift (x) against its forgetting on
    the tasks it did not train on (y, points of probe accuracy), coloured by method, one marker
    per training task."""
    fig = new_figure(5.6, 4.2)
    ax = fig.subplots()
    markers = dict(zip(ordered(points["task"]), "osD^v<>"))
    handles = []
    for method in method_order(points["method"]):
        for task, marker in markers.items():
            rows = points[(points["method"] == method) & (points["task"] == task)]
            if not rows.empty:
                handles.append(
                    ax.scatter(
                        rows["drift"],
                        100 * rows["forgetting"],
                        color=method_color(method),
                        marker=marker,
                        label=f"{method_label(method)}, trained on {task}",
                    )
                )
    ax.axhline(0, color="black", linestyle="--", linewidth=0.8)
    ax.set(xlabel="drift, 1 − linear CKA (mean over layers)", ylabel="forgetting on other tasks (points)")
    ax.grid(alpha=0.3)
    legend(fig, handles, ncol=2)
    return fig
