"""Representation similarity on [examples × features] tensors: CKA (linear, debiased, RBF),
per-example cosine, and bootstrap intervals. No model code.

Written by hand because the reference study's "CKA" normalised by ‖X‖²‖Y‖² instead of
‖XᵀX‖‖YᵀY‖ and scored the base model against itself at 0.23–0.40. Inputs are centred in
float64, and everything runs in float64 except, in compare and bootstrap_cka, the Gram and
bootstrap matrix products and their row sums: those take `dtype`, float32 by default, which
halves their time. Against float64 (the reference), no value or interval bound moved by more
than 4e-7 at paper size (benchmarks/drift_speed.py prints it) nor by more than 3e-6 on a
SmolLM2 study's features, massive activations included. Errors are ValueErrors, never NaN."""

from __future__ import annotations

import functools

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
    return _debiased_from_grams(x @ x.T, y @ y.T)


def off_diagonal(k: torch.Tensor) -> torch.Tensor:
    """A copy of (a batch of) Gram matrices with zero diagonals: the pairs of distinct examples."""
    k = k.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def _debiased_from_grams(kx: torch.Tensor, ky: torch.Tensor) -> float:
    if kx.shape[0] < 4:
        raise ValueError(f"debiased CKA needs at least 4 examples, got {kx.shape[0]}")
    a, b = off_diagonal(kx), off_diagonal(ky)
    xx, yy = unbiased_hsic(a, a), unbiased_hsic(b, b)
    if xx <= 0 or yy <= 0:
        raise ValueError("debiased CKA: self-similarity estimate is not positive (too few examples)")
    return (unbiased_hsic(a, b) / torch.sqrt(xx * yy)).item()


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


