"""Statistics across seeds and the verdict against the success criteria.

Every number states its test, its n and its effect-size formula; the reference study called
unpaired tests paired, drew intervals that three values cannot give, announced Bonferroni
without applying it and used the wrong Cohen's d. Pure functions on numbers and dataframes:
nothing here knows about models.

Conventions: `a` is LoRA and `b` full fine-tuning; differences are `a - b`. Runs pair by seed
because the seed fixes head initialisation and data order for both methods. Non-finite values
raise ValueError: failed runs are flagged (`flag_runs`) and left out by the caller, never
silently averaged.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

MET, NOT_MET, INCONCLUSIVE, NOT_RUN = "met", "not met", "inconclusive", "not run"
VERDICT_COLUMNS = ("task", "criterion", "value", "ci_low", "ci_high", "threshold", "outcome", "rule")
MAX_EXACT = 2**16  # relabellings enumerated at most (16 pairs, 9 + 9 runs); beyond, the exact tests refuse


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


def _tail_fraction(null: np.ndarray, observed: float, scale: float) -> float:
    """Share of |null| ≥ |observed|, the observed labelling included; a relative tolerance
    keeps ties that differ only by float rounding."""
    return float(np.mean(np.abs(null) >= abs(observed) - 1e-12 * scale))


def permutation_paired_p(a: Iterable[float], b: Iterable[float]) -> float:
    """Exact two-sided sign-flip test: all 2^n sign patterns of the differences a - b; p is the
    share with |mean| ≥ the observed |mean|. The smallest possible p is 2/2^n (0.25 at n=3),
    so three seeds can never reach p < 0.05. NaN without pairs.

    Enumerated here rather than by scipy.stats.permutation_test, whose two-sided p is
    2·min(one-sided p), not the |statistic| rule."""
    d = _values(a) - _values(b)
    if len(d) == 0:
        return math.nan
    if 2 ** len(d) > MAX_EXACT:
        raise ValueError(f"{len(d)} pairs: 2^{len(d)} sign flips is too many to enumerate")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    return _tail_fraction(signs @ d, float(d.sum()), float(np.abs(d).sum()))


def permutation_unpaired_p(a: Iterable[float], b: Iterable[float]) -> float:
    """Exact two-sided permutation test of mean(a) - mean(b) over all C(n_a+n_b, n_a) ways to
    split the pooled values into groups of the original sizes; p is the share with
    |difference| ≥ the observed one. Needs n ≥ 1 per group, else NaN."""
    a, b = _values(a), _values(b)
    if len(a) == 0 or len(b) == 0:
        return math.nan
    pooled = np.concatenate([a, b])
    if math.comb(len(pooled), len(a)) > MAX_EXACT:
        raise ValueError(f"C({len(pooled)}, {len(a)}) splits is too many to enumerate")
    in_a = np.zeros((math.comb(len(pooled), len(a)), len(pooled)), dtype=bool)
    for row, chosen in enumerate(itertools.combinations(range(len(pooled)), len(a))):
        in_a[row, list(chosen)] = True
    null = in_a @ pooled / len(a) - ~in_a @ pooled / len(b)
    return _tail_fraction(null, float(a.mean() - b.mean()), float(np.abs(pooled).max()))


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
        (d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


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
    seed: int = 0,
) -> dict[str, float]:
    """Every test and effect size for one task, a = LoRA and b = full FT keyed by seed.

    Unpaired statistics (Welch, exact split permutation, Hedges' g) use all runs; paired ones
    (paired t, exact sign flips, bootstrap, d_z) use the seeds both methods have. The mean
    difference is a - b over those pairs."""
    a_all, b_all = _values(a_by_seed.values()), _values(b_by_seed.values())
    a, b = paired(a_by_seed, b_by_seed)
    low, high = bootstrap_paired_interval(a, b, confidence=confidence, n_resamples=n_resamples, seed=seed)
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
        "permutation_paired_p": permutation_paired_p(a, b),
        "permutation_unpaired_p": permutation_unpaired_p(a_all, b_all),
        "hedges_g": hedges_g(a_all, b_all),
        "cohen_dz": cohen_dz(a, b),
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


# ---------------------------------------------------------------- failed runs


def flag_runs(performance: pd.DataFrame, majority: Mapping[str, float], margin: float) -> pd.DataFrame:
    """Copy of a performance table (task, method, seed, status, primary_value, ...) with a
    boolean `flagged` and a `reason` ('' when not flagged). A run is flagged when its status is
    not ok, it has no primary value, or it scores at most the task's majority-class baseline plus
    `margin`: such a run learned nothing, and the reference study reported one as a finding.
    The caller computes statistics with and without the flagged runs."""
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
            return f"primary value {row['primary_value']:.4f} <= majority baseline + margin {floor:.4f}"
        return ""

    out = performance.copy()
    out["reason"] = [reason(row) for _, row in performance.iterrows()]
    out["flagged"] = (out["reason"] != "").astype(bool)
    return out


# ---------------------------------------------------------------- verdict


def quality_gap(
    lora_by_seed: Mapping[int, float], full_by_seed: Mapping[int, float], confidence: float = 0.95
) -> Estimate:
    """Full FT minus LoRA on the primary metric, in percentage points, over seeds both ran, with
    the paired t-interval. The t-interval rather than the bootstrap: with three seeds the
    percentile bootstrap cannot be wider than the range of the differences and undercovers."""
    lora, full = paired(lora_by_seed, full_by_seed)
    d = describe(100 * (full - lora), confidence)
    return Estimate(d["mean"], d["ci_low"], d["ci_high"])


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


def recommended(quality: str, drift: str, deployment: str) -> str:
    """'LoRA recommended' = quality and (drift or deployment), in three-valued logic where
    'inconclusive' and 'not run' are unknown: a decided answer needs only the criteria that decide
    it (quality not met -> not met whatever else; quality and drift met -> met without a
    deployment result). An undecided answer reads 'inconclusive' if any criterion is
    inconclusive, else 'not run'."""
    q, dr, de = _kleene(quality), _kleene(drift), _kleene(deployment)
    either = True if dr or de else False if dr is False and de is False else None
    result = False if q is False or either is False else True if q and either else None
    if result is not None:
        return MET if result else NOT_MET
    return INCONCLUSIVE if INCONCLUSIVE in (quality, drift, deployment) else NOT_RUN


def verdict_rows(
    task: str,
    *,
    quality: Estimate | None,
    drift: Estimate | None,
    deployment: Estimate | None,
    quality_threshold: float = 3.0,
    drift_threshold: float = 0.20,
    deployment_threshold: float = 0.30,
) -> list[dict[str, object]]:
    """Rows of tables/verdict.csv for one task (columns VERDICT_COLUMNS); None means not run.

    quality: full FT minus LoRA, percentage points of the primary metric (`quality_gap`), met
    at ≤ quality_threshold. drift: relative drift reduction 1 - drift_lora/drift_full with
    drift = 1 - mean CKA over layers, met at ≥ drift_threshold. deployment: latency of LoRA kept
    as a separate adapter over full FT at batch size 1, minus 1, met at ≤ deployment_threshold.
    The last row, criterion 'recommended', combines them (see `recommended`)."""
    specs = [
        ("quality", quality, quality_threshold, False, "full FT - LoRA, primary metric, percentage points; met if <="),
        ("drift", drift, drift_threshold, True, "1 - drift_lora / drift_full, drift = 1 - mean CKA; met if >="),
        ("deployment", deployment, deployment_threshold, False,
         "separate-adapter latency / full FT - 1 at batch size 1; met if <="),
    ]  # fmt: skip
    rows = []
    for name, estimate, threshold, higher_is_better, rule in specs:
        value, low, high = estimate if estimate is not None else Estimate(math.nan, math.nan, math.nan)
        rows.append({
            "task": task, "criterion": name, "value": value, "ci_low": low, "ci_high": high,
            "threshold": threshold, "outcome": criterion(value, low, high, threshold, higher_is_better),
            "rule": f"{rule} {threshold:g}",
        })  # fmt: skip
    outcomes = [row["outcome"] for row in rows]
    rows.append({
        "task": task, "criterion": "recommended", "value": math.nan, "ci_low": math.nan, "ci_high": math.nan,
        "threshold": math.nan, "outcome": recommended(*outcomes), "rule": "quality and (drift or deployment)",
    })  # fmt: skip
    return rows
