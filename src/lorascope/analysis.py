"""The `analyze` stage: statistics across seeds, flagged runs, drift statistics and the verdict
against the reference study's success criteria, from the tables earlier stages wrote. The
report renders these tables and recomputes none of them."""

from __future__ import annotations

import math
import sys

import pandas as pd

from lorascope import forgetting, stats, verdict
from lorascope.comparisons import (
    BUILT_IN,
    STATISTICS,
    comparison_rows,
    describe_rows,
    method_pairs,
    scored_by_generation,
    study_methods,
)
from lorascope.config import AnalysisConfig, StudyConfig
from lorascope.drift import DRIFT_LAYERS, DRIFT_SUMMARY
from lorascope.forgetting import FORGET_CORRELATION, FORGET_DRIFT, FORGET_STATISTICS, FORGETTING
from lorascope.runs import BASELINES, PERFORMANCE
from lorascope.serving.generation_grid import DEPLOYMENT_GENERATION
from lorascope.serving.grid import DEPLOYMENT
from lorascope.study import Study, Table

DRIFT_MEASURE, DRIFT_POOLING = "linear_cka", "mean"
FORGETTING_CRITERION = "forgetting: LoRA − full FT"
FLAGS = Table("flags", ("task", "method", "seed", "status", "primary_metric", "primary_value", "flagged", "reason"))
DRIFT_STATISTICS = Table(
    "drift_statistics",
    (
        "task",
        "pooling",
        "measure",
        "method",
        "n",
        "similarity_mean",
        "similarity_sd",
        "last_third_mean",
        "seed_vs_seed_mean",
        "base_vs_base",
        "shuffled_base",
        "drift_reduction",
        "reduction_low",
        "reduction_high",
        "reduction_pairs",
        "reduction_note",
    ),
)
VERDICT = Table("verdict", verdict.VERDICT_COLUMNS)
# Baselines a run must beat to count as having learned: classification's majority class, and a
# generative task's zero-shot base and "always unanswerable" (the better of the two).
FLOOR_BASELINES = ("majority", "zero_shot", "always_unanswerable")


def flagged_performance(study: Study, config: StudyConfig) -> pd.DataFrame:
    performance = PERFORMANCE.read(study.tables)
    baselines = BASELINES.read(study.tables)
    majority, names = {}, {}
    if baselines is not None:  # a task's floor: its best baseline that needs no training
        rows = baselines[baselines["baseline"].isin(FLOOR_BASELINES)].sort_values("primary_value")
        for row in rows.itertuples():
            majority[row.task], names[row.task] = row.primary_value, row.baseline.replace("_", " ")
    for task in set(performance["task"]) - set(majority):
        majority[task] = -math.inf  # no baseline stage: flag on status only
    return FLAGS.frame(verdict.flag_runs(performance, majority, config.analysis.majority_margin, names))


def clean_pairs(flags: pd.DataFrame, task: str, pair: tuple[str, str] = BUILT_IN) -> tuple[set[int], set[int]]:
    """(seeds both methods of `pair` ran without error, those of them where neither run is flagged)."""
    ok = flags[(flags["task"] == task) & (flags["status"] == "ok") & flags["method"].isin(pair)]
    seeds = set(ok.loc[ok["method"] == pair[0], "seed"]) & set(ok.loc[ok["method"] == pair[1], "seed"])
    return seeds, seeds - set(ok.loc[ok["flagged"], "seed"])


def _judged(seeds: set[int], clean: set[int]) -> tuple[set[int], bool, str]:
    """The seed pairs a criterion is judged on: those without a flagged run (a run that did not
    beat the majority class says nothing about LoRA), or, with fewer than two, every pair for a
    value without an interval (which reads inconclusive)."""
    note = f" ({len(clean)} of {len(seeds)} seed pairs without a flagged run"
    if len(clean) >= 2:
        return clean, True, note + ")"
    return seeds, False, note + ": value over all pairs, no interval)"


def _names(pair: tuple[str, str], full: str = "full FT") -> tuple[str, str]:
    """How a criterion's rule names the two methods of its pair (the built-in one: LoRA and `full`)."""
    return ("LoRA", full) if pair == BUILT_IN else pair


def run_drifts(summary: pd.DataFrame, task: str, pooling: str, measure: str) -> dict[str, dict[int, float]]:
    """drift = 1 - similarity (mean over layers) per method and seed; a run whose measure the data
    leave undefined at every layer (drift_layers.csv's missing_reason) has none and is left out."""
    rows = summary[
        (summary["task"] == task)
        & (summary["comparison"] == "run_vs_base")
        & (summary["pooling"] == pooling)
        & (summary["measure"] == measure)
        & summary["mean_over_layers"].notna()
    ]
    return {m: dict(zip(g["seed"].astype(int), 1 - g["mean_over_layers"])) for m, g in rows.groupby("method")}


