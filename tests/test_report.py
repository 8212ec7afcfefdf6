"""report.py on synthetic study directories: the verdict comes first with the table's outcomes,
the tables' numbers reach report.md, report.html is self-contained (every figure a PNG data URI),
a partial study reads "not run" where inputs are missing, and, where Chromium is installed, every
figure loads in a real browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lorascope import drift, report, stats
from lorascope.analysis import comparison_rows, describe_rows
from lorascope.config import AnalysisConfig

TASKS = {"sst2": "accuracy", "mrpc": "f1"}
SEEDS = (42, 1337, 2024)
MAJORITY = {"sst2": 0.5092, "mrpc": 0.8122}
KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")  # fmt: skip
VERDICT = {  # task -> (quality, drift, deployment) estimates: value, low, high
    "sst2": (stats.Estimate(0.5, -1.0, 2.0), stats.Estimate(0.30, 0.25, 0.35), stats.Estimate(0.37, 0.33, 0.41)),
    "mrpc": (stats.Estimate(2.5, -4.0, 9.0), stats.Estimate(0.05, -0.10, 0.20), None),
}
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _write(path: Path, table: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)


def _tiny_png(path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2), dpi=60)
    fig.subplots().plot([1, 2, 3], [1, 4, 2])
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def performance_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for task, metric in TASKS.items():
        for seed in SEEDS:
            levels = {"lora": 0.90, "full": 0.91} if task == "sst2" else {"lora": 0.86, "full": 0.85}
            for method, level in levels.items():
                value = round(level + rng.normal(0, 0.006), 4)
                if (task, method, seed) == ("mrpc", "full", 1337):
                    value = MAJORITY["mrpc"]  # learned nothing: must be flagged
                rows.append({"task": task, "method": method, "seed": seed, "status": "ok", "primary_metric": metric,
                             "primary_value": value, "accuracy": value - 0.01 if metric == "f1" else value,
                             "f1": value if metric == "f1" else value - 0.005, "train_seconds": 30.0 + seed % 7,
                             "trainable_params": 222338 if method == "lora" else 22713986,
                             "head_init_digest": f"h{task}{seed}", "data_order_digest": f"d{task}{seed}"})  # fmt: skip
    return pd.DataFrame(rows)


def make_study(root: Path, partial: bool = False, tasks: dict[str, str] | None = None) -> Path:
    """A small study directory with every table report.py reads (only performance.csv when
    `partial`)."""
    root.mkdir(parents=True, exist_ok=True)
    perf = performance_table()
    if tasks is not None:  # rename the tasks: a study the reference study does not share
        perf["task"] = perf["task"].map(dict(zip(TASKS, tasks)))
    _write(root / "tables" / "performance.csv", perf)
    if partial:
        return root
    config = {"name": "synthetic", "model": {"name": "minilm-l6"}, "tasks": {t: {} for t in TASKS},
              "methods": ["lora", "full"], "seeds": list(SEEDS),
              "training": {"lora": {"lr": 0.002, "r": 8, "weight_decay": 0.01, "warmup_ratio": 0.1},
                           "full": {"lr": 1e-4, "weight_decay": 0.01, "warmup_ratio": 0.1}},
              "analysis": {"majority_margin": 0.01, "confidence": 0.95, "bootstrap": 2000, "seed": 0}}  # fmt: skip
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    manifest = {"config_fingerprint": "10789b141317b3cc", "lorascope": "0.1.0", "python": "3.11.7",
                "versions": {"torch": "2.13.0+cpu", "transformers": "5.23.0", "peft": "0.21.2"},
                "hardware": {"machine": "x86_64", "cpu_count": 2, "cuda": False},
                "stages": {name: {"status": "done", "seconds": sec, "fingerprint": "10789b141317b3cc",
                                  "finished": "2026-11-23T01:04:30+00:00"}
                           for name, sec in (("prepare", 3.5), ("baselines", 124.1), ("train", 829.5),
                                             ("drift", 61.0), ("deploy", 300.2), ("analyze", 2.0))}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    rows = []
    for task, metric in TASKS.items():
        accuracy, f1 = (0.5092, 0.6748) if task == "sst2" else (0.6838, 0.8122)  # as GLUE's validation splits
        rows.append({"task": task, "baseline": "majority", "method": "", "status": "ok", "primary_metric": metric,
                     "primary_value": MAJORITY[task], "accuracy": accuracy, "f1": f1, "passed": None})  # fmt: skip
        rows.append({"task": task, "baseline": "head_only", "method": "head", "status": "ok", "primary_metric": metric,
                     "primary_value": 0.7018, "accuracy": 0.7018, "f1": 0.6912, "passed": None})  # fmt: skip
        for method in ("lora", "full"):
            rows.append({"task": task, "baseline": f"overfit_{method}", "method": method, "status": "ok",
                         "primary_metric": metric, "primary_value": 1.0, "accuracy": 1.0, "f1": 1.0,
                         "passed": method == "lora"})  # fmt: skip
    _write(root / "tables" / "baselines.csv", pd.DataFrame(rows))
    flags = stats.flag_runs(perf, MAJORITY, 0.01)
    _write(root / "tables" / "flags.csv", flags)
    analysis = AnalysisConfig(**config["analysis"])  # the rows the analyze stage writes
    _write(root / "tables" / "statistics.csv",
           pd.DataFrame(describe_rows(flags, analysis.confidence) + comparison_rows(flags, analysis)))  # fmt: skip
    verdict = [row for task, (q, d, dep) in VERDICT.items()
               for row in stats.verdict_rows(task, quality=q, drift=d, deployment=dep)]  # fmt: skip
    _write(root / "tables" / "verdict.csv", pd.DataFrame(verdict, columns=stats.VERDICT_COLUMNS))
    _write(root / "tables" / "drift_layers.csv", drift_layers())
    _write(root / "tables" / "drift_summary.csv", pd.DataFrame(drift.summary_rows(drift_layers())))
    _write(root / "tables" / "weights.csv", weights_table())
    _write(root / "tables" / "deployment.csv", deployment_table())
    _write(root / "tables" / "deployment_memory.csv", pd.DataFrame(
        [{"strategy": s, "weights_mb": w, "peak_mb": w + 40.5} for s, w in
         (("full", 86.6), ("merged", 86.6), ("separate", 87.5), ("mixed", 89.2))]))  # fmt: skip
    _write(root / "tables" / "deployment_checks.csv", pd.DataFrame(
        [{"check": "merged_vs_separate", "task": "sst2", "n_examples": 64, "max_abs_diff": 2.1e-6,
          "prediction_mismatches": 0, "tolerance": 1e-4, "passed": True},
         {"check": "mixed_vs_separate", "task": "sst2", "n_examples": 64, "max_abs_diff": 3.0e-3,
          "prediction_mismatches": 1, "tolerance": 1e-4, "passed": False}]))  # fmt: skip
    _write(root / "tables" / "trials.csv", pd.DataFrame(
        [{"task": "sst2", "method": "lora", "number": i, "state": "COMPLETE" if i % 3 else "PRUNED",
          "value": 0.85 + i / 100} for i in range(6)]))  # fmt: skip
    (root / "tuned").mkdir()
    (root / "tuned" / "sst2_lora.yaml").write_text(yaml.safe_dump(
        {"task": "sst2", "method": "lora", "best_value": 0.9,
         "params": {"lr": 0.002, "weight_decay": 0.05}}))  # fmt: skip
    for task in TASKS:
        for method in ("lora", "full"):
            for seed in SEEDS:
                folder = root / "runs" / task / method / f"seed{seed}"
                folder.mkdir(parents=True)
                configured = dict(config["training"][method])
                (folder / "hparams.json").write_text(json.dumps({"method": method, "seed": seed,
                                                                 "configured": configured}))  # fmt: skip
    _tiny_png(root / "figures" / "deployment_memory.png", "memory (from the deploy stage)")
    _tiny_png(root / "figures" / "tune_sst2_lora.png", "tuning history")
    return root


def drift_layers() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for task in TASKS:
        for pooling in ("mean", "head"):
            for measure in ("linear_cka", "debiased_cka", "cosine"):
                for layer in range(7):
                    base = {"task": task, "layer": layer, "pooling": pooling, "measure": measure}
                    rows.append({**base, "comparison": "base_vs_base", "method": "", "seed": "",
                                 "value": 1.0, "ci_low": 1.0, "ci_high": 1.0})  # fmt: skip
                    rows.append({**base, "comparison": "shuffled_base", "method": "", "seed": "",
                                 "value": 0.05 + rng.normal(0, 0.01), "ci_low": 0.02, "ci_high": 0.08})  # fmt: skip
                    for method, slope in (("lora", 0.015), ("full", 0.05)):
                        for seed in SEEDS:
                            v = 1 - slope * layer + rng.normal(0, 0.005)
                            rows.append({**base, "comparison": "run_vs_base", "method": method, "seed": str(seed),
                                         "value": v, "ci_low": v - 0.01, "ci_high": min(1.0, v + 0.01)})  # fmt: skip
                        for pair in ("42-1337", "42-2024", "1337-2024"):
                            v = 1 - slope * layer / 3 + rng.normal(0, 0.003)
                            rows.append({**base, "comparison": "seed_vs_seed", "method": method, "seed": pair,
                                         "value": v, "ci_low": v - 0.01, "ci_high": min(1.0, v + 0.01)})  # fmt: skip
    return pd.DataFrame(rows)[["task", "comparison", "method", "seed", "layer", "pooling", "measure", "value",
                               "ci_low", "ci_high"]]  # fmt: skip


def weights_table() -> pd.DataFrame:
    rng = np.random.default_rng(2)
    rows = []
    for task in TASKS:
        for method in ("lora", "full"):
            for seed in SEEDS:
                for layer in range(6):
                    for kind in KINDS:
                        if method == "lora" and kind not in ("attention.self.query", "attention.self.value"):
                            continue
                        rows.append({
                            "task": task, "method": method, "seed": seed,
                            "module": f"bert.encoder.layer.{layer}.{kind}",
                            "relative_update": (0.012 if method == "lora" else 0.003) * (1 + layer / 6)
                            * (1 + rng.normal(0, 0.05)),
                            "effective_rank": 5.5 + rng.normal(0, 0.3) if method == "lora" else 180 + rng.normal(0, 5),
                            "intruders": int(rng.integers(1, 4)) if method == "lora" else 0,
                            "layer": layer, "kind": kind.rsplit(".", 1)[-1], "rows": 384, "cols": 384,
                        })  # fmt: skip
    return pd.DataFrame(rows)


def deployment_table() -> pd.DataFrame:
    rows = []
    for seq_len in ("natural", "128"):
        for batch in (1, 2, 4, 8, 16):
            full = 4.0 * batch**0.8 * (1.6 if seq_len == "128" else 1.0)
            for strategy, factor in (("full", 1.0), ("merged", 1.0), ("separate", 1.35), ("switch", 1.42),
                                     ("mixed", 1.6), ("base", 0.99)):  # fmt: skip
                p50 = round(full * factor, 3)
                over = factor  # a ratio, as deployment.py writes it
                rows.append({"strategy": strategy, "batch_size": batch, "seq_len": seq_len, "p50_ms": p50,
                             "p95_ms": round(p50 * 1.1, 3), "p99_ms": round(p50 * 1.2, 3),
                             "mean_ms": round(p50 * 1.02, 3),
                             "examples_per_s": round(1000 * batch / p50, 1), "overhead_vs_full": over,
                             "overhead_ci_low": over - 0.02, "overhead_ci_high": over + 0.02})  # fmt: skip
    return pd.DataFrame(rows)


def _md_tables(md: str) -> list[list[list[str]]]:
    """Every pipe table of a Markdown text as rows of cells (separator row dropped)."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(---\|)+", line):
                current.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif current:
            tables.append(current)
            current = []
    return tables


