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
import optuna
import pandas as pd
import pytest
import torch

from lorascope import analysis, comparisons, drift, planning, report, runs, stats, tuning, verdict, weights
from lorascope.config import DeployConfig
from lorascope.config_io import to_yaml, validate
from lorascope.footprint import MB
from lorascope.optuna_storage import Backend
from lorascope.serving import checks, grid, memory
from lorascope.study import Study

TASKS = {"sst2": "accuracy", "mrpc": "f1"}
SEEDS = (42, 1337, 2024)
MAJORITY = {"sst2": 0.5092, "mrpc": 0.8122}
KINDS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
VERDICT = {  # task -> (quality, drift, deployment) estimates: value, low, high
    "sst2": (stats.Estimate(0.5, -1.0, 2.0), stats.Estimate(0.30, 0.25, 0.35), stats.Estimate(0.37, 0.33, 0.41)),
    "mrpc": (stats.Estimate(2.5, -4.0, 9.0), stats.Estimate(0.05, -0.10, 0.20), None),
}
SLOWER = {"full": 1.0, "merged": 1.0, "separate": 1.35, "switch": 1.42, "multi": 1.6, "base": 0.99}
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def performance_rows(tasks: dict[str, str], seeds=SEEDS) -> list[dict]:
    """metrics.json-like rows, one per run (runs.write_performance_table's input)."""
    rng = np.random.default_rng(0)
    rows = []
    for (task, metric), original in zip(tasks.items(), TASKS):
        for seed in seeds:
            levels = {"lora": 0.90, "full": 0.91} if original == "sst2" else {"lora": 0.86, "full": 0.85}
            for method, level in levels.items():
                value = round(level + rng.normal(0, 0.006), 4)
                if (original, method, seed) == ("mrpc", "full", 1337):
                    value = MAJORITY["mrpc"]  # learned nothing: must be flagged
                rows.append(
                    {
                        "task": task,
                        "method": method,
                        "seed": seed,
                        "status": "ok",
                        "primary_metric": metric,
                        "primary_value": value,
                        "accuracy": value - 0.01 if metric == "f1" else value,
                        "f1": value if metric == "f1" else value - 0.005,
                        "train_seconds": 30.0 + seed % 7,
                        "trainable_params": 222338 if method == "lora" else 22713986,
                        "head_init_digest": f"h{task}{seed}",
                        "data_order_digest": f"d{task}{seed}",
                        **run_cost(method, seed),
                    }
                )
    return rows


def run_cost(method: str, seed: int) -> dict:
    """What train_run records of a run's cost (CPU: no CUDA fields), varying with the seed."""
    trainable = 222338 if method == "lora" else 22713986
    return {
        "train_tokens_per_second": (5000.0 if method == "lora" else 2000.0) + seed % 5,
        "peak_rss_bytes": 900 * MB + seed,
        "peak_rss_added_bytes": (40 if method == "lora" else 300) * MB + seed,
        "cuda_max_allocated_bytes": None,
        "cuda_max_reserved_bytes": None,
        "optimizer_state_bytes": 8 * trainable + 4 * 40,
        "artifact_bytes": 4 * trainable + seed,
    }


def _write_runs(study: Study, rows: list[dict], training: dict) -> None:
    """Run folders as train_run leaves them (metrics.json, hparams.json), then performance.csv
    from them by the real writer."""
    for row in rows:
        folder = study.run_dir(row["task"], row["method"], row["seed"])
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(row))
        (folder / "hparams.json").write_text(
            json.dumps({"method": row["method"], "seed": row["seed"], "configured": training[row["method"]]})
        )
    runs.write_performance_table(study)


def _search(task: str, method: str) -> tuple[optuna.Study, Backend]:
    """A finished in-memory Optuna search of six trials, two of them pruned."""
    storage = optuna.storages.InMemoryStorage()
    ostudy = optuna.create_study(
        storage=storage, direction="maximize", study_name=f"lorascope/synthetic/{task}/{method}/x"
    )
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    wd = optuna.distributions.FloatDistribution(0.0, 0.1)
    for i in range(6):
        params = {"lr": 0.002 if i == 5 else 0.001 * (i + 1), "weight_decay": 0.05}
        state = optuna.trial.TrialState.COMPLETE if i % 3 else optuna.trial.TrialState.PRUNED
        ostudy.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={"lr": lr, "weight_decay": wd},
                state=state,
                value=0.85 + i / 100 if state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values={10: 0.84 + i / 100},
            )
        )
    return ostudy, Backend(storage, "in memory", "rdb", "in memory")