def drift_reduction(
    drifts: dict, seeds: set[int], confidence: float, pair: tuple[str, str] = BUILT_IN
) -> stats.RatioEstimate:
    """1 − mean drift_LoRA / mean drift_full (of `pair`'s method and reference) over `seeds`,
    with Fieller's interval."""
    lora, full = drifts.get(pair[0], {}), drifts.get(pair[1], {})
    return stats.drift_reduction(
        {s: lora[s] for s in seeds if s in lora}, {s: full[s] for s in seeds if s in full}, confidence
    )


def drift_statistics(
    layers: pd.DataFrame | None,
    summary: pd.DataFrame | None,
    flags: pd.DataFrame,
    confidence: float,
    methods=BUILT_IN,
    reference: str = BUILT_IN[1],
) -> pd.DataFrame:
    """Per task × pooling × measure and method: the runs' similarity to the base (mean over
    layers: mean and sd over runs; mean over the last third of layers), seed-vs-seed similarity,
    the base-vs-base and shuffled-row references, and, on every method but the reference, the
    drift reduction the verdict uses: 1 − mean drift_method / mean drift_reference over the seed
    pairs without a flagged run, with its Fieller interval (drift = 1 − similarity)."""
    if summary is None:
        return DRIFT_STATISTICS.frame([])
    refs = {}
    if layers is not None:
        picked = layers[layers["comparison"].isin(["base_vs_base", "shuffled_base"])]
        refs = picked.groupby(["task", "comparison", "pooling", "measure"])["value"].mean().to_dict()
    rows = []
    for (task, pooling, measure), cell in summary.groupby(["task", "pooling", "measure"], sort=False):
        cell = cell[cell["mean_over_layers"].notna()]  # undefined at every layer: left out, as in run_drifts
        runs, pairs = cell[cell["comparison"] == "run_vs_base"], cell[cell["comparison"] == "seed_vs_seed"]
        drifts = run_drifts(summary, task, pooling, measure)
        for method in methods:
            if method == reference:
                seeds, note, reduction = set(), "", stats.RatioEstimate(math.nan, math.nan, math.nan, False, "")
            else:
                seeds, judged, note = _judged(*clean_pairs(flags, task, (method, reference)))
                reduction = drift_reduction(drifts, seeds, confidence, (method, reference))
                if not judged:
                    reduction = reduction._replace(low=math.nan, high=math.nan, bounded=False)
            d = stats.describe(runs.loc[runs["method"] == method, "mean_over_layers"], confidence)
            rows.append(
                {
                    "task": task,
                    "pooling": pooling,
                    "measure": measure,
                    "method": method,
                    "n": d["n"],
                    "similarity_mean": d["mean"],
                    "similarity_sd": d["sd"],
                    "last_third_mean": runs.loc[runs["method"] == method, "mean_last_third"].mean(),
                    "seed_vs_seed_mean": pairs.loc[pairs["method"] == method, "mean_over_layers"].mean(),
                    "base_vs_base": refs.get((task, "base_vs_base", pooling, measure), math.nan),
                    "shuffled_base": refs.get((task, "shuffled_base", pooling, measure), math.nan),
                    "drift_reduction": reduction.value,
                    "reduction_low": reduction.low,
                    "reduction_high": reduction.high,
                    "reduction_pairs": len(seeds) if method != reference else math.nan,
                    "reduction_note": reduction.note + note,
                }
            )
    return DRIFT_STATISTICS.frame(rows)


def quality_criteria(
    flags: pd.DataFrame, task: str, analysis: AnalysisConfig, pair: tuple[str, str] = BUILT_IN
) -> list[verdict.Criterion]:
    """Full FT − LoRA in points with the paired t-interval over the judged seed pairs, on the
    configured metric (analysis.quality_metric) and, informing, on the other one. A generative
    task has no accuracy: its criterion is on SQuAD F1, exact match informs."""
    ok = flags[(flags["task"] == task) & (flags["status"] == "ok")]
    primary = ok["primary_metric"].iloc[0]
    generative = scored_by_generation(ok)
    configured = "accuracy" if analysis.quality_metric == "accuracy" and not generative else primary
    seeds, judged, note = _judged(*clean_pairs(flags, task, pair))
    method, reference = pair
    a, b = _names(pair)
    out = []
    for metric in dict.fromkeys([configured, primary, "exact" if generative else "accuracy"]):
        by = {m: dict(zip(g["seed"], g[metric])) for m, g in ok.groupby("method")}
        if not seeds:
            estimate, spread = None, None
        else:
            gap = stats.describe([100 * (by[reference][s] - by[method][s]) for s in sorted(seeds)], analysis.confidence)
            estimate = stats.Estimate(
                gap["mean"], gap["ci_low"] if judged else math.nan, gap["ci_high"] if judged else math.nan
            )
            spread = (gap["mean"], gap["sd"], gap["n"]) if judged else None
        counts = metric == configured
        rule = (
            f"{b} − {a}, {metric}, percentage points, paired t-interval; one-sided: met if the interval's "
            f"upper end is ≤ {analysis.quality_max_gap_pp:g}, so {a} better than {b} always passes"
            + note
            + ("" if counts else "; shown beside the criterion, not part of the verdict")
        )
        out.append(
            verdict.Criterion(
                "quality" if counts else f"quality ({metric})",
                estimate,
                analysis.quality_max_gap_pp,
                False,
                rule,
                spread=spread,
                counts=counts,
            )
        )
    return out