def _section(md: str, heading: str) -> str:
    start = md.index(f"\n## {heading}\n")
    end = md.find("\n## ", start + 1)
    return md[start : end if end > 0 else None]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = make_study(tmp_path_factory.mktemp("study") / "synthetic")
    md_path, html_path = report.write_report(root)
    return root, md_path.read_text(), html_path.read_text()


def test_verdict_table_comes_first_with_the_tables_outcomes(full_report):
    root, md, html = full_report
    assert md.startswith("# lorascope report — synthetic\n")
    assert md.split("\n## ")[1].startswith("Verdict\n")
    first = _md_tables(md)[0]
    assert first[0] == ["task", "criterion", "value", "95% interval", "threshold", "outcome"]
    verdict = pd.read_csv(root / "tables" / "verdict.csv")
    assert [row[-1] for row in first[1:]] == list(verdict["outcome"])
    assert [row[-1] for row in first[1:]] == ["met", "met", "not met", "met",
                                              "inconclusive", "inconclusive", "not run", "inconclusive"]  # fmt: skip
    sst2_quality = first[1]
    assert sst2_quality[2:5] == ["0.50 pp", "[-1.00 pp, 2.00 pp]", "≤ 3.00 pp"]
    assert first[2][2:5] == ["30.0 %", "[25.0 %, 35.0 %]", "≥ 20.0 %"]
    # html: the first table is the verdict, outcomes coloured by class
    first_table = html[html.index("<table") : html.index("</table>")]
    assert 'class="verdict"' in first_table
    assert first_table.count('class="met"') == 3 and first_table.count('class="notmet"') == 1
    assert first_table.count('class="inconclusive"') == 3 and first_table.count('class="notrun"') == 1


