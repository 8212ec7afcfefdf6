"""Report sections on how the numbers were made: the hyperparameters each run used (and the
tuned ones, checked against the runs), and provenance (versions, hardware, stages, config)."""

from __future__ import annotations

import datetime
import json
import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from lorascope.report import format as fmt
from lorascope.report.document import Document
from lorascope.report.figures import finite, method_label, method_order, new_figure, ordered
from lorascope.report.loader import StudyView
from lorascope.tuning import tuned_records

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _used_hparams(view: StudyView) -> dict[tuple[str, str], list[tuple[int | None, dict]]]:
    """(task, method) -> [(seed, configured hyperparameters)] from each run's hparams.json."""
    found: dict[tuple[str, str], list[tuple[int | None, dict]]] = {}
    root = view.root
    for path in sorted(root.glob("runs/*/*/seed*/hparams.json")) + sorted(
        root.glob("baselines/*/head_only/hparams.json")
    ):
        data = json.loads(path.read_text())
        rel = path.relative_to(root).parts
        if rel[0] == "runs":
            task, method, seed = rel[1], rel[2], int(rel[3].removeprefix("seed"))
        else:
            task, method, seed = rel[1], data["method"], None
        found.setdefault((task, method), []).append((seed, data["configured"]))
    return found


def _same(a: Any, b: Any) -> bool:
    if finite(a) and finite(b) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _used_section(doc: Document, view: StudyView, used: dict) -> None:
    doc.heading(3, "Used")
    if not used:
        doc.not_run("no runs/*/*/seed*/hparams.json yet")
        return
    groups: dict[tuple[str, str], list[str]] = {}
    varies = set()
    for (task, method), runs in used.items():
        texts = {json.dumps(c, sort_keys=True, default=str) for _, c in runs}
        if len(texts) > 1:
            varies.add((task, method))
        for text in texts:
            groups.setdefault((method, text), []).append(task)
    keys: list[str] = []
    columns = []
    order = method_order(["lora", "full", "head", *(m for m, _ in groups)])
    for (method, text), tasks in sorted(groups.items(), key=lambda kv: order.index(kv[0][0])):
        configured = json.loads(text)
        keys += [k for k in configured if k not in keys]
        columns.append(
            (f"{method_label(method)} ({', '.join(ordered(tasks, list(view.config.get('tasks') or {})))})", configured)
        )
    doc.table(
        ["hyperparameter"] + [c[0] for c in columns],
        [[k] + [fmt.value(c[1][k]) if k in c[1] else "—" for c in columns] for k in keys],
    )
    note = (
        "As configured and saved by each run (runs/<task>/<method>/seed<k>/hparams.json; head only: "
        "baselines/<task>/head_only/hparams.json); columns group the tasks that used identical values."
    )
    if varies:
        note += " Values differ between seeds for: " + ", ".join(f"{t} {m}" for t, m in sorted(varies)) + "."
    doc.para(note, css="note")


def _tuned_section(doc: Document, view: StudyView, used: dict) -> None:
    doc.heading(3, "Tuned")
    tuned, trials = tuned_records(view.study), view.tables["trials"]
    if not tuned and trials is None:
        doc.not_run("no tuned/*.yaml (the optional tune stage did not run)")
        return
    rows = []
    for record in tuned:
        task, method = record["task"], record["method"]
        runs = used.get((task, method), [])
        for key, tuned_value in (record["best_params"] or {}).items():
            values = [c.get(key, "<absent>") for _, c in runs]
            if not runs:
                check = ("no run", "notrun")
            elif all(_same(v, tuned_value) for v in values):
                check = ("used", "met")
            else:
                check = (f"NOT used (runs: {', '.join(sorted({fmt.value(v) for v in values}))})", "notmet")
            rows.append([task, method_label(method), key, fmt.value(tuned_value), check])
    if rows:
        doc.table(["task", "method", "hyperparameter", "tuned value", "reached the runs?"], rows)
    if trials is not None:
        summary = []
        for (task, method), group in trials.groupby(["task", "method"], sort=False):
            states = group["state"].value_counts().to_dict()
            summary.append(
                [
                    str(task),
                    method_label(str(method)),
                    str(len(group)),
                    ", ".join(f"{k} {v}" for k, v in states.items()) or "—",
                    fmt.num(group["value"].max()),
                ]
            )
        doc.table(["task", "method", "trials", "states", "best dev value"], summary)
        doc.para(
            "Tuning scores the dev split, held out of train; the reported eval split is never used for selection.",
            css="note",
        )
    for record in tuned if trials is not None else []:
        task, method = record["task"], record["method"]
        figure = tune_figure(trials, task, method, record["metric"])
        doc.figure(
            view.save(figure, f"tune_{task}_{method}"),
            f"{task}, {method_label(method)}: dev {record['metric']} of every finished trial and the best "
            "so far (tables/trials.csv).",
        )


