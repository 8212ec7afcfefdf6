"""The study's report: `report.md` and a self-contained `report.html`, verdict first.

Reads only the study directory (config.yaml, manifest.json, tables/*.csv, runs/*/hparams.json,
tuned/*.yaml, figures/*.png). Every missing input turns its section into "not run"; nothing
here trains, times or recomputes features. Figures drawn here go to figures/report_*.png with
one colour per method across all of them (METHOD_COLORS); figures drawn by other stages
(deployment_*.png, tune_*.png, ...) are embedded as they are. The HTML file carries its CSS
inline and every figure as a base64 PNG data URI: one file to send, nothing to fetch.

Statistics come from lorascope.stats on the study's own tables; the method comparison is read
from tables/statistics.csv when that table has comparison rows (a `paired_t_p` column), else it
is computed here with the analysis settings of config.yaml, and the report says which.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lorascope import stats

__all__ = ["METHOD_COLORS", "METHOD_LABELS", "load_reference", "write_report"]

# One colour per method in every figure (Okabe-Ito, colour-blind safe); references are black or
# grey and dashed, so a coloured solid line is always a fine-tuned model.
METHOD_COLORS = {"lora": "#0072B2", "full": "#D55E00", "head": "#009E73"}
METHOD_LABELS = {"lora": "LoRA", "full": "full FT", "head": "head only"}
REFERENCE_STYLES = {
    "base_vs_base": {"color": "black", "linestyle": "--", "label": "base vs base (ceiling)"},
    "shuffled_base": {"color": "#8c8c8c", "linestyle": "-.", "label": "base vs row-shuffled base (chance)"},
    "majority": {"color": "black", "linestyle": "--", "label": "majority-class baseline"},
    "head_only": {"color": METHOD_COLORS["head"], "linestyle": ":", "label": "head-only probe"},
}
DPI = 110
FIGURE_PREFIX = "report_"  # figures this module owns; others' figures are never touched
NOT_RUN = "not run"
P_KEYS = ("welch_p", "paired_t_p", "permutation_paired_p", "permutation_unpaired_p")
COMPARE_KEYS = ("n_a", "n_b", "n_pairs", "mean_a", "mean_b", "mean_diff_paired", "bootstrap_low",
                "bootstrap_high", *P_KEYS, "hedges_g", "cohen_dz")  # fmt: skip
MEASURE_LABELS = {"linear_cka": "linear CKA", "debiased_cka": "debiased CKA", "rbf_cka": "RBF CKA",
                  "cosine": "centred cosine"}  # fmt: skip
POOLING_LABELS = {"mean": "masked-mean pooling", "head": "head-token pooling"}
TABLES = ("performance", "baselines", "flags", "statistics", "verdict", "drift_layers", "drift_summary", "weights",
          "deployment", "deployment_memory", "deployment_checks", "trials")  # fmt: skip
_PARTIAL = ".partial-"  # lorascope.study.PARTIAL: a killed write leaves a file the next run removes


# ---------------------------------------------------------------- document model


@dataclass
class _Doc:
    """Blocks rendered twice, to Markdown and to HTML. Text may use **bold** and `code`."""

    blocks: list[tuple] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str, css: str = "") -> None:
        self.blocks.append(("p", text, css))

    def bullets(self, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            self.blocks.append(("ul", items))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "") -> None:
        """Cells are strings or (text, css class) pairs."""
        self.blocks.append(("table", list(headers), [list(r) for r in rows], css))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("fig", path, caption))

    def details(self, summary: str, text: str, lang: str = "") -> None:
        self.blocks.append(("details", summary, text, lang))

    def not_run(self, why: str) -> None:
        self.para(f"{NOT_RUN}: {why}", css="notrun")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cell(cell: Any) -> tuple[str, str]:
    return cell if isinstance(cell, tuple) else (str(cell), "")


def _to_markdown(doc: _Doc, root: Path) -> str:
    out: list[str] = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"{'#' * block[1]} {block[2]}")
        elif kind == "p":
            out.append(f"*{block[1]}*" if block[2] == "notrun" else block[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            headers, rows = block[1], block[2]
            esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(esc(_cell(c)[0]) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "fig":
            rel = block[1].relative_to(root).as_posix()
            out.append(f"![{block[2]}]({rel})\n\n*{block[2]}*")
        elif kind == "details":
            code = f"```{block[3]}\n{block[2].rstrip()}\n```"
            out.append(f"<details><summary>{block[1]}</summary>\n\n{code}\n\n</details>")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


_NUMERIC = re.compile(r"^(?:[\[(<≤≥+\-−]?\s?\d|—$)")


def _png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def _to_html(doc: _Doc, title: str) -> str:
    body: list[str] = []
    toc = [(block[2], _slug(block[2])) for block in doc.blocks if block[0] == "h" and block[1] == 2]
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            body.append(f'<h{block[1]} id="{_slug(block[2])}">{_inline(block[2])}</h{block[1]}>')
        elif kind == "p":
            css = f' class="{block[2]}"' if block[2] else ""
            body.append(f"<p{css}>{_inline(block[1])}</p>")
            if block[2] == "summary" and toc:
                links = " · ".join(f'<a href="#{slug}">{html.escape(text)}</a>' for text, slug in toc)
                body.append(f'<nav class="toc">{links}</nav>')
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            headers, rows, css = block[1], block[2], block[3]
            head = "".join(f"<th>{_inline(h)}</th>" for h in headers)
            lines = []
            for row in rows:
                cells = []
                for j, cell in enumerate(row):
                    text, cls = _cell(cell)
                    classes = [cls] if cls else []
                    if j > 0 and css != "kv" and _NUMERIC.match(text):
                        classes.append("num")
                    attr = f' class="{" ".join(classes)}"' if classes else ""
                    cells.append(f"<td{attr}>{_inline(text)}</td>")
                lines.append("<tr>" + "".join(cells) + "</tr>")
            attr = f' class="{css}"' if css else ""
            body.append(f'<div class="tablewrap"><table{attr}><thead><tr>{head}</tr></thead>'
                        f'<tbody>{"".join(lines)}</tbody></table></div>')  # fmt: skip
        elif kind == "fig":
            data = block[1].read_bytes()
            width, height = _png_size(data)
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            cap = _inline(block[2])
            body.append(f'<figure><img src="{uri}" width="{width}" height="{height}" alt="{html.escape(block[2])}">'
                        f"<figcaption>{cap}</figcaption></figure>")  # fmt: skip
        elif kind == "details":
            body.append(f"<details><summary>{_inline(block[1])}</summary><pre>{html.escape(block[2])}</pre></details>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


_CSS = """
:root{--lora:#0072B2;--full:#D55E00}
body{margin:0;background:#eef1f4;color:#1d2125;font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 40px 60px;background:#fff;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:28px;margin:0 0 12px}
h2{font-size:21px;margin:40px 0 10px;padding-bottom:4px;border-bottom:2px solid #e3e7eb}
h3{font-size:17px;margin:24px 0 6px}
p{margin:8px 0;max-width:70em}
p.summary{font-size:16px;background:#f3f7fb;border-left:4px solid var(--lora);padding:10px 14px}
p.notrun{color:#6b7177;font-style:italic;background:#f5f5f5;border-left:3px solid #b9bec3;padding:6px 12px}
p.note{font-size:13.5px;color:#4a5056}
nav.toc{font-size:13.5px;margin:10px 0 4px;color:#6b7177}
nav.toc a{color:#1f5f95;text-decoration:none}
.tablewrap{overflow-x:auto;margin:10px 0 14px}
table{border-collapse:collapse;font-size:13.5px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde1e5;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f0f3f6;font-weight:600}
tbody tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;white-space:nowrap}
td.met{background:#d9f2df !important;color:#0f5323;font-weight:600}
td.notmet{background:#fbdcdc !important;color:#8a1c1c;font-weight:600}
td.inconclusive{background:#fff1c7 !important;color:#7a5a00;font-weight:600}
td.notrun{background:#eceef0 !important;color:#5d6368}
td.flag{color:#8a1c1c}
tbody tr td.sub{background:#f1f4f7;color:#30363b}
table.verdict td,table.verdict th{font-size:14px;padding:5px 11px}
table.verdict tr.rec td{border-bottom:2px solid #aab1b8}
figure{margin:14px 0 22px}
figure img{max-width:100%;height:auto;border:1px solid #e6e9ec}
figcaption{font-size:13px;color:#4a5056;margin-top:4px;max-width:70em}
code{font-size:90%;background:#f2f4f6;padding:0 3px;border-radius:3px}
details{margin:8px 0}
pre{background:#f6f8fa;padding:10px;font-size:12.5px;overflow-x:auto}
ul{margin:6px 0 10px}
"""


# ---------------------------------------------------------------- formatting


def _ok(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _f(x: Any, digits: int = 4) -> str:
    return f"{float(x):.{digits}f}" if _ok(x) else "—"


def _pm(mean: Any, sd: Any, digits: int = 4) -> str:
    if not _ok(mean):
        return "—"
    return f"{float(mean):.{digits}f} ± {float(sd):.{digits}f}" if _ok(sd) else f"{float(mean):.{digits}f}"


def _ci(low: Any, high: Any, digits: int = 4, unit: str = "") -> str:
    return f"[{_f(low, digits)}, {_f(high, digits)}]{unit}" if _ok(low) and _ok(high) else "—"


def _p(p: Any) -> str:
    if not _ok(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _seconds(s: Any) -> str:
    if not _ok(s):
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


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _color(method: str) -> str:
    return METHOD_COLORS.get(method, "#7f7f7f")


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


def _ordered(values: Iterable[Any], preferred: Sequence[Any] = ()) -> list:
    present = list(dict.fromkeys(v for v in values if isinstance(v, str) or _ok(v)))
    return [v for v in preferred if v in present] + [v for v in present if v not in preferred]


def _tasks(study: _Study, table: pd.DataFrame) -> list[str]:
    return _ordered(table["task"].dropna().astype(str), list(study.config.get("tasks") or {}))


def _methods(values: Iterable[Any]) -> list[str]:
    return _ordered((str(v) for v in values if isinstance(v, str) and v), ("lora", "full", "head"))


def load_reference() -> dict:
    """The reference study's published numbers (package data), families with their flaw notes."""
    text = resources.files("lorascope.reference").joinpath("microscope.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


# ---------------------------------------------------------------- derived tables


def _flags(study: _Study) -> tuple[pd.DataFrame, str]:
    """performance.csv with `flagged` and `reason`, and where the flags come from."""
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
    margin = float(study.analysis.get("majority_margin", 0.01))
    baselines = study.tables["baselines"]
    majority = {}
    if baselines is not None:
        rows = baselines[baselines["baseline"] == "majority"]
        majority = {str(r.task): float(r.primary_value) for r in rows.itertuples() if _ok(r.primary_value)}
    if set(perf["task"].astype(str)) <= set(majority):
        out = stats.flag_runs(perf, majority, margin)
        return out, (f"computed here with `lorascope.stats.flag_runs` (majority baseline + margin {margin:g}; "
                     f"tables/flags.csv missing)")  # fmt: skip
    out = perf.copy()
    bad = (out["status"] != "ok") | out["primary_value"].isna()
    out["flagged"] = bad
    out["reason"] = np.where(bad, "status not ok or no value", "")
    return out, "status only (tables/flags.csv and the majority baselines are missing)"


def _describe(values: Iterable[float], confidence: float) -> dict:
    return stats.describe([v for v in values if _ok(v)], confidence)


def _safe_compare(a: dict, b: dict, confidence: float, n_resamples: int, seed: int) -> dict:
    try:
        return stats.compare(a, b, confidence=confidence, n_resamples=n_resamples, seed=seed)
    except ValueError:  # too many runs for the exact tests: report the rest
        a_all, b_all = list(a.values()), list(b.values())
        pa, pb = stats.paired(a, b)
        low, high = stats.bootstrap_paired_interval(pa, pb, confidence=confidence, n_resamples=n_resamples, seed=seed)
        return {"n_a": len(a_all), "n_b": len(b_all), "n_pairs": len(pa), "mean_a": float(np.mean(a_all)),
                "mean_b": float(np.mean(b_all)), "mean_diff_paired": float(np.mean(pa - pb)) if len(pa) else math.nan,
                "bootstrap_low": low, "bootstrap_high": high, "welch_p": stats.welch_p(a_all, b_all),
                "paired_t_p": stats.paired_p(pa, pb), "permutation_paired_p": math.nan,
                "permutation_unpaired_p": math.nan, "hedges_g": stats.hedges_g(a_all, b_all),
                "cohen_dz": stats.cohen_dz(pa, pb)}  # fmt: skip


def _comparisons(study: _Study, flagged: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """One row per task × subset (all | unflagged): every test, Holm-adjusted `<p>_holm`."""
    table = study.tables["statistics"]
    if table is not None and set(COMPARE_KEYS) | {"task"} <= set(table.columns):
        rows = table[pd.to_numeric(table["paired_t_p"], errors="coerce").notna() | table["n_pairs"].notna()].copy()
        if not rows.empty:
            if "subset" not in rows:
                rows["subset"] = "all"
            for key in P_KEYS:
                for alias in (f"{key}_holm", f"holm_{key}", f"{key}_adj"):
                    if alias in rows:
                        rows[f"{key}_holm"] = rows[alias]
                        break
                else:
                    rows[f"{key}_holm"] = rows.groupby("subset")[key].transform(lambda p: stats.holm(p))
            return rows.reset_index(drop=True), "tables/statistics.csv"
    confidence = float(study.analysis.get("confidence", 0.95))
    n_resamples = int(study.analysis.get("bootstrap", 10_000)) or 10_000
    seed = int(study.analysis.get("seed", 0))
    rows = []
    for subset in ("all", "unflagged"):
        part = []
        for task in _tasks(study, flagged):
            sel = flagged[(flagged["task"] == task) & flagged["primary_value"].notna()]
            if subset == "unflagged":
                sel = sel[~sel["flagged"]]
            a = {int(r.seed): float(r.primary_value) for r in sel[sel["method"] == "lora"].itertuples()}
            b = {int(r.seed): float(r.primary_value) for r in sel[sel["method"] == "full"].itertuples()}
            if not a or not b:
                continue
            metric = str(sel["primary_metric"].iloc[0])
            part.append({"task": task, "subset": subset, "metric": metric,
                         **_safe_compare(a, b, confidence, n_resamples, seed)})  # fmt: skip
        for key in P_KEYS:
            for row, adjusted in zip(part, stats.holm([r[key] for r in part])):
                row[f"{key}_holm"] = adjusted
        rows += part
    source = (f"computed here with `lorascope.stats.compare` ({n_resamples} bootstrap resamples, seed {seed}; "
              f"tables/statistics.csv has no comparison rows)")  # fmt: skip
    return pd.DataFrame(rows), source


# ---------------------------------------------------------------- figures


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f"{_PARTIAL}{path.name}-{os.getpid()}")
    scratch.write_bytes(data)
    os.replace(scratch, path)


def _save(study: _Study, fig, name: str) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    path = study.root / "figures" / f"{FIGURE_PREFIX}{name}.png"
    _write_bytes(path, buffer.getvalue())
    study.figures.append(path)
    return path


def _legend(fig, handles: list, ncol: int) -> None:
    seen: dict[str, Any] = {}
    for handle in handles:
        seen.setdefault(handle.get_label(), handle)
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=ncol, frameon=False, fontsize=9)


def _performance_figure(study: _Study, flagged: pd.DataFrame) -> Path:
    from matplotlib.lines import Line2D

    tasks = _tasks(study, flagged)
    ncols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig = _new_figure(4.1 * ncols, 3.3 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    confidence = float(study.analysis.get("confidence", 0.95))
    baselines = study.tables["baselines"]
    handles = []
    for ax, task in zip(axes.flat, tasks):
        rows = flagged[flagged["task"] == task]
        metric = str(rows["primary_metric"].dropna().iloc[0]) if rows["primary_metric"].notna().any() else "metric"
        methods = _methods(rows["method"])
        seeds = sorted(int(s) for s in rows["seed"].dropna().unique())
        offsets = dict(zip(seeds, np.linspace(-0.14, 0.14, len(seeds)) if len(seeds) > 1 else [0.0]))
        points: dict[int, list[tuple[float, float]]] = {s: [] for s in seeds}
        shown: list[float] = []
        for x, method in enumerate(methods):
            color = _color(method)
            for r in rows[rows["method"] == method].itertuples():
                if pd.isna(r.seed) or not _ok(r.primary_value):
                    continue
                px = x + offsets[int(r.seed)]
                points[int(r.seed)].append((px, r.primary_value))
                ax.scatter(px, r.primary_value, s=38, zorder=3, linewidths=1.6, edgecolors=color,
                           facecolors="white" if r.flagged else color, marker="o")  # fmt: skip
            d = _describe(rows[(rows["method"] == method) & ~rows["flagged"]]["primary_value"], confidence)
            if _ok(d["mean"]):
                err = [[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]] if _ok(d["ci_low"]) else None
                side = -0.32 if x == 0 else 0.32  # outside the pair lines
                ax.errorbar(x + side, d["mean"], yerr=err, fmt="D", color=color, ms=6, capsize=4, lw=1.6, zorder=4)
            shown += [v for v in (d["ci_low"], d["ci_high"]) if _ok(v)]
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
                if not sel.empty and _ok(sel["primary_value"].iloc[0]):
                    style, value = REFERENCE_STYLES[name], float(sel["primary_value"].iloc[0])
                    ax.axhline(value, color=style["color"], ls=style["linestyle"], lw=1.3, label=style["label"],
                               zorder=2)  # fmt: skip
                    bottom, top = ax.get_ylim()
                    if not bottom <= value <= top:
                        side = "below" if value < bottom else "above"
                        ax.text(0.03, edge[side], f"{'▼' if side == 'below' else '▲'} {style['label']} {value:.3f}",
                                transform=ax.transAxes, fontsize=8, color=style["color"])  # fmt: skip
                        edge[side] += 0.07 if side == "below" else -0.07
        ax.set_xticks(range(len(methods)), [_label(m) for m in methods])
        ax.set_xlim(-0.55, len(methods) - 0.45)
        ax.set_ylabel(f"{metric} on eval split (0–1)")
        ax.set_title(task, fontweight="bold")
        ax.grid(axis="y", alpha=0.3)
        handles += ax.get_lines()
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    grey = "#555555"
    handles = [
        *(Line2D([], [], marker="o", ls="", color=_color(m), label=f"{_label(m)} run (one seed)")
          for m in _methods(flagged["method"])),
        Line2D([], [], marker="o", ls="", markerfacecolor="white", markeredgecolor=grey, label="flagged run (hollow)"),
        Line2D([], [], color="#b5b5b5", label="same seed (a pair)"),
        Line2D([], [], marker="D", color=grey, label=f"mean ± {confidence:.0%} CI, unflagged"),
        *(h for h in handles if h.get_label() in (REFERENCE_STYLES["majority"]["label"],
                                                  REFERENCE_STYLES["head_only"]["label"])),
    ]  # fmt: skip
    _legend(fig, handles, ncol=4)
    return _save(study, fig, "performance")


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


def _drift_figure(study: _Study, layers: pd.DataFrame, task: str) -> Path:
    data = layers[layers["task"] == task]
    poolings = _ordered(data["pooling"].astype(str), ("mean", "head"))
    measures = _ordered(data["measure"].astype(str), tuple(MEASURE_LABELS))
    confidence = float(study.analysis.get("confidence", 0.95))
    fig = _new_figure(3.9 * len(measures) + 0.4, 2.9 * len(poolings) + 1.0)
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
                    handles += ax.plot(curve["layer"], curve["mean"], color=style["color"], ls=style["linestyle"],
                                       lw=1.4, label=style["label"], zorder=2)  # fmt: skip
                    ax.fill_between(curve["layer"], curve["low"], curve["high"], color="#9a9a9a", alpha=0.15, lw=0)
            for method in _methods(cell["method"]):
                color = _color(method)
                curve = _curve(cell[(cell["comparison"] == "seed_vs_seed") & (cell["method"] == method)], confidence)
                if not curve.empty:
                    handles += ax.plot(curve["layer"], curve["mean"], color=color, ls=":", lw=1.6,
                                       label=f"{_label(method)} seed vs seed (noise)", zorder=2)  # fmt: skip
                curve = _curve(cell[(cell["comparison"] == "run_vs_base") & (cell["method"] == method)], confidence)
                if not curve.empty:
                    handles += ax.plot(curve["layer"], curve["mean"], color=color, lw=2.2, marker="o", ms=3.5,
                                       label=f"{_label(method)} vs base", zorder=3)  # fmt: skip
                    ax.fill_between(curve["layer"], curve["low"], curve["high"], color=color, alpha=0.2, lw=0)
            ax.set_title(f"{MEASURE_LABELS.get(measure, measure)}, {POOLING_LABELS.get(pooling, pooling)}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.set_ylim(top=max(1.03, ax.get_ylim()[1]))
            if i == len(poolings) - 1:
                ax.set_xlabel("layer (0 = embedding output)")
            if j == 0:
                ax.set_ylabel("similarity (1 = identical)")
    fig.suptitle(f"{task}: hidden-state similarity per layer", fontweight="bold")
    rank = lambda h: (" vs base" not in h.get_label(), "seed vs seed" not in h.get_label())  # noqa: E731
    _legend(fig, sorted(handles, key=rank), ncol=3)
    return _save(study, fig, f"drift_{_slug(task)}")


def _kind(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _weights_frame(weights: pd.DataFrame) -> pd.DataFrame:
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


def _changed_kinds(w: pd.DataFrame) -> tuple[dict[str, list[str]], list[str]]:
    """Matrix kinds each method changed, and those every method changed (compared like for like)."""
    moved = w[w["relative_update"] > 0]
    changed = {m: sorted(set(moved[moved["method"] == m]["kind"])) for m in _methods(w["method"])}
    common = sorted(set.intersection(*(set(k) for k in changed.values()))) if changed else []
    return changed, common


def _weights_figure(study: _Study, weights: pd.DataFrame, task: str) -> Path:
    w = weights[(weights["task"] == task) & weights["layer"].notna()]
    changed, common = _changed_kinds(w)
    fig = _new_figure(13.0, 4.1)
    axes = fig.subplots(1, 3)
    handles = []
    methods = _methods(w["method"])
    width = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        color = _color(method)
        kinds = common or changed[method]
        sel = w[(w["method"] == method) & w["kind"].isin(kinds)]
        if sel.empty:
            continue
        for ax, col in ((axes[0], "relative_update"), (axes[1], "effective_rank")):
            per_seed = sel.groupby(["seed", "layer"])[col].mean().unstack("seed")
            line = ax.plot(per_seed.index, per_seed.mean(axis=1), color=color, lw=2.2, marker="o", ms=3.5,
                           label=f"{_label(method)} ({', '.join(kinds)})")  # fmt: skip
            if col == "relative_update":
                handles += line
            if per_seed.shape[1] > 1:
                low, high = per_seed.min(axis=1), per_seed.max(axis=1)
                ax.fill_between(per_seed.index, low, high, color=color, alpha=0.2, lw=0)
            others = w[(w["method"] == method) & (w["relative_update"] > 0)]
            if common and set(changed[method]) - set(common) and col == "relative_update":
                every = others.groupby(["seed", "layer"])[col].mean().unstack("seed").mean(axis=1)
                handles += ax.plot(every.index, every, color=color, lw=1.3, ls="--",
                                   label=f"{_label(method)} (all {len(changed[method])} matrix kinds)")  # fmt: skip
        intr = sel.groupby(["seed", "layer"])["intruders"].sum().unstack("seed").mean(axis=1)
        axes[2].bar(intr.index + (k - (len(methods) - 1) / 2) * width, intr, width=width, color=color,
                    label=_label(method) + (" (0 in every layer)" if not (intr > 0).any() else ""))  # fmt: skip
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
    axes[2].legend(fontsize=8, frameon=False, loc="upper left", ncol=len(methods))
    for ax in axes[:2]:
        if any(line.get_ydata().size and np.nanmin(line.get_ydata()) > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
            _plain_ticks(ax.yaxis)
    fig.suptitle(f"{task}: weight-space change per layer (mean over seeds; band = min–max)", fontweight="bold")
    _legend(fig, handles, ncol=3)
    return _save(study, fig, f"weights_{_slug(task)}")


def _plain_ticks(axis) -> None:
    """Tick labels of a log axis as plain numbers (0.02, 64) rather than 2×10⁻², 2⁶."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def _strategy_style(name: str) -> dict:
    n = name.lower()
    lora = METHOD_COLORS["lora"]
    for key, style in (("full", {"color": METHOD_COLORS["full"], "ls": "-", "marker": "s"}),
                       ("base", {"color": "black", "ls": "--", "marker": "x"}),
                       ("merged", {"color": lora, "ls": "-", "marker": "o"}),
                       ("separate", {"color": lora, "ls": "--", "marker": "^"}),
                       ("switch", {"color": lora, "ls": "-.", "marker": "v"}),
                       ("mixed", {"color": lora, "ls": ":", "marker": "D"}),
                       ("multi", {"color": lora, "ls": ":", "marker": "D"})):  # fmt: skip
        if n.startswith(key) or key in n:
            return style
    return {"color": "#7f7f7f", "ls": "-", "marker": "."}


def _latency_figure(study: _Study, dep: pd.DataFrame) -> Path:
    dep = dep.copy()
    dep["seq_len"] = dep["seq_len"].astype(str)
    seq_lens = _ordered(dep["seq_len"], ("natural",))
    fig = _new_figure(4.3 * len(seq_lens) + 0.4, 3.8)
    axes = fig.subplots(1, len(seq_lens), squeeze=False)[0]
    handles = []
    for ax, seq_len in zip(axes, seq_lens):
        part = dep[dep["seq_len"] == seq_len]
        for strategy in _ordered(part["strategy"].astype(str)):
            rows = part[part["strategy"] == strategy].sort_values("batch_size")
            style = _strategy_style(strategy)
            halo = {"lw": 5, "alpha": 0.5, "zorder": 1} if strategy == "full" else {"lw": 1.8, "zorder": 2}
            if "compiled" in strategy:
                halo = {"lw": 1.2, "zorder": 2, "markerfacecolor": "white"}
            handles += ax.plot(rows["batch_size"], rows["p50_ms"], color=style["color"], ls=style["ls"],
                               marker=style["marker"], label=strategy, **halo)  # fmt: skip
            if "p95_ms" in rows:
                ax.fill_between(rows["batch_size"], rows["p50_ms"], rows["p95_ms"], color=style["color"], alpha=0.1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(part["batch_size"].unique()))
        _plain_ticks(ax.xaxis)
        _plain_ticks(ax.yaxis)
        ax.set_xlabel("batch size (examples)")
        ax.set_ylabel("latency per batch, median (ms)")
        ax.set_title(f"sequence length {seq_len}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("Latency vs batch size (line = median, band up to p95)", fontweight="bold")
    _legend(fig, handles, ncol=6)
    return _save(study, fig, "deployment_latency")


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
    if not _ok(value):
        return "—"
    if unit == "%":
        return f"{100 * float(value):{'+' if signed else ''}.1f} %"
    if unit == "pp":
        return f"{float(value):{'+' if signed else ''}.2f} pp"
    return f"{float(value):.4g}"


def _verdict_section(doc: _Doc, study: _Study) -> None:
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
            threshold = f"{'≥' if geq else '≤'} {_criterion_number(r.threshold, unit)}" if _ok(r.threshold) else ""
            if r.criterion == "recommended":
                rows.append([f"**{task}**", label, "", "", "", _outcome_cell(r.outcome)])
                continue
            low_high = (f"[{_criterion_number(r.ci_low, unit)}, {_criterion_number(r.ci_high, unit)}]"
                        if _ok(r.ci_low) and _ok(r.ci_high) else "—")  # fmt: skip
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
            if _ok(m["lora"]) and _ok(m["full"]):
                means.append(f"{task} {metric} {m['lora']:.3f} vs {m['full']:.3f}")
        if means:
            parts.append("Mean primary metric of unflagged runs, LoRA vs full FT: " + "; ".join(means) + ".")
        n_flag = int(flagged["flagged"].sum())
        parts.append(f"{n_flag} of {len(flagged)} runs {'is' if n_flag == 1 else 'are'} flagged as failed "
                     f"(shown, and left out of the 'unflagged' statistics).")  # fmt: skip
    if missing_sections:
        parts.append("Not run: " + ", ".join(missing_sections) + ".")
    return " ".join(parts)


def _performance_section(doc: _Doc, study: _Study, flagged: pd.DataFrame | None, flag_source: str) -> None:
    doc.heading(2, "Task performance")
    if flagged is None:
        doc.not_run(study.why["performance"])
        return
    confidence = float(study.analysis.get("confidence", 0.95))
    ci = f"{confidence:.0%} CI"
    doc.figure(_performance_figure(study, flagged),
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
        methods = _methods(rows["method"])
        pair = "lora" in methods and "full" in methods
        doc.heading(3, f"{task} — {metric}")
        headers = ["seed"] + [f"{_label(m)} {metric}" for m in methods] + (["LoRA − full FT"] if pair else [])
        table = []
        by = {(r.method, int(r.seed)): r for r in rows.itertuples() if not pd.isna(r.seed) and r.method in methods}
        diffs: dict[str, list[float]] = {"all": [], "unflagged": []}
        for seed in sorted({s for _, s in by}):
            line: list[Any] = [str(seed)]
            for m in methods:
                r = by.get((m, seed))
                if r is None:
                    line.append("—")
                elif r.status != "ok" or not _ok(r.primary_value):
                    line.append((f"{r.status} ⚑", "flag"))
                else:
                    line.append((f"{r.primary_value:.4f} ⚑", "flag") if r.flagged else f"{r.primary_value:.4f}")
            if pair:
                a, b = by.get(("lora", seed)), by.get(("full", seed))
                if a is not None and b is not None and _ok(a.primary_value) and _ok(b.primary_value):
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
                described.append(_describe(sel["primary_value"], confidence))
            if pair:
                described.append(_describe(diffs[subset], confidence))
            name = "all runs" if subset == "all" else "unflagged runs"
            texts = [f"{_pm(d['mean'], d['sd'])} (n={d['n']})" for d in described]
            if pair and _ok(described[-1]["mean"]):
                texts[-1] = "+" * (described[-1]["mean"] >= 0) + texts[-1]
            table.append([(t, "sub") for t in [f"mean ± sd, {name}", *texts]])
            table.append([(t, "sub") for t in [f"{ci}, {name}", *(_ci(d["ci_low"], d["ci_high"]) for d in described)]])
        doc.table(headers, table)
        doc.bullets(_baseline_lines(baselines, task, metric))
        bad = rows[rows["flagged"]]
        bad = bad.assign(_m=bad["method"].map(methods.index)).sort_values(["_m", "seed"])
        reasons = [f"⚑ {_label(r.method)} seed {r.seed}: {r.reason}" for r in bad.itertuples()]
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
            lines.append(f"overfit check, {_label(str(r.method))}: {verdict} (training accuracy {_f(r.accuracy, 3)} "
                         f"on the few examples it was trained on)")  # fmt: skip
    return lines


def _comparison_section(doc: _Doc, study: _Study, flagged: pd.DataFrame | None) -> None:
    doc.heading(2, "Method comparison")
    if flagged is None:
        doc.not_run(study.why["performance"])
        return
    table, source = _comparisons(study, flagged)
    if table.empty:
        doc.not_run("no task has runs of both LoRA and full FT")
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
            n = f"{int(r.n_a)} / {int(r.n_b)} / {int(r.n_pairs)}" if _ok(r.n_pairs) else "—"
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
    doc.para(f"Source: {source}.", css="note")


def _drift_summary_frame(study: _Study) -> pd.DataFrame | None:
    summary = study.tables["drift_summary"]
    if summary is not None:
        return summary
    layers = study.tables["drift_layers"]
    if layers is None:
        return None
    runs = layers[layers["comparison"] == "run_vs_base"].copy()
    runs["layer"] = pd.to_numeric(runs["layer"], errors="coerce")
    out = []
    for key, group in runs.groupby(["task", "method", "seed", "pooling", "measure"]):
        group = group.sort_values("layer")
        last = group[group["layer"] >= group["layer"].max() - (group["layer"].nunique() // 3) + 1]
        out.append((*key, group["value"].mean(), last["value"].mean()))
    return pd.DataFrame(out, columns=["task", "method", "seed", "pooling", "measure", "mean_over_layers",
                                      "mean_last_third"])  # fmt: skip


def _drift_section(doc: _Doc, study: _Study) -> None:
    doc.heading(2, "Representational drift")
    layers, summary = study.tables["drift_layers"], _drift_summary_frame(study)
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
            doc.figure(_drift_figure(study, layers, task),
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
        for pooling in _ordered(part["pooling"].astype(str), ("mean", "head")):
            for measure in _ordered(part["measure"].astype(str), tuple(MEASURE_LABELS)):
                cell = part[(part["pooling"] == pooling) & (part["measure"] == measure)]
                d = {m: _describe(cell[cell["method"] == m]["mean_over_layers"], confidence) for m in ("lora", "full")}
                last = {m: cell[cell["method"] == m].get("mean_last_third", pd.Series(dtype=float)).mean()
                        for m in ("lora", "full")}  # fmt: skip
                drift = {m: 1 - d[m]["mean"] for m in d}
                reduction = 1 - drift["lora"] / drift["full"] if _ok(drift["full"]) and drift["full"] > 0 else math.nan
                rows.append([
                    task, pooling, measure,
                    f"{_pm(d['lora']['mean'], d['lora']['sd'])} (n={d['lora']['n']})",
                    f"{_pm(d['full']['mean'], d['full']['sd'])} (n={d['full']['n']})",
                    _f(last["lora"]), _f(last["full"]),
                    f"{100 * reduction:+.1f} %" if _ok(reduction) else "—",
                    _f(refs.get((task, "base_vs_base", pooling, measure))),
                    _f(refs.get((task, "shuffled_base", pooling, measure))),
                ])  # fmt: skip
    doc.table(["task", "pooling", "measure", "LoRA vs base, mean over layers", "full FT vs base, mean over layers",
               "LoRA, last third of layers", "full FT, last third", "drift reduction 1 − drift_LoRA/drift_full",
               "base vs base", "shuffled rows"], rows)  # fmt: skip
    doc.para("Mean over layers: mean ± sd over seeds. Drift reduction is the point estimate from the means; the "
             "verdict table gives it with its interval.", css="note")  # fmt: skip


def _weights_section(doc: _Doc, study: _Study) -> None:
    doc.heading(2, "Weight-space change")
    if study.need("weights"):
        doc.not_run(study.why["weights"])
        return
    weights = _weights_frame(study.tables["weights"])
    for task in _tasks(study, weights):
        if weights[(weights["task"] == task) & weights["layer"].notna()].empty:
            continue
        _, common = _changed_kinds(weights[weights["task"] == task])
        doc.figure(_weights_figure(study, weights, task),
                   f"{task}: per layer, relative update ‖W_ft − W_base‖F / ‖W_base‖F, effective rank of the "
                   f"update "
                   f"(Roy & Vetterli) and intruder dimensions (top singular vectors of W_ft with |cos| below the "
                   f"threshold against every base singular vector). Solid lines average the matrix kinds both "
                   f"methods changed ({', '.join(common) or 'none in common: each its own'}).")  # fmt: skip
    rows = []
    for task in _tasks(study, weights):
        part = weights[weights["task"] == task]
        for method in _methods(part["method"]):
            sel = part[part["method"] == method]
            for kind in _ordered(sel["kind"]):
                k = sel[sel["kind"] == kind]
                per_seed_intruders = k.groupby("seed")["intruders"].sum()
                n_seeds = k["seed"].nunique()
                rows.append([task, _label(method), kind, str(n_seeds), str(int(len(k) / max(1, n_seeds))),
                             f"{k['relative_update'].mean():.3e}", _f(k["effective_rank"].mean(), 2),
                             _f(per_seed_intruders.mean(), 1)])  # fmt: skip
    doc.table(["task", "method", "matrix kind", "seeds", "matrices per seed", "mean relative update",
               "mean effective rank of ΔW", "intruders per run (sum over matrices)"], rows)  # fmt: skip


def _deployment_section(doc: _Doc, study: _Study) -> None:
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
        doc.figure(_latency_figure(study, dep), "Median latency per batch against batch size, one panel per sequence "
                   "length (band: median to p95; log–log). LoRA strategies in LoRA's colour (hollow markers: "
                   "torch.compile variants), full FT in full FT's; the merged adapter should sit on the full-FT line."
                   + (" The deploy stage's figure of the same numbers: figures/deployment_latency.png."
                      if (study.root / "figures" / "deployment_latency.png").is_file() else ""))  # fmt: skip
        for path in figures:
            doc.figure(path, f"{path.stem.replace('_', ' ')} (figures/{path.name}, drawn by the deploy stage)")
        strategies = _ordered(dep["strategy"].astype(str), ("full", "merged", "separate", "switch", "mixed", "base"))
        batches = sorted(pd.to_numeric(dep["batch_size"], errors="coerce").dropna().astype(int).unique())
        for seq_len in _ordered(dep["seq_len"], ("natural",)):
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
                    text = f"{100 * (r['overhead_vs_full'] - 1):+.1f}" if _ok(r.get("overhead_vs_full")) else "—"
                    if _ok(r.get("overhead_ci_low")) and _ok(r.get("overhead_ci_high")):
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
        if not _ok(v):
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
    if _ok(a) and _ok(b) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _hparams_section(doc: _Doc, study: _Study) -> None:
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
        order = _methods(["lora", "full", "head", *(m for m, _ in groups)])
        for (method, text), tasks in sorted(groups.items(), key=lambda kv: order.index(kv[0][0])):
            configured = json.loads(text)
            keys += [k for k in configured if k not in keys]
            tasks = _ordered(tasks, list(study.config.get("tasks") or {}))
            columns.append((f"{_label(method)} ({', '.join(tasks)})", configured))
        doc.table(["hyperparameter"] + [c[0] for c in columns],
                  [[k] + [_value(c[1][k]) if k in c[1] else "—" for c in columns] for k in keys])  # fmt: skip
        note = ("As configured and saved by each run (runs/<task>/<method>/seed<k>/hparams.json; head only: "
                "baselines/<task>/head_only/hparams.json); columns group the tasks that used identical values.")
        if varies:
            note += " Values differ between seeds for: " + ", ".join(f"{t} {m}" for t, m in sorted(varies)) + "."
        doc.para(note, css="note")
    elif (study.config.get("training") or {}):
        training = study.config["training"]
        methods = [m for m in _methods(training) if isinstance(training.get(m), dict)]
        keys = list(dict.fromkeys(k for m in methods for k in training[m]))
        doc.table(["hyperparameter"] + [_label(m) for m in methods],
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
            rows.append([task, _label(method), key, _value(value), check])
    if rows:
        doc.table(["task", "method", "hyperparameter", "tuned value", "reached the runs?"], rows)
    if trials is not None:
        by = [c for c in ("task", "method") if c in trials]
        summary = []
        for key, group in (trials.groupby(by) if by else [(("all",), trials)]):
            key = key if isinstance(key, tuple) else (key,)
            states = group["state"].value_counts().to_dict() if "state" in group else {}
            best = pd.to_numeric(group["value"], errors="coerce").max() if "value" in group else math.nan
            key = tuple(_label(str(k)) if col == "method" else str(k) for col, k in zip(by or ["trials"], key))
            summary.append([*key, str(len(group)), ", ".join(f"{k} {v}" for k, v in states.items()) or "—",
                            _f(best)])  # fmt: skip
        doc.table([*(by or ["trials"]), "trials", "states", "best dev value"], summary)
        doc.para("Tuning scores the dev split, held out of train; the reported eval split is never used for "
                 "selection.", css="note")  # fmt: skip
    for path in figures:
        doc.figure(path, f"{path.stem.replace('_', ' ')} (figures/{path.name})")


def _reference_section(doc: _Doc, study: _Study, flagged: pd.DataFrame | None) -> None:
    doc.heading(2, "Beside the reference study")
    ref = load_reference()
    families = ref["families"]
    ref_tasks = {str(r["task"]) for fam in families.values() for r in fam["rows"]} - {"all"}
    ours = list(study.config.get("tasks") or {})
    if flagged is not None:
        ours = _ordered(list(ours) + _tasks(study, flagged))
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
            table.append([task, metric, _label(method),
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
    summary = _drift_summary_frame(study)
    table = []
    for task in matched:
        ref_d = {r["method"]: float(r["value"]) for r in rows_of("drift", task)}
        ref_red = 1 - ref_d["lora"] / ref_d["full"] if {"lora", "full"} <= set(ref_d) else math.nan
        mine = {"lora": math.nan, "full": math.nan}
        if summary is not None:
            sel = summary[(summary["task"] == task) & (summary["measure"] == "linear_cka")
                          & (summary["pooling"] == "mean")]  # fmt: skip
            mine = {m: 1 - sel[sel["method"] == m]["mean_over_layers"].mean() for m in mine}
        red = 1 - mine["lora"] / mine["full"] if _ok(mine["full"]) and mine["full"] > 0 else math.nan
        table.append([task, _f(ref_d.get("lora"), 3), _f(ref_d.get("full"), 3), f"{100 * ref_red:+.1f} %",
                      _f(mine["lora"], 3) if _ok(mine["lora"]) else "not run",
                      _f(mine["full"], 3) if _ok(mine["full"]) else "not run",
                      f"{100 * red:+.1f} %" if _ok(red) else "—"])  # fmt: skip
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
    doc.table(["check", "reference", "this study (linear CKA, all layers)"],
              [["CKA of the base model with itself (correct: 1)", f"{bvb['low']:.2f}–{bvb['high']:.2f}", mine]])
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
            seq = _ordered(one["seq_len"], ("natural",))[0]
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


def _provenance_section(doc: _Doc, study: _Study) -> None:
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
            total = sum(float(s["seconds"]) for s in stages.values() if _ok(s.get("seconds")))
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
    sections: list[tuple[str, Callable[[_Doc], None], str | None]] = [
        ("verdict", lambda d: _verdict_section(d, study), study.need("verdict")),
        ("task performance", lambda d: _performance_section(d, study, flagged, flag_source), study.need("performance")),
        ("method comparison", lambda d: _comparison_section(d, study, flagged), study.need("performance")),
        ("drift", lambda d: _drift_section(d, study),
         study.need("drift_layers") if study.tables["drift_summary"] is None else None),
        ("weight-space change", lambda d: _weights_section(d, study), study.need("weights")),
        ("deployment", lambda d: _deployment_section(d, study), study.need("deployment")),
        ("hyperparameters", lambda d: _hparams_section(d, study), None),
        ("reference study", lambda d: _reference_section(d, study, flagged), None),
        ("provenance", lambda d: _provenance_section(d, study), None if study.manifest else "manifest.json missing"),
    ]  # fmt: skip
    name = study.config.get("name") or root.name
    doc = _Doc()
    doc.heading(1, f"lorascope report — {name}")
    doc.para(_summary(study, flagged, [s for s, _, missing in sections if missing]), css="summary")
    for _, build, _ in sections:
        build(doc)
    shown = {p.resolve() for b in doc.blocks if b[0] == "fig" for p in [b[1]]}
    others = [p for p in _other_figures(study, "*.png") if p.resolve() not in shown]
    if others:
        doc.heading(2, "Other figures")
        for path in others:
            doc.figure(path, f"figures/{path.name}")
    for stale in (root / "figures").glob(f"{FIGURE_PREFIX}*.png") if (root / "figures").is_dir() else []:
        if stale not in study.figures:
            stale.unlink(missing_ok=True)
    md_path, html_path = root / "report.md", root / "report.html"
    _write_bytes(md_path, _to_markdown(doc, root).encode("utf-8"))
    _write_bytes(html_path, _to_html(doc, f"lorascope report — {name}").encode("utf-8"))
    return md_path, html_path
