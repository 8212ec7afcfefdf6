"""Statistics across seeds: tests, intervals, effect sizes and ratios (planning.py: failure
rates and how many seeds a criterion would need; verdict.py turns them into the verdict).

Every number states its test, its n and its effect-size formula; the reference study called
unpaired tests paired, drew intervals that three values cannot give, announced Bonferroni
without applying it and used the wrong Cohen's d. Pure functions on numbers and dataframes:
nothing here knows about models.

Conventions: `a` is LoRA and `b` full fine-tuning; differences are `a - b`. Runs pair by seed
because the seed fixes head initialisation and data order for both methods. Non-finite values
raise ValueError: failed runs are flagged (`verdict.flag_runs`) and left out by the caller, never
silently averaged.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

MAX_EXACT = 2**16  # relabellings enumerated at most (16 pairs, 9 + 9 runs); beyond, Monte Carlo


class Estimate(NamedTuple):
    """A number with its interval, as a criterion reads it."""

    value: float
    low: float
    high: float


def _values(values: Iterable[float]) -> np.ndarray:
    """Float array; NaN or inf raise, so a failed run cannot slip into a mean."""
    x = np.asarray(list(values), dtype=float)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"non-finite value among {x.tolist()}: flag and drop failed runs first")
    return x


def _constant(x: np.ndarray) -> bool:
    """True when all values agree up to float rounding (0.05 vs 0.05000000000000002): such data
    have zero variance, and scipy would return NaN or a rounding-noise p-value for them."""
    return float(np.ptp(x)) <= 1e-12 * max(1.0, float(np.max(np.abs(x))))


@contextlib.contextmanager
def _quiet():
    """scipy warns 'precision loss' for a group of identical values, whose variance is exactly 0."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        yield


def _degenerate_p(mean_difference: float) -> float:
    """p of a test whose data have no variance: no difference -> 1, any difference -> 0."""
    return 1.0 if math.isclose(mean_difference, 0.0, abs_tol=1e-12) else 0.0


def _ratio(numerator: float, denominator: float) -> float:
    """Standardised effect; a zero SD gives 0 for no difference and a signed inf otherwise."""
    if denominator == 0.0:
        return 0.0 if math.isclose(numerator, 0.0, abs_tol=1e-12) else math.copysign(math.inf, numerator)
    return numerator / denominator


# ---------------------------------------------------------------- one sample


