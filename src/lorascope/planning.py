"""Failure rates with exact intervals, and how many seeds an inconclusive criterion would need
(verdict.py reports both)."""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import stats

from lorascope.stats import Estimate


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> Estimate:
    """k/n with the exact (Clopper–Pearson) binomial interval: the α/2 and 1-α/2 quantiles of
    Beta(k, n-k+1) and Beta(k+1, n-k); low is 0 at k=0 and high 1 at k=n. Never narrower than
    the nominal level, unlike the Wald interval, which collapses to a point at k=0 or k=n.
    n=0: NaN."""
    if not (0 <= k <= n) or int(k) != k or int(n) != n:
        raise ValueError(f"need integers 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan)
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return Estimate(k / n, low, high)


@functools.lru_cache(maxsize=8)
def _t_quantiles(confidence: float, max_n: int) -> np.ndarray:
    """t(1-α/2, N-1) for N = 2 .. max_n (index N - 2)."""
    q = stats.t.ppf(0.5 + confidence / 2, np.arange(1, max_n))
    q.setflags(write=False)
    return q


def seeds_needed(
    mean: float,
    sd: float,
    n: int,
    threshold: float,
    *,
    higher_is_better: bool,
    confidence: float = 0.95,
    max_n: int = 1000,
) -> int | None:
    """Smallest number of seeds (pairs) N, the n already run included, at which the t-interval
    mean ± t(1-α/2, N-1)·sd/√N would lie on one side of `threshold` (as `criterion` reads it),
    were mean and sd to stay as observed from n seeds: met or not met, whichever side the mean
    is on. N ≤ n means the current seeds already decide. A planning figure, not a promise: the
    next seeds move mean and sd (`seeds_needed_range` shows the sd's share of that). None when
    the mean equals the threshold (no N decides), when mean or sd is NaN (n < 2), or when it
    would take more than max_n seeds."""
    if n < 1 or max_n < 2:
        raise ValueError(f"need n >= 1 and max_n >= 2, got n={n}, max_n={max_n}")
    if math.isnan(mean) or math.isnan(sd) or mean == threshold:
        return None
    if sd < 0 or math.isinf(sd) or math.isinf(mean):
        raise ValueError(f"need a finite mean and sd >= 0, got mean={mean}, sd={sd}")
    half = _t_quantiles(confidence, max_n) * sd / np.sqrt(np.arange(2, max_n + 1))
    gap = abs(mean - threshold)
    met_side = (mean > threshold) == higher_is_better  # the threshold itself counts as met
    decided = np.flatnonzero(half <= gap if met_side else half < gap)
    return int(decided[0]) + 2 if len(decided) else None


def seeds_needed_range(
    mean: float,
    sd: float,
    n: int,
    threshold: float,
    *,
    higher_is_better: bool,
    confidence: float = 0.95,
    max_n: int = 1000,
) -> tuple[int | None, int | None]:
    """`seeds_needed` at the two ends of the chi-square interval of the sd from n seeds,
    sd·sqrt((n-1) / χ²(1-α/2, n-1)) and sd·sqrt((n-1) / χ²(α/2, n-1)): (fewest, most) seeds.
    From three seeds the sd is known to within a factor of about 0.5 to 6.3 at 95 %, and N
    scales roughly with its square. The mean is held at its observed value; its own
    uncertainty widens the range further. None as in `seeds_needed` (at the upper end: more
    than max_n seeds)."""
    if n < 2 or math.isnan(sd):
        return None, None
    alpha = 1 - confidence
    scale = [math.sqrt((n - 1) / stats.chi2.ppf(q, n - 1)) for q in (1 - alpha / 2, alpha / 2)]
    fewest, most = (
        seeds_needed(mean, sd * s, n, threshold, higher_is_better=higher_is_better, confidence=confidence, max_n=max_n)
        for s in scale
    )
    return fewest, most
