"""tables/statistics.csv, written by the analyze stage: per task, each method's metrics across
seeds (n, mean, sd, t-interval) over every finished run and over the unflagged ones, and each
pair of methods (every method against the reference, then the others against each other)
compared by seed: paired differences, tests with Holm's correction across tasks, effect sizes,
and the seed pairs that would tell the two apart."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import pandas as pd

from lorascope import planning, stats
from lorascope.config import AnalysisConfig, StudyConfig
from lorascope.study import Table

METRICS = ("primary_value", "accuracy", "f1")
GENERATIVE_METRICS = ("primary_value", "exact", "has_ans_f1", "no_ans_f1")  # primary: SQuAD F1
P_VALUES = ("welch_p", "paired_t_p", "permutation_paired_p", "permutation_unpaired_p")
BUILT_IN = ("lora", "full")  # the default pair the statistics and the verdict compare: (method, reference)


def pair_name(pair: tuple[str, str]) -> str:
    """`method` of statistics.csv's rows about a pair: paired differences a − b, comparisons."""
    return f"{pair[0]}-{pair[1]}"


DIFFERENCE = pair_name(BUILT_IN)


def method_pairs(methods: Iterable[str], reference: str) -> list[tuple[str, str]]:
    """Every method against the reference (when the study has it), then the others against each
    other, in study order: the pairs statistics.csv compares."""
    methods = list(methods)
    others = [m for m in methods if m != reference]
    return [(m, reference) for m in others if reference in methods] + list(itertools.combinations(others, 2))


def study_methods(flags: pd.DataFrame, config: StudyConfig) -> list[str]:
    """The methods with runs in `flags`, in the order of `methods` (a method dropped from the
    config since its runs were trained comes last)."""
    return [m for m in dict.fromkeys([*config.methods, *flags["method"]]) if m in set(flags["method"])]


STATISTICS = Table("statistics", ("kind", "task", "method", "metric", "subset"))


def scored_by_generation(runs: pd.DataFrame) -> bool:
    """Runs of a generative task: they have an exact match (SQuAD v2), no accuracy."""
    return "exact" in runs and runs["exact"].notna().all()


def _subsets(flags: pd.DataFrame):
    """Statistics are shown over every finished run and over the runs not flagged."""
    return (("all", flags[flags["status"] == "ok"]), ("unflagged", flags[~flags["flagged"]]))


def _by_seed(runs: pd.DataFrame, column: str = "primary_value") -> dict[str, dict[int, float]]:
    return {m: dict(zip(g["seed"], g[column])) for m, g in runs.groupby("method")}


def describe_rows(flags: pd.DataFrame, confidence: float, pairs=(BUILT_IN,)) -> list[dict]:
    """n, mean, sd and t-interval per task × method × metric × subset, and of the paired
    differences a − b of each pair (method `pair_name`) on each metric."""
    rows = []
    for subset, frame in _subsets(flags):
        for task, runs in frame.groupby("task"):
            primary = runs["primary_metric"].iloc[0]
            generative = scored_by_generation(runs)
            for metric in GENERATIVE_METRICS if generative else METRICS:
                name = primary if metric == "primary_value" else metric
                for method, group in runs.groupby("method"):
                    rows.append(
                        {
                            "kind": "describe",
                            "task": task,
                            "method": method,
                            "metric": name,
                            "subset": subset,
                            **stats.describe(group[metric].dropna(), confidence),
                        }
                    )
                values = _by_seed(runs.dropna(subset=[metric]), metric)
                for pair in pairs:
                    if pair[0] in values and pair[1] in values:
                        a, b = stats.paired(values[pair[0]], values[pair[1]])
                        rows.append(
                            {
                                "kind": "describe",
                                "task": task,
                                "method": pair_name(pair),
                                "metric": name,
                                "subset": subset,
                                **stats.describe(a - b, confidence),
                            }
                        )
    return rows


def seeds_to_separate(a_by_seed: dict[int, float], b_by_seed: dict[int, float], confidence: float) -> float:
    """Seed pairs at which the paired t-interval of a − b would exclude zero, were its mean and
    sd to stay as observed (planning.seeds_needed; the pairs run when it already does); NaN
    from fewer than two pairs, or when more than 1000 (or none) would."""
    a, b = stats.paired(a_by_seed, b_by_seed)
    d = stats.describe(a - b, confidence)
    if d["n"] < 2:
        return math.nan
    needed = planning.seeds_needed(
        d["mean"], d["sd"], int(d["n"]), 0.0, higher_is_better=d["mean"] > 0, confidence=confidence
    )
    return math.nan if needed is None else needed


def comparison_rows(flags: pd.DataFrame, analysis: AnalysisConfig, pairs=(BUILT_IN,)) -> list[dict]:
    """Each pair a vs b per task on the primary metric (method `pair_name`), with the seed pairs
    that would tell them apart; Holm-corrected across tasks per test and pair."""
    rows = []
    for pair, (subset, frame) in itertools.product(pairs, _subsets(flags)):
        family = []
        for task, group in frame.groupby("task"):
            by_seed = _by_seed(group)
            a, b = by_seed.get(pair[0], {}), by_seed.get(pair[1], {})
            if not a or not b:
                continue
            result = stats.compare(
                a, b, confidence=analysis.confidence, n_resamples=analysis.bootstrap, seed=analysis.seed
            )
            family.append(
                {
                    "kind": "compare",
                    "task": task,
                    "method": pair_name(pair),
                    "metric": group["primary_metric"].iloc[0],
                    "subset": subset,
                    **result,
                    "seeds_needed": seeds_to_separate(a, b, analysis.confidence),
                }
            )
        for p in P_VALUES:
            for row, adjusted in zip(family, stats.holm([row[p] for row in family])):
                row[f"{p}_holm"] = adjusted
        rows += family
    return rows