def _deployment(tables: Path) -> None:
    """The deploy stage's tables through its own writers: timings of a fake grid whose strategies
    take known multiples of full FT's time, checks from real logits, memory rows."""
    cfg = DeployConfig(
        grid={"batch_sizes": [1, 2, 4, 8, 16], "seq_lens": ["natural", 128], "repeats": 5}, bootstrap=200
    )
    rng = np.random.default_rng(3)
    results = {}
    for seq_len in cfg.grid.seq_lens:
        for batch in cfg.grid.batch_sizes:
            n = cfg.grid.repeats
            base = 4.0 * batch**0.8 * (1.6 if seq_len == 128 else 1.0) * rng.lognormal(0, 0.02, n)
            times = {s: base * factor * rng.lognormal(0, 0.01, n) for s, factor in SLOWER.items()}
            cell = grid.Cell(1, batch, seq_len)
            results[cell] = grid.sequential("peft", cell, times, np.full(n, 32 * batch), np.full(n, 20 * batch))
    measured = [m for cell in results.values() for m in cell]
    grid.overheads(measured, cfg.bootstrap)
    grid.DEPLOYMENT.write(tables, grid.deployment_table(measured, list(SLOWER), {}, cfg, 1, "cpu"))
    reference = torch.tensor([[0.2, 0.9], [1.0, -0.3], [0.1, 0.4], [0.7, 0.2]])
    labels = [1, 0, 1, 0]
    rows = [
        checks.compare_logits("merged_vs_separate", "sst2", reference + 2e-6, reference, labels),
        checks.compare_logits("multi_vs_alone", "sst2", reference + torch.tensor([0.0, 0.7]), reference, labels),
    ]
    checks.DEPLOYMENT_CHECKS.write(tables, [r | {"method": "lora"} for r in rows])  # as check_correctness names them
    memory.DEPLOYMENT_MEMORY.write(
        tables,
        [
            {
                "strategy": s,
                "load_seconds": 0.4,
                "peak_mb": w + 40.5,
                "loaded_mb": w,
                "inference_mb": 40.5,
                "disk_mb": w,
                "adapter_disk_mb": w - 86.6,
                "measure": "cpu rss",
                "method": "VmHWM",
                "device": "cpu",
            }
            for s, w in (("full", 86.6), ("merged", 86.6), ("separate", 87.5), ("multi", 89.2))
        ],
    )


