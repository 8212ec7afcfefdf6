"""The study's report: `report.md` and a self-contained `report.html`, verdict first.

Reads only the study directory (config.yaml, manifest.json, tables/*.csv, runs/*/hparams.json,
tuned/*.yaml, figures/*.png). Every missing input turns its section into "not run"; nothing
here trains, times or recomputes features. Figures drawn here go to figures/report_*.png with
one colour per method across all of them (lorascope.report_figures); figures drawn by other
stages (deployment_*.png, tune_*.png, ...) are embedded as they are. The document model and its
two renderings live in lorascope.report_document.

Run flags and the method comparison are read from tables/flags.csv and tables/statistics.csv,
which the analyze stage writes (lorascope.analysis); they are never recomputed here, so the
report cannot disagree with the tables it ships beside.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lorascope import stats
from lorascope.report_document import NOT_RUN, Document, slug, to_html, to_markdown
from lorascope.report_figures import (
    MEASURE_LABELS,
    METHOD_COLORS,
    METHOD_LABELS,
    changed_kinds,
    describe_finite,
    drift_figure,
    finite,
    latency_figure,
    method_label,
    method_order,
    ordered,
    performance_figure,
    png_bytes,
    weights_figure,
    weights_frame,
)

__all__ = ["METHOD_COLORS", "METHOD_LABELS", "load_reference", "write_report"]

FIGURE_PREFIX = "report_"  # figures this module owns; others' figures are never touched
P_KEYS = ("welch_p", "paired_t_p", "permutation_paired_p", "permutation_unpaired_p")
COMPARE_KEYS = ("n_a", "n_b", "n_pairs", "mean_a", "mean_b", "mean_diff_paired", "bootstrap_low",
                "bootstrap_high", *P_KEYS, *(f"{p}_holm" for p in P_KEYS), "hedges_g", "cohen_dz")  # fmt: skip
TABLES = ("performance", "baselines", "flags", "statistics", "verdict", "drift_layers", "drift_summary", "weights",
          "deployment", "deployment_memory", "deployment_checks", "trials")  # fmt: skip
ANALYZE = "run `lorascope analyze STUDY`"
_PARTIAL = ".partial-"  # lorascope.study.PARTIAL: a killed write leaves a file the next run removes


# ---------------------------------------------------------------- formatting


def _f(x: Any, digits: int = 4) -> str:
    return f"{float(x):.{digits}f}" if finite(x) else "—"


def _pm(mean: Any, sd: Any, digits: int = 4) -> str:
    if not finite(mean):
        return "—"
    return f"{float(mean):.{digits}f} ± {float(sd):.{digits}f}" if finite(sd) else f"{float(mean):.{digits}f}"


def _ci(low: Any, high: Any, digits: int = 4, unit: str = "") -> str:
    return f"[{_f(low, digits)}, {_f(high, digits)}]{unit}" if finite(low) and finite(high) else "—"


def _p(p: Any) -> str:
    if not finite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _seconds(s: Any) -> str:
    if not finite(s):
        return "—"
    s = float(s)
    return f"{s:.1f} s" if s < 60 else f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"


def _value(v: Any) -> str:
    if v is None:
        return "None"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) or "[]"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


# ---------------------------------------------------------------- inputs


@dataclass
class _Study:
    root: Path
    config: dict
    manifest: dict
    tables: dict[str, pd.DataFrame | None]
    why: dict[str, str]
    figures: list[Path] = field(default_factory=list)  # drawn by this call

    def need(self, *names: str) -> str | None:
        """None when every table exists, else the reason the first missing one is missing."""
        for name in names:
            if self.tables.get(name) is None:
                return self.why[name]
        return None

    @property
    def analysis(self) -> dict:
        return self.config.get("analysis") or {}


def _read_csv(path: Path) -> tuple[pd.DataFrame | None, str]:
    rel = f"{path.parent.name}/{path.name}"
    if not path.is_file():
        return None, f"{rel} missing"
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None, f"{rel} is empty"
    if table.empty:
        return None, f"{rel} has no rows"
    return table, ""


def _load(root: Path) -> _Study:
    config_path, manifest_path = root / "config.yaml", root / "manifest.json"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    tables, why = {}, {}
    for name in TABLES:
        tables[name], why[name] = _read_csv(root / "tables" / f"{name}.csv")
    perf = tables["performance"]
    if perf is not None:
        perf = perf.copy()
        perf["seed"] = pd.to_numeric(perf["seed"], errors="coerce").astype("Int64")
        perf["primary_value"] = pd.to_numeric(perf["primary_value"], errors="coerce")
        tables["performance"] = perf
    return _Study(root, config, manifest, tables, why)


def _tasks(study: _Study, table: pd.DataFrame) -> list[str]:
    return ordered(table["task"].dropna().astype(str), list(study.config.get("tasks") or {}))


def load_reference() -> dict:
    """The reference study's published numbers (package data), families with their flaw notes."""
    text = resources.files("lorascope.reference").joinpath("microscope.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


# ---------------------------------------------------------------- the analyze stage's tables


def _flags(study: _Study) -> tuple[pd.DataFrame, str]:
    """performance.csv with the analyze stage's `flagged` and `reason`, and where they come from.
    Without tables/flags.csv only runs that failed or have no value are flagged."""
    perf = study.tables["performance"]
    flags = study.tables["flags"]
    if flags is not None and {"task", "method", "seed", "flagged"} <= set(flags.columns):
        keep = flags[["task", "method", "seed", "flagged"] + (["reason"] if "reason" in flags else [])].copy()
        keep["seed"] = pd.to_numeric(keep["seed"], errors="coerce").astype("Int64")
        out = perf.drop(columns=[c for c in ("flagged", "reason") if c in perf]).merge(
            keep, on=["task", "method", "seed"], how="left")  # fmt: skip
        unknown = out["flagged"].isna()
        out["flagged"] = out["flagged"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))
        out.loc[unknown, "flagged"] = (out.loc[unknown, "status"] != "ok") | out.loc[unknown, "primary_value"].isna()
        out["reason"] = out.get("reason", pd.Series("", index=out.index)).fillna("").astype(str)
        out.loc[unknown & out["flagged"], "reason"] = "status not ok or no value (run missing from flags.csv)"
        return out, "tables/flags.csv"
    why = study.why["flags"] or "tables/flags.csv lacks the task, method, seed and flagged columns"
    out = perf.copy()
    bad = (out["status"] != "ok") | out["primary_value"].isna()
    out["flagged"] = bad
    out["reason"] = np.where(bad, "status not ok or no value", "")
    return out, f"status only ({why}; {ANALYZE} to flag runs that do not beat the majority baseline)"


