"""The verdict against the reference study's success criteria: which runs are flagged as
failed, each criterion's outcome (met / not met / inconclusive / not run) with its direction,
how many seeds an inconclusive one would need, and the rows that inform beside them (failure
rates, the quality gap on the other metric, generation throughput). Estimates come from stats.py;
a study that served only generative tasks judges deployment on deployment_generation.csv."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import pandas as pd

from lorascope import planning
from lorascope.stats import Estimate

MET, NOT_MET, INCONCLUSIVE, NOT_RUN, SHOWN = "met", "not met", "inconclusive", "not run", "shown"
VERDICT_COLUMNS = (
    "task",
    "method",  # the method judged against the reference (analysis.reference)
    "criterion",
    "value",
    "ci_low",
    "ci_high",
    "threshold",
    "direction",
    "outcome",
    "rule",
    "n",
    "seeds_needed",
    "seeds_needed_low",
    "seeds_needed_high",
)
CRITERIA = ("quality", "drift", "deployment")  # combined into "recommended"; other rows inform


# ---------------------------------------------------------------- failed runs


def flag_runs(
    performance: pd.DataFrame, majority: Mapping[str, float], margin: float, floor_names: Mapping[str, str] = {}
) -> pd.DataFrame:
    """Copy of a performance table (task, method, seed, status, primary_value, ...) with a
    boolean `flagged` and a `reason` ('' when not flagged). A run is flagged when its status is
    not ok, it has no primary value, or it scores at most the task's floor plus `margin`: the
    majority-class baseline (generative tasks: the better of zero-shot base and "always
    unanswerable", named in `floor_names`). Such a run learned nothing, and the reference study
    reported one as a finding. The caller computes statistics with and without the flagged runs."""
    missing = sorted(set(performance["task"]) - set(majority))
    if missing:
        raise ValueError(f"no majority baseline for task(s) {missing}")

    def reason(row: pd.Series) -> str:
        if row["status"] != "ok":
            return f"status {row['status']}"
        if pd.isna(row["primary_value"]):
            return "no primary value"
        floor = majority[row["task"]] + margin
        if row["primary_value"] <= floor:
            name = floor_names.get(row["task"], "majority")
            return f"primary value {row['primary_value']:.4f} <= {name} baseline + margin {floor:.4f}"
        return ""

    out = performance.copy()
    out["reason"] = [reason(row) for _, row in performance.iterrows()]
    out["flagged"] = (out["reason"] != "").astype(bool)
    return out


# ---------------------------------------------------------------- verdict


def criterion(
    value: float | None, low: float | None, high: float | None, threshold: float, higher_is_better: bool
) -> str:
    """'not run' without a value; 'inconclusive' without an interval or when the interval
    straddles the threshold; otherwise 'met' or 'not met'. The threshold itself counts as met
    ('within 3 points', 'at least 20 %', 'at most 30 %')."""
    if value is None or math.isnan(value):
        return NOT_RUN
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if low > high:
        raise ValueError(f"interval [{low}, {high}] is reversed")
    if higher_is_better:
        return MET if low >= threshold else NOT_MET if high < threshold else INCONCLUSIVE
    return MET if high <= threshold else NOT_MET if low > threshold else INCONCLUSIVE


def _kleene(outcome: str) -> bool | None:
    return {MET: True, NOT_MET: False}.get(outcome)


def recommended(quality: str, drift: str, deployment: str, *required: str) -> str:
    """'LoRA recommended' = quality and (drift or deployment) [and every `required` criterion,
    e.g. forgetting when configured to count], in three-valued logic where 'inconclusive' and
    'not run' are unknown: a decided answer needs only the criteria that decide it (quality not
    met -> not met whatever else; quality and drift met -> met without a deployment result). An
    undecided answer reads 'inconclusive' if any criterion is inconclusive, else 'not run'."""
    q, dr, de = _kleene(quality), _kleene(drift), _kleene(deployment)
    either = True if dr or de else False if dr is False and de is False else None
    musts = [q, either, *map(_kleene, required)]
    result = False if False in musts else True if all(musts) else None
    if result is not None:
        return MET if result else NOT_MET
    return INCONCLUSIVE if INCONCLUSIVE in (quality, drift, deployment, *required) else NOT_RUN


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One verdict row. `estimate`: value with its interval (None: not run); `decider`: when
    given, the estimate that decides instead, met when its interval is at most `decide_at` (the
    drift contrast); `spread`: (mean, sd, n) of the per-seed values the deciding interval comes
    from, for the seeds-needed estimate; `counts`: False for a row that informs only."""

    name: str
    estimate: tuple | None
    threshold: float
    higher_is_better: bool
    rule: str
    decider: Estimate | None = None
    decide_at: float | None = None
    spread: tuple[float, float, int] | None = None
    counts: bool = True


def row(task: str, c: Criterion, confidence: float = 0.95, method: str = "") -> dict:
    value, low, high = tuple(c.estimate)[:3] if c.estimate is not None else (math.nan, math.nan, math.nan)
    if c.decider is not None:  # a contrast that must be at most decide_at
        decider, at, better = tuple(c.decider), c.decide_at, False
    else:
        decider, at, better = (value, low, high), c.threshold, c.higher_is_better
    outcome = NOT_RUN if c.estimate is None else criterion(*decider[:3], at, better)
    needed: tuple = (None, None, None)
    if outcome == INCONCLUSIVE and c.spread is not None and c.spread[2] >= 2:
        mean, sd, n = c.spread
        args = {"higher_is_better": better, "confidence": confidence}
        needed = (planning.seeds_needed(mean, sd, n, at, **args), *planning.seeds_needed_range(mean, sd, n, at, **args))
    return {
        "task": task,
        "method": method,
        "criterion": c.name,
        "value": value,
        "ci_low": low,
        "ci_high": high,
        "threshold": c.threshold,
        "direction": "at least" if c.higher_is_better else "at most",
        "outcome": outcome if c.counts else SHOWN,
        "rule": c.rule,
        "n": c.spread[2] if c.spread is not None else None,
        "seeds_needed": needed[0],
        "seeds_needed_low": needed[1],
        "seeds_needed_high": needed[2],
    }


def verdict_rows(task: str, criteria: list[Criterion], confidence: float = 0.95, method: str = "") -> list[dict]:
    """Rows of tables/verdict.csv for one task and method (columns VERDICT_COLUMNS), then
    'recommended', which combines the rows named in CRITERIA and any other row that counts (see
    `recommended`)."""
    rows = [row(task, c, confidence, method) for c in criteria]
    outcome = {r["criterion"]: r["outcome"] for r in rows}
    required = [c.name for c in criteria if c.counts and c.name not in CRITERIA]  # e.g. forgetting, when it counts
    rows.append(
        {
            "task": task,
            "method": method,
            "criterion": "recommended",
            "value": math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
            "threshold": math.nan,
            "direction": "",
            "outcome": recommended(
                *(outcome.get(name, NOT_RUN) for name in CRITERIA), *(outcome[name] for name in required)
            ),
            "rule": " and ".join(["quality and (drift or deployment)", *required]),
        }
    )
    return rows


def failure_rate(task: str, method: str, flagged: int, runs: int, confidence: float) -> dict:
    """An informing row: the share of a method's runs that are flagged, with its Clopper–Pearson
    interval, so instability shows beside quality (which is judged on unflagged pairs)."""
    estimate = planning.clopper_pearson(flagged, runs, confidence) if runs else None
    rule = (
        f"{flagged} of {runs} runs flagged (failed, diverged or not above the best floor baseline); "
        "Clopper–Pearson interval"
    )
    failures = Criterion(f"failure rate {method}", estimate, math.nan, False, rule, counts=False)
    return row(task, failures, confidence, method)


# ---------------------------------------------------------------- generation serving

GENERATION_ENGINES = ("vllm", "peft")  # deploy.engines, preferred first: the real server


def _one_prompt(table: pd.DataFrame) -> pd.DataFrame:
    """Timed one-prompt rows of deployment_generation.csv (more prompts: the batched cells)."""
    return table[(table["status"] == "ok") & (table["prompts"] == 1)]


def generation_deployment(table: pd.DataFrame, threshold: float) -> Criterion:
    """The deployment criterion of a study whose deploy stage served only generative tasks:
    separate-adapter time per output token over merged at one client and one prompt, minus 1 (the
    table holds grid.overheads' median paired ratio), on vLLM when it timed that cell, else PEFT,
    so the number is the one a real server shows. Its interval decides as every criterion's does
    (criterion): met when the upper bound is ≤ threshold, not met when the lower one is above."""
    rule = (
        "separate-adapter time per output token / merged − 1, one client, one prompt per request (median of "
        f"per-request ratios, bootstrap interval over turns); met if ≤ {threshold:g}"
    )
    rows = _one_prompt(table)
    rows = rows[(rows["strategy"] == "separate") & (rows["concurrency"] == 1) & rows["tpot_overhead_vs_merged"].notna()]
    for engine in GENERATION_ENGINES:
        found = rows[rows["engine"] == engine]
        if not found.empty:
            r = found.iloc[0]
            value, low, high = (float(r[f"tpot_overhead_vs_merged{end}"]) - 1 for end in ("", "_ci_low", "_ci_high"))
            shown = f"Engine {engine}: {value:+.1%}" + (f" [{low:+.1%}, {high:+.1%}]" if not math.isnan(high) else "")
            return Criterion("deployment", Estimate(value, low, high), threshold, False, f"{rule}. {shown}")
    return Criterion("deployment", None, threshold, False, f"{rule}. No engine timed separate and merged there")


def generation_throughput(table: pd.DataFrame) -> Criterion:
    """An informing row: output tokens/s of separate and multi over merged at each engine's highest
    concurrency, where batching (or its absence) decides what an adapter costs; its value is
    separate's on the engine the deployment criterion prefers."""
    ok, parts, value = _one_prompt(table), [], math.nan
    for engine in GENERATION_ENGINES:
        mine = ok[ok["engine"] == engine]
        if mine.empty:
            continue
        top = mine[mine["concurrency"] == mine["concurrency"].max()]
        ratios = {s: top.loc[top["strategy"] == s, "tokens_per_s_vs_merged"].dropna() for s in ("separate", "multi")}
        shown = ", ".join(f"{s} {r.iloc[0]:.3f}" if not r.empty else f"{s} —" for s, r in ratios.items())
        parts.append(f"{engine} at {int(top['concurrency'].iloc[0])} clients: {shown}")
        if math.isnan(value) and not ratios["separate"].empty:
            value = float(ratios["separate"].iloc[0])
            parts[-1] += " (the value)"
    rule = "output tokens/s / merged at the highest concurrency, one prompt per request: " + (
        "; ".join(parts) or "no engine timed"
    )
    estimate = Estimate(value, math.nan, math.nan) if not math.isnan(value) else None
    return Criterion("generation throughput", estimate, math.nan, True, rule, counts=False)


def serving_criteria(classification: Criterion, generation: pd.DataFrame | None, threshold: float) -> list[Criterion]:
    """The deployment criterion, read from the generation table when no classification cell
    decided it (a study of generative tasks only), and the generation throughput row beside it."""
    if generation is None:
        return [classification]
    deployment = classification if classification.estimate is not None else generation_deployment(generation, threshold)
    return [deployment, generation_throughput(generation)]