def make_study(root: Path, partial: bool = False, tasks: dict[str, str] | None = None) -> Path:
    """A small study directory written by lorascope's own writers: performance.csv only when
    `partial`, else every table the report reads, the analyze stage's included."""
    study = Study(root)
    training = {
        "lora": {"lr": 0.002, "r": 8, "weight_decay": 0.01, "warmup_ratio": 0.1},
        "full": {"lr": 1e-4, "weight_decay": 0.01, "warmup_ratio": 0.1},
    }
    _write_runs(study, performance_rows(tasks or TASKS), training)
    if partial:
        return root
    config = validate(
        {
            "name": "synthetic",
            "model": {"name": "minilm-l6"},
            "tasks": {t: {} for t in TASKS},
            "methods": ["lora", "full"],
            "seeds": list(SEEDS),
            "training": training,
            "analysis": {"majority_margin": 0.01, "confidence": 0.95, "bootstrap": 2000, "seed": 0},
        }
    )
    (root / "config.yaml").write_text(to_yaml(config))
    manifest = {
        "config_fingerprint": "10789b141317b3cc",
        "lorascope": "0.1.0",
        "python": "3.11.7",
        "versions": {"torch": "2.13.0+cpu", "transformers": "5.23.0", "peft": "0.21.2"},
        "hardware": {"machine": "x86_64", "cpu_count": 2, "cuda": False},
        "stages": {
            name: {
                "status": "done",
                "seconds": sec,
                "fingerprint": "10789b141317b3cc",
                "finished": "2026-11-23T01:04:30+00:00",
            }
            for name, sec in (
                ("prepare", 3.5),
                ("baselines", 124.1),
                ("train", 829.5),
                ("drift", 61.0),
                ("deploy", 300.2),
                ("analyze", 2.0),
            )
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    rows = []
    for task, metric in TASKS.items():
        accuracy, f1 = (0.5092, 0.6748) if task == "sst2" else (0.6838, 0.8122)  # as GLUE's validation splits
        rows.append(
            {
                "task": task,
                "baseline": "majority",
                "method": "",
                "status": "ok",
                "primary_metric": metric,
                "primary_value": MAJORITY[task],
                "accuracy": accuracy,
                "f1": f1,
                "exact": None,
                "passed": None,
            }
        )
        rows.append(
            {
                "task": task,
                "baseline": "head_only",
                "method": "head",
                "status": "ok",
                "primary_metric": metric,
                "primary_value": 0.7018,
                "accuracy": 0.7018,
                "f1": 0.6912,
                "exact": None,
                "passed": None,
            }
        )
        for method in ("lora", "full"):
            rows.append(
                {
                    "task": task,
                    "baseline": f"overfit_{method}",
                    "method": method,
                    "status": "ok",
                    "primary_metric": metric,
                    "primary_value": 1.0,
                    "accuracy": 1.0,
                    "f1": 1.0,
                    "exact": None,
                    "passed": method == "lora",
                }
            )
    runs.BASELINES.write(study.tables, rows)
    layers, summary = drift.drift_tables(drift_rows())
    drift.DRIFT_LAYERS.write(study.tables, layers)
    drift.DRIFT_SUMMARY.write(study.tables, summary)
    weights.WEIGHTS.write(study.tables, weights_rows())
    _deployment(study.tables)
    ostudy, backend = _search("sst2", "lora")
    tuning.write_tuned(study, config, "sst2", "lora", "accuracy", ostudy, backend, 6)
    tuning.TRIALS.write(study.tables, tuning.trial_rows("sst2", "lora", ostudy))
    analysis.analyze(study, config)
    verdict_rows = [
        row
        for task, (q, d, dep) in VERDICT.items()
        for row in verdict.verdict_rows(
            task,
            [
                verdict.Criterion("quality", q, 3.0, False, "quality rule", spread=(q.value, 4.0, 3)),
                verdict.Criterion("drift", d, 0.2, True, "drift rule"),
                verdict.Criterion("deployment", dep, 0.3, False, "deployment rule"),
            ],
        )
    ]
    analysis.VERDICT.write(study.tables, verdict_rows)  # outcomes of every kind, which real data would not give
    return root


def drift_rows() -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for task in TASKS:
        for pooling in ("mean", "head"):
            for measure in ("linear_cka", "debiased_cka", "cosine"):
                for layer in range(7):
                    base = {"task": task, "layer": layer, "pooling": pooling, "measure": measure}
                    rows.append(
                        {
                            **base,
                            "comparison": "base_vs_base",
                            "method": "",
                            "seed": "",
                            "value": 1.0,
                            "ci_low": 1.0,
                            "ci_high": 1.0,
                        }
                    )
                    rows.append(
                        {
                            **base,
                            "comparison": "shuffled_base",
                            "method": "",
                            "seed": "",
                            "value": 0.05 + rng.normal(0, 0.01),
                            "ci_low": 0.02,
                            "ci_high": 0.08,
                        }
                    )
                    for method, slope in (("lora", 0.015), ("full", 0.05)):
                        for seed in SEEDS:
                            v = 1 - slope * layer + rng.normal(0, 0.005)
                            rows.append(
                                {
                                    **base,
                                    "comparison": "run_vs_base",
                                    "method": method,
                                    "seed": str(seed),
                                    "value": v,
                                    "ci_low": v - 0.01,
                                    "ci_high": min(1.0, v + 0.01),
                                }
                            )
                        for pair in ("42-1337", "42-2024", "1337-2024"):
                            v = 1 - slope * layer / 3 + rng.normal(0, 0.003)
                            rows.append(
                                {
                                    **base,
                                    "comparison": "seed_vs_seed",
                                    "method": method,
                                    "seed": pair,
                                    "value": v,
                                    "ci_low": v - 0.01,
                                    "ci_high": min(1.0, v + 0.01),
                                }
                            )
    return rows


def weights_rows() -> list[dict]:
    rng = np.random.default_rng(2)
    rows = []
    for task in TASKS:
        for method in ("lora", "full"):
            for seed in SEEDS:
                for layer in range(6):
                    for kind in KINDS:
                        if method == "lora" and kind not in ("attention.self.query", "attention.self.value"):
                            continue
                        rows.append(
                            {
                                "task": task,
                                "method": method,
                                "seed": seed,
                                "module": f"bert.encoder.layer.{layer}.{kind}",
                                "relative_update": (0.012 if method == "lora" else 0.003)
                                * (1 + layer / 6)
                                * (1 + rng.normal(0, 0.05)),
                                "effective_rank": 5.5 + rng.normal(0, 0.3)
                                if method == "lora"
                                else 180 + rng.normal(0, 5),
                                "intruders": int(rng.integers(1, 4)) if method == "lora" else 0,
                                "layer": layer,
                                "kind": kind.rsplit(".", 1)[-1],
                                "rows": 384,
                                "cols": 384,
                            }
                        )
    return rows


def _md_tables(md: str) -> list[list[list[str]]]:
    """Every pipe table of a Markdown text as rows of cells (separator row dropped)."""
    tables, current = [], []
    for line in [*md.splitlines(), ""]:
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
    outcomes = [row[-1].split(";")[0] for row in first[1:]]
    assert outcomes == list(verdict["outcome"])
    assert outcomes == ["met", "met", "not met", "met", "inconclusive", "inconclusive", "not run", "inconclusive"]
    needed = planning.seeds_needed(2.5, 4.0, 3, 3.0, higher_is_better=False)
    low, high = planning.seeds_needed_range(2.5, 4.0, 3, 3.0, higher_is_better=False)
    assert (
        first[5][-1] == f"inconclusive; at this spread ~{needed} seed pairs would decide it ({low}–{high or '>1000'})"
    )
    assert "Seeds needed" in md and "t-distribution" in md
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
    by = {
        m: perf[(perf.task == "sst2") & (perf.method == m)].set_index("seed")["primary_value"].to_dict()
        for m in ("lora", "full")
    }
    result = stats.compare(by["lora"], by["full"], n_resamples=2000)
    assert f"{result['mean_diff_paired']:.4f}" in comparison
    assert f"{result['paired_t_p']:.3f}" in comparison and f"{result['cohen_dz']:.2f}" in comparison
    assert "Unflagged runs only" in comparison and "Hedges' g** = J" in comparison
    assert "Source: tables/statistics.csv." in comparison
    # drift, weights, deployment
    summary = pd.read_csv(root / "tables" / "drift_summary.csv")
    cell = summary[
        (summary.task == "sst2")
        & (summary.method == "lora")
        & (summary.pooling == "mean")
        & (summary.measure == "linear_cka")
    ]
    lora = cell[cell.comparison == "run_vs_base"]["mean_over_layers"]
    noise = cell[cell.comparison == "seed_vs_seed"]["mean_over_layers"]
    drift = _section(md, "Representational drift")
    assert f"| sst2 | mean | linear_cka | LoRA | {lora.mean():.4f} ± {lora.std():.4f} (n=3) |" in drift
    assert f"| {noise.mean():.4f} |" in drift  # seed vs seed beside it
    assert "| sst2 | mean | linear_cka | full FT |" in drift and "| reference |" in drift
    dep = pd.read_csv(root / "tables" / "deployment.csv")
    sep = dep[(dep.strategy == "separate") & (dep.batch_size == 1) & (dep.seq_len == "natural")].iloc[0]
    deployment = _section(md, "Deployment cost")
    assert re.search(
        r"\| merged_vs_separate \| sst2 \| lora \| 4 \| 2\.\d+e-06 \| 0 \| 0\.0001 \| passed \|", deployment
    )
    assert "| multi_vs_alone | sst2 | lora | 4 | 0.7 | 1 | 0.0001 | FAILED |" in deployment
    overhead = (
        f"| separate | {100 * (sep.overhead_vs_full - 1):+.1f} [{100 * (sep.overhead_ci_low - 1):+.1f}, "
        f"{100 * (sep.overhead_ci_high - 1):+.1f}] |"
    )
    assert f"| separate | {sep.p50_ms:.2f} |" in deployment and overhead in deployment
    assert 1.3 < sep.overhead_vs_full < 1.4  # the fake grid's 1.35, through the real estimator
    assert "| LoRA | value | 3 | 6 |" in _section(md, "Weight-space change")
    hparams = _section(md, "Hyperparameters")
    assert "| weight_decay | 0.05 | NOT used (runs: 0.01) |" in hparams and "| lr | 0.002 | used |" in hparams
    provenance = _section(md, "Provenance")
    assert "10789b141317b3cc" in provenance and "13:49" in provenance and "2.13.0+cpu" in provenance


def test_training_cost_shows_medians_of_each_method_and_their_ratio(full_report):
    """Medians over seeds of performance.csv as the train stage wrote it, LoRA over full FT; the
    CUDA rows of a CPU study are left out."""
    root, md, _ = full_report
    section = _section(md, "Training cost")
    perf = pd.read_csv(root / "tables" / "performance.csv")
    assert "![" in section and "figures/report_training_cost.png" in section
    rows = {(r[0], r[1]): r[2:] for r in _md_tables(section)[0][1:]}
    assert {cost for _, cost in rows} == {
        "training time (s)",
        "training tokens / s",
        "peak resident memory added by training (MB)",
        "peak resident memory of the process (MB)",
        "optimizer state (MB)",
        "saved weights (MB)",
    }
    medians = perf.groupby(["task", "method"])[["optimizer_state_bytes", "train_tokens_per_second"]].median()
    for task in TASKS:
        lora, full = (medians.loc[(task, m), "optimizer_state_bytes"] / MB for m in ("lora", "full"))
        assert rows[(task, "optimizer state (MB)")] == [f"{lora:.4g}", f"{full:.4g}", f"{lora / full:.4g}", "3 / 3"]
        lora, full = (medians.loc[(task, m), "train_tokens_per_second"] for m in ("lora", "full"))
        assert rows[(task, "training tokens / s")][:3] == [f"{lora:.4g}", f"{full:.4g}", f"{lora / full:.4g}"]
    assert rows[("mrpc", "optimizer state (MB)")][2] == f"{(8 * 222338 + 160) / (8 * 22713986 + 160):.4g}"


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
    drawn = sorted(p.name for p in (root / "figures").glob("*.png"))
    assert drawn == [
        "report_deployment_latency.png",
        "report_deployment_memory.png",
        "report_drift_mrpc.png",
        "report_drift_sst2.png",
        "report_performance.png",
        "report_training_cost.png",
        "report_tune_sst2_lora.png",
        "report_weights_mrpc.png",
        "report_weights_sst2.png",
    ]


def test_partial_study_reads_not_run(tmp_path):
    root = make_study(tmp_path / "partial", partial=True)
    md_path, html_path = report.write_report(root)
    md = md_path.read_text()
    for heading in (
        "Verdict",
        "Task performance",
        "Representational drift",
        "Weight-space change",
        "Deployment cost",
        "Provenance",
    ):
        assert "*not run:" in _section(md, heading), heading
    assert "tables/verdict.csv missing" in md and "tables/weights.csv missing" in md
    performance = _section(md, "Task performance")  # flags come from the analyze stage, never guessed here
    assert "*not run: tables/flags.csv missing or empty; run `lorascope analyze STUDY`*" in performance
    comparison = _section(md, "Method comparison")
    assert "*not run: tables/statistics.csv missing or empty; run `lorascope analyze STUDY`*" in comparison
    assert (
        "Not run: verdict, task performance, method comparison, methods, drift, weight-space change, "
        "forgetting, deployment, provenance."
    ) in md
    html = html_path.read_text()
    assert "not run" not in _section(md, "Training cost")  # it needs performance.csv alone
    assert html.count("<img ") == 1 and "report_training_cost.png" in md and 'class="notrun"' in html


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
    row = (table["kind"] == "compare") & (table["task"] == "sst2") & (table["subset"] == "all")
    table.loc[row, ["mean_diff_paired", "paired_t_p", "paired_t_p_holm", "cohen_dz"]] = [-0.0123, 0.0417, 0.0834, -2.71]
    comparisons.STATISTICS.write(root / "tables", table)
    md = report.write_report(root)[0].read_text()
    section = _section(md, "Method comparison")
    assert "-0.0123" in section and "0.042 (0.083)" in section and "-2.71" in section
    assert "Source: tables/statistics.csv." in section


def test_comparison_not_run_without_comparison_rows(tmp_path):
    root, table = _comparison_study(tmp_path / "s")
    comparisons.STATISTICS.write(root / "tables", table[table["kind"] == "describe"])
    md = report.write_report(root)[0].read_text()
    section = _section(md, "Method comparison")
    assert (
        "*not run: tables/statistics.csv has no comparison rows (no task has runs of both methods); run "
        "`lorascope analyze STUDY`*"
    ) in section
    assert "Not run: method comparison, methods, drift, weight-space change, forgetting, deployment." in md


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package `chromium`)")
def test_every_figure_loads_in_chromium(full_report, tmp_path):
    _root, _, html = full_report
    probe = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        " document.title = 'loaded ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length"
        " + ' of ' + imgs.length; });</script>"
    )
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"<title>loaded (\d+) of (\d+)</title>", result.stdout)
    assert match, f"no probe title in Chromium's DOM; stderr: {result.stderr[-2000:]}"
    loaded, total = map(int, match.groups())
    assert total == html.count("<img ") and total >= 7
    assert loaded == total