def _comparisons(study: _Study, flagged: pd.DataFrame | None) -> tuple[pd.DataFrame | None, str]:
    """The analyze stage's LoRA-vs-full rows of tables/statistics.csv, one per task × subset
    (all | unflagged) with every test and its Holm-adjusted `<p>_holm`, or why there are none."""
    if flagged is None:
        return None, study.why["performance"]
    if not any({"lora", "full"} <= set(group["method"]) for _, group in flagged.groupby("task")):
        return None, "no task has runs of both LoRA and full FT"
    table = study.tables["statistics"]
    if table is None:
        return None, f"{study.why['statistics']}; {ANALYZE}"
    if {"kind", "task", "subset", *COMPARE_KEYS} <= set(table.columns):
        rows = table[table["kind"] == "compare"]
        if not rows.empty:
            order = {task: i for i, task in enumerate(_tasks(study, rows))}  # the config's order, as elsewhere
            return rows.sort_values("task", key=lambda t: t.map(order), kind="stable").reset_index(drop=True), ""
    return None, f"tables/statistics.csv has no comparison rows; {ANALYZE}"


# ---------------------------------------------------------------- figures


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f"{_PARTIAL}{path.name}-{os.getpid()}")
    scratch.write_bytes(data)
    os.replace(scratch, path)


def _save(study: _Study, fig, name: str) -> Path:
    path = study.root / "figures" / f"{FIGURE_PREFIX}{name}.png"
    _write_bytes(path, png_bytes(fig))
    study.figures.append(path)
    return path


def _other_figures(study: _Study, pattern: str) -> list[Path]:
    folder = study.root / "figures"
    return [p for p in sorted(folder.glob(pattern)) if not p.name.startswith(FIGURE_PREFIX)] if folder.is_dir() else []


# ---------------------------------------------------------------- sections


def _outcome_cell(outcome: Any) -> tuple[str, str]:
    text = str(outcome) if isinstance(outcome, str) else NOT_RUN
    return text, {"met": "met", "not met": "notmet", "inconclusive": "inconclusive"}.get(text, "notrun")


_CRITERIA = {
    "quality": ("quality gap: full FT − LoRA, primary metric", "pp"),
    "drift": ("drift reduction: 1 − drift(LoRA) / drift(full), drift = 1 − mean CKA", "%"),
    "deployment": ("deployment: separate-adapter latency overhead vs full FT, batch 1", "%"),
    "recommended": ("**LoRA recommended** = quality and (drift or deployment)", ""),
}


def _criterion_number(value: Any, unit: str, signed: bool = False) -> str:
    if not finite(value):
        return "—"
    if unit == "%":
        return f"{100 * float(value):{'+' if signed else ''}.1f} %"
    if unit == "pp":
        return f"{float(value):{'+' if signed else ''}.2f} pp"
    return f"{float(value):.4g}"


def _verdict_section(doc: Document, study: _Study) -> None:
    doc.heading(2, "Verdict")
    missing = study.need("verdict")
    if missing:
        doc.not_run(f"{missing} (the analyze stage writes it)")
        return
    verdict = study.tables["verdict"]
    rows = []
    rules = {}
    for task in _tasks(study, verdict):
        part = verdict[verdict["task"] == task]
        order = {c: i for i, c in enumerate(_CRITERIA)}
        part = part.iloc[sorted(range(len(part)), key=lambda i: order.get(part["criterion"].iloc[i], 99))]
        for r in part.itertuples():
            label, unit = _CRITERIA.get(r.criterion, (str(r.criterion), ""))
            rule = str(getattr(r, "rule", "") or "")
            if rule and rule != "nan":
                rules.setdefault(r.criterion, rule)
            geq = ">=" in rule or (not rule and r.criterion == "drift")
            bound = _criterion_number(r.threshold, unit)
            threshold = f"{'≥' if geq else '≤'} {bound}" if finite(r.threshold) else ""
            if r.criterion == "recommended":
                rows.append([f"**{task}**", label, "", "", "", _outcome_cell(r.outcome)])
                continue
            low_high = (f"[{_criterion_number(r.ci_low, unit)}, {_criterion_number(r.ci_high, unit)}]"
                        if finite(r.ci_low) and finite(r.ci_high) else "—")  # fmt: skip
            rows.append([task, label, _criterion_number(r.value, unit), low_high, threshold, _outcome_cell(r.outcome)])
    confidence = float(study.analysis.get("confidence", 0.95))
    doc.table(["task", "criterion", "value", f"{confidence:.0%} interval", "threshold", "outcome"], rows, css="verdict")
    doc.para("**met** — the whole interval is on the good side of the threshold; **not met** — the whole interval "
             "is on the wrong side; **inconclusive** — the interval straddles the threshold (or one value gives "
             "no interval); **not run** — the inputs for the criterion do not exist. The threshold itself counts "
             "as met.", css="note")  # fmt: skip
    doc.bullets(f"`{criterion}`: {rule}" for criterion, rule in rules.items())