def test_numbers_from_the_tables_appear_in_the_markdown(full_report):
    root, md, _ = full_report
    perf = pd.read_csv(root / "tables" / "performance.csv")
    performance = _section(md, "Task performance")
    for value in perf["primary_value"]:
        assert f"{value:.4f}" in performance
    assert "0.8122 ⚑" in performance  # the flagged run is marked ...
    assert "⚑ full FT seed 1337: primary value 0.8122 <= majority baseline + margin 0.8222" in performance
    assert "majority-class baseline: f1 0.8122" in performance and "head-only probe (frozen backbone)" in performance
    assert "overfit check, full FT: **FAILED**" in performance
    assert "Paired design" in performance and "agree for all 6 pairs" in performance
    # ... and left out of the unflagged statistics: mrpc full has n=2 there
    full = perf[(perf.task == "mrpc") & (perf.method == "full") & (perf.seed != 1337)]["primary_value"]
    d = stats.describe(full)
    assert f"{d['mean']:.4f} ± {d['sd']:.4f} (n=2)" in performance
    assert f"[{d['ci_low']:.4f}, {d['ci_high']:.4f}]" in performance
    # comparison: read from statistics.csv, as stats.compare computes it, Holm across the two tasks
    comparison = _section(md, "Method comparison")
    by = {m: perf[(perf.task == "sst2") & (perf.method == m)].set_index("seed")["primary_value"].to_dict()
          for m in ("lora", "full")}  # fmt: skip
    result = stats.compare(by["lora"], by["full"], n_resamples=2000)
    assert f"{result['mean_diff_paired']:.4f}" in comparison
    assert f"{result['paired_t_p']:.3f}" in comparison and f"{result['cohen_dz']:.2f}" in comparison
    assert "Unflagged runs only" in comparison and "Hedges' g** = J" in comparison
    assert "Source: tables/statistics.csv." in comparison
    # drift, weights, deployment
    summary = pd.read_csv(root / "tables" / "drift_summary.csv")
    cell = summary[(summary.task == "sst2") & (summary.method == "lora") & (summary.pooling == "mean")
                   & (summary.measure == "linear_cka")]  # fmt: skip
    lora = cell[cell.comparison == "run_vs_base"]["mean_over_layers"]
    noise = cell[cell.comparison == "seed_vs_seed"]["mean_over_layers"]
    assert f"| sst2 | mean | linear_cka | {lora.mean():.4f} ± {lora.std():.4f} (n=3) |" in _section(md, "Representational drift")
    assert f"| {noise.mean():.4f} |" in _section(md, "Representational drift")  # seed vs seed beside it
    dep = pd.read_csv(root / "tables" / "deployment.csv")
    sep = dep[(dep.strategy == "separate") & (dep.batch_size == 1) & (dep.seq_len == "natural")].iloc[0]
    deployment = _section(md, "Deployment cost")
    assert "| merged_vs_separate | sst2 | 64 | 2.1e-06 | 0 | 0.0001 | passed |" in deployment
    assert "| mixed_vs_separate | sst2 | 64 | 0.003 | 1 | 0.0001 | FAILED |" in deployment
    assert f"| separate | {sep.p50_ms:.2f} |" in deployment and "| separate | +35.0 [+33.0, +37.0] |" in deployment
    assert "| LoRA | value | 3 | 6 |" in _section(md, "Weight-space change")
    hparams = _section(md, "Hyperparameters")
    assert "| weight_decay | 0.05 | NOT used (runs: 0.01) |" in hparams and "| lr | 0.002 | used |" in hparams
    provenance = _section(md, "Provenance")
    assert "10789b141317b3cc" in provenance and "13:49" in provenance and "2.13.0+cpu" in provenance