@pytest.mark.parametrize("n_seeds", [12, 30])
def test_many_seeds_go_through_analyze_and_report(tmp_path, n_seeds):
    """The exact permutation tests refused beyond 2^16 relabellings; now they draw (seeded)."""
    study = Study(tmp_path / "many")
    seeds = list(range(1, n_seeds + 1))
    _write_runs(study, performance_rows(TASKS, seeds), {"lora": {"lr": 0.002}, "full": {"lr": 1e-4}})
    config = validate({"name": "many", "tasks": {t: {} for t in TASKS}, "seeds": seeds, "analysis": {"bootstrap": 500}})
    (study.root / "config.yaml").write_text(to_yaml(config))
    analysis.analyze(study, config)
    compare = comparisons.STATISTICS.read(study.tables).query("kind == 'compare' and subset == 'all'")
    assert (compare["n_pairs"] == n_seeds).all() and compare["permutation_unpaired_method"].eq("monte carlo").all()
    assert compare["permutation_paired_method"].eq("exact" if n_seeds == 12 else "monte carlo").all()
    assert compare["permutation_paired_p"].between(0, 1).all() and (compare["permutation_unpaired_n"] == 100_000).all()
    table = analysis.VERDICT.read(study.tables).set_index(["task", "criterion"])
    assert table.loc[("sst2", "failure rate full"), "value"] == 0.0 and table.loc[("sst2", "quality"), "n"] == n_seeds
    section = _section(report.write_report(study.root)[0].read_text(), "Method comparison")
    assert "MC, 100,000 draws" in section and f"{n_seeds} / {n_seeds} / {n_seeds}" in section


