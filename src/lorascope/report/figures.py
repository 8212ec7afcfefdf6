"""The report's figures, drawn with matplotlib's object API (no pyplot: no global state, no GUI
backend), and the look they share with the report's tables: one colour, label and order per
method (Okabe-Ito, colour-blind safe); references are black or grey and dashed, so a coloured
solid line is always a fine-tuned model. Each function returns a Figure; `png_bytes` renders it."""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lorascope import stats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHOD_COLORS = {"lora": "#0072B2", "full": "#D55E00", "head": "#009E73"}
METHOD_LABELS = {"lora": "LoRA", "full": "full FT", "head": "head only"}
REFERENCE_STYLES = {
    "base_vs_base": {"color": "black", "linestyle": "--", "label": "base vs base (ceiling)"},
    "shuffled_base": {"color": "#8c8c8c", "linestyle": "-.", "label": "base vs row-shuffled base (chance)"},
    "majority": {"color": "black", "linestyle": "--", "label": "majority-class baseline"},
    "head_only": {"color": METHOD_COLORS["head"], "linestyle": ":", "label": "head-only probe"},
}
MEASURE_LABELS = {
    "linear_cka": "linear CKA",
    "debiased_cka": "debiased CKA",
    "rbf_cka": "RBF CKA",
    "cosine": "centred cosine",
}
POOLING_LABELS = {"mean": "masked-mean pooling", "head": "head-token pooling"}
DPI = 110


# ---------------------------------------------------------------- shared with the tables


def finite(x: Any) -> bool:
    """A number that can be shown: not None, NaN, inf or text."""
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def ordered(values: Iterable[Any], preferred: Sequence[Any] = ()) -> list:
    """Distinct values, those in `preferred` first and in its order, the rest as they come."""
    present = list(dict.fromkeys(v for v in values if isinstance(v, str) or finite(v)))
    return [v for v in preferred if v in present] + [v for v in present if v not in preferred]


def method_order(values: Iterable[Any]) -> list[str]:
    return ordered((str(v) for v in values if isinstance(v, str) and v), ("lora", "full", "head"))


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


# Colours of methods of your own (Okabe-Ito and tab10, none close to the built-ins' hues): a study's
# methods take them in config order (use_method_colors, once per report), so no two share one.
OTHER_METHOD_COLORS = ["#CC79A7", "#9467bd", "#8c564b", "#000000", "#56B4E9", "#bcbd22", "#7f7f7f", "#17becf"]
_study_colors: dict[str, str] = {}


def use_method_colors(methods: Iterable[str]) -> None:
    """Give the study's own methods their colours, in its order (the report's one piece of state)."""
    others = [m for m in methods if m not in METHOD_COLORS]
    _study_colors.clear()
    _study_colors.update({m: OTHER_METHOD_COLORS[i % len(OTHER_METHOD_COLORS)] for i, m in enumerate(others)})


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _study_colors.get(method) or OTHER_METHOD_COLORS[zlib.crc32(method.encode()) % len(OTHER_METHOD_COLORS)]


def describe_finite(values: Iterable[float], confidence: float) -> dict:
    """stats.describe over the finite values: a failed run shows as a gap, not an error."""
    return stats.describe([v for v in values if finite(v)], confidence)


# ---------------------------------------------------------------- figures


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def panel_grid(panels: int, ncols: int, panel_size: tuple[float, float], legend_height: float):
    """A figure of `panels` panels in rows of `ncols`, each `panel_size` inches, plus room for a legend."""
    nrows = math.ceil(panels / ncols)
    fig = new_figure(panel_size[0] * ncols, panel_size[1] * nrows + legend_height)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG, on a white background (the HTML embeds it as a data URI)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def legend(fig, handles: list, ncol: int) -> None:
    seen: dict[str, Any] = {}
    for handle in handles:
        seen.setdefault(handle.get_label(), handle)
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=ncol, frameon=False, fontsize=9)


