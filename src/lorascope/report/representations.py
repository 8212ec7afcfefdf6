"""Report sections on what fine-tuning changed inside the model: representational drift per
layer with its references, and weight-space change. Numbers come from drift_layers.csv,
drift_statistics.csv (the analyze stage) and weights.csv."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lorascope.report import format as fmt
from lorascope.report.document import Document
from lorascope.report.figures import (
    MEASURE_LABELS,
    drift_figure,
    finite,
    legend,
    method_color,
    method_label,
    method_order,
    new_figure,
    ordered,
    plain_ticks,
)
from lorascope.report.loader import ANALYZE, StudyView

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def drift_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Representational drift")
    layers, statistics = view.tables["drift_layers"], view.tables["drift_statistics"]
    if layers is None:
        doc.not_run(view.why["drift_layers"])
        return
    doc.para(
        "Similarity of each fine-tuned model's hidden states to the base model's, layer by layer, on the fixed "
        "probe examples (1 = unchanged; drift = 1 − similarity). The references show what the numbers can "
        "mean: **base vs base** is the ceiling a correct measure reaches (1), **seed vs seed** is the "
        "similarity of two runs of the same method (the noise between seeds), **shuffled rows** is the chance "
        "level of unrelated examples."
    )
    _pooled_positions(doc, view)
    layers = layers.assign(method=layers["method"].fillna(""))
    for task in view.tasks(layers):
        doc.figure(
            view.save(drift_figure(layers, task, view.confidence), f"drift_{task}"),
            f"{task}: solid = run vs base (mean over seeds, band = {view.confidence:.0%} t-interval over "
            f"seeds; one seed: its bootstrap interval over probe examples); dotted = seed vs seed; "
            f"black dashed = base vs base; grey dash-dot = row-shuffled base.",
        )
    _rogue_dimensions(doc, view, layers)
    _undefined(doc, layers)
    if statistics is None:
        doc.not_run(f"drift table: {view.why['drift_statistics']}; {ANALYZE}")
        return
    rows = []
    for task in view.tasks(statistics):
        part = statistics[statistics["task"] == task]
        for pooling in ordered(part["pooling"].astype(str), ("mean", "head")):
            for measure in ordered(part["measure"].astype(str), tuple(MEASURE_LABELS)):
                cell = part[(part["pooling"] == pooling) & (part["measure"] == measure)]
                for r in cell.to_dict("records"):  # one row per method, the study's order
                    reduction = r["drift_reduction"]
                    if not finite(reduction):
                        reduced = "reference" if not finite(r["reduction_pairs"]) else "—"
                    else:
                        reduced = f"{100 * reduction:+.1f} %" + (
                            f" [{100 * r['reduction_low']:+.1f}, {100 * r['reduction_high']:+.1f}]"
                            if finite(r["reduction_low"])
                            else f" (no interval; {int(r['reduction_pairs'])} pairs)"
                        )
                    rows.append(
                        [
                            task,
                            pooling,
                            measure,
                            method_label(str(r["method"])),
                            f"{fmt.pm(r['similarity_mean'], r['similarity_sd'])} (n={int(r['n'])})",
                            fmt.num(r["last_third_mean"]),
                            fmt.num(r["seed_vs_seed_mean"]),
                            reduced,
                            fmt.num(r["base_vs_base"]),
                            fmt.num(r["shuffled_base"]),
                        ]
                    )
    doc.table(
        [
            "task",
            "pooling",
            "measure",
            "method",
            "vs base, mean over layers",
            "last third of layers",
            "seed vs seed",
            f"drift reduction 1 − mean drift / mean drift of the reference [Fieller {view.confidence:.0%}]",
            "base vs base",
            "shuffled rows",
        ],
        rows,
    )
    doc.para(
        "Mean over layers: mean ± sd over seeds. Seed vs seed: two runs of one method compared with each "
        "other, mean over layers and pairs (a run further from the base than this is not told apart from "
        "seed noise by the measure alone). Drift reduction: against the study's reference method "
        "(analysis.reference, full FT by default), the ratio of mean drifts over the seed pairs without a "
        "flagged run, the number the verdict uses, with Fieller's interval (none when it is unbounded: the "
        "reference's drift is not clearly above 0). Source: tables/drift_statistics.csv.",
        css="note",
    )


def _pooled_positions(doc: Document, view: StudyView) -> None:
    """Which positions the mean pooled, and per layer the share of the base model's token-norm
    mass the left-out positions carried (a decoder's first position: most of it)."""
    positions = view.tables["pooled_positions"]
    if positions is None:
        return
    rows = []
    for task in view.tasks(positions):
        part = positions[positions["task"] == task].sort_values("layer")
        shares = part["excluded_norm_share"]
        per_layer = (
            "—"
            if not shares.notna().any()
            else " ".join(f"{int(layer)}: {100 * share:.0f}" for layer, share in zip(part["layer"], shares))
        )
        rows.append([task, str(part["positions"].iloc[0]), per_layer])
    doc.table(
        [
            "task",
            "mean pooling reads",
            "share of the base model's token-norm mass in the left-out positions, % per layer (layer: %)",
        ],
        rows,
    )


ROGUE_SHARE = 0.5  # one feature holding more of a model's centred variance than this is shown


def _rogue_dimensions(doc: Document, view: StudyView, layers: pd.DataFrame) -> None:
    """The layers where one feature holds most of the base's or a run's variance: CKA and cosine
    there mostly measure that feature (rogue dimensions, Timkey & van Schijndel 2021)."""
    rows = []
    for task in view.tasks(layers):
        part = layers[layers["task"] == task]
        for pooling in ordered(part["pooling"].astype(str), ("mean", "head")):
            cell = part[part["pooling"] == pooling]
            shares = pd.concat(
                {
                    "base": cell[cell["comparison"] == "base_vs_base"].groupby("layer")["top1_share_x"].first(),
                    "runs": cell[cell["comparison"] == "run_vs_base"].groupby("layer")["top1_share_y"].max(),
                },
                axis=1,
            )
            large = shares[shares.max(axis=1) > ROGUE_SHARE]
            if not large.empty:
                per_layer = "; ".join(
                    f"{int(layer)}: {_percent(s.base)} / {_percent(s.runs)}" for layer, s in large.iterrows()
                )
                rows.append([task, pooling, per_layer])
    if not rows:
        return
    doc.table(
        [
            "task",
            "pooling",
            f"layers where one feature holds > {ROGUE_SHARE:.0%} of the variance (layer: base % / runs' largest %)",
        ],
        rows,
    )
    standardized = bool((view.config.get("drift") or {}).get("standardize", False))
    doc.para(
        "In these layers one feature holds most of a model's centred variance over the probe examples, so CKA and "
        "cosine mostly measure that feature (rogue dimensions, Timkey & van Schijndel 2021). "
        + (
            "This study z-scored every feature before the measures (drift.standardize), so each weighs the same."
            if standardized
            else "`drift.standardize: true` z-scores every feature before the measures, so that each weighs the same."
        )
        + " Source: tables/drift_layers.csv (top1_share_x: the base, top1_share_y: a run; top3_share_*: three features).",
        css="note",
    )


def _percent(share: float) -> str:
    return f"{100 * share:.0f}" if finite(share) else "—"


def _undefined(doc: Document, layers: pd.DataFrame) -> None:
    """The values and intervals the data leave undefined, which the figure and the means cannot show, and why."""
    reasons = layers["missing_reason"]
    missing = layers[reasons.notna() & (reasons.astype(str) != "")]
    if missing.empty:
        return
    keys = ["task", "pooling", "comparison", "method", "seed", "measure", "missing_reason"]
    rows = [
        [*(fmt.cell(k) for k in key[:-1]), ", ".join(str(int(layer)) for layer in sorted(group["layer"])), key[-1]]
        for key, group in missing.groupby(keys, sort=False, dropna=False)
    ]
    doc.table(["task", "pooling", "comparison", "method", "seed", "measure", "layers", "missing because"], rows)
    doc.para(
        "Where the probe examples leave a measure undefined (too few examples, or an estimate of a model's HSIC with "
        "itself that is not positive), drift_layers.csv holds NaN and the reason instead of stopping the study; the "
        "means over layers leave those layers out.",
        css="note",
    )


def weights_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Weight-space change")
    if view.need("weights"):
        doc.not_run(view.why["weights"])
        return
    weights = weights_frame(view.tables["weights"])
    for task in view.tasks(weights):
        if weights[(weights["task"] == task) & weights["layer"].notna()].empty:
            continue
        _, common = changed_kinds(weights[weights["task"] == task])
        doc.figure(
            view.save(weights_figure(weights, task), f"weights_{task}"),
            f"{task}: per layer, relative update ‖W_ft − W_base‖F / ‖W_base‖F, effective rank of the "
            f"update (Roy & Vetterli) and intruder dimensions (top singular vectors of W_ft with |cos| below "
            f"the threshold against every base singular vector). Solid lines average the matrix kinds both "
            f"methods changed ({', '.join(common) or 'none in common: each its own'}).",
        )
    rows = []
    for task in view.tasks(weights):
        part = weights[weights["task"] == task]
        for method in method_order(part["method"]):
            sel = part[part["method"] == method]
            for kind in ordered(sel["kind"]):
                k = sel[sel["kind"] == kind]
                n_seeds = k["seed"].nunique()
                rows.append(
                    [
                        task,
                        method_label(method),
                        kind,
                        str(n_seeds),
                        str(int(len(k) / max(1, n_seeds))),
                        f"{k['relative_update'].mean():.3e}",
                        fmt.num(k["effective_rank"].mean(), 2),
                        fmt.num(k.groupby("seed")["intruders"].sum().mean(), 1),
                    ]
                )
    doc.table(
        [
            "task",
            "method",
            "matrix kind",
            "seeds",
            "matrices per seed",
            "mean relative update",
            "mean effective rank of ΔW",
            "intruders per run (sum over matrices)",
        ],
        rows,
    )


def _kind(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def weights_frame(weights: pd.DataFrame) -> pd.DataFrame:
    """tables/weights.csv with numeric columns and each module's layer and matrix kind."""
    w = weights.copy()
    if "kind" not in w:
        w["kind"] = w["module"].astype(str).map(_kind)
    if "layer" not in w:
        w["layer"] = w["module"].astype(str).str.extract(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)(?:\.|$)")[0]
    w["layer"] = pd.to_numeric(w["layer"], errors="coerce")
    for col in ("relative_update", "effective_rank", "intruders"):
        w[col] = pd.to_numeric(w.get(col), errors="coerce")
    w["kind"] = w["kind"].astype(str)
    return w


def changed_kinds(w: pd.DataFrame) -> tuple[dict[str, list[str]], list[str]]:
    """Matrix kinds each method changed, and those every method changed (compared like for like)."""
    moved = w[w["relative_update"] > 0]
    changed = {m: sorted(set(moved[moved["method"] == m]["kind"])) for m in method_order(w["method"])}
    common = sorted(set.intersection(*(set(k) for k in changed.values()))) if changed else []
    return changed, common


def weights_figure(weights: pd.DataFrame, task: str) -> Figure:
    """Size, rank and intruder dimensions of each method's update per layer (a `weights_frame`)."""
    w = weights[(weights["task"] == task) & weights["layer"].notna()]
    changed, common = changed_kinds(w)
    methods = method_order(w["method"])
    fig = new_figure(13.0, 3.5 + 0.3 * math.ceil(2 * len(methods) / 3))  # room for a legend of two lines a method
    axes = fig.subplots(1, 3)
    handles = []
    width = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        color = method_color(method)
        kinds = common or changed[method]
        sel = w[(w["method"] == method) & w["kind"].isin(kinds)]
        if sel.empty:
            continue
        for ax, col in ((axes[0], "relative_update"), (axes[1], "effective_rank")):
            per_seed = sel.groupby(["seed", "layer"])[col].mean().unstack("seed")
            line = ax.plot(
                per_seed.index,
                per_seed.mean(axis=1),
                color=color,
                lw=2.2,
                marker="o",
                ms=3.5,
                label=f"{method_label(method)} ({', '.join(kinds)})",
            )
            if col == "relative_update":
                handles += line
            if per_seed.shape[1] > 1:
                low, high = per_seed.min(axis=1), per_seed.max(axis=1)
                ax.fill_between(per_seed.index, low, high, color=color, alpha=0.2, lw=0)
            others = w[(w["method"] == method) & (w["relative_update"] > 0)]
            if common and set(changed[method]) - set(common) and col == "relative_update":
                every = others.groupby(["seed", "layer"])[col].mean().unstack("seed").mean(axis=1)
                label = f"{method_label(method)} (all {len(changed[method])} matrix kinds)"
                handles += ax.plot(every.index, every, color=color, lw=1.3, ls="--", label=label)
        intr = sel.groupby(["seed", "layer"])["intruders"].sum().unstack("seed").mean(axis=1)
        axes[2].bar(
            intr.index + (k - (len(methods) - 1) / 2) * width,
            intr,
            width=width,
            color=color,
            label=method_label(method) + (" (0 in every layer)" if not (intr > 0).any() else ""),
        )
    axes[0].set_ylabel("relative update ‖ΔW‖F / ‖W‖F (ratio)")
    axes[0].set_title("size of the update", fontsize=10)
    axes[1].set_ylabel("effective rank of ΔW (dimensions)")
    axes[1].set_title("rank of the update", fontsize=10)
    axes[2].set_ylabel("intruder dimensions per layer (count)")
    axes[2].set_title("intruder dimensions (summed over matrices)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[2].set_ylim(0, max(1.0, axes[2].get_ylim()[1]) * 1.3)  # room for the legend above the bars
    axes[2].legend(fontsize=8, frameon=False, loc="upper left", ncol=min(len(methods), 3))
    for ax in axes[:2]:
        if any(line.get_ydata().size and np.nanmin(line.get_ydata()) > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
            plain_ticks(ax.yaxis)
    fig.suptitle(f"{task}: weight-space change per layer (mean over seeds; band = min–max)", fontweight="bold")
    legend(fig, handles, ncol=3)
    return fig
