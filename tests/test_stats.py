"""stats.py against scipy, against independent textbook formulas, and against values worked out
by hand (the enumerations are written out in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from lorascope import stats

# The reference study's published numbers (PRIOR_ART.md), keyed by seed.
SST2_LORA = {42: 0.951, 1337: 0.953, 2024: 0.945}
SST2_FULL = {42: 0.903, 1337: 0.844, 2024: 0.851}
MRPC_LORA = {42: 0.880, 1337: 0.883, 2024: 0.881}
MRPC_FULL = {42: 0.830, 1337: 0.888, 2024: 0.875}


# ---------------------------------------------------------------- describe


def test_describe_matches_scipy_t_interval():
    x = [0.951, 0.953, 0.945, 0.93]
    d = stats.describe(x)
    low, high = st.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=st.sem(x))
    assert d["n"] == 4
    assert d["mean"] == pytest.approx(np.mean(x))
    assert d["sd"] == pytest.approx(np.std(x, ddof=1))
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((low, high))


def test_describe_by_hand():
    # [1, 2, 3]: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    d = stats.describe([1, 2, 3])
    assert d["ci_high"] - 2 == pytest.approx(4.302652729911275 / math.sqrt(3))


def test_describe_edge_cases():
    one = stats.describe([0.9])
    assert one["n"] == 1 and one["mean"] == 0.9
    assert math.isnan(one["sd"]) and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    flat = stats.describe([0.8, 0.8, 0.8])
    assert flat["sd"] == 0 and flat["ci_low"] == flat["ci_high"] == pytest.approx(0.8)
    empty = stats.describe([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])
    with pytest.raises(ValueError, match="non-finite"):
        stats.describe([0.9, float("nan")])


# ---------------------------------------------------------------- t-tests


def test_welch_matches_scipy_and_formula():
    a, b = list(SST2_LORA.values()), list(SST2_FULL.values())
    assert stats.welch_p(a, b) == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3  # Welch–Satterthwaite by hand
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert stats.welch_p(a, b) == pytest.approx(2 * st.t.sf(abs(t), df))


def test_paired_matches_scipy_and_formula():
    a, b = [3.0, 5.0, 10.0], [1.0, 2.0, 4.0]  # differences 2, 3, 6
    assert stats.paired_p(a, b) == pytest.approx(st.ttest_rel(a, b).pvalue)
    t = (11 / 3) / (math.sqrt(13 / 3) / math.sqrt(3))
    assert stats.paired_p(a, b) == pytest.approx(2 * st.t.sf(t, 2))


def test_t_tests_without_variance():
    assert stats.welch_p([0.9, 0.9], [0.9, 0.9, 0.9]) == 1.0
    assert stats.welch_p([0.9, 0.9], [0.8, 0.8]) == 0.0
    assert 0 < stats.welch_p([0.9, 0.9, 0.9], [0.8, 0.85, 0.82]) < 1  # one group constant: scipy's answer
    assert stats.paired_p([0.9, 0.8], [0.9, 0.8]) == 1.0
    assert stats.paired_p([0.9, 0.8], [0.85, 0.75]) == 0.0  # differences 0.05 up to float rounding
    assert math.isnan(stats.welch_p([0.9], [0.8, 0.7]))
    assert math.isnan(stats.paired_p([0.9], [0.8]))


# ---------------------------------------------------------------- exact permutation tests


def test_permutation_paired_by_hand():
    # diffs [1, 2, 3]: sign-flipped sums 6, 0, 2, -4, 4, -2, 0, -6; |sum| >= 6 in 2 of 8
    assert stats.permutation_paired_p([1, 2, 3], [0, 0, 0]) == 0.25
    # diffs [1, -2, 3], sum 2: |sums| 6, 0, 2, 4, 4, 2, 0, 6; >= 2 in 6 of 8
    assert stats.permutation_paired_p([1, -2, 3], [0, 0, 0]) == 0.75
    # n=2, diffs [1, 3]: sums 4, -2, 2, -4; >= 4 in 2 of 4
    assert stats.permutation_paired_p([1, 3], [0, 0]) == 0.5
    assert stats.permutation_paired_p([0.9, 0.8], [0.9, 0.8]) == 1.0
    assert math.isnan(stats.permutation_paired_p([], []))


def test_permutation_paired_three_seeds_never_below_a_quarter():
    # SST-2 in the reference study: LoRA better on every seed, still p = 2/8
    a, b = stats.paired(SST2_LORA, SST2_FULL)
    assert stats.permutation_paired_p(a, b) == 0.25
    # float differences (0.1, 0.2, 0.3 up to rounding) keep their ties
    assert stats.permutation_paired_p([0.4, 0.5, 0.6], [0.3, 0.3, 0.3]) == 0.25


def test_permutation_paired_matches_scipy_when_symmetric():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=6), rng.normal(size=6)
    ref = st.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples", n_resamples=np.inf)
    assert stats.permutation_paired_p(a, b) == pytest.approx(ref.pvalue)


def test_permutation_unpaired_by_hand():
    # pooled [1, 2, 3, 4], 6 splits, mean(a) - mean(b): -2, -1, 0, 0, 1, 2; |.| >= 2 in 2 of 6
    assert stats.permutation_unpaired_p([1, 2], [3, 4]) == pytest.approx(1 / 3)
    # pooled [0, 1, 5], a of size 1: a={0}: -3, {1}: -1.5, {5}: 4.5; |.| >= 3 in 2 of 3
    assert stats.permutation_unpaired_p([0], [1, 5]) == pytest.approx(2 / 3)
    # 3 vs 3 fully separated: 2 of C(6, 3) = 20
    assert stats.permutation_unpaired_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert math.isnan(stats.permutation_unpaired_p([], [1.0]))


def test_permutation_refuses_what_it_cannot_enumerate():
    with pytest.raises(ValueError, match="too many"):
        stats.permutation_paired_p(np.ones(17), np.zeros(17))
    with pytest.raises(ValueError, match="too many"):
        stats.permutation_unpaired_p(np.ones(10), np.zeros(10))


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_is_the_seeded_scipy_percentile_interval():
    a, b = stats.paired(MRPC_LORA, MRPC_FULL)
    low, high = stats.bootstrap_paired_interval(a, b, n_resamples=2000, seed=3)
    ref = st.bootstrap((a - b,), np.mean, n_resamples=2000, method="percentile", rng=np.random.default_rng(3))
    assert (low, high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    assert (low, high) == stats.bootstrap_paired_interval(a, b, n_resamples=2000, seed=3)
    assert min(a - b) - 1e-12 <= low <= high <= max(a - b) + 1e-12  # n=3: never wider than the range


def test_bootstrap_edge_cases():
    assert stats.bootstrap_paired_interval([0.9, 0.8], [0.85, 0.75]) == pytest.approx((0.05, 0.05))
    assert all(math.isnan(v) for v in stats.bootstrap_paired_interval([0.9], [0.8]))


# ---------------------------------------------------------------- effect sizes


def test_hedges_g_by_hand():
    # s_a² = s_b² = 1, s_pooled = 1, difference -2, J = 1 - 3/(24 - 9) = 0.8
    assert stats.hedges_g([1, 2, 3], [3, 4, 5]) == pytest.approx(-1.6)
    # s_a² = 2, s_b² = 4, s_pooled² = (1·2 + 2·4)/3 = 10/3, difference -2, J = 1 - 3/11
    assert stats.hedges_g([1, 3], [2, 4, 6]) == pytest.approx(-(8 / 11) * 2 / math.sqrt(10 / 3))


def test_cohen_dz_by_hand():
    # differences 2, 3, 6: mean 11/3, variance (25 + 4 + 49)/9/2 = 13/3
    assert stats.cohen_dz([3, 5, 10], [1, 2, 4]) == pytest.approx((11 / 3) / math.sqrt(13 / 3))


def test_effect_sizes_without_variance():
    assert stats.hedges_g([0.9, 0.9], [0.8, 0.8]) == math.inf
    assert stats.hedges_g([0.8, 0.8], [0.9, 0.9]) == -math.inf
    assert stats.hedges_g([0.9, 0.9], [0.9, 0.9]) == 0.0
    assert stats.cohen_dz([0.9, 0.8], [0.85, 0.75]) == math.inf
    assert stats.cohen_dz([0.85, 0.75], [0.9, 0.8]) == -math.inf
    assert stats.cohen_dz([0.9, 0.8], [0.9, 0.8]) == 0.0
    assert math.isnan(stats.hedges_g([0.9], [0.8, 0.7]))
    assert math.isnan(stats.cohen_dz([0.9], [0.8]))


# ---------------------------------------------------------------- compare


def test_compare_pairs_by_seed_and_uses_unpaired_seeds_only_unpaired():
    lora = {**SST2_LORA, 7: 0.94}  # seed 7 has no full-FT partner
    out = stats.compare(lora, SST2_FULL, n_resamples=1000)
    a, b = stats.paired(SST2_LORA, SST2_FULL)
    all_a = list(lora.values())
    assert (out["n_a"], out["n_b"], out["n_pairs"]) == (4, 3, 3)
    assert out["mean_a"] == pytest.approx(np.mean(all_a))
    assert out["mean_diff_paired"] == pytest.approx(np.mean(a - b))
    assert out["welch_p"] == pytest.approx(st.ttest_ind(all_a, b, equal_var=False).pvalue)
    assert out["paired_t_p"] == pytest.approx(st.ttest_rel(a, b).pvalue)
    assert out["permutation_paired_p"] == 0.25
    assert out["permutation_unpaired_p"] == pytest.approx(stats.permutation_unpaired_p(all_a, b))
    assert out["hedges_g"] == pytest.approx(stats.hedges_g(all_a, b))
    assert out["cohen_dz"] == pytest.approx(stats.cohen_dz(a, b))
    assert out["bootstrap_low"] <= out["mean_diff_paired"] <= out["bootstrap_high"]


def test_paired_aligns_by_seed_not_by_order():
    a, b = stats.paired({2: 0.2, 1: 0.1}, {1: 1.1, 2: 1.2, 3: 1.3})
    assert a.tolist() == [0.1, 0.2] and b.tolist() == [1.1, 1.2]


# ---------------------------------------------------------------- Holm


def test_holm_textbook():
    # sorted 0.01, 0.03, 0.04 -> 3·0.01, 2·0.03, 1·0.04 = 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # sorted 0.01, 0.02, 0.3, 0.5 -> 0.04, 0.06, 0.6, 0.5 -> monotone 0.04, 0.06, 0.6, 0.6
    assert stats.holm([0.5, 0.01, 0.3, 0.02]) == pytest.approx([0.6, 0.04, 0.6, 0.06])


def test_holm_caps_keeps_nan_and_empty():
    assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
    out = stats.holm([0.01, float("nan"), 0.04])  # m = 2
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert len(stats.holm([])) == 0


# ---------------------------------------------------------------- failed runs


def test_flag_runs():
    perf = pd.DataFrame({
        "task": ["rte"] * 5 + ["sst2"],
        "method": ["full"] * 6,
        "seed": [1, 2, 3, 4, 5, 1],
        "status": ["ok", "ok", "diverged", "failed", "ok", "ok"],
        "primary_value": [0.80, 0.75, 0.6, None, 0.70, 0.60],
    })  # fmt: skip
    out = stats.flag_runs(perf, {"rte": 0.5, "sst2": 0.5}, margin=0.25)
    assert out["flagged"].tolist() == [False, True, True, True, True, True]
    assert out["reason"][0] == ""
    assert "majority" in out["reason"][1]  # exactly at the floor 0.75 counts as failed
    assert out["reason"][2] == "status diverged" and out["reason"][3] == "status failed"
    assert "majority" in out["reason"][5]
    assert "flagged" not in perf.columns  # the input is not modified
    with pytest.raises(ValueError, match="sst2"):
        stats.flag_runs(perf, {"rte": 0.5}, margin=0.0)


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
    assert stats.criterion(value, low, high, threshold, higher_is_better) == expected


def test_criterion_rejects_reversed_interval():
    with pytest.raises(ValueError, match="reversed"):
        stats.criterion(0.2, 0.3, 0.1, 0.2, True)


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
    assert stats.recommended(quality, drift, deployment) == expected


def test_quality_gap_in_points_over_paired_seeds():
    gap = stats.quality_gap({**SST2_LORA, 7: 0.5}, SST2_FULL)  # seed 7 unpaired, ignored
    # full - LoRA: -4.8, -10.9, -9.4 points
    assert gap.value == pytest.approx(-25.1 / 3)
    d = stats.describe([-4.8, -10.9, -9.4])
    assert (gap.low, gap.high) == pytest.approx((d["ci_low"], d["ci_high"]))


def test_verdict_rows_columns_and_outcomes():
    rows = stats.verdict_rows(
        "mrpc",
        quality=stats.quality_gap(MRPC_LORA, MRPC_FULL),  # -1.7 points, t-interval about [-8.9, 5.5]
        drift=stats.Estimate(0.25, 0.22, 0.28),
        deployment=None,
    )
    table = pd.DataFrame(rows)
    assert tuple(table.columns) == stats.VERDICT_COLUMNS
    assert list(table.columns[:7]) == ["task", "criterion", "value", "ci_low", "ci_high", "threshold", "outcome"]
    by = table.set_index("criterion")
    assert by.loc["quality", "value"] == pytest.approx(-1.7)
    assert by.loc["quality", "ci_low"] < 3 < by.loc["quality", "ci_high"]
    assert by["outcome"].to_dict() == {
        "quality": "inconclusive", "drift": "met", "deployment": "not run", "recommended": "inconclusive",
    }  # fmt: skip
    assert by["threshold"].iloc[:3].tolist() == [3.0, 0.20, 0.30]
    assert (table["task"] == "mrpc").all()


def test_verdict_rows_recommended_and_thresholds():
    rows = stats.verdict_rows(
        "sst2",
        quality=stats.quality_gap(SST2_LORA, SST2_FULL),  # LoRA better on every seed
        drift=stats.Estimate(0.05, 0.01, 0.09),
        deployment=stats.Estimate(0.10, 0.08, 0.12),
    )
    assert [r["outcome"] for r in rows] == ["met", "not met", "met", "met"]
    strict = stats.verdict_rows("sst2", quality=None, drift=None, deployment=stats.Estimate(0.10, 0.08, 0.12),
                                deployment_threshold=0.05)  # fmt: skip
    assert [r["outcome"] for r in strict] == ["not run", "not run", "not met", "not run"]