def drift_criterion(
    summary: pd.DataFrame | None, flags: pd.DataFrame, task: str, analysis: AnalysisConfig, pair=BUILT_IN
) -> verdict.Criterion:
    """The reduction of mean drift (linear CKA, mean pooling) with its Fieller interval; met when
    the paired contrast drift_LoRA − (1 − threshold)·drift_full has its upper t-bound ≤ 0,
    which tests the criterion without a ratio."""
    threshold = analysis.drift_min_reduction
    a, b = _names(pair, "full")
    rule = (
        f"1 − mean drift_{a} / mean drift_{b}, drift = 1 − linear CKA (mean over layers, mean pooling), "
        f"Fieller interval; met if the paired contrast drift_{a} − {1 - threshold:g}·drift_{b} has its upper "
        f"t-bound ≤ 0 (at least {threshold:.0%} less drift)"
    )
    drifts = run_drifts(summary, task, DRIFT_POOLING, DRIFT_MEASURE) if summary is not None else {}
    seeds, judged, note = _judged(*clean_pairs(flags, task, pair))
    method, reference = pair
    seeds = {s for s in seeds if s in drifts.get(method, {}) and s in drifts.get(reference, {})}
    if not seeds:
        return verdict.Criterion("drift", None, threshold, True, rule)
    reduction = drift_reduction(drifts, seeds, analysis.confidence, pair)
    contrast_values = [drifts[method][s] - (1 - threshold) * drifts[reference][s] for s in sorted(seeds)]
    c = stats.describe(contrast_values, analysis.confidence)
    if not judged:
        reduction = reduction._replace(low=math.nan, high=math.nan)
        c = c | {"ci_low": math.nan, "ci_high": math.nan}
    rule += note + ("" if reduction.bounded or not judged else f"; Fieller interval {reduction.note}")
    return verdict.Criterion(
        "drift",
        reduction,
        threshold,
        True,
        rule,
        decider=stats.Estimate(c["mean"], c["ci_low"], c["ci_high"]),
        decide_at=0.0,
        spread=(c["mean"], c["sd"], c["n"]) if judged else None,
    )


def forgetting_criterion(
    probes: pd.DataFrame | None, flags: pd.DataFrame, task: str, analysis: AnalysisConfig, pair=BUILT_IN
) -> verdict.Criterion:
    """Forgetting of LoRA − that of full FT, in points of probe accuracy, on the probed tasks a
    run did not train on (mean over them, last probed layer), paired t-interval over the judged
    seed pairs. Informs unless analysis.forgetting_in_verdict makes it count."""
    threshold, counts = analysis.forgetting_max_gap_pp, analysis.forgetting_in_verdict
    a, b = _names(pair)
    rule = (
        f"forgetting = base − run linear-probe accuracy on the other probed tasks (mean over them, last "
        f"layer); {a} − {b}, percentage points, paired t-interval; ≤ {threshold:g} means {a} forgets at "
        f"most that much more" + ("" if counts else "; informs, not part of 'recommended'")
    )
    by = {}
    if probes is not None:
        cost = forgetting.transfer_cost(probes)
        cost = cost[(cost["task"] == task) & (cost["probe_task"] == forgetting.OTHER_TASKS)]
        by = {m: dict(zip(g["seed"], g["forgetting"])) for m, g in cost.groupby("method")}
    seeds, judged, note = _judged(*clean_pairs(flags, task, pair))
    method, reference = pair
    seeds = {s for s in seeds if s in by.get(method, {}) and s in by.get(reference, {})}
    if not seeds:
        return verdict.Criterion(FORGETTING_CRITERION, None, threshold, False, rule, counts=counts)
    gap = stats.describe([100 * (by[method][s] - by[reference][s]) for s in sorted(seeds)], analysis.confidence)
    estimate = stats.Estimate(
        gap["mean"], gap["ci_low"] if judged else math.nan, gap["ci_high"] if judged else math.nan
    )
    return verdict.Criterion(
        FORGETTING_CRITERION,
        estimate,
        threshold,
        False,
        rule + note,
        spread=(gap["mean"], gap["sd"], gap["n"]) if judged else None,
        counts=counts,
    )


