"""Representation similarity on [examples × features] tensors: CKA (linear, debiased, RBF),
per-example cosine, and bootstrap intervals. No model code.

Written by hand because the reference study's "CKA" normalised by ‖X‖²‖Y‖² instead of
‖XᵀX‖‖YᵀY‖ and scored the base model against itself at 0.23–0.40. Everything here runs in
float64 on column-centred inputs and raises ValueError instead of returning NaN."""

from __future__ import annotations

import torch

_DTYPE = torch.float64


def _as_float64(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [examples, features], got shape {tuple(x.shape)}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 examples and 1 feature, got shape {tuple(x.shape)}")
    x = x.detach().to(_DTYPE)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def is_constant(x: torch.Tensor) -> bool:
    """Every example has the same features: no similarity to anything is defined (0/0)."""
    x = x.to(_DTYPE)
    return bool((x - x.mean(dim=0, keepdim=True)).abs().max() <= 1e-12 * x.abs().max())


def _centred(x: torch.Tensor, name: str) -> torch.Tensor:
    """Column-centred float64 copy; a constant matrix is an error rather than a NaN."""
    x = _as_float64(x, name)
    centred = x - x.mean(dim=0, keepdim=True)
    if is_constant(x):
        raise ValueError(f"{name}: all features are constant across examples (zero variance after centring)")
    return centred


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


def _gram_cka(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Centred kernel alignment of (batches of) Gram matrices: the biased HSIC estimator."""
    kx, ky = _centre_gram(kx), _centre_gram(ky)
    xy = (kx * ky).sum(dim=(-2, -1))
    xx = (kx * kx).sum(dim=(-2, -1))
    yy = (ky * ky).sum(dim=(-2, -1))
    return xy / torch.sqrt(xx * yy)


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
    return _gram_cka(kx, ky).item()


def _unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. 2012 unbiased HSIC of (batches of) Gram matrices; needs n >= 4."""
    n = k.shape[-1]
    diagonal = torch.eye(n, dtype=torch.bool, device=k.device)
    k, l = k.masked_fill(diagonal, 0.0), l.masked_fill(diagonal, 0.0)
    trace = (k * l).sum(dim=(-2, -1))
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


def _debiased_from_grams(kx: torch.Tensor, ky: torch.Tensor) -> float:
    if kx.shape[0] < 4:
        raise ValueError(f"debiased CKA needs at least 4 examples, got {kx.shape[0]}")
    xx, yy = _unbiased_hsic(kx, kx), _unbiased_hsic(ky, ky)
    if xx <= 0 or yy <= 0:
        raise ValueError("debiased CKA: self-similarity estimate is not positive (too few examples)")
    return (_unbiased_hsic(kx, ky) / torch.sqrt(xx * yy)).item()


def _rbf_gram(x: torch.Tensor, sigma_scale: float, name: str) -> torch.Tensor:
    squared = x.pow(2).sum(dim=1)
    distances = (squared[:, None] + squared[None, :] - 2 * x @ x.T).clamp_min(0.0)
    pairs = distances[torch.triu_indices(x.shape[0], x.shape[0], offset=1).unbind()]
    median = pairs.median()  # of squared distances: the square of the median distance
    if median <= 0:
        raise ValueError(f"{name}: median pairwise distance is zero (most examples are identical)")
    return torch.exp(-distances / (2 * sigma_scale**2 * median))


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma_scale: float = 1.0) -> float:
    """CKA with Gaussian kernels whose bandwidth is sigma_scale × the median distance between
    distinct examples, per input (Kornblith's notebook also counts the zero self-distances)."""
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale}")
    _same_n(x, y)
    x, y = _centred(x, "x"), _centred(y, "y")
    return _gram_cka(_rbf_gram(x, sigma_scale, "x"), _rbf_gram(y, sigma_scale, "y")).item()