def _summary(study: _Study, flagged: pd.DataFrame | None, missing_sections: list[str]) -> str:
    cfg = study.config
    perf = study.tables["performance"]
    model = (cfg.get("model") or {}).get("name", "the configured model")
    tasks = list(cfg.get("tasks") or {}) or (_tasks(study, perf) if perf is not None else [])
    seeds = cfg.get("seeds") or (sorted(int(s) for s in perf["seed"].dropna().unique()) if perf is not None else [])
    parts = [f"LoRA against full fine-tuning of `{model}` on {len(tasks)} task(s) ({', '.join(tasks) or '—'}), "
             f"seeds {', '.join(map(str, seeds)) or '—'}."]  # fmt: skip
    verdict = study.tables["verdict"]
    if verdict is not None:
        rec = verdict[verdict["criterion"] == "recommended"]
        groups: dict[str, list[str]] = {}
        for r in rec.itertuples():
            groups.setdefault(str(r.outcome), []).append(str(r.task))
        words = {"met": "LoRA is recommended for", "not met": "LoRA is not recommended for",
                 "inconclusive": "the evidence is inconclusive for", NOT_RUN: "criteria were not run for"}  # fmt: skip
        said = [f"{words.get(k, k)} {', '.join(v)}" for k, v in groups.items()]
        if said:
            parts.append("Verdict (LoRA is recommended when its quality is within the threshold of full FT and it "
                         "drifts less or deploys cheaply): " + "; ".join(said) + ".")  # fmt: skip
    else:
        parts.append("No verdict yet: the analyze stage has not run.")
    if flagged is not None:
        means = []
        for task in _tasks(study, flagged):
            sel = flagged[(flagged["task"] == task) & ~flagged["flagged"]]
            metric = str(flagged[flagged["task"] == task]["primary_metric"].iloc[0])
            m = {meth: sel[sel["method"] == meth]["primary_value"].mean() for meth in ("lora", "full")}
            if finite(m["lora"]) and finite(m["full"]):
                means.append(f"{task} {metric} {m['lora']:.3f} vs {m['full']:.3f}")
        if means:
            parts.append("Mean primary metric of unflagged runs, LoRA vs full FT: " + "; ".join(means) + ".")
        n_flag = int(flagged["flagged"].sum())
        parts.append(f"{n_flag} of {len(flagged)} runs {'is' if n_flag == 1 else 'are'} flagged as failed "
                     f"(shown, and left out of the 'unflagged' statistics).")  # fmt: skip
    if missing_sections:
        parts.append("Not run: " + ", ".join(missing_sections) + ".")
    return " ".join(parts)


def _performance_section(doc: Document, study: _Study, flagged: pd.DataFrame | None, flag_source: str) -> None:
    doc.heading(2, "Task performance")
    if flagged is None:
        doc.not_run(study.why["performance"])
        return
    confidence = float(study.analysis.get("confidence", 0.95))
    ci = f"{confidence:.0%} CI"
    figure = performance_figure(flagged, _tasks(study, flagged), study.tables["baselines"], confidence)
    doc.figure(_save(study, figure, "performance"),
               f"Primary metric per run on the eval split (validation split, never used for selection). Filled "
               f"dots: runs; hollow: flagged runs; grey lines join the two runs of one seed; diamonds: mean ± {ci} "
               f"(t-interval over unflagged seeds); horizontal lines: baselines.")  # fmt: skip
    doc.para("**Paired design.** A seed fixes the classifier-head initialisation and the order of the training "
             "data identically for both methods, so the LoRA and full-FT runs of one seed are a real pair and "
             "paired tests on their differences are valid. " + _pairing_check(flagged))  # fmt: skip
    baselines = study.tables["baselines"]
    for task in _tasks(study, flagged):
        rows = flagged[flagged["task"] == task]
        metric = str(rows["primary_metric"].dropna().iloc[0]) if rows["primary_metric"].notna().any() else "metric"
        methods = method_order(rows["method"])
        pair = "lora" in methods and "full" in methods
        doc.heading(3, f"{task} — {metric}")
        headers = ["seed"] + [f"{method_label(m)} {metric}" for m in methods] + (["LoRA − full FT"] if pair else [])
        table = []
        by = {(r.method, int(r.seed)): r for r in rows.itertuples() if not pd.isna(r.seed) and r.method in methods}
        diffs: dict[str, list[float]] = {"all": [], "unflagged": []}
        for seed in sorted({s for _, s in by}):
            line: list[Any] = [str(seed)]
            for m in methods:
                r = by.get((m, seed))
                if r is None:
                    line.append("—")
                elif r.status != "ok" or not finite(r.primary_value):
                    line.append((f"{r.status} ⚑", "flag"))
                else:
                    line.append((f"{r.primary_value:.4f} ⚑", "flag") if r.flagged else f"{r.primary_value:.4f}")
            if pair:
                a, b = by.get(("lora", seed)), by.get(("full", seed))
                if a is not None and b is not None and finite(a.primary_value) and finite(b.primary_value):
                    d = a.primary_value - b.primary_value
                    diffs["all"].append(d)
                    if not (a.flagged or b.flagged):
                        diffs["unflagged"].append(d)
                    line.append(f"{d:+.4f}")
                else:
                    line.append("—")
            table.append(line)
        for subset in ("all", "unflagged"):
            described = []
            for m in methods:
                sel = rows[rows["method"] == m]
                if subset == "unflagged":
                    sel = sel[~sel["flagged"]]
                described.append(describe_finite(sel["primary_value"], confidence))
            if pair:
                described.append(describe_finite(diffs[subset], confidence))
            name = "all runs" if subset == "all" else "unflagged runs"
            texts = [f"{_pm(d['mean'], d['sd'])} (n={d['n']})" for d in described]
            if pair and finite(described[-1]["mean"]):
                texts[-1] = "+" * (described[-1]["mean"] >= 0) + texts[-1]
            table.append([(t, "sub") for t in [f"mean ± sd, {name}", *texts]])
            table.append([(t, "sub") for t in [f"{ci}, {name}", *(_ci(d["ci_low"], d["ci_high"]) for d in described)]])
        doc.table(headers, table)
        doc.bullets(_baseline_lines(baselines, task, metric))
        bad = rows[rows["flagged"]]
        bad = bad.assign(_m=bad["method"].map(methods.index)).sort_values(["_m", "seed"])
        reasons = [f"⚑ {method_label(r.method)} seed {r.seed}: {r.reason}" for r in bad.itertuples()]
        doc.bullets(reasons)
    doc.para(f"Flags: {flag_source}. A flagged run diverged, failed, or does not beat the majority baseline by the "
             f"margin; it is shown and kept out of the 'unflagged' statistics, never silently averaged. "
             f"Intervals: mean ± t(1−α/2, n−1)·sd/√n over seeds; the difference column pairs runs by seed.",
             css="note")  # fmt: skip


def _pairing_check(perf: pd.DataFrame) -> str:
    cols = [c for c in ("head_init_digest", "data_order_digest") if c in perf]
    if not cols or not {"lora", "full"} <= set(perf["method"]):
        return ""
    both = perf[perf["method"].isin(["lora", "full"])].dropna(subset=cols)
    pairs = both.groupby(["task", "seed"])
    total = mismatched = 0
    for _, group in pairs:
        if set(group["method"]) >= {"lora", "full"}:
            total += 1
            mismatched += int(any(group[c].nunique() > 1 for c in cols))
    if total == 0:
        return ""
    if mismatched == 0:
        return f"Checked: the head-initialisation and data-order digests agree for all {total} pairs."
    return (f"**Warning:** the head-initialisation or data-order digests differ for {mismatched} of {total} pairs; "
            f"those pairs are not real pairs.")  # fmt: skip