def test_reference_numbers_beside_ours_with_their_flaws(full_report):
    _, md, _ = full_report
    section = _section(md, "Beside the reference study")
    assert "0.951 / 0.953 / 0.945 (mean 0.950)" in section and "0.880 / 0.883 / 0.881" in section
    assert {row[0] for row in _md_tables(section)[0][1:]} == {"sst2", "mrpc"}  # rte: not in this study
    assert "| sst2 | 0.641 | 0.899 | +28.7 % |" in section
    assert "| CKA of the base model with itself (correct: 1) | 0.23–0.40 | 1.000–1.000 |" in section
    for family, entry in report.load_reference()["families"].items():
        assert f"Known flaw ({family}): {entry['flaw']}" in section
    assert "| separate (ours: separate) | 35.1 | 1.376 |" in section


def test_reference_data_matches_prior_art():
    ref = report.load_reference()
    quality = pd.DataFrame(ref["families"]["quality"]["rows"])
    assert len(quality) == 18 and set(quality["seed"]) == set(SEEDS)
    sst2 = quality[(quality.task == "sst2") & (quality.method == "lora")].set_index("seed")["value"].to_dict()
    assert sst2 == {42: 0.951, 1337: 0.953, 2024: 0.945}
    rte_full = quality[(quality.task == "rte") & (quality.method == "full")].set_index("seed")["value"].to_dict()
    assert rte_full == {42: 0.469, 1337: 0.523, 2024: 0.690}
    assert all(len(f["flaw"].strip()) > 20 for f in ref["families"].values())