def plain_ticks(axis) -> None:
    """Tick labels of a log axis as plain numbers (0.02, 64) rather than 2×10⁻², 2⁶."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def performance_figure(
    flagged: pd.DataFrame, tasks: list[str], baselines: pd.DataFrame | None, confidence: float
) -> Figure:
    """Every run per task and method, flagged runs hollow, seed pairs joined, baselines as lines."""
    from matplotlib.lines import Line2D

    ncols = min(3, len(tasks))
    fig, axes = panel_grid(len(tasks), ncols, (4.1, 3.3), 0.7)
    handles = []
    for ax, task in zip(axes.flat, tasks):
        rows = flagged[flagged["task"] == task]
        metric = str(rows["primary_metric"].dropna().iloc[0]) if rows["primary_metric"].notna().any() else "metric"
        methods = method_order(rows["method"])
        seeds = sorted(int(s) for s in rows["seed"].dropna().unique())
        offsets = dict(zip(seeds, np.linspace(-0.14, 0.14, len(seeds)) if len(seeds) > 1 else [0.0]))
        points: dict[int, list[tuple[float, float]]] = {s: [] for s in seeds}
        shown: list[float] = []
        for x, method in enumerate(methods):
            color = method_color(method)
            for r in rows[rows["method"] == method].itertuples():
                if pd.isna(r.seed) or not finite(r.primary_value):
                    continue
                px = x + offsets[int(r.seed)]
                points[int(r.seed)].append((px, r.primary_value))
                ax.scatter(
                    px,
                    r.primary_value,
                    s=38,
                    zorder=3,
                    linewidths=1.6,
                    edgecolors=color,
                    facecolors="white" if r.flagged else color,
                    marker="o",
                )
            d = describe_finite(rows[(rows["method"] == method) & ~rows["flagged"]]["primary_value"], confidence)
            if finite(d["mean"]):
                err = [[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]] if finite(d["ci_low"]) else None
                side = -0.32 if x == 0 else 0.32  # outside the pair lines
                ax.errorbar(x + side, d["mean"], yerr=err, fmt="D", color=color, ms=6, capsize=4, lw=1.6, zorder=4)
            shown += [v for v in (d["ci_low"], d["ci_high"]) if finite(v)]
        for pts in points.values():
            if len(pts) == 2:
                ax.plot(*zip(*pts), color="#b5b5b5", lw=0.9, zorder=1)
            shown += [v for _, v in pts]
        if shown:  # zoom on the runs; a baseline far below (or above) them is written at the edge
            low, high = min(shown), max(shown)
            pad = 0.25 * max(high - low, 0.01)
            ax.set_ylim(low - pad, high + pad)
        edge = {"below": 0.03, "above": 0.91}
        if baselines is not None:
            for name in ("majority", "head_only"):
                sel = baselines[(baselines["task"] == task) & (baselines["baseline"] == name)]
                if not sel.empty and finite(sel["primary_value"].iloc[0]):
                    style, value = REFERENCE_STYLES[name], float(sel["primary_value"].iloc[0])
                    ax.axhline(
                        value, color=style["color"], ls=style["linestyle"], lw=1.3, label=style["label"], zorder=2
                    )
                    bottom, top = ax.get_ylim()
                    if not bottom <= value <= top:
                        side = "below" if value < bottom else "above"
                        ax.text(
                            0.03,
                            edge[side],
                            f"{'▼' if side == 'below' else '▲'} {style['label']} {value:.3f}",
                            transform=ax.transAxes,
                            fontsize=8,
                            color=style["color"],
                        )
                        edge[side] += 0.07 if side == "below" else -0.07
        ax.set_xticks(range(len(methods)), [method_label(m) for m in methods])
        ax.set_xlim(-0.55, len(methods) - 0.45)
        ax.set_ylabel(f"{metric} on eval split (0–1)")
        ax.set_title(task, fontweight="bold")
        ax.grid(axis="y", alpha=0.3)
        handles += ax.get_lines()
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    grey = "#555555"
    handles = [
        *(
            Line2D([], [], marker="o", ls="", color=method_color(m), label=f"{method_label(m)} run (one seed)")
            for m in method_order(flagged["method"])
        ),
        Line2D([], [], marker="o", ls="", markerfacecolor="white", markeredgecolor=grey, label="flagged run (hollow)"),
        Line2D([], [], color="#b5b5b5", label="same seed (a pair)"),
        Line2D([], [], marker="D", color=grey, label=f"mean ± {confidence:.0%} CI, unflagged"),
        *(
            h
            for h in handles
            if h.get_label() in (REFERENCE_STYLES["majority"]["label"], REFERENCE_STYLES["head_only"]["label"])
        ),
    ]
    legend(fig, handles, ncol=4)
    return fig


def _curve(rows: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Per layer: mean over seeds (or pairs) with a t-interval over them; with a single value
    per layer, that value's own interval (bootstrap over probe examples)."""
    out = []
    for layer, group in rows.groupby("layer"):
        values = group["value"].astype(float).dropna()
        if len(values) >= 2:
            d = stats.describe(values, confidence)
            out.append((layer, d["mean"], d["ci_low"], d["ci_high"], len(values)))
        elif len(values) == 1:
            row = group.loc[values.index[0]]
            out.append((layer, values.iloc[0], row.get("ci_low", math.nan), row.get("ci_high", math.nan), 1))
    return pd.DataFrame(out, columns=["layer", "mean", "low", "high", "n"]).sort_values("layer")


