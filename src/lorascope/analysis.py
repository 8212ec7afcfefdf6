"""The `analyze` stage: statistics across seeds, flagged runs, and the verdict against the
reference study's success criteria, from the tables earlier stages wrote."""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd

from lorascope import stats
from lorascope.config import AnalysisConfig, StudyConfig
from lorascope.study import Study, atomic_write_text

METRICS = ("primary_value", "accuracy", "f1")
P_VALUES = ("welch_p", "paired_t_p", "permutation_paired_p", "permutation_unpaired_p")
DRIFT_MEASURE, DRIFT_POOLING = "linear_cka", "mean"


def _read(study: Study, name: str) -> pd.DataFrame | None:
    path = study.tables / name
    return pd.read_csv(path) if path.is_file() else None


def flagged_performance(study: Study, config: StudyConfig) -> pd.DataFrame:
    performance = _read(study, "performance.csv")
    baselines = _read(study, "baselines.csv")
    majority = {}
    if baselines is not None:
        rows = baselines[baselines["baseline"] == "majority"]
        majority = dict(zip(rows["task"], rows["primary_value"]))
    for task in set(performance["task"]) - set(majority):
        majority[task] = -math.inf  # no baseline stage: flag on status only
    return stats.flag_runs(performance, majority, config.analysis.majority_margin)


def _subsets(flags: pd.DataFrame):
    """Statistics are shown over every finished run and over the runs not flagged."""
    return (("all", flags[flags["status"] == "ok"]), ("unflagged", flags[~flags["flagged"]]))


def _primary_by_seed(runs: pd.DataFrame) -> dict[str, dict[int, float]]:
    return {m: dict(zip(g["seed"], g["primary_value"])) for m, g in runs.groupby("method")}


def describe_rows(flags: pd.DataFrame, confidence: float) -> list[dict]:
    rows = []
    for subset, frame in _subsets(flags):
        for (task, method), group in frame.groupby(["task", "method"]):
            for metric in METRICS:
                values = group[metric].dropna()
                name = group["primary_metric"].iloc[0] if metric == "primary_value" else metric
                rows.append({"kind": "describe", "task": task, "method": method, "metric": name, "subset": subset,
                             **stats.describe(values, confidence)})  # fmt: skip
    return rows


def comparison_rows(flags: pd.DataFrame, analysis: AnalysisConfig) -> list[dict]:
    """LoRA vs full per task on the primary metric, Holm-corrected across tasks per test."""
    rows = []
    for subset, frame in _subsets(flags):
        family = []
        for task, group in frame.groupby("task"):
            by_seed = _primary_by_seed(group)
            if len(by_seed.get("lora", {})) < 1 or len(by_seed.get("full", {})) < 1:
                continue
            result = stats.compare(by_seed["lora"], by_seed["full"], confidence=analysis.confidence,
                                   n_resamples=analysis.bootstrap, seed=analysis.seed)  # fmt: skip
            family.append({"kind": "compare", "task": task, "metric": group["primary_metric"].iloc[0],
                           "subset": subset, **result})  # fmt: skip
        for p in P_VALUES:
            for row, adjusted in zip(family, stats.holm([row[p] for row in family])):
                row[f"{p}_holm"] = adjusted
        rows += family
    return rows


def _over_clean_seed_pairs(
    seeds: set[int], flagged: set[int], estimate: Callable[[set[int]], stats.Estimate]
) -> tuple[stats.Estimate, str]:
    """`estimate` over the seed pairs where neither run is flagged (a run that did not beat the
    majority class says nothing about LoRA); with fewer than two such pairs, its value over all
    pairs without an interval, which reads inconclusive. Returns the estimate and a note."""
    clean = seeds - flagged
    note = f" ({len(clean)} of {len(seeds)} seed pairs without a flagged run"
    if len(clean) >= 2:
        return estimate(clean), note + ")"
    return stats.Estimate(estimate(seeds).value, math.nan, math.nan), note + ": value over all runs, no interval)"


