"""Representation similarity on [examples × features] tensors: CKA (linear, debiased, RBF),
per-example cosine, and bootstrap intervals. No model code.

Written by hand because the reference study's "CKA" normalised by ‖X‖²‖Y‖² instead of
‖XᵀX‖‖YᵀY‖ and scored the base model against itself at 0.23–0.40. Inputs are centred in
float64 but, in compare and bootstrap_cka, the Gram and bootstrap products and the bootstrap's
sums over examples: those take `dtype`, float32 by default, which halves their time. Against
float64, no value moved by more than 1e-9 nor a bound by more than 7e-7 at paper size
(benchmarks/drift_speed.py), by 2e-5 on SmolLM2's features at n = 32 (base against base plus
noise). Errors are ValueErrors, never NaN, but in compare (the drift stage's entry): NaN and
the reason where the data leave a measure undefined."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

_DTYPE = torch.float64


def _largest(x: torch.Tensor) -> torch.Tensor:
    """max |x| without an |x|-sized temporary; NaN if x holds one (min and max propagate it)."""
    low, high = torch.aminmax(x)
    return torch.maximum(-low, high)


def _checked(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x as a 2-D tensor with enough examples and no NaN or inf, and its largest |entry|."""
    x = torch.as_tensor(x).detach()
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [examples, features], got shape {tuple(x.shape)}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 examples and 1 feature, got shape {tuple(x.shape)}")
    largest = _largest(x)
    if not torch.isfinite(largest):
        raise ValueError(f"{name} contains NaN or inf")
    return x, largest


def _as_float64(x: torch.Tensor, name: str) -> torch.Tensor:
    return _checked(x, name)[0].to(_DTYPE)


def _column_means(x: torch.Tensor) -> torch.Tensor:
    """Column means, [1, d], as a matrix product: x.mean(dim=0) took 6x as long at n = 872, d = 2048."""
    return x.new_ones(1, x.shape[0]) @ x / x.shape[0]


def _is_flat(centred: torch.Tensor, scale: torch.Tensor) -> bool:
    return bool(_largest(centred) <= 1e-12 * scale)


def is_constant(x: torch.Tensor) -> bool:
    """Every example has the same features: no similarity to anything is defined (0/0)."""
    x = x.to(_DTYPE)
    return _is_flat(x - _column_means(x), _largest(x))


def _centred(x: torch.Tensor, name: str) -> torch.Tensor:
    """Column-centred float64 copy; a constant matrix is an error rather than a NaN."""
    x, scale = _checked(x, name)
    centred = x.to(_DTYPE, copy=True)
    centred.sub_(_column_means(centred))  # in place: a second [n, d] copy cost as much as the rest
    if _is_flat(centred, scale):
        raise ValueError(f"{name}: all features are constant across examples (zero variance after centring)")
    return centred