def drift_figure(layers: pd.DataFrame, task: str, confidence: float) -> Figure:
    """Similarity to the base model per layer, one panel per pooling × measure, with the references."""
    data = layers[layers["task"] == task]
    poolings = ordered(data["pooling"].astype(str), ("mean", "head"))
    measures = ordered(data["measure"].astype(str), tuple(MEASURE_LABELS))
    fig = new_figure(3.9 * len(measures) + 0.4, 2.9 * len(poolings) + 1.0)
    axes = fig.subplots(len(poolings), len(measures), squeeze=False, sharex=True)
    handles = []
    for i, pooling in enumerate(poolings):
        for j, measure in enumerate(measures):
            ax = axes[i][j]
            cell = data[(data["pooling"] == pooling) & (data["measure"] == measure)]
            for comparison in ("base_vs_base", "shuffled_base"):
                style = REFERENCE_STYLES[comparison]
                curve = _curve(cell[cell["comparison"] == comparison], confidence)
                if not curve.empty:
                    handles += ax.plot(
                        curve["layer"],
                        curve["mean"],
                        color=style["color"],
                        ls=style["linestyle"],
                        lw=1.4,
                        label=style["label"],
                        zorder=2,
                    )
                    ax.fill_between(curve["layer"], curve["low"], curve["high"], color="#9a9a9a", alpha=0.15, lw=0)
            for method in method_order(cell["method"]):
                color = method_color(method)
                curve = _curve(cell[(cell["comparison"] == "seed_vs_seed") & (cell["method"] == method)], confidence)
                if not curve.empty:
                    handles += ax.plot(
                        curve["layer"],
                        curve["mean"],
                        color=color,
                        ls=":",
                        lw=1.6,
                        label=f"{method_label(method)} seed vs seed (noise)",
                        zorder=2,
                    )
                curve = _curve(cell[(cell["comparison"] == "run_vs_base") & (cell["method"] == method)], confidence)
                if not curve.empty:
                    handles += ax.plot(
                        curve["layer"],
                        curve["mean"],
                        color=color,
                        lw=2.2,
                        marker="o",
                        ms=3.5,
                        label=f"{method_label(method)} vs base",
                        zorder=3,
                    )
                    ax.fill_between(curve["layer"], curve["low"], curve["high"], color=color, alpha=0.2, lw=0)
            ax.set_title(f"{MEASURE_LABELS.get(measure, measure)}, {POOLING_LABELS.get(pooling, pooling)}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.set_ylim(top=max(1.03, ax.get_ylim()[1]))
            if i == len(poolings) - 1:
                ax.set_xlabel("layer (0 = embedding output)")
            if j == 0:
                ax.set_ylabel("similarity (1 = identical)")
    fig.suptitle(f"{task}: hidden-state similarity per layer", fontweight="bold")

    def rank(h):
        return (" vs base" not in h.get_label(), "seed vs seed" not in h.get_label())

    legend(fig, sorted(handles, key=rank), ncol=3)
    return fig


def _strategy_style(name: str) -> dict:
    n = name.lower()
    lora = METHOD_COLORS["lora"]
    for key, style in (
        ("full", {"color": METHOD_COLORS["full"], "ls": "-", "marker": "s"}),
        ("base", {"color": "black", "ls": "--", "marker": "x"}),
        ("merged", {"color": lora, "ls": "-", "marker": "o"}),
        ("separate", {"color": lora, "ls": "--", "marker": "^"}),
        ("switch", {"color": lora, "ls": "-.", "marker": "v"}),
        ("multi", {"color": lora, "ls": ":", "marker": "D"}),
    ):
        if n.startswith(key) or key in n:
            return style
    return {"color": "#7f7f7f", "ls": "-", "marker": "."}


def latency_figure(dep: pd.DataFrame) -> Figure:
    """Median latency against batch size per strategy, one panel per sequence length."""
    dep = dep.copy()
    dep["seq_len"] = dep["seq_len"].astype(str)
    seq_lens = ordered(dep["seq_len"], ("natural",))
    fig = new_figure(4.3 * len(seq_lens) + 0.4, 3.8)
    axes = fig.subplots(1, len(seq_lens), squeeze=False)[0]
    handles = []
    for ax, seq_len in zip(axes, seq_lens):
        part = dep[dep["seq_len"] == seq_len]
        for strategy in ordered(part["strategy"].astype(str)):
            rows = part[part["strategy"] == strategy].sort_values("batch_size")
            style = _strategy_style(strategy)
            halo = {"lw": 5, "alpha": 0.5, "zorder": 1} if strategy == "full" else {"lw": 1.8, "zorder": 2}
            if "compiled" in strategy:
                halo = {"lw": 1.2, "zorder": 2, "markerfacecolor": "white"}
            handles += ax.plot(
                rows["batch_size"],
                rows["p50_ms"],
                color=style["color"],
                ls=style["ls"],
                marker=style["marker"],
                label=strategy,
                **halo,
            )
            if "p95_ms" in rows:
                ax.fill_between(rows["batch_size"], rows["p50_ms"], rows["p95_ms"], color=style["color"], alpha=0.1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(part["batch_size"].unique()))
        plain_ticks(ax.xaxis)
        plain_ticks(ax.yaxis)
        ax.set_xlabel("batch size (examples)")
        ax.set_ylabel("latency per batch, median (ms)")
        ax.set_title(f"sequence length {seq_len}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("Latency vs batch size (line = median, band up to p95)", fontweight="bold")
    legend(fig, handles, ncol=6)
    return fig


def memory_figure(memory: pd.DataFrame) -> Figure:
    """Per strategy: memory after loading with the extra peak of inference stacked on it, size
    on disk of what it loads, and load time."""
    from matplotlib.patches import Patch

    names = list(memory["strategy"])
    colors = [_strategy_style(s)["color"] for s in names]
    unit = "GPU allocated" if (memory["measure"] == "cuda allocated").all() else "resident set above runtime"
    extra = memory["inference_mb"].clip(lower=0)
    fig = new_figure(13, 3.8)
    axes = fig.subplots(1, 3)
    axes[0].bar(names, memory["loaded_mb"], color=colors)
    top = axes[0].bar(names, extra, bottom=memory["loaded_mb"], color=colors, alpha=0.45, hatch="//")
    axes[0].bar_label(top, labels=[f"{v:.0f}" for v in memory["loaded_mb"] + extra], fontsize=8)
    axes[0].legend(
        handles=[
            Patch(facecolor="0.5", label="after loading"),
            Patch(facecolor="0.85", hatch="//", label="extra peak during inference"),
        ],
        fontsize=8,
        loc="lower right",
    )
    axes[0].set(ylabel=f"memory (MB, {unit})", title="peak memory")
    axes[1].bar_label(axes[1].bar(names, memory["disk_mb"], color=colors), fmt="%.1f", fontsize=8)
    axes[1].set(ylabel="size on disk (MB)", title="weights read at load (base + adapters)")
    axes[2].bar_label(axes[2].bar(names, memory["load_seconds"], color=colors), fmt="%.2f", fontsize=8)
    axes[2].set(ylabel="load time (s)", title="load time (weights paged in)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.12)
    return fig


ENGINE_LABELS = {"peft": "PEFT in-process", "vllm": "vLLM server"}


def engines_figure(grid: pd.DataFrame) -> Figure:
    """Per engine, side by side on shared axes: latency of one-example requests against the number
    of concurrent clients (p50 line, whiskers to p95 thick and p99 thin), and throughput below."""
    ok = grid[(grid["status"] == "ok") & (grid["batch_size"] == 1)]
    engines = ordered(ok["engine"].astype(str), tuple(ENGINE_LABELS))
    fig = new_figure(4.6 * len(engines) + 0.4, 6.4)
    axes = fig.subplots(2, len(engines), squeeze=False, sharex=True, sharey="row")
    handles = []
    for col, engine in enumerate(engines):
        part = ok[ok["engine"] == engine]
        for strategy in ordered(part["strategy"].astype(str), ("full", "merged", "separate", "multi")):
            rows = part[part["strategy"] == strategy].sort_values("concurrency")
            style = _strategy_style(strategy)
            x, p50 = rows["concurrency"], rows["p50_ms"]
            handles += axes[0, col].plot(
                x, p50, color=style["color"], ls=style["ls"], marker=style["marker"], label=strategy
            )
            axes[0, col].vlines(x, p50, rows["p95_ms"], color=style["color"], lw=3, alpha=0.5)
            axes[0, col].vlines(x, rows["p95_ms"], rows["p99_ms"], color=style["color"], lw=1, alpha=0.6)
            axes[1, col].plot(x, rows["examples_per_s"], color=style["color"], ls=style["ls"], marker=style["marker"])
        axes[0, col].set_title(ENGINE_LABELS.get(engine, engine), fontsize=10)
        axes[1, col].set_xlabel("concurrent clients (closed loop, one example per request)")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sorted(part["concurrency"].unique()))
            plain_ticks(ax.xaxis)
            plain_ticks(ax.yaxis)
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("latency per request (ms)\np50, whiskers to p95 / p99")
    axes[1, 0].set_ylabel("throughput (examples/s)")
    fig.suptitle("Latency and throughput vs concurrency, per engine", fontweight="bold")
    legend(fig, handles, ncol=4)
    return fig


GENERATION_STRATEGIES = ("full", "merged", "separate", "multi", "switch")


def _timed_prompts(table: pd.DataFrame) -> pd.DataFrame:
    """Generation rows that were timed with one prompt per request, what both figures show."""
    return table[(table["status"] == "ok") & (table["prompts"] == 1)]


def generation_throughput_figure(table: pd.DataFrame) -> Figure:
    """Output tokens/s against concurrent clients, one line per engine and strategy (vLLM filled
    markers, PEFT hollow), so batching shows as a rising line and its absence as a flat one."""
    ok = _timed_prompts(table)
    fig = new_figure(7.2, 4.6)
    ax = fig.subplots()
    for engine in ordered(ok["engine"].astype(str), tuple(ENGINE_LABELS)):
        part = ok[ok["engine"] == engine]
        for strategy in ordered(part["strategy"].astype(str), GENERATION_STRATEGIES):
            rows = part[part["strategy"] == strategy].sort_values("concurrency")
            style = _strategy_style(strategy)
            ax.plot(
                rows["concurrency"],
                rows["output_tokens_per_s"],
                color=style["color"],
                ls=style["ls"],
                marker=style["marker"],
                markerfacecolor=style["color"] if engine == "vllm" else "white",
                label=f"{ENGINE_LABELS.get(engine, engine)}, {strategy}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted(ok["concurrency"].unique()))
    plain_ticks(ax.xaxis)
    plain_ticks(ax.yaxis)
    ax.set(xlabel="concurrent clients (closed loop, one prompt per request)", ylabel="output tokens/s (steady state)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Generation throughput vs concurrency", fontweight="bold")
    legend(fig, ax.get_lines(), ncol=3)
    return fig


def generation_latency_figure(table: pd.DataFrame) -> Figure:
    """Time to first token and time per output token at one client, one bar per engine and
    strategy at p50 with whiskers to p95 (thick) and p99 (thin)."""
    ok = _timed_prompts(table)
    ok = ok[ok["concurrency"] == 1]
    bars = [
        (engine, strategy)
        for engine in ordered(ok["engine"].astype(str), tuple(ENGINE_LABELS))
        for strategy in ordered(ok.loc[ok["engine"] == engine, "strategy"].astype(str), GENERATION_STRATEGIES)
    ]
    fig = new_figure(max(6.0, 1.1 * len(bars) + 1.5), 3.9)
    for ax, name, title in zip(fig.subplots(1, 2), ("ttft", "tpot"), ("time to first token", "time per output token")):
        for x, (engine, strategy) in enumerate(bars):
            r = ok[(ok["engine"] == engine) & (ok["strategy"] == strategy)].iloc[0]
            color = _strategy_style(strategy)["color"]
            ax.bar(x, r[f"{name}_p50_ms"], color=color, alpha=0.85 if engine == "vllm" else 0.4, edgecolor=color)
            ax.vlines(x, r[f"{name}_p50_ms"], r[f"{name}_p95_ms"], color="black", lw=3)
            ax.vlines(x, r[f"{name}_p95_ms"], r[f"{name}_p99_ms"], color="black", lw=1)
        labels = [f"{s}\n{ENGINE_LABELS.get(e, e).split()[0]}" for e, s in bars]
        ax.set_xticks(range(len(bars)), labels, fontsize=8)
        ax.set(ylabel=f"{title} (ms)", title=f"{title}, one client")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Generation latency at one client (bar = p50, whiskers to p95 / p99)", fontweight="bold")
    return fig
