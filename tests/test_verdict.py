"""verdict.py: flags, criteria, the combined recommendation, seeds needed in the rows, failure
rates; and the analyze stage's quality, drift and deployment criteria on tables from the writers."""

import math

import pandas as pd
import pytest

from lorascope import analysis, comparisons, planning, stats, verdict
from lorascope.config import AnalysisConfig

SST2_LORA = {42: 0.951, 1337: 0.953, 2024: 0.945}  # the reference study's numbers
SST2_FULL = {42: 0.903, 1337: 0.844, 2024: 0.851}
MRPC_LORA = {42: 0.880, 1337: 0.883, 2024: 0.881}
MRPC_FULL = {42: 0.830, 1337: 0.888, 2024: 0.875}


# ---------------------------------------------------------------- failed runs


def test_flag_runs():
    perf = pd.DataFrame(
        {
            "task": ["rte"] * 5 + ["sst2"],
            "method": ["full"] * 6,
            "seed": [1, 2, 3, 4, 5, 1],
            "status": ["ok", "ok", "diverged", "failed", "ok", "ok"],
            "primary_value": [0.80, 0.75, 0.6, None, 0.70, 0.60],
        }
    )
    out = verdict.flag_runs(perf, {"rte": 0.5, "sst2": 0.5}, margin=0.25)
    assert out["flagged"].tolist() == [False, True, True, True, True, True]
    assert out["reason"][0] == ""
    assert "majority" in out["reason"][1]  # exactly at the floor 0.75 counts as failed
    assert out["reason"][2] == "status diverged" and out["reason"][3] == "status failed"
    assert "majority" in out["reason"][5]
    assert "flagged" not in perf.columns  # the input is not modified
    with pytest.raises(ValueError, match="sst2"):
        verdict.flag_runs(perf, {"rte": 0.5}, margin=0.0)


# ---------------------------------------------------------------- criteria and verdict


@pytest.mark.parametrize(
    "value, low, high, higher_is_better, expected",
    [
        (0.25, 0.22, 0.28, True, "met"),
        (0.20, 0.20, 0.21, True, "met"),  # the threshold counts as met
        (0.10, 0.05, 0.15, True, "not met"),
        (0.21, 0.10, 0.30, True, "inconclusive"),
        (0.10, 0.05, 0.15, False, "met"),
        (0.40, 0.35, 0.45, False, "not met"),
        (0.25, 0.10, 0.40, False, "inconclusive"),
        (0.25, float("nan"), float("nan"), False, "inconclusive"),  # no interval (n=1)
        (float("nan"), float("nan"), float("nan"), True, "not run"),
        (None, None, None, True, "not run"),
    ],
)
def test_criterion(value, low, high, higher_is_better, expected):
    threshold = 0.20 if higher_is_better else 0.30
    assert verdict.criterion(value, low, high, threshold, higher_is_better) == expected


def test_criterion_rejects_reversed_interval():
    with pytest.raises(ValueError, match="reversed"):
        verdict.criterion(0.2, 0.3, 0.1, 0.2, True)


@pytest.mark.parametrize(
    "quality, drift, deployment, expected",
    [
        ("met", "met", "not run", "met"),
        ("met", "not met", "met", "met"),
        ("met", "inconclusive", "met", "met"),
        ("met", "not met", "not met", "not met"),
        ("not met", "met", "met", "not met"),
        ("not met", "not run", "inconclusive", "not met"),
        ("inconclusive", "met", "met", "inconclusive"),
        ("met", "inconclusive", "not met", "inconclusive"),
        ("met", "inconclusive", "not run", "inconclusive"),
        ("met", "not run", "not met", "not run"),
        ("not run", "met", "met", "not run"),
    ],
)
def test_recommended(quality, drift, deployment, expected):
    assert verdict.recommended(quality, drift, deployment) == expected


def _gap(lora, full):
    d = stats.describe([100 * (full[s] - lora[s]) for s in sorted(lora)])
    return stats.Estimate(d["mean"], d["ci_low"], d["ci_high"]), (d["mean"], d["sd"], d["n"])


def test_verdict_rows_columns_outcomes_and_seeds_needed():
    gap, spread = _gap(MRPC_LORA, MRPC_FULL)  # -1.7 points, t-interval about [-8.9, 5.5]
    rows = verdict.verdict_rows(
        "mrpc",
        [
            verdict.Criterion("quality", gap, 3.0, False, "q", spread=spread),
            verdict.Criterion("drift", stats.Estimate(0.25, 0.22, 0.28), 0.2, True, "d"),
            verdict.Criterion("deployment", None, 0.3, False, "dep"),
        ],
    )
    table = pd.DataFrame(rows, columns=verdict.VERDICT_COLUMNS)
    by = table.set_index("criterion")
    assert by.loc["quality", "value"] == pytest.approx(-1.7)
    assert by["outcome"].to_dict() == {
        "quality": "inconclusive",
        "drift": "met",
        "deployment": "not run",
        "recommended": "inconclusive",
    }
    assert by["direction"].iloc[:3].tolist() == ["at most", "at least", "at most"]
    needed = by.loc["quality", "seeds_needed"]
    assert needed == planning.seeds_needed(*spread, 3.0, higher_is_better=False)
    assert needed > 3 and by.loc["quality", "seeds_needed_low"] <= needed  # more seeds than ran
    assert pd.isna(by.loc["drift", "seeds_needed"])  # decided: nothing to plan