def test_html_is_self_contained_and_every_image_is_a_png(full_report):
    root, _, html = full_report
    images = re.findall(r"<img [^>]*src=\"([^\"]+)\"", html)
    assert len(images) >= 7  # performance, 2 drift, 2 weights, latency, memory, tuning
    for src in images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert "<script" not in html and "<link" not in html and not re.search(r"(src|href)=\"(https?:|//)", html)
    drawn = sorted(p.name for p in (root / "figures").glob("report_*.png"))
    assert drawn == ["report_deployment_latency.png", "report_drift_mrpc.png", "report_drift_sst2.png",
                     "report_performance.png", "report_weights_mrpc.png", "report_weights_sst2.png"]  # fmt: skip


def test_partial_study_reads_not_run(tmp_path):
    root = make_study(tmp_path / "partial", partial=True)
    md_path, html_path = report.write_report(root)
    md = md_path.read_text()
    for heading in ("Verdict", "Representational drift", "Weight-space change", "Deployment cost", "Provenance"):
        assert "*not run:" in _section(md, heading), heading
    assert "tables/verdict.csv missing" in md and "tables/weights.csv missing" in md
    performance = _section(md, "Task performance")
    assert "0.8122 |" in performance and "⚑" not in performance  # no baselines: only failed runs can be flagged
    assert "Flags: status only (tables/flags.csv missing; run `lorascope analyze STUDY`" in performance
    comparison = _section(md, "Method comparison")
    assert "*not run: tables/statistics.csv missing; run `lorascope analyze STUDY`*" in comparison
    assert "Not run: verdict, method comparison, drift, weight-space change, deployment, provenance." in md
    html = html_path.read_text()
    assert html.count("<img ") == 1 and 'class="notrun"' in html