def cosine_per_example(x: torch.Tensor, y: torch.Tensor, centered: bool) -> torch.Tensor:
    """Cosine between matching rows, [n]. Uncentred cosine of transformer states is >= 0.94
    almost everywhere (a shared mean direction dominates), so centred is the informative one."""
    _same_n(x, y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"cosine needs equal widths: x has {x.shape[1]} features, y has {y.shape[1]}")
    x, y = (_centred(x, "x"), _centred(y, "y")) if centered else (_as_float64(x, "x"), _as_float64(y, "y"))
    norms_x, norms_y = x.norm(dim=1), y.norm(dim=1)
    for name, norms in (("x", norms_x), ("y", norms_y)):
        if (norms == 0).any():
            row = int((norms == 0).nonzero()[0])
            raise ValueError(f"{name}: row {row} is a zero vector{' after centring' if centered else ''}")
    return (x * y).sum(dim=1) / (norms_x * norms_y)


def cosine(x: torch.Tensor, y: torch.Tensor, centered: bool = True) -> float:
    """Mean over examples of the per-example cosine (DESIGN.md's interface)."""
    return cosine_per_example(x, y, centered).mean().item()

def _resampled_hsic(w: torch.Tensor, k: torch.Tensor, l: torch.Tensor, kw: torch.Tensor, lw: torch.Tensor,
                    klw: torch.Tensor, klw2: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """HSIC for resamples given as draw counts w [c, n] (kw, lw, klw = w @ K, w @ L, w @ (K∘L);
    K and L may carry a leading batch dimension), leaving out every pair of two draws of the
    same example. Given klw2 = w² @ (K∘L), the unbiased estimator; without it, the biased one.
    Such a pair is identical in x and in y, so it reads as shared structure: with it (plain
    K[idx][:, idx]), independent 256×384 inputs bootstrap to debiased CKA ~0.6 instead of 0,
    and no interval holds the estimate.

    biased: tr(K'HL'H) over the resampled Gram with those pairs zeroed (the diagonal, an example
    with itself, stays once per draw). unbiased: the U-statistic of Song et al. over distinct
    examples, each tuple weighted by the product of its draw counts; both equal the plain
    estimator when w = 1."""
    n = w.shape[-1]
    kd, ld = k.diagonal(dim1=-2, dim2=-1)[..., None, :], l.diagonal(dim1=-2, dim2=-1)[..., None, :]
    w2 = w * w
    if klw2 is None:
        ties = w2 - w  # ordered pairs of distinct draws of the same example
        trace = (klw * w - ties * kd * ld).sum(dim=-1)
        k_total, l_total = ((kw * w - ties * kd).sum(dim=-1), (lw * w - ties * ld).sum(dim=-1))
        k_rows, l_rows = kw - (w - 1) * kd, lw - (w - 1) * ld  # row sums of K' at a draw of example i
        return trace - 2 / n * (w * k_rows * l_rows).sum(dim=-1) + k_total * l_total / n**2
    # A, B = K, L with zero diagonal; sums over distinct i, j, q, r by inclusion-exclusion.
    aw, bw = kw - w * kd, lw - w * ld
    abw, abw2 = klw - w * kd * ld, klw2 - w2 * kd * ld  # w @ (A∘B), w² @ (A∘B)
    pairs = (abw * w).sum(dim=-1)  # Σ w_i w_j A_ij B_ij
    triples = (w * aw * bw - abw * w2).sum(dim=-1)  # Σ w_i w_j w_q A_ij B_iq
    quads = (aw * w).sum(dim=-1) * (bw * w).sum(dim=-1) + (2 * abw2 * w2 - 4 * w2 * aw * bw).sum(dim=-1)
    p1, p2, p3, p4 = (w.pow(e).sum(dim=-1) for e in (1, 2, 3, 4))  # Σ w^e: weights of distinct tuples
    n2 = p1**2 - p2
    n3 = p1**3 - 3 * p1 * p2 + 2 * p3
    n4 = p1**4 - 6 * p1**2 * p2 + 3 * p2**2 + 8 * p1 * p3 - 6 * p4
    return pairs / n2 + quads / n4 - 2 * triples / n3


def _resampled_cka(w: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, measures) -> dict[str, torch.Tensor]:
    """{measure: CKA of every resample} for "linear" and/or "debiased". xy, xx and yy go in one
    batched pass, and both measures share the [c, n] × [n, n] products, which are the cost."""
    kw, lw = w @ kx, w @ ky
    k, l = torch.stack([kx, kx, ky]), torch.stack([ky, kx, ky])
    kws, lws, kl = torch.stack([kw, kw, lw]), torch.stack([lw, kw, lw]), k * l
    klw = w @ kl
    klw2 = (w * w) @ kl if "debiased" in measures else None
    out = {}
    for measure in measures:
        xy, xx, yy = _resampled_hsic(w, k, l, kws, lws, klw, klw2 if measure == "debiased" else None)
        out[measure] = xy / torch.sqrt(xx * yy)
    return out


def bootstrap_cka(
    x: torch.Tensor,
    y: torch.Tensor,
    measure: str = "linear",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval over examples resampled with replacement (same rows for x and y).

    Gram matrices are computed once and a resample is its vector of draw counts, so the whole
    bootstrap is a few [resamples, n] × [n, n] products. Pairs of draws of the same example are
    left out (see _resampled_hsic): in simulation the plain bootstrap covered the point
    estimate 0 % of the time. Coverage of this one at the quick study's n = 192, d = 384, 300
    resamples, 95 % intervals, measured over 1,000 samples each of two populations y = x·W +
    noise, one with a decaying spectrum (Λ_i = 1/i) and one flat (benchmarks/bootstrap_coverage.py;
    Clopper–Pearson 95 % in brackets): debiased covers the population value 93.3 % [91.6, 94.8]
    (decaying) and 99.3 % [98.6, 99.7] (flat); linear covers the expected estimate at this n
    94.2 % [92.6, 95.6] and 97.6 % [96.4, 98.5] but the population value only 82.9 % and 0 %,
    since its bias at n < d lies outside the interval. A linear interval is about biased CKA at
    this n, not the population."""
    if measure not in ("linear", "debiased"):
        raise ValueError(f"measure must be 'linear' or 'debiased', got {measure!r}")
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < confidence < 1, got {n_resamples}, {confidence}")
    _same_n(x, y)
    x, y = _centred(x, "x"), _centred(y, "y")
    return _bootstrap_from_grams(x @ x.T, y @ y.T, [measure], n_resamples, seed, confidence)[measure]


def _bootstrap_from_grams(kx: torch.Tensor, ky: torch.Tensor, measures, n_resamples: int, seed: int,
                          confidence: float) -> dict[str, tuple[float, float]]:  # fmt: skip
    """{measure: (low, high)}; every measure sees the same resamples (same seed, same draws)."""
    n = kx.shape[0]
    if "debiased" in measures and n < 4:
        raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_resamples, n), generator=generator)
    counts = torch.zeros(n_resamples, n, dtype=_DTYPE).scatter_add_(1, idx, torch.ones_like(idx, dtype=_DTYPE))
    alpha = (1 - confidence) / 2
    out = {}
    for measure, values in _resampled_cka(counts, kx, ky, measures).items():
        if not torch.isfinite(values).all():
            raise ValueError("bootstrap: a resample has too few distinct examples for this measure")
        low, high = torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=_DTYPE))
        out[measure] = (low.item(), high.item())
    return out


def cka_with_intervals(x: torch.Tensor, y: torch.Tensor, measures=("linear", "debiased"), n_resamples: int = 0,
                       seed: int = 0, confidence: float = 0.95) -> dict[str, tuple[float, float, float]]:  # fmt: skip
    """{measure: (value, ci_low, ci_high)} for linear and/or debiased CKA from one centring and
    one pair of Gram matrices. Equal to linear_cka / debiased_cka / bootstrap_cka, which each
    build their own [n × n] Grams: at n = 872, d = 2048 those products were most of the drift
    stage's time. No interval (NaN) when n_resamples is 0."""
    _same_n(x, y)
    x, y = _centred(x, "x"), _centred(y, "y")
    kx, ky = x @ x.T, y @ y.T
    point = {"linear": lambda: _gram_cka(kx, ky).item(), "debiased": lambda: _debiased_from_grams(kx, ky)}
    nan = (float("nan"), float("nan"))
    intervals = _bootstrap_from_grams(kx, ky, measures, n_resamples, seed, confidence) if n_resamples else {}
    return {measure: (point[measure](), *intervals.get(measure, nan)) for measure in measures}