def describe(values: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """n, mean, sd (ddof=1) and the t-interval of the mean, mean ± t(1-α/2, n-1)·sd/√n.

    n=1: sd and interval are NaN (one value gives no spread). n=0: everything but n is NaN.
    Zero variance: sd is 0 and the interval collapses to the mean."""
    x = _values(values)
    n = len(x)
    out = {"n": n, "mean": math.nan, "sd": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    if n == 0:
        return out
    out["mean"] = float(np.mean(x))
    if n == 1:
        return out
    out["sd"] = 0.0 if _constant(x) else float(np.std(x, ddof=1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * out["sd"] / math.sqrt(n)
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    return out


# ---------------------------------------------------------------- two methods


def paired(a_by_seed: Mapping[int, float], b_by_seed: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """Values of the seeds both methods have, in seed order; a seed run by one method only
    has no partner and is left out of every paired statistic."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    return _values(a_by_seed[s] for s in seeds), _values(b_by_seed[s] for s in seeds)


def welch_p(a: Iterable[float], b: Iterable[float]) -> float:
    """Two-sided Welch t-test (unequal variances). Needs n ≥ 2 per group, else NaN. Both groups
    without variance: p = 1 if the means agree, 0 if they differ (scipy would give NaN)."""
    a, b = _values(a), _values(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if _constant(a) and _constant(b):
        return _degenerate_p(float(a[0] - b[0]))
    with _quiet():
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired_p(a: Iterable[float], b: Iterable[float]) -> float:
    """Two-sided paired t-test on the differences a - b. Needs 2 pairs, else NaN. Differences
    without variance: p = 1 if they are all 0, 0 otherwise."""
    a, b = _values(a), _values(b)
    d = a - b
    if len(d) < 2:
        return math.nan
    if _constant(d):
        return _degenerate_p(float(d[0]))
    return float(stats.ttest_rel(a, b).pvalue)


class Permutation(NamedTuple):
    """A permutation test's p with how it was computed: method 'exact' (every relabelling
    enumerated, n of them) or 'monte carlo' (n random relabellings drawn); 'none' with n = 0
    when there is nothing to test."""

    p: float
    method: str
    n: int


EXACT, MONTE_CARLO = "exact", "monte carlo"
_CHUNK = 2**20  # values of the relabelling matrix drawn at a time: bounds memory, fixes the stream


def _tail_count(null: np.ndarray, observed: float, scale: float) -> int:
    """How many |null| ≥ |observed|; a relative tolerance keeps ties that differ only by float
    rounding."""
    return int(np.count_nonzero(np.abs(null) >= abs(observed) - 1e-12 * scale))


def _monte_carlo(draw, n_values: int, n_permutations: int, seed: int, observed: float, scale: float) -> Permutation:
    """p = (1 + #{|null| ≥ |observed|}) / (1 + n_permutations) over relabellings drawn
    uniformly with replacement (Phipson & Smyth 2010): counting the observed labelling as one
    more draw makes P(p ≤ α) ≤ α under the null for every α, which the plain share does not
    (it can be 0). `draw(rng, rows)` returns the null statistics of `rows` random relabellings."""
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK // max(1, n_values))
    extreme = sum(
        _tail_count(draw(rng, min(rows, n_permutations - start)), observed, scale)
        for start in range(0, n_permutations, rows)
    )
    return Permutation((1 + extreme) / (1 + n_permutations), MONTE_CARLO, n_permutations)


def permutation_paired_test(
    a: Iterable[float],
    b: Iterable[float],
    *,
    n_permutations: int = 100_000,
    seed: int = 0,
    max_exact: int = MAX_EXACT,
) -> Permutation:
    """Two-sided sign-flip test of the differences a - b; p is the share of sign patterns with
    |mean| ≥ the observed |mean|. Exact over all 2^n patterns while 2^n ≤ max_exact: the
    smallest possible p is then 2/2^n (0.25 at n=3), so three seeds can never reach p < 0.05.
    Beyond, Monte Carlo: `n_permutations` random patterns drawn with `seed` and the standard
    valid p = (1 + #extreme) / (1 + n_permutations), never below 1/(1 + n_permutations) (see
    _monte_carlo); max_exact=0 forces it. NaN (method 'none') without pairs.

    Enumerated here rather than by scipy.stats.permutation_test, whose two-sided p is
    2·min(one-sided p), not the |statistic| rule."""
    d = _values(a) - _values(b)
    if len(d) == 0:
        return Permutation(math.nan, "none", 0)
    observed, scale = float(d.sum()), float(np.abs(d).sum())
    if 2 ** len(d) <= max_exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return Permutation(_tail_count(signs @ d, observed, scale) / len(signs), EXACT, len(signs))

    def draw(rng: np.random.Generator, rows: int) -> np.ndarray:
        return np.where(rng.random((rows, len(d))) < 0.5, -1.0, 1.0) @ d

    return _monte_carlo(draw, len(d), n_permutations, seed, observed, scale)


def permutation_paired_p(
    a: Iterable[float], b: Iterable[float], *, n_permutations: int = 100_000, seed: int = 0, max_exact: int = MAX_EXACT
) -> float:
    """p of `permutation_paired_test`, whose `method` and `n` say how it was computed."""
    return permutation_paired_test(a, b, n_permutations=n_permutations, seed=seed, max_exact=max_exact).p


def permutation_unpaired_test(
    a: Iterable[float],
    b: Iterable[float],
    *,
    n_permutations: int = 100_000,
    seed: int = 0,
    max_exact: int = MAX_EXACT,
) -> Permutation:
    """Two-sided permutation test of mean(a) - mean(b) over splits of the pooled values into
    groups of the original sizes; p is the share with |difference| ≥ the observed one. Exact
    over all C(n_a+n_b, n_a) splits while that is ≤ max_exact; beyond, Monte Carlo over
    `n_permutations` random splits drawn with `seed`, p = (1 + #extreme) / (1 + n_permutations)
    as for the sign flips; max_exact=0 forces it. Needs n ≥ 1 per group, else NaN (method
    'none')."""
    a, b = _values(a), _values(b)
    if len(a) == 0 or len(b) == 0:
        return Permutation(math.nan, "none", 0)
    pooled = np.concatenate([a, b])
    observed, scale = float(a.mean() - b.mean()), float(np.abs(pooled).max())
    splits = math.comb(len(pooled), len(a))
    if splits <= max_exact:
        in_a = np.zeros((splits, len(pooled)), dtype=bool)
        for row, chosen in enumerate(itertools.combinations(range(len(pooled)), len(a))):
            in_a[row, list(chosen)] = True
        null = in_a @ pooled / len(a) - ~in_a @ pooled / len(b)
        return Permutation(_tail_count(null, observed, scale) / splits, EXACT, splits)

    def draw(rng: np.random.Generator, rows: int) -> np.ndarray:
        shuffled = rng.permuted(np.broadcast_to(pooled, (rows, len(pooled))), axis=1)
        return shuffled[:, : len(a)].mean(axis=1) - shuffled[:, len(a) :].mean(axis=1)

    return _monte_carlo(draw, len(pooled), n_permutations, seed, observed, scale)


def permutation_unpaired_p(
    a: Iterable[float], b: Iterable[float], *, n_permutations: int = 100_000, seed: int = 0, max_exact: int = MAX_EXACT
) -> float:
    """p of `permutation_unpaired_test`, whose `method` and `n` say how it was computed."""
    return permutation_unpaired_test(a, b, n_permutations=n_permutations, seed=seed, max_exact=max_exact).p


def bootstrap_paired_interval(
    a: Iterable[float], b: Iterable[float], *, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean difference a - b, resampling the differences
    (pairs stay together); seeded, so a report is reproducible. Needs 2 pairs, else NaN.
    With n=3 there are only 10 distinct resampled means: the interval is never wider than the
    range of the differences and undercovers; read it beside the t-interval."""
    d = _values(a) - _values(b)
    if len(d) < 2:
        return math.nan, math.nan
    if _constant(d):
        return float(d[0]), float(d[0])
    result = stats.bootstrap(
        (d,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def median_paired_ratio(
    a: np.ndarray,
    b: np.ndarray,
    n_boot: int,
    confidence: float = 0.95,
    seed: int = 0,
    blocks: Sequence[range] | None = None,
) -> tuple[float, float, float]:
    """Median over repetitions of a[r] / b[r], with a percentile-bootstrap interval. Call r of
    both strategies processed the same batch in the same round, so the per-round ratio cancels
    the batch's content (natural lengths vary several-fold) and slow machine drift.

    `blocks`: runs of repetitions that are not independent, resampled whole (default: each
    repetition alone). The requests of one turn of the engine grid waited in one queue through
    one spell of the machine: six identical runs of PEFT's separate over merged at 16 clients (20
    turns) read +4.0 to +5.2 %; resampled one by one, two runs' intervals were disjoint ([3.4, 4.5]
    and [4.8, 5.6]), resampled by turn, every two overlapped ([2.0, 6.8] ... [4.3, 6.1])."""
    ratios = np.asarray(a) / np.asarray(b)
    groups = [ratios[r.start : r.stop] for r in blocks or [range(i, i + 1) for i in range(len(ratios))]]
    if n_boot == 0 or len(groups) < 2:  # one block resampled is itself: no interval, not a zero-width one
        return float(np.median(ratios)), math.nan, math.nan
    picks = np.random.default_rng(seed).integers(0, len(groups), size=(n_boot, len(groups)))
    boot = [np.median(np.concatenate([groups[g] for g in pick])) for pick in picks]
    low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(np.median(ratios)), float(low), float(high)


def ratio_of_medians(
    a: np.ndarray, b: np.ndarray, n_boot: int, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """median(a) / median(b) with a percentile-bootstrap interval, repetitions resampled
    jointly. Kept for comparison: with natural lengths each median mixes batches of very
    different sizes, and on a busy machine this estimate moved 3-4 points between identical runs
    where `median_paired_ratio` moved about 1 (benchmarks/deploy_repeatability.py)."""
    ratio = float(np.median(a) / np.median(b))
    if n_boot == 0:
        return ratio, math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    boot = np.median(np.asarray(a)[idx], axis=1) / np.median(np.asarray(b)[idx], axis=1)
    low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return ratio, float(low), float(high)


def hedges_g(a: Iterable[float], b: Iterable[float]) -> float:
    """Hedges' g = J · (mean_a - mean_b) / s_pooled, with
    s_pooled = sqrt(((n_a-1)s_a² + (n_b-1)s_b²) / (n_a+n_b-2)) and the small-sample correction
    J = 1 - 3 / (4(n_a+n_b) - 9). Unpaired: uses every run. Needs n ≥ 2 per group, else NaN.
    s_pooled = 0: g = 0 when the means agree, ±inf when they differ."""
    a, b = _values(a), _values(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    var_a = 0.0 if _constant(a) else np.var(a, ddof=1)
    var_b = 0.0 if _constant(b) else np.var(b, ddof=1)
    s_pooled = math.sqrt(((len(a) - 1) * var_a + (len(b) - 1) * var_b) / (len(a) + len(b) - 2))
    correction = 1 - 3 / (4 * (len(a) + len(b)) - 9)
    return correction * _ratio(float(a.mean() - b.mean()), s_pooled)


def cohen_dz(a: Iterable[float], b: Iterable[float]) -> float:
    """Cohen's d_z = mean(d) / sd(d) (ddof=1) of the paired differences d = a - b; not d_av,
    which pingouin calls paired Cohen's d. Needs 2 pairs, else NaN. sd(d) = 0: 0 when all
    differences are 0, ±inf otherwise."""
    d = _values(a) - _values(b)
    if len(d) < 2:
        return math.nan
    return _ratio(float(d.mean()), 0.0 if _constant(d) else float(np.std(d, ddof=1)))


def compare(
    a_by_seed: Mapping[int, float],
    b_by_seed: Mapping[int, float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    n_permutations: int = 100_000,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """Every test and effect size for one task, a = LoRA and b = full FT keyed by seed.

    Unpaired statistics (Welch, split permutation, Hedges' g) use all runs; paired ones
    (paired t, sign flips, bootstrap, d_z) use the seeds both methods have. The mean
    difference is a - b over those pairs. Each permutation test says how its p was computed:
    permutation_*_method 'exact' (permutation_*_n relabellings enumerated, up to MAX_EXACT) or
    'monte carlo' (n_permutations drawn with `seed`)."""
    a_all, b_all = _values(a_by_seed.values()), _values(b_by_seed.values())
    a, b = paired(a_by_seed, b_by_seed)
    low, high = bootstrap_paired_interval(a, b, confidence=confidence, n_resamples=n_resamples, seed=seed)
    flips = permutation_paired_test(a, b, n_permutations=n_permutations, seed=seed)
    splits = permutation_unpaired_test(a_all, b_all, n_permutations=n_permutations, seed=seed)
    return {
        "n_a": len(a_all),
        "n_b": len(b_all),
        "n_pairs": len(a),
        "mean_a": describe(a_all)["mean"],
        "mean_b": describe(b_all)["mean"],
        "mean_diff_paired": describe(a - b)["mean"],
        "bootstrap_low": low,
        "bootstrap_high": high,
        "welch_p": welch_p(a_all, b_all),
        "paired_t_p": paired_p(a, b),
        "permutation_paired_p": flips.p,
        "permutation_unpaired_p": splits.p,
        "hedges_g": hedges_g(a_all, b_all),
        "cohen_dz": cohen_dz(a, b),
        "permutation_paired_method": flips.method,
        "permutation_paired_n": flips.n,
        "permutation_unpaired_method": splits.method,
        "permutation_unpaired_n": splits.n,
    }


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjustment, in the input order: the i-th smallest of m p-values
    becomes max over j ≤ i of min(1, (m - j + 1)·p_(j)), so adjusted values keep the order of the
    raw ones. NaN (a test that could not be computed) stays NaN and does not count in m."""
    p = np.asarray(list(pvalues), dtype=float)
    adjusted = np.full_like(p, math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = p[order] * (len(order) - np.arange(len(order)))
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


# ---------------------------------------------------------------- drift reduction


class RatioEstimate(NamedTuple):
    """A ratio with its Fieller interval. bounded is False when the confidence set is not a
    finite interval; then low and high are NaN (a criterion reads inconclusive) and `note`
    says which unbounded set it is."""

    value: float
    low: float
    high: float
    bounded: bool
    note: str


def ratio_of_means_fieller(
    a_by_seed: Mapping[int, float], b_by_seed: Mapping[int, float], confidence: float = 0.95
) -> RatioEstimate:
    """R = mean(a) / mean(b) over seeds both have, with Fieller's interval for paired
    (correlated) values: the R whose paired contrast a - R·b has a mean its two-sided t-test
    at 1 - confidence does not reject,
        (ā - R b̄)² ≤ t² (s_aa - 2R s_ab + R² s_bb) / n,   t = t(1-α/2, n-1),
    with the sample (co)variances (ddof=1). Exact under bivariate normality, unlike the delta
    method, which it approaches when b̄ is far from 0. The set is the finite interval between
    the roots only when b̄ is significantly nonzero, g = t² s_bb / (n b̄²) < 1; otherwise it is
    the whole line or the line without an interval: unbounded, NaN bounds. n < 2: NaN bounds;
    mean(b) = 0: R is NaN."""
    a, b = paired(a_by_seed, b_by_seed)
    n = len(a)
    if n == 0:
        return RatioEstimate(math.nan, math.nan, math.nan, False, "no seed pairs")
    mean_a, mean_b = float(a.mean()), float(b.mean())
    value = mean_a / mean_b if mean_b != 0 else math.nan
    if n < 2:
        return RatioEstimate(value, math.nan, math.nan, False, "one seed pair: no interval")
    covariance = np.cov(a, b, ddof=1)
    s_aa = 0.0 if _constant(a) else float(covariance[0, 0])  # rounding noise of constant drifts is 0
    s_bb = 0.0 if _constant(b) else float(covariance[1, 1])
    s_ab = 0.0 if s_aa == 0.0 or s_bb == 0.0 else float(covariance[0, 1])
    q = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) ** 2 / n
    # quadratic A R² - 2 B R + C ≤ 0
    quad_a, quad_b, quad_c = mean_b**2 - q * s_bb, mean_a * mean_b - q * s_ab, mean_a**2 - q * s_aa
    discriminant = quad_b**2 - quad_a * quad_c
    if quad_a > 0:  # g < 1; R̂ satisfies the inequality, so the roots are real
        root = math.sqrt(max(discriminant, 0.0))
        return RatioEstimate(value, (quad_b - root) / quad_a, (quad_b + root) / quad_a, True, "bounded")
    g = math.inf if mean_b == 0 else q * s_bb / mean_b**2
    unbounded = f"unbounded (g = {g:.3g} >= 1)"
    if quad_a < 0 and discriminant > 0:
        r1, r2 = sorted((quad_b + sign * math.sqrt(discriminant)) / quad_a for sign in (-1, 1))
        return RatioEstimate(value, math.nan, math.nan, False, f"{unbounded}: every R outside ({r1:.6g}, {r2:.6g})")
    if quad_a < 0 or quad_b == 0:
        return RatioEstimate(value, math.nan, math.nan, False, f"{unbounded}: the whole line")
    side = ">=" if quad_b > 0 else "<="  # A = 0: the inequality is linear, -2B R + C <= 0
    return RatioEstimate(value, math.nan, math.nan, False, f"{unbounded}: every R {side} {quad_c / (2 * quad_b):.6g}")


def drift_reduction(
    a_by_seed: Mapping[int, float], b_by_seed: Mapping[int, float], confidence: float = 0.95
) -> RatioEstimate:
    """Relative drift reduction 1 - R, R = mean(drift_lora) / mean(drift_full) over seeds both
    have (drift = 1 - CKA): one estimand, the reduction of the average drift, rather than the
    average of per-seed ratios, which a seed with tiny full-FT drift dominates. Interval: 1 minus
    Fieller's (`ratio_of_means_fieller`), bounds swapped; NaN bounds (inconclusive) when
    unbounded. `reduction_contrast` decides the same criterion without a ratio."""
    r = ratio_of_means_fieller(a_by_seed, b_by_seed, confidence)
    return RatioEstimate(1 - r.value, 1 - r.high, 1 - r.low, r.bounded, r.note)


def reduction_contrast(
    a_by_seed: Mapping[int, float],
    b_by_seed: Mapping[int, float],
    threshold: float = 0.20,
    confidence: float = 0.95,
) -> Estimate:
    """Mean of the paired contrast c_s = a_s - (1 - threshold)·b_s with the two-sided t-interval
    mean ± t(1-α/2, n-1)·sd/√n of the rest of the verdict. "LoRA drifts at least `threshold`
    less", mean(a) ≤ (1 - threshold)·mean(b), is mean(c) ≤ 0: read it with
    criterion(*contrast, 0.0, higher_is_better=False), i.e. met when high ≤ 0, not met when
    low > 0, inconclusive when the interval holds 0 (the boundary counts as met, as for every
    criterion). It needs no division: with mean(b) > 0 its outcome is that of the bounded
    Fieller interval of `drift_reduction` against `threshold`, and it still decides some
    cases where that interval is unbounded."""
    a, b = paired(a_by_seed, b_by_seed)
    d = describe(a - (1 - threshold) * b, confidence)
    return Estimate(float(d["mean"]), float(d["ci_low"]), float(d["ci_high"]))
