"""Report section beside the reference study ("LoRA Under the Microscope"): its published
numbers (package data) next to this study's, each family with the flaw that explains the
difference. This study's numbers come from the analyze stage's tables."""

from __future__ import annotations

from importlib import resources

import yaml

from lorascope.report import format as fmt
from lorascope.report.document import NOT_RUN, Document
from lorascope.report.figures import finite, method_label, ordered
from lorascope.report.loader import StudyView


def load_reference() -> dict:
    """The reference study's published numbers (package data), families with their flaw notes."""
    text = resources.files("lorascope.reference").joinpath("microscope.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _ours_quality(view: StudyView, task: str, method: str, metric: str) -> str:
    flags, stats = view.tables["flags"], view.tables["statistics"]
    if flags is None or stats is None or metric not in flags:
        return "not run"
    sel = flags[(flags["task"] == task) & (flags["method"] == method) & (flags["status"] == "ok")].sort_values("seed")
    if sel.empty:
        return "not run"
    d = stats[
        (stats["kind"] == "describe")
        & (stats["task"] == task)
        & (stats["method"] == method)
        & (stats["metric"] == metric)
        & (stats["subset"] == "all")
    ].iloc[0]
    each = " / ".join(f"{v:.3f}{' ⚑' if f else ''}" for v, f in zip(sel[metric], sel["flagged"]))
    return f"{each} (mean {fmt.pm(d['mean'], d['sd'], 3)}, all ok runs)"


def reference_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Beside the reference study")
    ref = load_reference()
    families = ref["families"]
    ref_tasks = {str(r["task"]) for fam in families.values() for r in fam["rows"]} - {"all"}
    matched = [t for t in list(view.config.get("tasks") or {}) if t in ref_tasks]
    if not matched:
        doc.para(
            f"No task of this study is one of the reference study's ({', '.join(sorted(ref_tasks))}), so its "
            f"numbers are not shown.",
            css="notrun",
        )
        return
    doc.para(
        f"**{ref['study']}** ({ref['repository']}): {ref['setup']}. Its numbers come from a different model "
        "and hardware and from the flawed pipeline noted under each table; they are shown for orientation, "
        "not as a target."
    )

    def rows_of(family: str, task: str) -> list[dict]:
        return [r for r in families[family]["rows"] if str(r["task"]) == task]

    def flaw(family: str) -> None:
        doc.para(f"Known flaw ({family}): {families[family]['flaw']}", css="note")

    doc.heading(3, "Task quality")
    table = []
    for task in matched:
        for method in ("lora", "full"):
            rs = [r for r in rows_of("quality", task) if r["method"] == method]
            if rs:
                values = [float(r["value"]) for r in rs]
                table.append(
                    [
                        task,
                        rs[0]["metric"],
                        method_label(method),
                        f"{' / '.join(f'{v:.3f}' for v in values)} (mean {sum(values) / len(values):.3f})",
                        _ours_quality(view, task, method, rs[0]["metric"]),
                    ]
                )
    doc.table(["task", "metric", "method", "reference (seeds 42 / 1337 / 2024)", "this study (its seeds)"], table)
    flaw("quality")

    doc.heading(3, "Majority-class baseline")
    baselines = view.tables["baselines"]
    table = []
    for task in matched:
        for r in rows_of("majority", task):
            mine = "not run"
            if baselines is not None:
                sel = baselines[(baselines["task"] == task) & (baselines["baseline"] == "majority")]
                if not sel.empty and r["metric"] in sel:
                    mine = fmt.num(sel[r["metric"]].iloc[0], 3)
            table.append([task, r["metric"], f"{float(r['value']):.3f}", mine])
    doc.table(["task", "metric", "reference", "this study"], table)
    flaw("majority")

    doc.heading(3, "Drift (1 − CKA, mean over layers)")
    drift = view.tables["drift_statistics"]
    table = []
    for task in matched:
        ref_d = {r["method"]: float(r["value"]) for r in rows_of("drift", task)}
        ref_red = 1 - ref_d["lora"] / ref_d["full"] if {"lora", "full"} <= set(ref_d) else float("nan")
        mine, reduction = {}, float("nan")
        if drift is not None:
            sel = drift[(drift["task"] == task) & (drift["measure"] == "linear_cka") & (drift["pooling"] == "mean")]
            mine = {r.method: 1 - r.similarity_mean for r in sel.itertuples()}
            lora = sel[sel["method"] == "lora"]  # the reference study's pair: LoRA against full FT
            reduction = lora["drift_reduction"].iloc[0] if not lora.empty else reduction
        table.append(
            [
                task,
                fmt.num(ref_d.get("lora"), 3),
                fmt.num(ref_d.get("full"), 3),
                f"{100 * ref_red:+.1f} %",
                fmt.num(mine["lora"], 3) if finite(mine.get("lora")) else NOT_RUN,
                fmt.num(mine["full"], 3) if finite(mine.get("full")) else NOT_RUN,
                f"{100 * reduction:+.1f} %" if finite(reduction) else "—",
            ]
        )
    doc.table(
        [
            "task",
            "reference LoRA",
            "reference full FT",
            "reference reduction",
            "this study LoRA",
            "this study full FT",
            "this study reduction",
        ],
        table,
    )
    flaw("drift")
    bvb = families["cka_base_vs_base"]["rows"][0]
    layers = view.tables["drift_layers"]
    mine = NOT_RUN
    if layers is not None:
        values = layers.loc[(layers["comparison"] == "base_vs_base") & (layers["measure"] == "linear_cka"), "value"]
        mine = f"{values.min():.3f}–{values.max():.3f}" if len(values) else NOT_RUN
    doc.table(
        ["check", "reference", "this study (linear CKA, all layers)"],
        [["CKA of the base model with itself (correct: 1)", f"{bvb['low']:.2f}–{bvb['high']:.2f}", mine]],
    )
    flaw("cka_base_vs_base")

    doc.heading(3, "Latency at batch size 1")
    dep = view.tables["deployment"]
    ref_l = {r["method"]: float(r["value"]) for r in families["latency"]["rows"]}
    ours, seq = {}, ""
    if dep is not None:
        one = dep[dep["batch_size"] == 1].assign(seq_len=lambda d: d["seq_len"].astype(str))
        if not one.empty:
            seq = ordered(one["seq_len"], ("natural",))[0]
            ours = {str(r.strategy): r for r in one[(one["seq_len"] == seq) & (one["status"] == "ok")].itertuples()}
    table = []
    for key, ours_key in {"full": "full", "merged": "merged", "separate": "separate", "multi": "multi"}.items():
        ref_ms, row = ref_l.get(key), ours.get(ours_key)
        table.append(
            [
                f"{key} (ours: {ours_key})",
                fmt.num(ref_ms, 1),
                fmt.num(ref_ms / ref_l["full"] if ref_ms else None, 3),
                fmt.num(row.p50_ms, 2) if row is not None else NOT_RUN,
                fmt.num(row.overhead_vs_full, 3) if row is not None else "—",
            ]
        )
    doc.table(
        [
            "strategy",
            "reference p50 ms (L4)",
            "reference ratio to full",
            f"this study p50 ms{f' (seq {seq})' if seq else ''}",
            "this study ratio to full (median of paired ratios)",
        ],
        table,
    )
    flaw("latency")