def forgetting_tables(
    tables, probes: pd.DataFrame | None, summary: pd.DataFrame | None, analysis: AnalysisConfig
) -> None:
    """Forgetting over seeds, each run's drift beside its forgetting, and their rank correlations
    (drift = 1 − linear CKA, mean pooling: the drift criterion's measure)."""
    if probes is None:
        for table in (FORGET_STATISTICS, FORGET_DRIFT, FORGET_CORRELATION):
            table.write(tables, [])
        return
    FORGET_STATISTICS.write(tables, forgetting.seed_statistics(probes, analysis.confidence))
    points = forgetting.drift_points(probes, summary, DRIFT_LAYERS.read(tables), DRIFT_POOLING, DRIFT_MEASURE)
    FORGET_DRIFT.write(tables, points)
    FORGET_CORRELATION.write(
        tables,
        forgetting.correlation_rows(
            points, n_resamples=analysis.bootstrap, confidence=analysis.confidence, seed=analysis.seed
        ),
    )


def deployment_criterion(
    table: pd.DataFrame | None, analysis: AnalysisConfig, method: str | None = None
) -> verdict.Criterion:
    """Separate-adapter latency over full FT at batch size 1 on natural-length inputs, minus 1
    (of `method`'s adapter, when the table has a method column)."""
    rule = (
        f"separate-adapter latency / full FT − 1, batch size 1, natural length, PEFT in-process (median of "
        f"per-round ratios, bootstrap interval); met if ≤ {analysis.deploy_max_overhead:g}"
    )
    estimate = None
    if table is not None:
        rows = table[
            (table["strategy"] == "separate") & (table["batch_size"] == 1) & (table["seq_len"].astype(str) == "natural")
        ]
        if method is not None and "method" in rows:
            rows = rows[rows["method"] == method]
        if not rows.empty and pd.notna(rows.iloc[0]["overhead_vs_full"]):
            r = rows.iloc[0]
            estimate = stats.Estimate(r["overhead_vs_full"] - 1, r["overhead_ci_low"] - 1, r["overhead_ci_high"] - 1)
    return verdict.Criterion("deployment", estimate, analysis.deploy_max_overhead, False, rule)


def serving_criteria(
    deployment: pd.DataFrame | None, generation: pd.DataFrame | None, config: StudyConfig, method: str
) -> list[verdict.Criterion]:
    """The deployment rows of `method`: of its adapter served separately in PEFT (deployment.csv);
    generation serving (deployment_generation.csv) times the study's first adapter method only."""
    classification = deployment_criterion(deployment, config.analysis, method)
    if method == config.served_methods()[0]:
        return verdict.serving_criteria(classification, generation, config.analysis.deploy_max_overhead)
    return [classification]


def analyze(study: Study, config: StudyConfig) -> None:
    tables, analysis = study.tables, config.analysis
    if PERFORMANCE.read(tables) is None:
        print("analyze: no tables/performance.csv yet (no run has trained); nothing to analyze", file=sys.stderr)
        return
    flags = FLAGS.write(tables, flagged_performance(study, config))
    methods, reference = study_methods(flags, config), analysis.reference
    pairs = method_pairs(methods, reference)
    STATISTICS.write(tables, describe_rows(flags, analysis.confidence, pairs) + comparison_rows(flags, analysis, pairs))
    summary = DRIFT_SUMMARY.read(tables)
    DRIFT_STATISTICS.write(
        tables,
        drift_statistics(DRIFT_LAYERS.read(tables), summary, flags, analysis.confidence, methods, reference),
    )
    probes = FORGETTING.read(tables)
    forgetting_tables(tables, probes, summary, analysis)
    judged = [m for m, other in pairs if other == reference]
    deployment, generation = DEPLOYMENT.read(tables), DEPLOYMENT_GENERATION.read(tables)
    serving = {m: serving_criteria(deployment, generation, config, m) for m in judged}  # the same for every task
    rows = []
    for task in flags.loc[flags["status"] == "ok", "task"].unique():
        for method in judged:
            criteria = [
                *quality_criteria(flags, task, analysis, (method, reference)),
                drift_criterion(summary, flags, task, analysis, (method, reference)),
                forgetting_criterion(probes, flags, task, analysis, (method, reference)),
                *serving[method],
            ]
            rows += verdict.verdict_rows(task, criteria, analysis.confidence, method)
        for method in methods:
            runs = flags[(flags["task"] == task) & (flags["method"] == method)]
            rows.append(verdict.failure_rate(task, method, int(runs["flagged"].sum()), len(runs), analysis.confidence))
    VERDICT.write(tables, pd.DataFrame(rows, columns=list(verdict.VERDICT_COLUMNS)))