def _baseline_lines(baselines: pd.DataFrame | None, task: str, metric: str) -> list[str]:
    if baselines is None:
        return ["Baselines: not run (tables/baselines.csv missing)."]
    rows = baselines[baselines["task"] == task]
    if rows.empty:
        return ["Baselines: not run for this task."]
    lines = []
    for r in rows.itertuples():
        if r.baseline == "majority":
            lines.append(f"majority-class baseline: {metric} {_f(r.primary_value)}")
        elif r.baseline == "head_only":
            lines.append(f"head-only probe (frozen backbone): {metric} {_f(r.primary_value)}"
                         + ("" if r.status == "ok" else f" — {r.status}"))  # fmt: skip
        elif str(r.baseline).startswith("overfit"):
            passed = str(getattr(r, "passed", "")).strip().lower() in ("true", "1", "1.0")
            verdict = "passed" if passed else "**FAILED**"
            lines.append(f"overfit check, {method_label(str(r.method))}: {verdict} (training accuracy "
                         f"{_f(r.accuracy, 3)} on the few examples it was trained on)")  # fmt: skip
    return lines


def _comparison_section(doc: Document, flagged: pd.DataFrame | None, table: pd.DataFrame | None, why: str) -> None:
    doc.heading(2, "Method comparison")
    if table is None:
        doc.not_run(why)
        return
    any_flagged = bool(flagged["flagged"].any())
    for subset in ("all", "unflagged"):
        part = table[table["subset"] == subset]
        if part.empty or (subset == "unflagged" and not any_flagged):
            continue
        doc.heading(3, "All runs with a value" if subset == "all" else "Unflagged runs only")
        rows = []
        for r in part.itertuples():
            metric = getattr(r, "metric", "") if isinstance(getattr(r, "metric", ""), str) else ""
            n = f"{int(r.n_a)} / {int(r.n_b)} / {int(r.n_pairs)}" if finite(r.n_pairs) else "—"
            rows.append([
                r.task, metric, n, _f(r.mean_diff_paired), _ci(r.bootstrap_low, r.bootstrap_high),
                f"{_p(r.welch_p)} ({_p(r.welch_p_holm)})", f"{_p(r.paired_t_p)} ({_p(r.paired_t_p_holm)})",
                f"{_p(r.permutation_paired_p)} ({_p(r.permutation_paired_p_holm)})",
                f"{_p(r.permutation_unpaired_p)} ({_p(r.permutation_unpaired_p_holm)})",
                _f(r.hedges_g, 2), _f(r.cohen_dz, 2),
            ])  # fmt: skip
        doc.table(["task", "metric", "n LoRA / full / pairs", "mean diff (LoRA − full, paired)",
                   "bootstrap 95 % CI of diff", "Welch t p (Holm)", "paired t p (Holm)", "exact sign-flip p (Holm)",
                   "exact permutation p (Holm)", "Hedges' g", "d_z"], rows)  # fmt: skip
        if subset == "unflagged":
            table_all = table[table["subset"] == "all"]
            if not table_all.empty:
                doc.para("Compare with the table above: a difference between them is the effect of the flagged runs.",
                         css="note")  # fmt: skip
    if not any_flagged:
        doc.para("No run is flagged, so the statistics without flagged runs equal these.", css="note")
    doc.bullets([
        "**Welch t-test**: two-sided, unequal variances, all runs of each method (n LoRA, n full).",
        "**Paired t-test**: two-sided, on the per-seed differences d = LoRA − full FT, n = pairs, n − 1 degrees of "
        "freedom; valid because a seed fixes head initialisation and data order for both methods.",
        "**Exact sign-flip test** (paired permutation): all 2ⁿ sign patterns of d; the smallest possible p is 2/2ⁿ "
        "(0.25 at n = 3), so three seeds can never reach p < 0.05.",
        "**Exact permutation test** (unpaired): all C(n_a + n_b, n_a) splits of the pooled runs.",
        "**Bootstrap CI**: percentile interval of mean(d), resampling the pairs; with three seeds it cannot be wider "
        "than the range of d and undercovers.",
        "**Hedges' g** = J · (mean_LoRA − mean_full) / s_pooled, s_pooled = √(((n_a−1)s_a² + (n_b−1)s_b²) / "
        "(n_a + n_b − 2)), J = 1 − 3 / (4(n_a + n_b) − 9).",
        "**d_z** = mean(d) / sd(d) (sd with n − 1) of the paired differences — not d_av.",
        "**Holm**: step-down correction across tasks within each family of tests (each test is one family); the "
        "adjusted p is in brackets.",
    ])  # fmt: skip
    doc.para("Source: tables/statistics.csv.", css="note")