def hparams_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Hyperparameters")
    used = _used_hparams(view)
    _used_section(doc, view, used)
    _tuned_section(doc, view, used)


def provenance_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Provenance")
    manifest = view.manifest
    if not manifest:
        doc.not_run("manifest.json missing")
    else:
        doc.table(
            ["item", "value"],
            css="kv",
            rows=[
                ["config fingerprint", f"`{manifest.get('config_fingerprint', '—')}`"],
                ["lorascope", str(manifest.get("lorascope", "—"))],
                ["python", str(manifest.get("python", "—"))],
                ["report written", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")],
            ],
        )
        versions, hardware = manifest.get("versions") or {}, manifest.get("hardware") or {}
        if versions:
            doc.heading(3, "Versions")
            doc.table(["package", "version"], [[k, str(v)] for k, v in versions.items()], css="kv")
        if hardware:
            doc.heading(3, "Hardware")
            doc.table(["item", "value"], [[k, fmt.value(v) or "—"] for k, v in hardware.items()], css="kv")
        stages = manifest.get("stages") or {}
        doc.heading(3, "Stages")
        if stages:
            rows = [
                [
                    name,
                    str(s.get("status", "—")),
                    fmt.seconds(s.get("seconds")),
                    str(s.get("finished", "—")),
                    f"`{s.get('fingerprint', '—')}`",
                ]
                for name, s in stages.items()
            ]
            total = sum(float(s["seconds"]) for s in stages.values() if finite(s.get("seconds")))
            rows.append(["**total**", "", fmt.seconds(total), "", ""])
            doc.table(["stage", "status", "wall time", "finished (UTC)", "fingerprint"], rows)
        else:
            doc.not_run("no stage recorded in manifest.json")
    config_path = view.root / "config.yaml"
    if config_path.is_file():
        doc.details("config.yaml (resolved, exactly what ran)", config_path.read_text(), "yaml")
    else:
        doc.not_run("config.yaml missing")


def tune_figure(trials: pd.DataFrame, task: str, method: str, metric: str) -> Figure:
    """Dev metric of every finished trial of one search by trial number, and the best so far."""
    rows = trials[(trials["task"] == task) & (trials["method"] == method)].sort_values("trial")
    complete, pruned = (
        rows[rows["state"] == "COMPLETE"],
        rows[(rows["state"] == "PRUNED") & rows["last_dev_value"].notna()],
    )
    fig = new_figure(6, 3.6)
    ax = fig.subplots()
    ax.plot(complete["trial"], complete["value"], "o", label="complete trial")
    if len(pruned):
        ax.plot(pruned["trial"], pruned["last_dev_value"], "x", color="grey", label="pruned (last dev value)")
    if len(complete):
        ax.step(complete["trial"], complete["value"].cummax(), where="post", color="C3", label="best so far")
    ax.set(
        xlabel="trial",
        ylabel=f"dev {metric}",
        title=f"{task} {method}: TPE search ({len(complete)} complete, {len(pruned)} pruned)",
    )
    ax.legend(loc="lower right", fontsize="small")
    return fig
