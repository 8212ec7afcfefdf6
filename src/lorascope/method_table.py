"""tables/methods.csv, written by the analyze stage after the statistics: every method of the
study side by side, what it costs and what it buys or loses, and the verdict's criteria of each
method against analysis.reference (lorascope.analysis computes them for any pair of methods)."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd

from lorascope import forgetting, stats, verdict
from lorascope.analysis import (
    DRIFT_MEASURE,
    DRIFT_POOLING,
    FLAGS,
    drift_criterion,
    forgetting_criterion,
    quality_criteria,
    run_drifts,
)
from lorascope.config import StudyConfig
from lorascope.drift import DRIFT_SUMMARY
from lorascope.forgetting import FORGETTING
from lorascope.serving.grid import DEPLOYMENT
from lorascope.study import Study, Table

METHOD_COSTS = ("trainable_params", "train_seconds", "peak_rss_added_bytes", "artifact_bytes")  # medians
# The verdict's criteria of each method against analysis.reference, paired by seed, in tables/methods.csv:
# quality (reference − method, points), drift reduction, forgetting (method − reference, points).
PAIRED = ("quality_gap", "drift_reduction", "forgetting_gap")
PARTS = {"value": "value", "low": "ci_low", "high": "ci_high", "outcome": "outcome", "seeds_needed": "seeds_needed"}
# One row per task x method: what each method costs and buys, over its finished runs.
METHODS = Table(
    "methods",
    (
        "task",
        "method",
        "type",
        "runs",
        "flagged",
        "metric",
        "quality_mean",
        "quality_low",
        "quality_high",
        "trainable_params",
        "train_seconds",
        "peak_rss_added_bytes",
        "artifact_bytes",
        "drift_mean",
        "drift_low",
        "drift_high",
        "forgetting_pp",
        "forgetting_low",
        "forgetting_high",
        "separate_over_merged",
        "separate_over_merged_low",
        "separate_over_merged_high",
        *(f"{c}_{part}" for c in PAIRED for part in PARTS),
    ),
)
SERVED_CELL = "PEFT, one client, one example a request, natural length"  # separate_over_merged's cell


def separate_over_merged(deployment: pd.DataFrame | None, method: str) -> tuple[float, float, float]:
    """Latency of `method`'s adapter kept separate over merged, with its interval, in SERVED_CELL
    (deployment.csv, the deploy stage's); NaN where it was not served."""
    if deployment is None or "method" not in deployment:
        return math.nan, math.nan, math.nan
    rows = deployment[
        (deployment["method"] == method)
        & (deployment["strategy"] == "separate")
        & (deployment["batch_size"] == 1)
        & (deployment["seq_len"].astype(str) == "natural")
    ]
    if rows.empty:
        return math.nan, math.nan, math.nan
    r = rows.iloc[0]
    return tuple(float(r[c]) for c in ("overhead_vs_merged", "overhead_vs_merged_ci_low", "overhead_vs_merged_ci_high"))


def method_rows(
    flags: pd.DataFrame,
    summary: pd.DataFrame | None,
    probes: pd.DataFrame | None,
    config: StudyConfig,
    deployment: pd.DataFrame | None = None,
) -> list[dict]:
    """Per task and method, over its finished runs: the primary metric (mean, t-interval over
    seeds), trainable parameters, training time, memory added and saved size (medians), drift
    (1 − linear CKA, mean pooling, mean over layers: the drift criterion's measure) and
    forgetting on the other probed tasks (points of probe accuracy), each with its t-interval;
    separate-over-merged latency where deploy served the method (SERVED_CELL); and for every
    method but analysis.reference, the verdict's quality, drift and forgetting
    criteria against the reference (paired by seed, with outcome and seeds needed)."""
    analysis, rows = config.analysis, []
    confidence, reference = analysis.confidence, analysis.reference
    cost = forgetting.transfer_cost(probes) if probes is not None else None
    for task in flags.loc[flags["status"] == "ok", "task"].unique():
        ok = flags[(flags["task"] == task) & (flags["status"] == "ok")]
        drifts = run_drifts(summary, task, DRIFT_POOLING, DRIFT_MEASURE) if summary is not None else {}
        forgot = {}
        if cost is not None:
            mine = cost[(cost["task"] == task) & (cost["probe_task"] == forgetting.OTHER_TASKS)]
            forgot = {m: list(100 * g["forgetting"]) for m, g in mine.groupby("method")}
        for method in dict.fromkeys([*config.methods, *ok["method"]]):
            runs = ok[ok["method"] == method]
            if runs.empty:
                continue
            quality = stats.describe(runs["primary_value"], confidence)
            drift = stats.describe(list(drifts.get(method, {}).values()), confidence)
            forget = stats.describe(forgot.get(method, []), confidence)
            pair = (method, reference)
            paired = (
                [
                    next(c for c in quality_criteria(flags, task, analysis, pair) if c.counts),
                    drift_criterion(summary, flags, task, analysis, pair),
                    dataclasses.replace(forgetting_criterion(probes, flags, task, analysis, pair), counts=True),
                ]
                if method != reference and reference in set(ok["method"])
                else []
            )
            served = separate_over_merged(deployment, method)
            versus = dict.fromkeys((f"{name}_{part}" for name in PAIRED for part in PARTS), math.nan)
            for name, criterion in zip(PAIRED, paired):
                judged = verdict.row(task, criterion, confidence)
                versus |= {f"{name}_{part}": judged[column] for part, column in PARTS.items()}
            rows.append(
                {
                    "task": task,
                    "method": method,
                    "type": config.method(method).type if config.defines(method) else "",
                    "runs": len(runs),
                    "flagged": int(runs["flagged"].sum()),
                    "metric": runs["primary_metric"].iloc[0],
                    "quality_mean": quality["mean"],
                    "quality_low": quality["ci_low"],
                    "quality_high": quality["ci_high"],
                    **{
                        c: pd.to_numeric(runs[c], errors="coerce").median() if c in runs else math.nan
                        for c in METHOD_COSTS
                    },
                    "drift_mean": drift["mean"],
                    "drift_low": drift["ci_low"],
                    "drift_high": drift["ci_high"],
                    "forgetting_pp": forget["mean"],
                    "forgetting_low": forget["ci_low"],
                    "forgetting_high": forget["ci_high"],
                    **dict(
                        zip(("separate_over_merged", "separate_over_merged_low", "separate_over_merged_high"), served)
                    ),
                    **versus,
                }
            )
    return rows


def write_method_table(study: Study, config: StudyConfig) -> None:
    flags = FLAGS.read(study.tables)
    if flags is not None:
        tables = study.tables
        rows = method_rows(flags, DRIFT_SUMMARY.read(tables), FORGETTING.read(tables), config, DEPLOYMENT.read(tables))
        METHODS.write(study.tables, METHODS.frame(rows))