def _drift_section(doc: Document, study: _Study) -> None:
    doc.heading(2, "Representational drift")
    layers, summary = study.tables["drift_layers"], study.tables["drift_summary"]
    if layers is None and summary is None:
        doc.not_run(study.why["drift_layers"])
        return
    confidence = float(study.analysis.get("confidence", 0.95))
    doc.para("Similarity of each fine-tuned model's hidden states to the base model's, layer by layer, on the fixed "
             "probe examples (1 = unchanged; drift = 1 − similarity). The references show what the numbers can "
             "mean: **base vs base** is the ceiling a correct measure reaches (1), **seed vs seed** is the "
             "similarity of two runs of the same method (the noise between seeds), **shuffled rows** is the chance "
             "level of unrelated examples.")  # fmt: skip
    if layers is not None:
        layers = layers.copy()
        layers["layer"] = pd.to_numeric(layers["layer"], errors="coerce")
        layers["value"] = pd.to_numeric(layers["value"], errors="coerce")
        layers["method"] = layers["method"].where(layers["method"].notna(), "")
        for task in _tasks(study, layers):
            figure = drift_figure(layers, task, confidence)
            doc.figure(_save(study, figure, f"drift_{slug(task)}"),
                       f"{task}: solid = run vs base (mean over seeds, band = {confidence:.0%} t-interval over "
                       f"seeds; one seed: its bootstrap interval over probe examples); dotted = seed vs seed; "
                       f"black dashed = base vs base; grey dash-dot = row-shuffled base.")  # fmt: skip
    else:
        doc.not_run(f"per-layer figure: {study.why['drift_layers']}")
    if summary is None:
        return
    refs = {}
    if layers is not None:
        for (task, comparison, pooling, measure), g in layers.groupby(["task", "comparison", "pooling", "measure"]):
            if comparison in ("base_vs_base", "shuffled_base"):
                refs[(task, comparison, pooling, measure)] = g["value"].mean()
    rows = []
    for task in _tasks(study, summary):
        part = summary[summary["task"] == task]
        for pooling in ordered(part["pooling"].astype(str), ("mean", "head")):
            for measure in ordered(part["measure"].astype(str), tuple(MEASURE_LABELS)):
                cell = part[(part["pooling"] == pooling) & (part["measure"] == measure)]
                runs, pairs = cell[cell["comparison"] == "run_vs_base"], cell[cell["comparison"] == "seed_vs_seed"]
                d = {m: describe_finite(runs[runs["method"] == m]["mean_over_layers"], confidence)
                     for m in ("lora", "full")}  # fmt: skip
                last = {m: runs[runs["method"] == m]["mean_last_third"].mean() for m in ("lora", "full")}
                noise = {m: pairs[pairs["method"] == m]["mean_over_layers"].mean() for m in ("lora", "full")}
                drift = {m: 1 - d[m]["mean"] for m in d}
                ok = finite(drift["full"]) and drift["full"] > 0
                reduction = 1 - drift["lora"] / drift["full"] if ok else math.nan
                rows.append([
                    task, pooling, measure,
                    f"{_pm(d['lora']['mean'], d['lora']['sd'])} (n={d['lora']['n']})",
                    f"{_pm(d['full']['mean'], d['full']['sd'])} (n={d['full']['n']})",
                    _f(last["lora"]), _f(last["full"]), _f(noise["lora"]), _f(noise["full"]),
                    f"{100 * reduction:+.1f} %" if finite(reduction) else "—",
                    _f(refs.get((task, "base_vs_base", pooling, measure))),
                    _f(refs.get((task, "shuffled_base", pooling, measure))),
                ])  # fmt: skip
    doc.table(["task", "pooling", "measure", "LoRA vs base, mean over layers", "full FT vs base, mean over layers",
               "LoRA, last third of layers", "full FT, last third", "seed vs seed, LoRA", "seed vs seed, full FT",
               "drift reduction 1 − drift_LoRA/drift_full",
               "base vs base", "shuffled rows"], rows)  # fmt: skip
    doc.para("Mean over layers: mean ± sd over seeds. Seed vs seed: two runs of one method compared with each "
             "other, mean over layers and pairs (a run further from the base than this is not told apart from "
             "seed noise by the measure alone). Drift reduction is the point estimate from the means; the "
             "verdict table gives it with its interval.", css="note")  # fmt: skip


def _weights_section(doc: Document, study: _Study) -> None:
    doc.heading(2, "Weight-space change")
    if study.need("weights"):
        doc.not_run(study.why["weights"])
        return
    weights = weights_frame(study.tables["weights"])
    for task in _tasks(study, weights):
        if weights[(weights["task"] == task) & weights["layer"].notna()].empty:
            continue
        _, common = changed_kinds(weights[weights["task"] == task])
        doc.figure(_save(study, weights_figure(weights, task), f"weights_{slug(task)}"),
                   f"{task}: per layer, relative update ‖W_ft − W_base‖F / ‖W_base‖F, effective rank of the "
                   f"update "
                   f"(Roy & Vetterli) and intruder dimensions (top singular vectors of W_ft with |cos| below the "
                   f"threshold against every base singular vector). Solid lines average the matrix kinds both "
                   f"methods changed ({', '.join(common) or 'none in common: each its own'}).")  # fmt: skip
    rows = []
    for task in _tasks(study, weights):
        part = weights[weights["task"] == task]
        for method in method_order(part["method"]):
            sel = part[part["method"] == method]
            for kind in ordered(sel["kind"]):
                k = sel[sel["kind"] == kind]
                per_seed_intruders = k.groupby("seed")["intruders"].sum()
                n_seeds = k["seed"].nunique()
                rows.append([task, method_label(method), kind, str(n_seeds), str(int(len(k) / max(1, n_seeds))),
                             f"{k['relative_update'].mean():.3e}", _f(k["effective_rank"].mean(), 2),
                             _f(per_seed_intruders.mean(), 1)])  # fmt: skip
    doc.table(["task", "method", "matrix kind", "seeds", "matrices per seed", "mean relative update",
               "mean effective rank of ΔW", "intruders per run (sum over matrices)"], rows)  # fmt: skip