def quality_estimate(runs: pd.DataFrame, confidence: float) -> tuple[stats.Estimate | None, str]:
    """Full FT - LoRA in points with the paired t-interval, over unflagged seed pairs."""
    by_seed = _primary_by_seed(runs)
    lora, full = by_seed.get("lora", {}), by_seed.get("full", {})
    if not (lora and full):
        return None, ""

    def gap(seeds: set[int]) -> stats.Estimate:
        return stats.quality_gap({s: lora[s] for s in seeds}, {s: full[s] for s in seeds}, confidence)

    return _over_clean_seed_pairs(set(lora) & set(full), set(runs.loc[runs["flagged"], "seed"]), gap)


def drift_estimate(study: Study, task: str, confidence: float, flagged: set) -> tuple[stats.Estimate | None, str]:
    """Relative drift reduction 1 - drift_lora / drift_full (drift = 1 - mean linear CKA over
    layers, mean pooling), per seed pair, with a t-interval over unflagged seed pairs: a run
    that learned nothing barely drifts, and that says nothing about LoRA."""
    summary = _read(study, "drift_summary.csv")
    if summary is None:
        return None, ""
    rows = summary[(summary["task"] == task) & (summary["comparison"] == "run_vs_base")
                   & (summary["measure"] == DRIFT_MEASURE) & (summary["pooling"] == DRIFT_POOLING)]  # fmt: skip
    drift = {m: dict(zip(g["seed"].astype(int), 1 - g["mean_over_layers"])) for m, g in rows.groupby("method")}
    lora, full = drift.get("lora", {}), drift.get("full", {})
    reductions = {s: 1 - lora[s] / full[s] for s in sorted(set(lora) & set(full)) if full[s] > 0}
    if not reductions:
        return None, ""

    def mean_reduction(seeds: set[int]) -> stats.Estimate:
        d = stats.describe([reductions[s] for s in sorted(seeds)], confidence)
        return stats.Estimate(d["mean"], d["ci_low"], d["ci_high"])

    return _over_clean_seed_pairs(set(reductions), set(flagged), mean_reduction)


def deployment_estimate(study: Study) -> stats.Estimate | None:
    """Separate-adapter latency over full FT at batch size 1 on natural-length inputs, minus 1."""
    table = _read(study, "deployment.csv")
    if table is None:
        return None
    rows = table[
        (table["strategy"] == "separate") & (table["batch_size"] == 1) & (table["seq_len"].astype(str) == "natural")
    ]
    if rows.empty:
        return None
    row = rows.iloc[0]
    return stats.Estimate(row["overhead_vs_full"] - 1, row["overhead_ci_low"] - 1, row["overhead_ci_high"] - 1)


def analyze(study: Study, config: StudyConfig) -> None:
    flags = flagged_performance(study, config)
    atomic_write_text(study.tables / "flags.csv", flags.to_csv(index=False))
    statistics = pd.DataFrame(
        describe_rows(flags, config.analysis.confidence) + comparison_rows(flags, config.analysis)
    )
    atomic_write_text(study.tables / "statistics.csv", statistics.to_csv(index=False))
    verdict = []
    for task, group in flags[flags["status"] == "ok"].groupby("task"):
        quality, note = quality_estimate(group, config.analysis.confidence)
        drift, drift_note = drift_estimate(study, task, config.analysis.confidence, set(group.loc[group["flagged"], "seed"]))
        rows = stats.verdict_rows(
            task, quality=quality, drift=drift,
            deployment=deployment_estimate(study), quality_threshold=config.analysis.quality_max_gap_pp,
            drift_threshold=config.analysis.drift_min_reduction, deployment_threshold=config.analysis.deploy_max_overhead,
        )  # fmt: skip
        rows[0]["rule"] += note
        rows[1]["rule"] += drift_note
        verdict += rows
    atomic_write_text(
        study.tables / "verdict.csv", pd.DataFrame(verdict, columns=stats.VERDICT_COLUMNS).to_csv(index=False)
    )
