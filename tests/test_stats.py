"""stats.py against scipy, against independent textbook formulas, and against values worked out
by hand (the enumerations are written out in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from lorascope import planning, stats, verdict

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


# ---------------------------------------------------------------- permutation tests


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


def test_permutation_exact_up_to_max_exact_then_monte_carlo():
    assert stats.permutation_paired_test(np.arange(1.0, 17), np.zeros(16))[1:] == ("exact", 2**16)
    assert stats.permutation_paired_test(np.ones(17), np.zeros(17))[1:] == ("monte carlo", 100_000)
    assert stats.permutation_unpaired_test(np.ones(9), np.zeros(9))[1:] == ("exact", math.comb(18, 9))
    assert stats.permutation_unpaired_test(np.ones(10), np.zeros(10), n_permutations=500)[1:] == ("monte carlo", 500)
    assert stats.permutation_paired_test([], [])[1:] == ("none", 0)
    with pytest.raises(ValueError, match="n_permutations"):
        stats.permutation_paired_test(np.ones(3), np.zeros(3), n_permutations=0, max_exact=0)


def test_monte_carlo_p_is_one_plus_extreme_over_one_plus_draws():
    # 30 equal differences: only the two all-equal sign patterns (2 in 2^30) reach |sum| = 30,
    # so no draw is extreme and p = (1 + 0) / (1 + m)
    assert stats.permutation_paired_p(np.ones(30), np.zeros(30)) == 1 / 100_001
    # 30 vs 30 separated: 2 of C(60, 30) ~ 1e17 splits are as extreme
    assert stats.permutation_unpaired_p(np.arange(30.0) + 100, np.arange(30.0), n_permutations=1000) == 1 / 1001
    # all differences 0: every draw ties the observed 0, p = (1 + m) / (1 + m)
    assert stats.permutation_paired_p(np.zeros(20), np.zeros(20), n_permutations=1000) == 1.0
    # diffs [1, 2, 3], exact p 1/4: p·(1 + m) - 1 counts extreme draws, about m/4
    p = stats.permutation_paired_p([1, 2, 3], [0, 0, 0], n_permutations=4000, max_exact=0)
    assert (p * 4001 - 1) == pytest.approx(round(p * 4001 - 1)) and abs(p - 0.25) < 0.02


def test_monte_carlo_agrees_with_exact_where_both_run():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.5, 1, 16), rng.normal(0, 1, 16)
    exact, drawn = stats.permutation_paired_test(a, b), stats.permutation_paired_test(a, b, max_exact=0)
    assert (exact.method, drawn.method) == ("exact", "monte carlo")
    assert 0.01 < exact.p < 0.5 and abs(drawn.p - exact.p) < 0.01  # Monte Carlo SE ~0.0015 at 100,000 draws
    a, b = a[:8], b[:8]
    exact, drawn = stats.permutation_unpaired_test(a, b), stats.permutation_unpaired_test(a, b, max_exact=0)
    assert (exact.method, exact.n, drawn.method) == ("exact", 12870, "monte carlo")
    assert 0.01 < exact.p < 0.5 and abs(drawn.p - exact.p) < 0.01


def test_monte_carlo_is_reproducible_with_the_seed():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.3, 1, 30), rng.normal(0, 1, 30)
    for test in (stats.permutation_paired_test, stats.permutation_unpaired_test):
        first, again, other = test(a, b), test(a, b), test(a, b, seed=1)
        assert first == again and first.method == "monte carlo"
        assert other.p != first.p and abs(other.p - first.p) < 0.01


@pytest.mark.parametrize("n", [12, 30])
def test_compare_at_many_seeds_says_how_each_permutation_p_was_computed(n):
    rng = np.random.default_rng(n)
    full = rng.normal(0.85, 0.01, n)
    lora = dict(enumerate(full + 0.03 + rng.normal(0, 0.005, n)))  # better by 3 between-seed sd
    full = dict(enumerate(full))
    out = stats.compare(lora, full, n_resamples=1000)
    assert out["n_pairs"] == n
    # 2^12 = 4096 sign patterns are enumerated; C(24, 12) and 2^30 are not
    assert (out["permutation_paired_method"], out["permutation_paired_n"]) == (
        ("exact", 2**12) if n == 12 else ("monte carlo", 100_000)
    )
    assert (out["permutation_unpaired_method"], out["permutation_unpaired_n"]) == ("monte carlo", 100_000)
    a, b = stats.paired(lora, full)
    assert out["permutation_paired_p"] == stats.permutation_paired_p(a, b)
    assert out["permutation_unpaired_p"] == stats.permutation_unpaired_p(a, b)
    assert out["permutation_paired_p"] < 0.001 and out["permutation_unpaired_p"] < 0.001  # a strong effect
    assert out["paired_t_p"] < 0.001


def test_compare_at_three_seeds_is_exact():
    out = stats.compare(SST2_LORA, SST2_FULL, n_resamples=1000)
    assert (out["permutation_paired_method"], out["permutation_paired_n"]) == ("exact", 8)
    assert (out["permutation_unpaired_method"], out["permutation_unpaired_n"]) == ("exact", 20)
    assert out["permutation_paired_p"] == 0.25 and out["permutation_unpaired_p"] == pytest.approx(0.1)


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


def test_median_paired_ratio_gives_no_interval_from_one_block():
    a, b = np.array([1.2, 1.1, 1.3]), np.ones(3)
    ratio, low, high = stats.median_paired_ratio(a, b, 100, blocks=[range(0, 3)])
    assert ratio == pytest.approx(1.2) and np.isnan(low) and np.isnan(high)


def test_median_paired_ratio_resamples_blocks_whole():
    """Requests of one engine-grid turn share a spell of the machine: resampled one by one, a
    95 % interval held the true ratio in few runs; resampled by turn, in about 95 %."""
    rng, turns, true = np.random.default_rng(0), [range(16 * t, 16 * (t + 1)) for t in range(6)], 1.05
    covered = {"requests": 0, "turns": 0}
    for run in range(100):
        b = rng.uniform(1.5, 2.5, 96)  # the requests' content, common to both strategies
        spell = np.repeat(np.exp(rng.normal(0, 0.04, 6)), 16)  # one factor per turn
        a = true * b * spell * np.exp(rng.normal(0, 0.005, 96))
        for name, blocks in (("requests", None), ("turns", turns)):
            ratio, low, high = stats.median_paired_ratio(a, b, 300, seed=run, blocks=blocks)
            assert ratio == pytest.approx(np.median(a / b)) and low <= ratio <= high
            covered[name] += low <= true <= high
    assert covered["requests"] < 60 and covered["turns"] >= 88
    # blocks of one request are the default, draw for draw
    a, b = rng.uniform(1, 2, 30), rng.uniform(1, 2, 30)
    singles = [range(i, i + 1) for i in range(30)]
    assert stats.median_paired_ratio(a, b, 200, seed=4, blocks=singles) == stats.median_paired_ratio(a, b, 200, seed=4)


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


# ---------------------------------------------------------------- drift reduction

DRIFT_LORA = [0.10, 0.12, 0.15, 0.11]  # 1 - CKA per seed
DRIFT_FULL = [0.30, 0.28, 0.35, 0.27]


def test_fieller_matches_the_textbook_closed_form():
    a, b = np.array(DRIFT_LORA), np.array(DRIFT_FULL)
    r = stats.ratio_of_means_fieller(dict(enumerate(a)), dict(enumerate(b)))
    # Fieller's limits, e.g. Wikipedia "Fieller's theorem", with v = s / n:
    # [R - g v_ab/v_bb ± (t/b̄) sqrt(v_aa - 2R v_ab + R² v_bb - g (v_aa - v_ab²/v_bb))] / (1 - g)
    n, ratio = 4, a.mean() / b.mean()
    (v_aa, v_ab), (_, v_bb) = np.cov(a, b) / n
    t = st.t.ppf(0.975, n - 1)
    g = t**2 * v_bb / b.mean() ** 2
    root = (t / b.mean()) * math.sqrt(v_aa - 2 * ratio * v_ab + ratio**2 * v_bb - g * (v_aa - v_ab**2 / v_bb))
    assert r.bounded and r.note == "bounded" and g < 1
    assert r.value == pytest.approx(ratio)
    assert (r.low, r.high) == pytest.approx(
        ((ratio - g * v_ab / v_bb - root) / (1 - g), (ratio - g * v_ab / v_bb + root) / (1 - g))
    )


def test_fieller_limits_are_where_the_paired_t_test_of_a_minus_r_b_reaches_alpha():
    a, b = np.array(DRIFT_LORA), np.array(DRIFT_FULL)
    for confidence in (0.95, 0.8):
        r = stats.ratio_of_means_fieller(dict(enumerate(a)), dict(enumerate(b)), confidence)
        for limit in (r.low, r.high):
            assert st.ttest_rel(a, limit * b).pvalue == pytest.approx(1 - confidence)
        assert st.ttest_rel(a, r.value * b).pvalue == pytest.approx(1.0)


def test_fieller_approaches_the_delta_method_on_low_noise_data():
    rng = np.random.default_rng(0)
    b = 0.3 + rng.normal(0, 0.002, 8)
    a = 0.5 * b + rng.normal(0, 0.001, 8)
    r = stats.ratio_of_means_fieller(dict(enumerate(a)), dict(enumerate(b)))
    ratio = a.mean() / b.mean()  # delta method: Var R ≈ Var(ā - R b̄) / b̄²
    se = np.std(a - ratio * b, ddof=1) / math.sqrt(8) / b.mean()
    half = st.t.ppf(0.975, 7) * se
    assert (r.low, r.high) == pytest.approx((ratio - half, ratio + half), rel=1e-3)


def test_fieller_covers_95_percent_at_five_seeds():
    # bivariate normal drifts (correlated across methods); the true ratio is 0.15 / 0.3 = 0.5
    rng = np.random.default_rng(11)
    cov = [[0.03**2, 0.6 * 0.03 * 0.06], [0.6 * 0.03 * 0.06, 0.06**2]]
    draws = rng.multivariate_normal([0.15, 0.30], cov, size=(2000, 5))
    covered = bounded = 0
    for sample in draws:
        r = stats.ratio_of_means_fieller(dict(enumerate(sample[:, 0])), dict(enumerate(sample[:, 1])))
        bounded += r.bounded
        covered += r.bounded and r.low <= 0.5 <= r.high
    assert bounded >= 1990  # g = t² s_bb / (n b̄²) ~ 0.06 here
    rate, low, high = planning.clopper_pearson(covered, 2000)
    assert 0.935 <= rate <= 0.965, (rate, low, high)  # exact under normality: 0.95 ± 2 SE (0.005)


def test_fieller_unbounded_when_the_denominator_mean_is_not_significant():
    lora, full = dict(enumerate([0.10, 0.12, 0.15])), dict(enumerate([0.05, -0.04, 0.02]))
    r = stats.ratio_of_means_fieller(lora, full)
    assert not r.bounded and math.isnan(r.low) and math.isnan(r.high)
    assert r.note.startswith("unbounded") and "outside" in r.note
    assert r.value == pytest.approx(0.37 / 0.03)
    whole = stats.ratio_of_means_fieller(dict(enumerate([0.01, -0.02, 0.02])), full)
    assert not whole.bounded and whole.note.endswith("the whole line")
    reduction = stats.drift_reduction(lora, full)
    assert not reduction.bounded and math.isnan(reduction.low)
    assert verdict.criterion(*reduction[:3], 0.2, higher_is_better=True) == "inconclusive"
    assert stats.ratio_of_means_fieller({1: 0.1}, {1: 0.2})[:4] == pytest.approx(
        (0.5, math.nan, math.nan, False), nan_ok=True
    )
    assert math.isnan(stats.ratio_of_means_fieller({}, {}).value)


def test_drift_reduction_is_one_minus_the_ratio_with_swapped_bounds():
    lora, full = dict(enumerate(DRIFT_LORA)), dict(enumerate(DRIFT_FULL))
    r, reduction = stats.ratio_of_means_fieller(lora, full), stats.drift_reduction(lora, full)
    assert reduction.value == pytest.approx(1 - sum(DRIFT_LORA) / sum(DRIFT_FULL))
    assert (reduction.low, reduction.high) == pytest.approx((1 - r.high, 1 - r.low))
    assert reduction.bounded and reduction.low < reduction.value < reduction.high
    # LoRA drift exactly half of full on every seed: the interval collapses to 0.5
    exact = stats.drift_reduction(dict(enumerate(0.5 * np.array(DRIFT_FULL))), full)
    assert exact[:3] == pytest.approx((0.5, 0.5, 0.5))
    row = verdict.row("rte", verdict.Criterion("drift", reduction, 0.2, True, "rule"))  # a RatioEstimate goes in
    assert row["value"] == pytest.approx(reduction.value) and row["outcome"] == "met"


def test_reduction_contrast_half_the_drift():
    full = np.array(DRIFT_FULL)
    lora = dict(enumerate(0.5 * full))  # every LoRA drift is 50 % of full
    at_20 = stats.reduction_contrast(lora, dict(enumerate(full)), threshold=0.2)  # c = 0.5 b - 0.8 b = -0.3 b
    d = stats.describe(-0.3 * full)
    assert at_20 == pytest.approx((d["mean"], d["ci_low"], d["ci_high"]))
    assert at_20.high < 0 and verdict.criterion(*at_20, 0.0, higher_is_better=False) == "met"
    at_60 = stats.reduction_contrast(lora, dict(enumerate(full)), threshold=0.6)  # c = 0.1 b
    assert at_60.value == pytest.approx(0.1 * full.mean()) and at_60.low > 0
    assert verdict.criterion(*at_60, 0.0, higher_is_better=False) == "not met"


def test_reduction_contrast_decides_as_the_fieller_interval_does():
    # the contrast's t-interval excludes 0 exactly when 1 - threshold is outside Fieller's set
    rng = np.random.default_rng(4)
    outcomes = []
    for _ in range(300):
        n = int(rng.integers(3, 8))
        full = rng.normal(0.3, 0.05, n)
        lora = dict(enumerate(full * rng.uniform(0.3, 1.0) + rng.normal(0, 0.03, n)))
        threshold = float(rng.uniform(0, 0.8))
        reduction = stats.drift_reduction(lora, dict(enumerate(full)))
        contrast = stats.reduction_contrast(lora, dict(enumerate(full)), threshold)
        assert reduction.bounded  # g ~ 0.01-0.1 at these drifts
        outcomes.append((verdict.criterion(*reduction[:3], threshold, True), verdict.criterion(*contrast, 0.0, False)))
    assert all(fieller == contrast for fieller, contrast in outcomes)
    assert {fieller for fieller, _ in outcomes} == {"met", "not met", "inconclusive"}


# ---------------------------------------------------------------- rates and planning


def test_clopper_pearson_known_values():
    assert planning.clopper_pearson(1, 3) == pytest.approx((1 / 3, 0.0084, 0.9057), abs=1e-4)
    # k = 0: [0, 1 - (α/2)^(1/n)]; k = n: [(α/2)^(1/n), 1]
    assert planning.clopper_pearson(0, 10) == pytest.approx((0.0, 0.0, 1 - 0.025 ** (1 / 10)))
    assert planning.clopper_pearson(10, 10) == pytest.approx((1.0, 0.025 ** (1 / 10), 1.0))
    for k, n, confidence in ((951, 1000, 0.95), (7, 20, 0.9), (0, 5, 0.99)):
        ci = st.binomtest(k, n).proportion_ci(confidence, method="exact")
        assert planning.clopper_pearson(k, n, confidence)[1:] == pytest.approx((ci.low, ci.high))
    assert all(math.isnan(v) for v in planning.clopper_pearson(0, 0))
    with pytest.raises(ValueError):
        planning.clopper_pearson(4, 3)


def _seeds_by_hand(gap, sd, strict=False):
    """Smallest N with t(0.975, N-1)·sd/√N below the gap (≤ on the met side)."""
    for n in range(2, 1001):
        half = st.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        if half < gap or (half == gap and not strict):
            return n


def test_seeds_needed_by_hand():
    # mean 2, sd 1, threshold 0: half-widths 9.0, 2.48, 1.59 at N = 2, 3, 4
    assert planning.seeds_needed(2.0, 1.0, 3, 0.0, higher_is_better=True) == 4 == _seeds_by_hand(2.0, 1.0)
    # a drift reduction of 0.25 ± 0.1 against 0.2 (met side): 0.05 / 0.1 needs N = 18
    assert planning.seeds_needed(0.25, 0.1, 3, 0.2, higher_is_better=True) == _seeds_by_hand(0.05, 0.1) == 18
    # quality gap 5 points ± 4 against 3 (lower is better: not-met side)
    assert planning.seeds_needed(5.0, 4.0, 3, 3.0, higher_is_better=False) == _seeds_by_hand(2.0, 4.0, strict=True)
    assert planning.seeds_needed(3.0, 1.0, 3, 3.0, higher_is_better=False) is None  # mean on the threshold
    assert planning.seeds_needed(0.21, 1.0, 3, 0.2, higher_is_better=True) is None  # more than 1000 seeds
    assert planning.seeds_needed(0.21, 1.0, 3, 0.2, higher_is_better=True, max_n=100_000) > 1000
    assert planning.seeds_needed(0.3, 0.0, 3, 0.2, higher_is_better=True) == 2
    assert planning.seeds_needed(0.3, math.nan, 1, 0.2, higher_is_better=True) is None  # one seed: no sd


def test_seeds_needed_is_where_the_interval_first_decides():
    for mean, sd, threshold, better in ((0.25, 0.06, 0.2, True), (0.1, 0.3, 0.2, True), (1.0, 2.5, 3.0, False)):
        n = planning.seeds_needed(mean, sd, 3, threshold, higher_is_better=better)

        def outcome(seeds, mean=mean, sd=sd, threshold=threshold, better=better):
            half = st.t.ppf(0.975, seeds - 1) * sd / math.sqrt(seeds)
            return verdict.criterion(mean, mean - half, mean + half, threshold, better)

        assert outcome(n - 1) == "inconclusive" and outcome(n) != "inconclusive"


def test_seeds_needed_range_from_the_chi_square_interval_of_the_sd():
    mean, sd, n = 0.25, 0.1, 3
    fewest, most = planning.seeds_needed_range(mean, sd, n, 0.2, higher_is_better=True)
    low_sd, high_sd = sd * math.sqrt(2 / st.chi2.ppf(0.975, 2)), sd * math.sqrt(2 / st.chi2.ppf(0.025, 2))
    assert (low_sd, high_sd) == pytest.approx((0.0521, 0.629), abs=1e-3)
    assert (fewest, most) == (_seeds_by_hand(0.05, low_sd), _seeds_by_hand(0.05, high_sd)) == (7, 610)
    assert planning.seeds_needed_range(mean, sd, n, 0.2, higher_is_better=True, max_n=100) == (7, None)  # more than 100
    assert fewest < planning.seeds_needed(mean, sd, n, 0.2, higher_is_better=True)
    fewest, most = planning.seeds_needed_range(2.0, 1.0, 10, 0.0, higher_is_better=True)
    assert fewest <= 4 <= most == _seeds_by_hand(2.0, math.sqrt(9 / st.chi2.ppf(0.025, 9)))
    assert planning.seeds_needed_range(2.0, math.nan, 1, 0.0, higher_is_better=True) == (None, None)


def test_seeds_needed_from_five_seeds_recovers_the_true_number_in_median():
    # paired differences ~ Normal(0.55, 1) against threshold 0: with the true sd, N = 16. Each of
    # 2,000 draws of 5 seeds plans with its sample sd and the TRUE mean (the issue's "if the
    # effect stayed as observed", with the effect known), so the test isolates the sd's noise.
    mu, sigma = 0.55, 1.0
    true_n = planning.seeds_needed(mu, sigma, 5, 0.0, higher_is_better=True)
    assert true_n == _seeds_by_hand(mu, sigma) == 16
    draws = np.random.default_rng(0).normal(mu, sigma, (2000, 5))
    planned = [planning.seeds_needed(mu, s, 5, 0.0, higher_is_better=True) or math.inf for s in draws.std(1, ddof=1)]
    assert abs(np.median(planned) - true_n) <= 0.25 * true_n  # median 14: the sample sd's median is 0.92 sigma