def test_the_drift_contrast_decides_and_the_ratio_is_shown():
    ratio = stats.RatioEstimate(0.3, math.nan, math.nan, False, "unbounded")  # Fieller gives no interval ...
    contrast = stats.Estimate(-0.05, -0.08, -0.02)  # ... the contrast still decides: met
    row = verdict.row("t", verdict.Criterion("drift", ratio, 0.2, True, "r", decider=contrast, decide_at=0.0))
    assert row["outcome"] == "met" and row["value"] == 0.3 and math.isnan(row["ci_low"])
    assert verdict.row("t", verdict.Criterion("drift", None, 0.2, True, "r"))["outcome"] == "not run"


def test_recommended_uses_only_the_three_criteria():
    gap, _ = _gap(SST2_LORA, SST2_FULL)  # LoRA better on every seed: met (one-sided)
    rows = verdict.verdict_rows(
        "sst2",
        [
            verdict.Criterion("quality", gap, 3.0, False, "q"),
            verdict.Criterion("quality (f1)", stats.Estimate(9.0, 8.0, 10.0), 3.0, False, "q", counts=False),
            verdict.Criterion("drift", stats.Estimate(0.05, 0.01, 0.09), 0.2, True, "d"),
            verdict.Criterion("deployment", stats.Estimate(0.10, 0.08, 0.12), 0.3, False, "dep"),
        ],
    )
    assert [r["outcome"] for r in rows] == ["met", "shown", "not met", "met", "met"]


def test_failure_rate_row_has_a_clopper_pearson_interval():
    row = verdict.failure_rate("rte", "lora", 1, 3, 0.95)
    assert (row["value"], row["ci_low"], row["ci_high"]) == pytest.approx((1 / 3, 0.0084, 0.9057), abs=1e-4)
    assert row["outcome"] == "shown" and "1 of 3 runs flagged" in row["rule"]


def _flags(values: dict[tuple[str, int], tuple[float, float, bool]]) -> pd.DataFrame:
    """A flags.csv-shaped frame (the analyze stage's columns) from {(method, seed): (accuracy, f1, flagged)}."""
    rows = [
        {
            "task": "mrpc",
            "method": m,
            "seed": s,
            "status": "ok",
            "primary_metric": "f1",
            "primary_value": f1,
            "accuracy": acc,
            "f1": f1,
            "flagged": flagged,
            "reason": "x" if flagged else "",
        }
        for (m, s), (acc, f1, flagged) in values.items()
    ]
    return analysis.FLAGS.frame(rows)


def test_quality_is_judged_on_accuracy_by_default_and_shows_the_primary_metric():
    flags = _flags(
        {
            ("lora", 1): (0.70, 0.80, False),
            ("full", 1): (0.72, 0.84, False),
            ("lora", 2): (0.71, 0.81, False),
            ("full", 2): (0.74, 0.85, False),
            ("lora", 3): (0.50, 0.60, True),
            ("full", 3): (0.73, 0.86, False),
        }
    )
    by = {c.name: c for c in analysis.quality_criteria(flags, "mrpc", AnalysisConfig())}
    assert set(by) == {"quality", "quality (f1)"} and by["quality"].counts and not by["quality (f1)"].counts
    assert by["quality"].estimate.value == pytest.approx(2.5)  # accuracy, seeds 1 and 2 only (3 is flagged)
    assert by["quality (f1)"].estimate.value == pytest.approx(4.0)
    assert "one-sided" in by["quality"].rule and "2 of 3 seed pairs" in by["quality"].rule
    primary = {c.name: c for c in analysis.quality_criteria(flags, "mrpc", AnalysisConfig(quality_metric="primary"))}
    assert primary["quality"].estimate.value == pytest.approx(4.0) and "quality (accuracy)" in primary


def _drift_summary(folder, drift: dict) -> pd.DataFrame:
    """drift_summary.csv as the drift writer's table holds it: linear CKA = 1 - drift per (method, seed)."""
    from lorascope.drift import DRIFT_SUMMARY

    rows = [
        {
            "task": "mrpc",
            "method": m,
            "seed": s,
            "pooling": "mean",
            "measure": "linear_cka",
            "mean_over_layers": 1 - d,
            "mean_last_third": 1 - d,
            "comparison": "run_vs_base",
        }
        for (m, s), d in drift.items()
    ]
    DRIFT_SUMMARY.write(folder, rows)
    return DRIFT_SUMMARY.read(folder)