def test_study_without_performance_and_unknown_tasks(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    md = report.write_report(empty)[0].read_text()
    assert _section(md, "Task performance").count("not run") == 1
    other = make_study(tmp_path / "other", partial=True, tasks={"custom_a": "accuracy", "custom_b": "f1"})
    md = report.write_report(other)[0].read_text()
    assert "No task of this study is one of the reference study's" in md


def _comparison_study(root: Path) -> tuple[Path, pd.DataFrame]:
    """A full study without the tables that only feed figures, and its statistics.csv."""
    make_study(root)
    for name in ("drift_layers", "drift_summary", "weights", "deployment"):  # not needed here; saves figures
        (root / "tables" / f"{name}.csv").unlink()
    return root, pd.read_csv(root / "tables" / "statistics.csv")


def test_comparison_read_from_statistics_csv(tmp_path):
    root, table = _comparison_study(tmp_path / "s")
    written = (table["kind"] == "compare") & (table["task"] == "sst2") & (table["subset"] == "all")
    comparison = {"kind": "compare", "task": "sst2", "metric": "accuracy", "subset": "all", "n_a": 3, "n_b": 3,
                  "n_pairs": 3, "mean_a": 0.9, "mean_b": 0.91, "mean_diff_paired": -0.0123, "bootstrap_low": -0.02,
                  "bootstrap_high": -0.005, "welch_p": 0.2, "paired_t_p": 0.0417, "permutation_paired_p": 0.25,
                  "permutation_unpaired_p": 0.3, "hedges_g": -1.5, "cohen_dz": -2.71,
                  "paired_t_p_holm": 0.0834}  # fmt: skip
    pd.concat([table[~written], pd.DataFrame([comparison])]).to_csv(root / "tables" / "statistics.csv", index=False)
    md = report.write_report(root)[0].read_text()
    section = _section(md, "Method comparison")
    assert "-0.0123" in section and "0.042 (0.083)" in section and "-2.71" in section
    assert "Source: tables/statistics.csv." in section


def test_comparison_not_run_without_comparison_rows(tmp_path):
    root, table = _comparison_study(tmp_path / "s")
    table[table["kind"] == "describe"].to_csv(root / "tables" / "statistics.csv", index=False)
    md = report.write_report(root)[0].read_text()
    section = _section(md, "Method comparison")
    assert "*not run: tables/statistics.csv has no comparison rows; run `lorascope analyze STUDY`*" in section
    assert "Not run: method comparison, drift, weight-space change, deployment." in md


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package `chromium`)")
def test_every_figure_loads_in_chromium(full_report, tmp_path):
    root, _, html = full_report
    probe = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
             " document.title = 'loaded ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length"
             " + ' of ' + imgs.length; });</script>")  # fmt: skip
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    match = re.search(r"<title>loaded (\d+) of (\d+)</title>", result.stdout)
    assert match, f"no probe title in Chromium's DOM; stderr: {result.stderr[-2000:]}"
    loaded, total = map(int, match.groups())
    assert total == html.count("<img ") and total >= 7
    assert loaded == total