def _gram(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """XXᵀ of a centred float64 X as float64, the product taken in `dtype`."""
    x = x.to(dtype)
    return (x @ x.T).to(_DTYPE)


def _same_n(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same examples: x has {x.shape[0]} rows, y has {y.shape[0]}")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. 2019: ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F); widths may differ. Wide inputs
    (more features than examples, e.g. d=2048 on 872 probe examples) take the equal Gram form
    tr(KL) / (‖K‖_F ‖L‖_F) with K = XXᵀ, whichever needs fewer multiplications."""
    _same_n(x, y)
    x, y = _centred(x, "x"), _centred(y, "y")
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    if n * (dx + dy) < dx * dy + dx * dx + dy * dy:
        k, l = x @ x.T, y @ y.T  # centred inputs give centred Grams
        return ((k * l).sum() / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l))).item()
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return (cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))).item()


def legacy_index(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖XᵀY‖²_F / (‖X‖²_F ‖Y‖²_F) on column-centred float64 inputs: the reference study's "CKA",
    kept only to reproduce its numbers. It is NOT a similarity index: legacy(X, X) is
    Σσ⁴ / (Σσ²)² over X's singular values (an inverse participation ratio, 1 / effective
    rank), 1 only for rank-1 X, which is why that study's base model scored 0.23–0.40 against
    itself and its "drift" mostly measured effective rank. Linear CKA divides by
    ‖XᵀX‖_F ‖YᵀY‖_F instead; legacy = CKA × ‖XᵀX‖_F ‖YᵀY‖_F / (‖X‖²_F ‖Y‖²_F)."""
    _same_n(x, y)
    x, y = _centred(x, "x"), _centred(y, "y")
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    # ‖XᵀY‖²_F = tr(XXᵀ YYᵀ): whichever of the feature and Gram forms is the fewer flops
    cross = (x.T @ y).pow(2).sum() if dx * dy <= n * (dx + dy) else ((x @ x.T) * (y @ y.T)).sum()
    return (cross / (x.pow(2).sum() * y.pow(2).sum())).item()


def _centre_gram(k: torch.Tensor) -> torch.Tensor:
    """H K H for a (batch of) symmetric [n, n] Gram matrices."""
    k = k - k.mean(dim=-1, keepdim=True)
    return k - k.mean(dim=-2, keepdim=True)


def _alignment(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """⟨K, L⟩ / (‖K‖ ‖L‖) of (batches of) Gram matrices: CKA when they are centred."""
    xy, xx, yy = (torch.einsum("...ij,...ij->...", a, b) for a, b in ((kx, ky), (kx, kx), (ky, ky)))
    return xy / torch.sqrt(xx * yy)


def gram_cka(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Centred kernel alignment of (batches of) Gram matrices: the biased HSIC estimator."""
    return _alignment(_centre_gram(kx), _centre_gram(ky))


def _check_gram(k: torch.Tensor, name: str) -> torch.Tensor:
    k = _as_float64(k, name)
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"{name} must be a square Gram matrix, got shape {tuple(k.shape)}")
    if _centre_gram(k).abs().max() <= 1e-12 * k.abs().max():
        raise ValueError(f"{name}: Gram matrix is constant after centring (all features constant)")
    return k


def linear_cka_gram(kx: torch.Tensor, ky: torch.Tensor) -> float:
    """CKA from Gram matrices (K = XXᵀ for linear CKA): tr(HKH HLH) / (‖HKH‖_F ‖HLH‖_F).
    An independent check of the feature-space form; any kernel works."""
    kx, ky = _check_gram(kx, "kx"), _check_gram(ky, "ky")
    _same_n(kx, ky)
    return gram_cka(kx, ky).item()


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. 2012 unbiased HSIC of (batches of) Gram matrices whose diagonals are zeroed
    (off_diagonal); needs n >= 4."""
    n = k.shape[-1]
    trace = torch.einsum("...ij,...ij->...", k, l)
    totals = k.sum(dim=(-2, -1)) * l.sum(dim=(-2, -1)) / ((n - 1) * (n - 2))
    rows = (k.sum(dim=-1) * l.sum(dim=-1)).sum(dim=-1) * 2 / (n - 2)
    return (trace + totals - rows) / (n * (n - 3))


def debiased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA from the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021;
    Kornblith's reference code). Biased CKA of independent inputs is ~0.2 at n=32 and only
    falls with n; this one is ~0 (and may be slightly negative)."""
    _same_n(x, y)
    x, y = _centred(x, "x"), _centred(y, "y")
    value, reason = _debiased_point(x @ x.T, y @ y.T)
    if reason:
        raise ValueError(reason)
    return value


def off_diagonal(k: torch.Tensor) -> torch.Tensor:
    """A copy of (a batch of) Gram matrices with zero diagonals: the pairs of distinct examples."""
    k = k.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def _debiased_point(kx: torch.Tensor, ky: torch.Tensor) -> tuple[float, str]:
    """Debiased CKA of centred Grams, or NaN and why it is undefined: the unbiased HSIC of x or
    y with itself, an estimate of ‖Σ‖²_F, can be 0 or below when few examples carry the variance."""
    if kx.shape[0] < 4:
        return math.nan, f"debiased CKA needs at least 4 examples, got {kx.shape[0]}"
    a, b = off_diagonal(kx), off_diagonal(ky)
    xx, yy = unbiased_hsic(a, a), unbiased_hsic(b, b)
    if xx <= 0 or yy <= 0:
        return math.nan, "debiased CKA undefined: the unbiased HSIC of x or y with itself is not positive"
    return (unbiased_hsic(a, b) / torch.sqrt(xx * yy)).item(), ""


@functools.lru_cache(maxsize=4)
def _upper_triangle(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the pairs of distinct examples, kept: building them took as long as using them."""
    return torch.triu_indices(n, n, offset=1).unbind()


def _rbf_gram(k: torch.Tensor, sigma_scale: float, name: str) -> torch.Tensor:
    """Gaussian kernel from the linear Gram K = XXᵀ, which the other CKA measures share."""
    squared = k.diagonal()
    distances = (-2 * k).add_(squared[:, None]).add_(squared[None, :]).clamp_min_(0.0)
    pairs = distances[_upper_triangle(k.shape[0])].numpy()  # a copy, partitioned in place
    middle = (len(pairs) - 1) // 2  # the lower median, as torch.median: numpy's selection is 5x faster
    pairs.partition(middle)
    median = pairs[middle]  # of squared distances: the square of the median distance
    if median <= 0:
        raise ValueError(f"{name}: median pairwise distance is zero (most examples are identical)")
    return distances.div_(-2 * sigma_scale**2 * median).exp_()


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma_scale: float = 1.0) -> float:
    """CKA with Gaussian kernels whose bandwidth is sigma_scale × the median distance between
    distinct examples, per input (Kornblith's notebook also counts the zero self-distances)."""
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale}")
    _same_n(x, y)
    x, y = _centred(x, "x"), _centred(y, "y")
    return gram_cka(_rbf_gram(x @ x.T, sigma_scale, "x"), _rbf_gram(y @ y.T, sigma_scale, "y")).item()


def cosine_per_example(x: torch.Tensor, y: torch.Tensor, centered: bool) -> torch.Tensor:
    """Cosine between matching rows, [n]. Uncentred cosine of transformer states is >= 0.94
    almost everywhere (a shared mean direction dominates), so centred is the informative one."""
    _same_n(x, y)
    x, y = (_centred(x, "x"), _centred(y, "y")) if centered else (_as_float64(x, "x"), _as_float64(y, "y"))
    return _row_cosines(x, y, " after centring" if centered else "")


def _row_cosines(x: torch.Tensor, y: torch.Tensor, note: str) -> torch.Tensor:
    """Cosines of the matching rows of float64 x and y; `note` ends a zero-row error."""
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"cosine needs equal widths: x has {x.shape[1]} features, y has {y.shape[1]}")
    norms_x, norms_y = torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(y, dim=1)
    for name, norms in (("x", norms_x), ("y", norms_y)):
        if (norms == 0).any():
            row = int((norms == 0).nonzero()[0])
            raise ValueError(f"{name}: row {row} is a zero vector{note}")
    return torch.einsum("ij,ij->i", x, y) / (norms_x * norms_y)


def cosine(x: torch.Tensor, y: torch.Tensor, centered: bool = True) -> float:
    """Mean over examples of the per-example cosine (DESIGN.md's interface)."""
    return cosine_per_example(x, y, centered).mean().item()


def top_variance_shares(x: torch.Tensor, tops=(1, 3)) -> list[float]:
    """For each top, the share of the centred variance (the features' variances summed) held by
    the `top` features of largest variance: near 1, CKA and cosine measure those few features
    ("rogue dimensions", Timkey & van Schijndel 2021)."""
    ranked = _centred(x, "x").pow(2).sum(dim=0).sort(descending=True).values.cumsum(dim=0)
    return [(ranked[min(top, len(ranked)) - 1] / ranked[-1]).item() for top in tops]


def standardized(x: torch.Tensor) -> torch.Tensor:
    """Each feature z-scored over the examples, float64; a constant one stays 0. Every
    dimension then weighs the same, so that a few with most of the variance no longer decide
    CKA and cosine alone."""
    centred = _centred(x, "x")
    sd = centred.pow(2).mean(dim=0).sqrt()
    return centred * torch.where(sd > 1e-12 * _largest(centred), 1 / sd, 0.0)


_LEFT, _RIGHT = [0, 0, 1], [1, 0, 1]  # the HSIC of (x, y), (x, x), (y, y): which of two Grams on each side


def _row_sums(v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i weights_i v_i along the last axis, per resample, in their dtype; float64 out."""
    return torch.einsum("...cn,cn->...c", v, weights).to(_DTYPE)


def _pair_sums(u: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i weights_i u_a,i v_b,i for the three pairs (a, b) of _LEFT, _RIGHT: [3, c] float64 from [2, c, n]."""
    return torch.einsum("acn,bcn->abc", u * weights, v)[_LEFT, _RIGHT].to(_DTYPE)


def _biased_hsic(w: torch.Tensor, p1: torch.Tensor, products: torch.Tensor, diagonals: torch.Tensor) -> torch.Tensor:
    """tr(K'HL'H) per resample, [3, c]: the draws centred at their own mean, then every pair of
    two draws of one example set to 0. With G their Gram and Z its pairs of copies (k̃_ii, i's
    c_i = w_i(w_i − 1) of them), tr(K'HL'H) = tr(G_x G_y) − tr(G_x Z_y) − tr(Z_x G_y) +
    tr(H Z_x H Z_y): sums over examples of the products w @ (A, B, A∘B, A∘A, B∘B)."""
    rows = products[:2] + w * diagonals[:, None, :]  # (K w)_i, the diagonal included: [2, c, n]
    totals = _row_sums(rows, w)  # wᵀKw
    plain = (  # tr(G_x G_y): the resample with its copies, centred
        _row_sums(products[2:], w)
        + ((w * w) @ (diagonals[_LEFT] * diagonals[_RIGHT]).T).T.to(_DTYPE)
        - 2 / p1 * _pair_sums(rows, rows, w)
        + totals[_LEFT] * totals[_RIGHT] / p1**2
    )
    scale = (1 / p1).to(w.dtype)[:, None]
    centred = diagonals[:, None, :] - 2 * scale * rows + (totals / p1**2).to(w.dtype)[..., None]  # k̃_ii
    copies = w * (w - 1)
    copy_totals = _row_sums(centred, copies)
    return (
        plain
        - _pair_sums(centred, centred, copies * (1 + 2 * scale * (w - 1)))
        + copy_totals[_LEFT] * copy_totals[_RIGHT] / p1**2
    )


def _unbiased_hsic(w: torch.Tensor, p1: torch.Tensor, products: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
    """Song et al.'s U-statistic per resample, [3, c]: the mean of k_ij l_ij − 2 k_ij l_iq + k_ij l_qr
    over tuples (i, j, q, r) of distinct examples weighted by the product of their draw counts,
    all three terms over the same tuples; by inclusion-exclusion over S_ef = Σ w_i^e w_j^f A_ij
    B_ij and the products w @ (A, B, A∘B, ...) and w² @ (the same)."""
    w2 = w * w
    s11, s21, s31 = (_row_sums(products[2:], v) for v in (w, w2, w2 * w))
    s22 = _row_sums(squared[2:], w2)
    p2, p3, p4 = (w.to(_DTYPE).pow(e).sum(dim=-1) for e in (2, 3, 4))
    doubled = _pair_sums(products[:2], products[:2], w2)  # Σ_i w_i² (Aw)_i (Bw)_i
    # Σ W A_ij B_ij: each pair (i, j) weighted by the weights of the pairs (q, r) it leaves
    pairs = (p1**2 - p2) * s11 - 4 * p1 * s21 + 4 * s31 + 2 * s22
    # Σ W A_ij B_iq: each triple weighted by the weight of the r it leaves, P1 − w_i − w_j − w_q
    triples = (
        p1 * (_pair_sums(products[:2], products[:2], w) - s21)
        - (doubled - s22)
        - (_pair_sums(squared[:2], products[:2], w) + _pair_sums(products[:2], squared[:2], w) - 2 * s31)
    )
    totals = _row_sums(products[:2], w)
    quadruples = totals[_LEFT] * totals[_RIGHT] + 2 * s22 - 4 * doubled  # Σ W A_ij B_qr
    weight = p1**4 - 6 * p1**2 * p2 + 3 * p2**2 + 8 * p1 * p3 - 6 * p4  # Σ W: 0 below 4 distinct examples
    return (pairs - 2 * triples + quadruples) / weight


def resampled_hsic(
    w: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, measures, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """{measure: [3, c] HSIC of (x, y), (x, x), (y, y)} for resamples given as draw counts w
    [c, n], "linear" (biased) and/or "debiased" (unbiased), leaving out every pair of two draws
    of the same example. Such a pair is identical in x and in y, so it reads as shared
    structure: with it (plain K[idx][:, idx]), independent 256×384 inputs bootstrap to debiased
    CKA ~0.6 instead of 0. Both equal the plain estimators when w = 1 and, like them, ignore a
    shift of the features. The former weighting did not (pairs zeroed in the full sample's
    coordinates; pairs, triples and quadruples averaged each over its own weights): on SmolLM2's
    mean-pooled states at n = 32, layer 12 (dimension 507: 96 % of the variance, 92 % of it on one
    example), the unbiased HSIC of x with itself fell to 0 or below on 271 of 1,000 resamples,
    making debiased CKA, HSIC_xy / √(HSIC_xx HSIC_yy), NaN or meaningless there. Cost: w @ (A, B,
    A∘B, A∘A, B∘B), A, B = K, L without diagonals, and for the unbiased one w² @ (the same), and
    their sums over examples, in `dtype`; what they add up to, where terms cancel, in float64."""
    n = w.shape[-1]
    grams = torch.empty(5, n, n, dtype=dtype)  # A, B, A∘B, A∘A, B∘B
    grams[0], grams[1] = kx, ky
    grams[:2].diagonal(dim1=-2, dim2=-1).zero_()
    torch.mul(grams[0], grams[1], out=grams[2])
    torch.mul(grams[:2], grams[:2], out=grams[3:])
    diagonals = torch.stack([kx.diagonal(), ky.diagonal()]).to(dtype)  # [2, n]
    p1, counts = w.sum(dim=-1).to(_DTYPE), w.to(dtype)
    products = counts @ grams  # [5, c, n]
    out = {}
    if "linear" in measures:
        out["linear"] = _biased_hsic(counts, p1, products, diagonals)
    if "debiased" in measures:
        out["debiased"] = _unbiased_hsic(counts, p1, products, (counts * counts) @ grams)
    return out


def resampled_cka(
    w: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, measures, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """{measure: CKA of every resample} for "linear" and/or "debiased" (see resampled_hsic); NaN
    where it is undefined: the HSIC of x or y with itself is not positive, or not a number (a
    debiased resample of fewer than 4 distinct examples)."""
    out = {}
    for measure, (xy, xx, yy) in resampled_hsic(w, kx, ky, measures, dtype).items():
        defined = (xx > 0) & (yy > 0) & torch.isfinite(xx * yy)
        out[measure] = torch.where(defined, xy / torch.sqrt(xx * yy), torch.nan)
    return out


class Interval(NamedTuple):
    """A bootstrap interval, or NaN bounds and why there is none ('' when there is one)."""

    low: float
    high: float
    missing_reason: str = ""


def bootstrap_cka(
    x: torch.Tensor,
    y: torch.Tensor,
    measure: str = "linear",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Percentile interval over examples resampled with replacement (same rows for x and y);
    a ValueError saying why when some resample has no value.

    Gram matrices are computed once and a resample is its vector of draw counts, so the whole
    bootstrap is a few [resamples, n] × [n, n] products. Pairs of draws of the same example are
    left out (see resampled_hsic): in simulation the plain bootstrap covered the point
    estimate 0 % of the time. Coverage: docs/benchmarks.md. Linear CKA's bias at n < d lies
    outside its intervals, which are about biased CKA at this n, not the population.
    `dtype`: of the Gram and bootstrap products (module docstring)."""
    if measure not in ("linear", "debiased"):
        raise ValueError(f"measure must be 'linear' or 'debiased', got {measure!r}")
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < confidence < 1, got {n_resamples}, {confidence}")
    _same_n(x, y)
    x, y = _centred(x, "x"), _centred(y, "y")
    grams = _gram(x, dtype), _gram(y, dtype)
    interval = _bootstrap_from_grams(*grams, [measure], n_resamples, seed, confidence, dtype)[measure]
    if interval.missing_reason:
        raise ValueError(f"bootstrap: {interval.missing_reason}")
    return interval.low, interval.high


@functools.lru_cache(maxsize=4)
def _resample_counts(n: int, n_resamples: int, seed: int) -> torch.Tensor:
    """[n_resamples, n] draw counts of n examples resampled with replacement, float64, shared
    (not to be modified): the same for every measure, layer and pair with this seed, and drawing
    them took as long as a layer's cosine."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_resamples, n), generator=generator)
    return torch.zeros(n_resamples, n, dtype=_DTYPE).scatter_add_(1, idx, torch.ones_like(idx, dtype=_DTYPE))


def _percentiles(values: torch.Tensor, confidence: float) -> Interval:
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=_DTYPE))
    return Interval(low.item(), high.item())


FEWEST_DISTINCT = {"linear": 2, "debiased": 4}  # distinct examples a resample needs for a value


def _interval(values: torch.Tensor, w: torch.Tensor, measure: str, confidence: float) -> Interval:
    """The percentile interval, or none when some resample has no value: percentiles of the
    others would describe only the resamples the data let through."""
    undefined = ~torch.isfinite(values)
    if not undefined.any():
        return _percentiles(values, confidence)
    few = (w > 0).sum(dim=-1) < FEWEST_DISTINCT[measure]
    causes = {
        f"fewer than {FEWEST_DISTINCT[measure]} distinct examples": int((undefined & few).sum()),
        "an HSIC of x or y with itself that is not positive": int((undefined & ~few).sum()),
    }
    why = "; ".join(f"{count} with {cause}" for cause, count in causes.items() if count)
    reason = f"{measure} CKA undefined on {int(undefined.sum())} of {len(values)} resamples ({why}): no interval"
    return Interval(math.nan, math.nan, reason)


def _bootstrap_from_grams(
    kx: torch.Tensor, ky: torch.Tensor, measures, n_resamples: int, seed: int, confidence: float, dtype: torch.dtype
) -> dict[str, Interval]:
    """{measure: Interval}; every measure sees the same resamples (same seed, same draws)."""
    w = _resample_counts(kx.shape[0], n_resamples, seed)
    resampled = resampled_cka(w, kx, ky, measures, dtype)
    return {measure: _interval(values, w, measure, confidence) for measure, values in resampled.items()}


class Compared(NamedTuple):
    """One measure of `compare`: its value and interval (NaN where there is none) and, where a
    value or an interval is missing because the data do not define it, why ('' otherwise)."""

    value: float
    ci_low: float
    ci_high: float
    missing_reason: str


_COMPARED = ("linear", "debiased", "rbf", "cosine")


def compare(
    x: torch.Tensor,
    y: torch.Tensor,
    measures=("linear", "debiased"),
    n_resamples: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Compared]:
    """{measure: Compared} for "linear", "debiased" and "rbf" CKA and "cosine" (centred, the mean
    over examples) from one centring and one pair of Gram matrices, every interval over the same
    resamples. Equal to linear_cka / debiased_cka / rbf_cka / cosine / bootstrap_cka, which each
    centre and build their own [n × n] Grams: at n = 872, d = 2048 those were most of the drift
    stage's time. Where those raise because debiased CKA is undefined on these examples (too few,
    or a self-HSIC estimate not positive) or on some resamples, this gives NaN and the reason, so
    that one measure does not stop the others. No interval (NaN) when n_resamples is 0, nor ever
    for RBF, whose resampled kernels are not worth the time. `dtype`: of the Gram and bootstrap
    products (module docstring)."""
    if set(measures) - set(_COMPARED):
        raise ValueError(f"unknown measures {sorted(set(measures) - set(_COMPARED))}; known: {list(_COMPARED)}")
    _same_n(x, y)
    x, y = _centred(x, "x"), _centred(y, "y")
    kx, ky = (_gram(x, dtype), _gram(y, dtype)) if set(measures) - {"cosine"} else (None, None)
    cosines = _row_cosines(x, y, " after centring") if "cosine" in measures else None
    point = {
        "linear": lambda: (_alignment(kx, ky).item(), ""),  # centred inputs give centred Grams
        "debiased": lambda: _debiased_point(kx, ky),
        "rbf": lambda: (gram_cka(_rbf_gram(kx, 1.0, "x"), _rbf_gram(ky, 1.0, "y")).item(), ""),
        "cosine": lambda: (cosines.mean().item(), ""),
    }
    points = {measure: point[measure]() for measure in measures}
    intervals = {}
    resampled = [m for m in measures if m in ("linear", "debiased") and not points[m][1]]
    if n_resamples and resampled:
        intervals = _bootstrap_from_grams(kx, ky, resampled, n_resamples, seed, confidence, dtype)
    if n_resamples and cosines is not None:
        means = _resample_counts(len(cosines), n_resamples, seed) @ cosines / len(cosines)
        intervals["cosine"] = _percentiles(means, confidence)
    intervals = {measure: intervals.get(measure, Interval(math.nan, math.nan)) for measure in measures}
    return {m: Compared(v, *intervals[m][:2], why or intervals[m].missing_reason) for m, (v, why) in points.items()}