def test_drift_criterion_uses_the_ratio_of_means_over_unflagged_pairs(tmp_path):
    drift = {
        ("lora", 1): 0.10,
        ("full", 1): 0.20,
        ("lora", 2): 0.05,
        ("full", 2): 0.20,
        ("lora", 3): 0.01,
        ("full", 3): 0.10,
    }
    summary = _drift_summary(tmp_path, drift)
    flags = _flags({(m, s): (0.8, 0.8, s == 3 and m == "lora") for m, s in drift})
    c = analysis.drift_criterion(summary, flags, "mrpc", AnalysisConfig())
    assert c.estimate.value == pytest.approx(1 - 0.15 / 0.40)  # ratio of means, seeds 1 and 2
    expected = stats.drift_reduction({1: 0.10, 2: 0.05}, {1: 0.20, 2: 0.20})
    assert (c.estimate.low, c.estimate.high) == pytest.approx((expected.low, expected.high))
    contrast = stats.reduction_contrast({1: 0.10, 2: 0.05}, {1: 0.20, 2: 0.20}, 0.2)
    assert tuple(c.decider) == pytest.approx(tuple(contrast)) and c.decide_at == 0.0
    alone = analysis.drift_criterion(
        summary, _flags({(m, s): (0.8, 0.8, s > 1) for m, s in drift}), "mrpc", AnalysisConfig()
    )
    assert alone.estimate.value == pytest.approx(1 - 0.16 / 0.50) and math.isnan(alone.decider.low)
    assert "no interval" in alone.rule and verdict.row("mrpc", alone)["outcome"] == "inconclusive"


def test_a_run_whose_drift_is_undefined_at_every_layer_is_left_out_of_the_statistics(tmp_path):
    """drift_layers.csv may hold NaN with a reason (a measure whose estimate the data
    leave undefined); a run undefined at every layer has no mean, and the statistics go on without it."""
    drift = {("lora", 1): 0.10, ("full", 1): 0.20, ("lora", 2): math.nan, ("full", 2): 0.20, ("lora", 3): 0.05}
    drift[("full", 3)] = 0.10
    summary = _drift_summary(tmp_path, drift)
    flags = _flags({key: (0.8, 0.8, False) for key in drift})
    table = analysis.drift_statistics(None, summary, flags, 0.95)
    assert table.loc[table["method"] == "lora", "n"].iloc[0] == 2
    c = analysis.drift_criterion(summary, flags, "mrpc", AnalysisConfig())
    assert c.estimate.value == pytest.approx(1 - 0.15 / 0.30)  # seeds 1 and 3, the pairs both have


def test_every_method_is_compared_with_the_reference_and_with_each_other(tmp_path):
    """Three methods: each against full FT, then LoRA against DoRA; differences, tests, the seed
    pairs that would tell a pair apart, and drift reductions, each against its own pair."""
    assert comparisons.method_pairs(["lora", "dora", "full"], "full") == [
        ("lora", "full"),
        ("dora", "full"),
        ("lora", "dora"),
    ]
    assert comparisons.method_pairs(["lora", "dora"], "full") == [("lora", "dora")]  # no reference: each other only
    accuracy = {"lora": (0.70, 0.72, 0.71), "dora": (0.74, 0.73, 0.78), "full": (0.75, 0.76, 0.74)}
    flags = _flags({(m, s): (v[s - 1], v[s - 1], False) for m, v in accuracy.items() for s in (1, 2, 3)})
    pairs = comparisons.method_pairs(["lora", "dora", "full"], "full")
    described = pd.DataFrame(comparisons.describe_rows(flags, 0.95, pairs))
    for a, b in pairs:
        d = described[(described["method"] == f"{a}-{b}") & (described["metric"] == "accuracy")]
        assert len(d) == 2 and d["mean"].iloc[0] == pytest.approx(
            sum(x - y for x, y in zip(accuracy[a], accuracy[b])) / 3
        )
    compared = pd.DataFrame(comparisons.comparison_rows(flags, AnalysisConfig(bootstrap=200), pairs))
    assert list(compared["method"]) == ["lora-full", "lora-full", "dora-full", "dora-full", "lora-dora", "lora-dora"]
    lora_full = compared.iloc[0]
    diffs = [x - y for x, y in zip(accuracy["lora"], accuracy["full"])]
    mean, sd = stats.describe(diffs)["mean"], stats.describe(diffs)["sd"]
    assert lora_full["mean_diff_paired"] == pytest.approx(mean)
    assert lora_full["seeds_needed"] == planning.seeds_needed(mean, sd, 3, 0.0, higher_is_better=False)
    summary = _drift_summary(
        tmp_path, {(m, s): d * s for m, d in (("lora", 0.1), ("dora", 0.2), ("full", 0.4)) for s in (1, 2, 3)}
    )
    table = analysis.drift_statistics(None, summary, flags, 0.95, ["lora", "dora", "full"], "full")
    reduction = table.set_index("method")["drift_reduction"]
    assert reduction["lora"] == pytest.approx(0.75) and reduction["dora"] == pytest.approx(0.5)
    assert math.isnan(reduction["full"]) and list(table["method"]) == ["lora", "dora", "full"]