def _deployment_section(doc: Document, study: _Study) -> None:
    doc.heading(2, "Deployment cost")
    dep = study.tables["deployment"]
    if dep is None:
        doc.not_run(study.why["deployment"])
    else:
        dep = dep.copy()
        dep["seq_len"] = dep["seq_len"].astype(str)
        # drawn here from the table, in the report's method colours; the deploy stage's own latency figure shows
        # the same numbers in other colours, so it is linked, not embedded
        figures = [p for p in _other_figures(study, "deployment_*.png") if p.name != "deployment_latency.png"]
        doc.figure(_save(study, latency_figure(dep), "deployment_latency"),
                   "Median latency per batch against batch size, one panel per sequence "
                   "length (band: median to p95; log–log). LoRA strategies in LoRA's colour (hollow markers: "
                   "torch.compile variants), full FT in full FT's; the merged adapter should sit on the full-FT line."
                   + (" The deploy stage's figure of the same numbers: figures/deployment_latency.png."
                      if (study.root / "figures" / "deployment_latency.png").is_file() else ""))  # fmt: skip
        for path in figures:
            doc.figure(path, f"{path.stem.replace('_', ' ')} (figures/{path.name}, drawn by the deploy stage)")
        strategies = ordered(dep["strategy"].astype(str), ("full", "merged", "separate", "switch", "mixed", "base"))
        batches = sorted(pd.to_numeric(dep["batch_size"], errors="coerce").dropna().astype(int).unique())
        for seq_len in ordered(dep["seq_len"], ("natural",)):
            part = dep[dep["seq_len"] == seq_len]
            latency, overhead = [], []
            for strategy in strategies:
                cells = [part[(part["strategy"] == strategy) & (part["batch_size"] == b)] for b in batches]
                latency.append([strategy] + [_f(c["p50_ms"].iloc[0], 2) if not c.empty else "—" for c in cells]
                               + [_f(cells[-1]["examples_per_s"].iloc[0], 1)
                                  if not cells[-1].empty and "examples_per_s" in part else "—"])  # fmt: skip
                if strategy.startswith("full") or "overhead_vs_full" not in part:
                    continue
                line = [strategy]
                for c in cells:
                    r = c.iloc[0] if not c.empty else {}
                    text = f"{100 * (r['overhead_vs_full'] - 1):+.1f}" if finite(r.get("overhead_vs_full")) else "—"
                    if finite(r.get("overhead_ci_low")) and finite(r.get("overhead_ci_high")):
                        text += f" [{100 * (r['overhead_ci_low'] - 1):+.1f}, {100 * (r['overhead_ci_high'] - 1):+.1f}]"
                    line.append(text)
                overhead.append(line)
            doc.heading(3, f"Sequence length {seq_len}")
            doc.table(["median latency per batch (ms)"] + [f"batch {b}" for b in batches]
                      + [f"examples/s at batch {batches[-1]}"], latency)  # fmt: skip
            if overhead:
                doc.table(["overhead vs full FT (%, interval)"] + [f"batch {b}" for b in batches], overhead)
        doc.para("Overhead: latency relative to full fine-tuning at the same batch size and length, minus 1, with "
                 "its bootstrap interval in brackets. Strategies: full = fully fine-tuned model; merged = LoRA merged "
                 "into the base "
                 "weights; separate = LoRA kept as an adapter; switch = switching adapters between batches; "
                 "mixed = several adapters served in one batch from one base; base = the untouched base model.",
                 css="note")  # fmt: skip
        cols = [c for c in dep.columns]
        full_rows = [[_table_value(r[c]) for c in cols] for _, r in dep.iterrows()]
        doc.details(f"all {len(dep)} rows of tables/deployment.csv",
                    _plain_table(cols, full_rows))  # fmt: skip
    checks = study.tables["deployment_checks"]
    doc.heading(3, "Correctness checks (before timing)")
    if checks is None:
        doc.not_run(study.why["deployment_checks"])
    else:
        rows = []
        for r in checks.itertuples(index=False):
            cells = [_table_value(v) for v in r]
            if "passed" in checks.columns:
                i = list(checks.columns).index("passed")
                ok = str(r[i]).strip().lower() in ("true", "1", "1.0")
                cells[i] = ("passed", "met") if ok else ("FAILED", "notmet")
            rows.append(cells)
        doc.table(list(checks.columns), rows)
    memory = study.tables["deployment_memory"]
    doc.heading(3, "Memory")
    if memory is None:
        doc.not_run(study.why["deployment_memory"])
    else:
        doc.table(list(memory.columns), [[_table_value(v) for v in r] for r in memory.itertuples(index=False)])