def test_rogue_dimensions_and_undefined_measures_are_shown_with_their_layers(tmp_path):
    """drift_layers.csv written by the drift writer from planted features: a layer where one feature
    holds most of the variance is listed with its shares, and a measure the data leave undefined
    (debiased CKA on 3 examples) is listed with its layers and reason instead of vanishing."""
    root = make_study(tmp_path / "s")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 16, generator=gen)
    base[1, :, 0] = torch.tensor([-300.0, 0.0, 300.0])  # layer 1: one feature holds ~all the variance
    runs = {("lora", 42): base + 0.1 * torch.randn(2, 3, 16, generator=gen)}
    rows = drift.task_drift_rows(
        "sst2",
        "mean",
        base,
        base.clone(),
        runs,
        [0, 1],
        ["linear_cka", "debiased_cka"],
        bootstrap=0,
        confidence=0.95,
        seed=0,
    )
    layers, summary = drift.drift_tables(rows)
    drift.DRIFT_LAYERS.write(Study(root).tables, layers)
    drift.DRIFT_SUMMARY.write(Study(root).tables, summary)
    section = _section(report.write_report(root)[0].read_text(), "Representational drift")
    share = layers[(layers["comparison"] == "base_vs_base") & (layers["layer"] == 1)]["top1_share_x"].iloc[0]
    assert share > 0.99
    assert f"| sst2 | mean | 1: {100 * share:.0f} / " in section and "| sst2 | mean | 0:" not in section
    assert "rogue dimensions" in section and "drift.standardize: true" in section
    reason = layers.loc[layers["measure"] == "debiased_cka", "missing_reason"].iloc[0]
    assert reason and "4" in reason
    assert f"| debiased_cka | 0, 1 | {reason} |" in section