def resampled_hsic(
    w: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, measures, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """{measure: [3, c] HSIC of (x, y), (x, x), (y, y)} for resamples given as draw counts w
    [c, n], "linear" (biased) and/or "debiased" (unbiased), leaving out every pair of two draws
    of the same example. Such a pair is identical in x and in y, so it reads as shared
    structure: with it (plain K[idx][:, idx]), independent 256×384 inputs bootstrap to debiased
    CKA ~0.6 instead of 0, and no interval holds the estimate.

    biased: tr(K'HL'H) over the resampled Gram with those pairs zeroed (the diagonal, an example
    with itself, stays once per draw). unbiased: the U-statistic of Song et al. over distinct
    examples, each tuple weighted by the product of its draw counts; both equal the plain
    estimator when w = 1. With A, B = K, L without their diagonals, every term is a row sum over
    the [c, n] × [n, n] products w @ (A, B, A∘B, A∘A, B∘B) and, for the unbiased one, w² @ (A∘B,
    A∘A, B∘B): those products are the cost, and both measures share them. They and their row
    sums are taken in `dtype`; the terms, which cancel, are combined in float64."""
    n = w.shape[-1]
    diagonals = torch.stack([kx.diagonal(), ky.diagonal()])  # [2, n]
    grams = torch.empty(5, n, n, dtype=dtype)  # A, B, A∘B, A∘A, B∘B
    grams[0], grams[1] = kx, ky
    grams[:2].diagonal(dim1=-2, dim2=-1).zero_()
    torch.mul(grams[0], grams[1], out=grams[2])
    torch.mul(grams[:2], grams[:2], out=grams[3:])
    counts, w = w.to(dtype), w.to(_DTYPE)
    products = counts @ grams  # [5, c, n]; the first two are w @ A, w @ B
    left, right = [0, 0, 1], [1, 0, 1]  # (x, y), (x, x), (y, y): which of A, B on each side

    def row_sums(v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_i weights_i v_i over each row, float64."""
        return torch.einsum("...cn,cn->...c", v, weights).to(_DTYPE)

    def pair_sums(v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_i weights_i v_a,i v_b,i for the three pairs (a, b) of v's two rows, [3, c] float64."""
        return torch.einsum("acn,bcn->abc", v * weights, v)[left, right].to(_DTYPE)

    hadamard = row_sums(products[2:], counts)  # Σ w_i w_j A_ij B_ij, [3, c]
    totals = row_sums(products[:2], counts)  # wᵀAw, wᵀBw
    out = {}
    if "linear" in measures:
        resampled_rows = products[:2] + diagonals[:, None, :].to(dtype)  # row sums of K', L' at a draw
        trace = hadamard + (w @ (diagonals[left] * diagonals[right]).T).T
        k_totals = totals + (w @ diagonals.T).T
        out["linear"] = trace - 2 / n * pair_sums(resampled_rows, counts) + k_totals[left] * k_totals[right] / n**2
    if "debiased" in measures:  # sums over distinct i, j, q, r by inclusion-exclusion
        squared = counts * counts
        triples = pair_sums(products[:2], counts) - row_sums(products[2:], squared)  # Σ w_i w_j w_q A_ij B_iq
        quads = (
            totals[left] * totals[right]
            + 2 * row_sums(squared @ grams[2:], squared)
            - 4 * pair_sums(products[:2], squared)
        )
        w2 = w * w
        p1, p2, p3, p4 = w.sum(dim=-1), w2.sum(dim=-1), row_sums(w2, w), row_sums(w2, w2)  # Σ w^e
        n2 = p1**2 - p2  # weights of the distinct pairs, triples and quadruples
        n3 = p1**3 - 3 * p1 * p2 + 2 * p3
        n4 = p1**4 - 6 * p1**2 * p2 + 3 * p2**2 + 8 * p1 * p3 - 6 * p4
        out["debiased"] = hadamard / n2 + quads / n4 - 2 * triples / n3
    return out


def resampled_cka(
    w: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, measures, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """{measure: CKA of every resample} for "linear" and/or "debiased" (see resampled_hsic)."""
    hsic = resampled_hsic(w, kx, ky, measures, dtype)
    return {measure: xy / torch.sqrt(xx * yy) for measure, (xy, xx, yy) in hsic.items()}


def bootstrap_cka(
    x: torch.Tensor,
    y: torch.Tensor,
    measure: str = "linear",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Percentile interval over examples resampled with replacement (same rows for x and y).

    Gram matrices are computed once and a resample is its vector of draw counts, so the whole
    bootstrap is a few [resamples, n] × [n, n] products. Pairs of draws of the same example are
    left out (see resampled_hsic): in simulation the plain bootstrap covered the point
    estimate 0 % of the time. Coverage of this one at the quick study's n = 192, d = 384, 300
    resamples, 95 % intervals, measured over 1,000 samples each of two populations y = x·W +
    noise, one with a decaying spectrum (Λ_i = 1/i) and one flat (docs/benchmarks.md;
    Clopper–Pearson 95 % in brackets): debiased covers the population value 93.3 % [91.6, 94.8]
    (decaying) and 99.3 % [98.6, 99.7] (flat); linear covers the expected estimate at this n
    94.2 % [92.6, 95.6] and 97.6 % [96.4, 98.5] but the population value only 82.9 % and 0 %,
    since its bias at n < d lies outside the interval. A linear interval is about biased CKA at
    this n, not the population. `dtype`: of the Gram and bootstrap products (module docstring)."""
    if measure not in ("linear", "debiased"):
        raise ValueError(f"measure must be 'linear' or 'debiased', got {measure!r}")
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < confidence < 1, got {n_resamples}, {confidence}")
    _same_n(x, y)
    x, y = _centred(x, "x"), _centred(y, "y")
    return _bootstrap_from_grams(_gram(x, dtype), _gram(y, dtype), [measure], n_resamples, seed, confidence, dtype)[
        measure
    ]


@functools.lru_cache(maxsize=4)
def _resample_counts(n: int, n_resamples: int, seed: int) -> torch.Tensor:
    """[n_resamples, n] draw counts of n examples resampled with replacement, float64, shared
    (not to be modified): the same for every measure, layer and pair with this seed, and drawing
    them took as long as a layer's cosine."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_resamples, n), generator=generator)
    return torch.zeros(n_resamples, n, dtype=_DTYPE).scatter_add_(1, idx, torch.ones_like(idx, dtype=_DTYPE))


def _percentiles(values: torch.Tensor, confidence: float) -> tuple[float, float]:
    if not torch.isfinite(values).all():
        raise ValueError("bootstrap: a resample has too few distinct examples for this measure")
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=_DTYPE))
    return low.item(), high.item()


def _bootstrap_from_grams(
    kx: torch.Tensor, ky: torch.Tensor, measures, n_resamples: int, seed: int, confidence: float, dtype: torch.dtype
) -> dict[str, tuple[float, float]]:
    """{measure: (low, high)}; every measure sees the same resamples (same seed, same draws)."""
    n = kx.shape[0]
    if "debiased" in measures and n < 4:
        raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
    resampled = resampled_cka(_resample_counts(n, n_resamples, seed), kx, ky, measures, dtype)
    return {measure: _percentiles(values, confidence) for measure, values in resampled.items()}


_COMPARED = ("linear", "debiased", "rbf", "cosine")


def compare(
    x: torch.Tensor,
    y: torch.Tensor,
    measures=("linear", "debiased"),
    n_resamples: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[float, float, float]]:
    """{measure: (value, ci_low, ci_high)} for "linear", "debiased" and "rbf" CKA and "cosine"
    (centred, the mean over examples) from one centring and one pair of Gram matrices, every
    interval over the same resamples. Equal to linear_cka / debiased_cka / rbf_cka / cosine /
    bootstrap_cka, which each centre and build their own [n × n] Grams: at n = 872, d = 2048
    those were most of the drift stage's time. No interval (NaN) when n_resamples is 0, nor ever
    for RBF, whose resampled kernels are not worth the time. `dtype`: of the Gram and bootstrap
    products (module docstring)."""
    if set(measures) - set(_COMPARED):
        raise ValueError(f"unknown measures {sorted(set(measures) - set(_COMPARED))}; known: {list(_COMPARED)}")
    _same_n(x, y)
    x, y = _centred(x, "x"), _centred(y, "y")
    kx, ky = (_gram(x, dtype), _gram(y, dtype)) if set(measures) - {"cosine"} else (None, None)
    cosines = _row_cosines(x, y, " after centring") if "cosine" in measures else None
    point = {
        "linear": lambda: _alignment(kx, ky).item(),  # centred inputs give centred Grams
        "debiased": lambda: _debiased_from_grams(kx, ky),
        "rbf": lambda: gram_cka(_rbf_gram(kx, 1.0, "x"), _rbf_gram(ky, 1.0, "y")).item(),
        "cosine": lambda: cosines.mean().item(),
    }
    intervals = {}
    resampled = [m for m in measures if m in ("linear", "debiased")]
    if n_resamples and resampled:
        intervals = _bootstrap_from_grams(kx, ky, resampled, n_resamples, seed, confidence, dtype)
    if n_resamples and cosines is not None:
        means = _resample_counts(len(cosines), n_resamples, seed) @ cosines / len(cosines)
        intervals["cosine"] = _percentiles(means, confidence)
    nan = (float("nan"), float("nan"))
    return {measure: (point[measure](), *intervals.get(measure, nan)) for measure in measures}