def _table_value(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if not finite(v):
            return "—"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _used_hparams(study: _Study) -> dict[tuple[str, str], list[tuple[int | None, dict]]]:
    """(task, method) -> [(seed, configured hyperparameters)] from each run's hparams.json."""
    found: dict[tuple[str, str], list[tuple[int | None, dict]]] = {}
    paths = sorted(study.root.glob("runs/*/*/seed*/hparams.json")) + sorted(
        study.root.glob("baselines/*/head_only/hparams.json"))  # fmt: skip
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        configured = data.get("configured", data)
        rel = path.relative_to(study.root).parts
        if rel[0] == "runs":
            task, method, seed = rel[1], rel[2], int(rel[3].removeprefix("seed"))
        else:
            task, method, seed = rel[1], str(data.get("method", "head")), None
        found.setdefault((task, method), []).append((seed, configured))
    return found


def _tuned(study: _Study) -> list[tuple[str, str, dict, Path]]:
    out = []
    for path in sorted((study.root / "tuned").glob("*.y*ml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        if not isinstance(data, dict):
            continue
        stem = re.split(r"[_\-.]", path.stem)
        task = str(data.get("task") or (stem[0] if stem else path.stem))
        method = str(data.get("method") or next((p for p in stem if p in METHOD_LABELS), "?"))
        nested = ("params", "best_params", "hyperparameters", "hp")
        params = next((data[k] for k in nested if isinstance(data.get(k), dict)), None)
        if params is None and any(k in data for k in nested):
            params = {}  # a search without a finished trial
        if params is None:
            skip = {"task", "method", "value", "best_value", "trial", "n_trials", "study", "direction", "sampler"}
            params = {k: v for k, v in data.items() if k not in skip and not isinstance(v, (dict, list))}
        out.append((task, method, params, path))
    return out


def _same(a: Any, b: Any) -> bool:
    if finite(a) and finite(b) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _hparams_section(doc: Document, study: _Study) -> None:
    doc.heading(2, "Hyperparameters")
    used = _used_hparams(study)
    doc.heading(3, "Used")
    if used:
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
            tasks = ordered(tasks, list(study.config.get("tasks") or {}))
            columns.append((f"{method_label(method)} ({', '.join(tasks)})", configured))
        doc.table(["hyperparameter"] + [c[0] for c in columns],
                  [[k] + [_value(c[1][k]) if k in c[1] else "—" for c in columns] for k in keys])  # fmt: skip
        note = (
            "As configured and saved by each run (runs/<task>/<method>/seed<k>/hparams.json; head only: "
            "baselines/<task>/head_only/hparams.json); columns group the tasks that used identical values."
        )
        if varies:
            note += " Values differ between seeds for: " + ", ".join(f"{t} {m}" for t, m in sorted(varies)) + "."
        doc.para(note, css="note")
    elif study.config.get("training") or {}:
        training = study.config["training"]
        methods = [m for m in method_order(training) if isinstance(training.get(m), dict)]
        keys = list(dict.fromkeys(k for m in methods for k in training[m]))
        doc.table(["hyperparameter"] + [method_label(m) for m in methods],
                  [[k] + [_value(training[m].get(k, "—")) for m in methods] for k in keys])  # fmt: skip
        doc.para("From config.yaml: no run has saved its hyperparameters yet.", css="note")
    else:
        doc.not_run("no runs/*/*/seed*/hparams.json and no config.yaml")
    doc.heading(3, "Tuned")
    tuned = _tuned(study)
    trials = study.tables["trials"]
    figures = _other_figures(study, "tune_*.png")
    if not tuned and trials is None and not figures:
        doc.not_run("no tuned/*.yaml (the optional tune stage did not run)")
        return
    rows = []
    for task, method, params, path in tuned:
        runs = used.get((task, method), [])
        for key, value in params.items():
            values = [c.get(key, "<absent>") for _, c in runs]
            if not runs:
                check = ("no run", "notrun")
            elif all(_same(v, value) for v in values):
                check = ("used", "met")
            else:
                check = (f"NOT used (runs: {', '.join(sorted({_value(v) for v in values}))})", "notmet")
            rows.append([task, method_label(method), key, _value(value), check])
    if rows:
        doc.table(["task", "method", "hyperparameter", "tuned value", "reached the runs?"], rows)
    if trials is not None:
        by = [c for c in ("task", "method") if c in trials]
        summary = []
        for key, group in trials.groupby(by) if by else [(("all",), trials)]:
            key = key if isinstance(key, tuple) else (key,)
            states = group["state"].value_counts().to_dict() if "state" in group else {}
            best = pd.to_numeric(group["value"], errors="coerce").max() if "value" in group else math.nan
            key = tuple(method_label(str(k)) if col == "method" else str(k) for col, k in zip(by or ["trials"], key))
            summary.append([*key, str(len(group)), ", ".join(f"{k} {v}" for k, v in states.items()) or "—",
                            _f(best)])  # fmt: skip
        doc.table([*(by or ["trials"]), "trials", "states", "best dev value"], summary)
        doc.para("Tuning scores the dev split, held out of train; the reported eval split is never used for "
                 "selection.", css="note")  # fmt: skip
    for path in figures:
        doc.figure(path, f"{path.stem.replace('_', ' ')} (figures/{path.name})")


def _reference_section(doc: Document, study: _Study, flagged: pd.DataFrame | None) -> None:
    doc.heading(2, "Beside the reference study")
    ref = load_reference()
    families = ref["families"]
    ref_tasks = {str(r["task"]) for fam in families.values() for r in fam["rows"]} - {"all"}
    ours = list(study.config.get("tasks") or {})
    if flagged is not None:
        ours = ordered(list(ours) + _tasks(study, flagged))
    matched = [t for t in ours if t in ref_tasks]
    if not matched:
        doc.para(f"No task of this study is one of the reference study's ({', '.join(sorted(ref_tasks))}), so its "
                 f"numbers are not shown.", css="notrun")  # fmt: skip
        return
    doc.para(f"**{ref['study']}** ({ref['repository']}): {ref['setup']}. Its numbers come from a different model "
             "and hardware and from the flawed pipeline noted under each table; they are shown for orientation, "
             "not as a target.")  # fmt: skip

    def rows_of(family: str, task: str) -> list[dict]:
        return [r for r in families[family]["rows"] if str(r["task"]) == task]

    def flaw(family: str) -> None:
        doc.para(f"Known flaw ({family}): {families[family]['flaw']}", css="note")

    # quality
    doc.heading(3, "Task quality")
    table = []
    for task in matched:
        for method in ("lora", "full"):
            rs = rows_of("quality", task)
            rs = [r for r in rs if r["method"] == method]
            if not rs:
                continue
            metric = rs[0]["metric"]
            ref_vals = [float(r["value"]) for r in rs]
            mine = "not run"
            if flagged is not None and metric in flagged:
                sel = flagged[(flagged["task"] == task) & (flagged["method"] == method) & (flagged["status"] == "ok")]
                sel = sel[pd.to_numeric(sel[metric], errors="coerce").notna()].sort_values("seed")
                if len(sel):
                    d = stats.describe(sel[metric].astype(float))
                    each = " / ".join(f"{v:.3f}{' ⚑' if f else ''}" for v, f in zip(sel[metric], sel["flagged"]))
                    mine = f"{each} (mean {_pm(d['mean'], d['sd'], 3)}, all ok runs)"
            table.append([task, metric, method_label(method),
                          f"{' / '.join(f'{v:.3f}' for v in ref_vals)} (mean {np.mean(ref_vals):.3f})",
                          mine])  # fmt: skip
    doc.table(["task", "metric", "method", "reference (seeds 42 / 1337 / 2024)", "this study (its seeds)"], table)
    flaw("quality")
    # majority
    doc.heading(3, "Majority-class baseline")
    baselines = study.tables["baselines"]
    table = []
    for task in matched:
        for r in rows_of("majority", task):
            mine = "not run"
            if baselines is not None:
                sel = baselines[(baselines["task"] == task) & (baselines["baseline"] == "majority")]
                if not sel.empty and r["metric"] in sel:
                    mine = _f(sel[r["metric"]].iloc[0], 3)
            table.append([task, r["metric"], f"{float(r['value']):.3f}", mine])
    doc.table(["task", "metric", "reference", "this study"], table)
    flaw("majority")
    # drift
    doc.heading(3, "Drift (1 − CKA, mean over layers)")
    summary = study.tables["drift_summary"]
    table = []
    for task in matched:
        ref_d = {r["method"]: float(r["value"]) for r in rows_of("drift", task)}
        ref_red = 1 - ref_d["lora"] / ref_d["full"] if {"lora", "full"} <= set(ref_d) else math.nan
        mine = {"lora": math.nan, "full": math.nan}
        if summary is not None:
            sel = summary[(summary["task"] == task) & (summary["measure"] == "linear_cka")
                          & (summary["pooling"] == "mean") & (summary["comparison"] == "run_vs_base")]  # fmt: skip
            mine = {m: 1 - sel[sel["method"] == m]["mean_over_layers"].mean() for m in mine}
        red = 1 - mine["lora"] / mine["full"] if finite(mine["full"]) and mine["full"] > 0 else math.nan
        table.append([task, _f(ref_d.get("lora"), 3), _f(ref_d.get("full"), 3), f"{100 * ref_red:+.1f} %",
                      _f(mine["lora"], 3) if finite(mine["lora"]) else "not run",
                      _f(mine["full"], 3) if finite(mine["full"]) else "not run",
                      f"{100 * red:+.1f} %" if finite(red) else "—"])  # fmt: skip
    doc.table(["task", "reference LoRA", "reference full FT", "reference reduction", "this study LoRA",
               "this study full FT", "this study reduction"], table)  # fmt: skip
    flaw("drift")
    bvb = families["cka_base_vs_base"]["rows"][0]
    layers = study.tables["drift_layers"]
    mine = "not run"
    if layers is not None:
        sel = layers[(layers["comparison"] == "base_vs_base") & (layers["measure"] == "linear_cka")]
        vals = pd.to_numeric(sel["value"], errors="coerce").dropna()
        if len(vals):
            mine = f"{vals.min():.3f}–{vals.max():.3f}"
    doc.table(
        ["check", "reference", "this study (linear CKA, all layers)"],
        [["CKA of the base model with itself (correct: 1)", f"{bvb['low']:.2f}–{bvb['high']:.2f}", mine]],
    )
    flaw("cka_base_vs_base")
    # latency
    doc.heading(3, "Latency at batch size 1")
    dep = study.tables["deployment"]
    ref_l = {r["method"]: float(r["value"]) for r in families["latency"]["rows"]}
    ours_l: dict[str, float] = {}
    seq = ""
    if dep is not None:
        one = dep[pd.to_numeric(dep["batch_size"], errors="coerce") == 1].copy()
        one["seq_len"] = one["seq_len"].astype(str)
        if not one.empty:
            seq = ordered(one["seq_len"], ("natural",))[0]
            one = one[one["seq_len"] == seq]
            ours_l = {str(r.strategy): float(r.p50_ms) for r in one.itertuples()}
    names = {"full": "full", "merged": "merged", "separate": "separate", "multi_adapter": "mixed"}
    table = []
    for key, ours_key in names.items():
        ref_ms = ref_l.get(key)
        our_ms = ours_l.get(ours_key)
        table.append([f"{key} (ours: {ours_key})", _f(ref_ms, 1), _f(ref_ms / ref_l["full"] if ref_ms else None, 3),
                      _f(our_ms, 2) if our_ms is not None else NOT_RUN,
                      _f(our_ms / ours_l["full"], 3) if our_ms is not None and ours_l.get("full") else "—",
                      ])  # fmt: skip
    ours_header = f"this study p50 ms{f' (seq {seq})' if seq else ''}"
    doc.table(["strategy", "reference p50 ms (L4)", "reference ratio to full", ours_header,
               "this study ratio to full"], table)  # fmt: skip
    flaw("latency")


def _provenance_section(doc: Document, study: _Study) -> None:
    doc.heading(2, "Provenance")
    manifest = study.manifest
    if not manifest:
        doc.not_run("manifest.json missing")
    else:
        doc.table(["item", "value"], css="kv", rows=[
            ["config fingerprint", f"`{manifest.get('config_fingerprint', '—')}`"],
            ["lorascope", str(manifest.get("lorascope", "—"))],
            ["python", str(manifest.get("python", "—"))],
            ["report written", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")],
        ])  # fmt: skip
        versions = manifest.get("versions") or {}
        hardware = manifest.get("hardware") or {}
        if versions:
            doc.heading(3, "Versions")
            doc.table(["package", "version"], [[k, str(v)] for k, v in versions.items()], css="kv")
        if hardware:
            doc.heading(3, "Hardware")
            doc.table(["item", "value"], [[k, _value(v) or "—"] for k, v in hardware.items()], css="kv")
        stages = manifest.get("stages") or {}
        doc.heading(3, "Stages")
        if stages:
            rows = [[name, str(s.get("status", "—")), _seconds(s.get("seconds")), str(s.get("finished", "—")),
                     f"`{s.get('fingerprint', '—')}`"] for name, s in stages.items()]  # fmt: skip
            total = sum(float(s["seconds"]) for s in stages.values() if finite(s.get("seconds")))
            rows.append(["**total**", "", _seconds(total), "", ""])
            doc.table(["stage", "status", "wall time", "finished (UTC)", "fingerprint"], rows)
        else:
            doc.not_run("no stage recorded in manifest.json")
    config_path = study.root / "config.yaml"
    if config_path.is_file():
        doc.details("config.yaml (resolved, exactly what ran)", config_path.read_text(), "yaml")
    else:
        doc.not_run("config.yaml missing")


# ---------------------------------------------------------------- entry points


def write_report(study_root: Path | str) -> tuple[Path, Path]:
    """Write `report.md` and a self-contained `report.html` for a study directory; returns their
    paths. Works on any partial study: a missing input makes its section read "not run"."""
    root = Path(study_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    study = _load(root)
    flagged, flag_source = (None, "")
    if study.tables["performance"] is not None:
        flagged, flag_source = _flags(study)
    comparisons, comparisons_why = _comparisons(study, flagged)
    sections: list[tuple[str, Callable[[Document], None], str | None]] = [
        ("verdict", lambda d: _verdict_section(d, study), study.need("verdict")),
        ("task performance", lambda d: _performance_section(d, study, flagged, flag_source), study.need("performance")),
        ("method comparison", lambda d: _comparison_section(d, flagged, comparisons, comparisons_why),
         comparisons_why or None),
        ("drift", lambda d: _drift_section(d, study),
         study.need("drift_layers") if study.tables["drift_summary"] is None else None),
        ("weight-space change", lambda d: _weights_section(d, study), study.need("weights")),
        ("deployment", lambda d: _deployment_section(d, study), study.need("deployment")),
        ("hyperparameters", lambda d: _hparams_section(d, study), None),
        ("reference study", lambda d: _reference_section(d, study, flagged), None),
        ("provenance", lambda d: _provenance_section(d, study), None if study.manifest else "manifest.json missing"),
    ]  # fmt: skip
    name = study.config.get("name") or root.name
    doc = Document()
    doc.heading(1, f"lorascope report — {name}")
    doc.para(_summary(study, flagged, [s for s, _, missing in sections if missing]), css="summary")
    for _, build, _ in sections:
        build(doc)
    shown = {p.resolve() for p in doc.figure_paths()}
    others = [p for p in _other_figures(study, "*.png") if p.resolve() not in shown]
    if others:
        doc.heading(2, "Other figures")
        for path in others:
            doc.figure(path, f"figures/{path.name}")
    for stale in (root / "figures").glob(f"{FIGURE_PREFIX}*.png") if (root / "figures").is_dir() else []:
        if stale not in study.figures:
            stale.unlink(missing_ok=True)
    md_path, html_path = root / "report.md", root / "report.html"
    _write_bytes(md_path, to_markdown(doc, root).encode("utf-8"))
    _write_bytes(html_path, to_html(doc, f"lorascope report — {name}").encode("utf-8"))
    return md_path, html_path
