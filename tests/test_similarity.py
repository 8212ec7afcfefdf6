import itertools
import math
import re

import pytest
import torch

from lorascope import similarity as sim

D = torch.float64


def _data(n=64, d1=20, d2=30, seed=0):
    """y depends on x plus noise, both with an offset (centring must happen inside)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=D) + 3.0
    y = x @ torch.randn(d1, d2, generator=g, dtype=D) + 2 * torch.randn(n, d2, generator=g, dtype=D) - 1.0
    return x, y


def _orthogonal(d, seed=1):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=D))
    return q


def _kornblith_debiased(x, y):
    """Feature-space debiased CKA as in Kornblith's reference notebook: an independent formula."""
    x, y = x - x.mean(0), y - y.mean(0)
    n = x.shape[0]
    rows_x, rows_y = (x * x).sum(1), (y * y).sum(1)

    def hsic(xty, rx, ry):
        return xty - n / (n - 2) * rx @ ry + rx.sum() * ry.sum() / ((n - 1) * (n - 2))

    xy = hsic(torch.linalg.matrix_norm(x.T @ y) ** 2, rows_x, rows_y)
    xx = hsic(torch.linalg.matrix_norm(x.T @ x) ** 2, rows_x, rows_x)
    yy = hsic(torch.linalg.matrix_norm(y.T @ y) ** 2, rows_y, rows_y)
    return (xy / torch.sqrt(xx * yy)).item()


@pytest.mark.parametrize("cka", [sim.linear_cka, sim.debiased_cka, sim.rbf_cka])
def test_self_similarity_is_one_and_invariances_hold(cka):
    x, y = _data()
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)
    reference = cka(x, y)
    assert 0.2 < reference < 0.99
    assert cka(y, x) == pytest.approx(reference, abs=1e-12)
    assert cka(x @ _orthogonal(x.shape[1]), y) == pytest.approx(reference, abs=1e-10)
    assert cka(x * 7.5, y / 3.0) == pytest.approx(reference, abs=1e-10)


def test_gram_form_equals_feature_form_for_different_widths():
    x, y = _data(d1=12, d2=50)
    assert sim.linear_cka_gram(x @ x.T, y @ y.T) == pytest.approx(sim.linear_cka(x, y), abs=1e-10)


@pytest.mark.parametrize("n, d1, d2", [(64, 12, 50), (16, 40, 60)])  # feature form, then Gram form inside
def test_linear_cka_equals_feature_formula_for_narrow_and_wide_inputs(n, d1, d2):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    y = x[:, :1] + torch.randn(n, d2, generator=g, dtype=torch.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    expected = (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())
    assert sim.linear_cka(x, y) == pytest.approx(expected.item(), abs=1e-10)


def test_debiased_equals_kornblith_feature_space_formula():
    x, y = _data(n=40)
    assert sim.debiased_cka(x, y) == pytest.approx(_kornblith_debiased(x, y), abs=1e-10)


def test_debiased_is_near_zero_for_independent_inputs_where_biased_is_not():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 64, generator=g), torch.randn(256, 64, generator=g)
    assert abs(sim.debiased_cka(x, y)) < 0.05
    assert 0.15 < sim.linear_cka(x, y) < 0.3  # ≈0.2: the floor a naive reading would call similarity


def test_rbf_with_a_wide_kernel_tends_to_linear_cka():
    x, y = _data()
    assert sim.rbf_cka(x, y, sigma_scale=1e3) == pytest.approx(sim.linear_cka(x, y), abs=1e-4)
    assert sim.rbf_cka(x, y, sigma_scale=0.5) != pytest.approx(sim.linear_cka(x, y), abs=1e-2)


def test_bad_inputs_raise_clear_errors():
    x, y = _data()
    with pytest.raises(ValueError, match="same examples: x has 64 rows, y has 63"):
        sim.linear_cka(x, y[:63])
    nan = x.clone()
    nan[3, 4] = float("nan")
    for cka in (sim.linear_cka, sim.debiased_cka, sim.rbf_cka, sim.bootstrap_cka):
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            cka(nan, y)
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        sim.linear_cka(x, y.index_fill(0, torch.tensor([0]), float("inf")))
    constant = torch.full((64, 5), 0.1)
    for cka in (sim.linear_cka, sim.debiased_cka, sim.rbf_cka):
        with pytest.raises(ValueError, match="y: all features are constant"):
            cka(x, constant)
    with pytest.raises(ValueError, match="kx: Gram matrix is constant"):
        sim.linear_cka_gram(constant @ constant.T, y @ y.T)
    with pytest.raises(ValueError, match="must be 2-D"):
        sim.linear_cka(x[:, 0], y)
    with pytest.raises(ValueError, match="at least 4 examples"):
        sim.debiased_cka(x[:3], y[:3])


def test_cosine_against_hand_values():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    plain = sim.cosine_per_example(x, y, centered=False)
    assert plain.dtype == D
    assert plain.tolist() == pytest.approx([1.0, 1 / math.sqrt(2), -1.0], abs=1e-12)
    centred = sim.cosine_per_example(x, y, centered=True)  # x - [2/3, 2/3], y - [1/3, 0]
    assert centred.tolist() == pytest.approx([1 / math.sqrt(5), -1 / math.sqrt(65), -7 / (5 * math.sqrt(2))], abs=1e-12)


def test_cosine_is_the_mean_of_the_per_example_cosines():
    x, y = torch.randn(20, 5), torch.randn(20, 5)
    assert sim.cosine(x, y) == pytest.approx(sim.cosine_per_example(x, y, centered=True).mean().item(), abs=1e-12)
    assert sim.cosine(x, 3 * x, centered=False) == pytest.approx(1.0, abs=1e-12)


def test_cosine_rejects_unequal_widths_and_zero_rows():
    x, y = _data()
    with pytest.raises(ValueError, match="equal widths: x has 20 features, y has 30"):
        sim.cosine_per_example(x, y, centered=True)
    with pytest.raises(ValueError, match="x: row 2 is a zero vector"):
        sim.cosine_per_example(x.index_fill(0, torch.tensor([2]), 0.0), x, centered=False)


def _counts(idx, n):
    return torch.zeros(len(idx), n, dtype=D).scatter_add_(1, idx, torch.ones(idx.shape, dtype=D))


def test_resampled_linear_cka_is_the_resampled_gram_without_pairs_of_copies():
    """Each resample's draws centred at their own mean, then every pair of two draws of one example set to 0."""
    x, y = _data(n=30)
    xc, yc = x - x.mean(0), y - y.mean(0)
    idx = torch.randint(30, (4, 30), generator=torch.Generator().manual_seed(2))
    fast = sim.resampled_cka(_counts(idx, 30), xc @ xc.T, yc @ yc.T, ["linear"], D)["linear"]
    for i, row in enumerate(idx):
        copies = (row[:, None] == row[None, :]) & ~torch.eye(30, dtype=torch.bool)
        drawn = (z[row] - z[row].mean(0) for z in (x, y))
        kx, ky = ((z @ z.T).masked_fill(copies, 0.0) for z in drawn)
        assert fast[i].item() == pytest.approx(sim.gram_cka(kx, ky).item(), abs=1e-12)
    ones = torch.ones(1, 30, dtype=D)
    assert sim.resampled_cka(ones, xc @ xc.T, yc @ yc.T, ["linear"], D)["linear"].item() == pytest.approx(
        sim.linear_cka(x, y), abs=1e-12
    )


def test_resampled_unbiased_hsic_is_the_weighted_u_statistic_over_distinct_examples():
    x, y = _data(n=7, d1=3, d2=2)
    k, l = x @ x.T, y @ y.T
    w = torch.tensor([[3.0, 0, 1, 2, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [2, 2, 1, 0, 1, 1, 0]], dtype=D)
    fast = sim.resampled_hsic(w, k, l, ["debiased"], D)["debiased"][0]  # of (x, y)
    tuples = list(itertools.permutations(range(7), 4))
    for row, value in zip(w, fast):
        weights = torch.stack([row[list(t)].prod() for t in tuples])  # one draw of each example
        terms = torch.stack([k[i, j] * l[i, j] - 2 * k[i, j] * l[i, q] + k[i, j] * l[q, r] for i, j, q, r in tuples])
        assert value.item() == pytest.approx(((weights * terms).sum() / weights.sum()).item(), abs=1e-10)
    plain = sim.unbiased_hsic(sim.off_diagonal(k), sim.off_diagonal(l))
    assert fast[1].item() == pytest.approx(plain.item(), abs=1e-10)  # w = 1: the estimator


def test_resampled_estimates_do_not_depend_on_where_the_features_are_centred():
    """As the plain estimators. Centred at the full sample's mean, an example far from the rest
    sits off-centre in a resample; the former weighting then gave negative self-HSIC."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=g, dtype=D)
    x[0, 0] += 200.0  # one example far out on one dimension
    y = x + 0.5 * torch.randn(32, 16, generator=g, dtype=D)
    w = torch.zeros(300, 32, dtype=D).scatter_add_(
        1, torch.randint(32, (300, 32), generator=g), torch.ones(300, 32, dtype=D)
    )
    centred = sim.resampled_hsic(w, *((z - z.mean(0)) @ (z - z.mean(0)).T for z in (x, y)), ["linear", "debiased"], D)
    moved = sim.resampled_hsic(
        w, *((z - z[1:].mean(0)) @ (z - z[1:].mean(0)).T for z in (x, y)), ["linear", "debiased"], D
    )
    for measure in ("linear", "debiased"):
        scale = centred[measure].abs().max()
        assert (centred[measure] - moved[measure]).abs().max() < 1e-10 * scale, measure
    assert (centred["debiased"][1:] > 0).all()  # the self-HSIC of every resample


@pytest.mark.parametrize("measure, point", [("linear", sim.linear_cka), ("debiased", sim.debiased_cka)])
def test_bootstrap_interval(measure, point):
    x, y = _data(n=128)
    low, high = sim.bootstrap_cka(x, y, measure, n_resamples=200, seed=3)
    assert low < point(x, y) < high
    assert high - low < 0.2
    assert sim.bootstrap_cka(x, y, measure, n_resamples=200, seed=3) == (low, high)
    assert sim.bootstrap_cka(x, y, measure, n_resamples=200, seed=4) != (low, high)
    assert sim.bootstrap_cka(x, x, measure, n_resamples=100) == (1.0, 1.0)


def test_bootstrap_of_independent_inputs_stays_at_the_estimate():
    """Pairs of copies of one example would read as shared structure (naive interval ≈ 0.5 here)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 256, generator=g), torch.randn(128, 256, generator=g)
    low, high = sim.bootstrap_cka(x, y, "debiased", n_resamples=200)
    assert low < 0 < high and low < sim.debiased_cka(x, y) < high and high < 0.1
    low, high = sim.bootstrap_cka(x, y, "linear", n_resamples=200)
    assert low < sim.linear_cka(x, y) < high


def test_bootstrap_rejects_bad_arguments():
    x, y = _data()
    with pytest.raises(ValueError, match="measure must be"):
        sim.bootstrap_cka(x, y, "rbf")
    with pytest.raises(ValueError, match="confidence"):
        sim.bootstrap_cka(x, y, confidence=1.5)


def _participation(x):
    """Σσ⁴ / (Σσ²)² of the centred x, from its singular values."""
    s2 = torch.linalg.svdvals(x.to(D) - x.to(D).mean(0)) ** 2
    return ((s2**2).sum() / s2.sum() ** 2).item()


def test_legacy_index_of_a_representation_with_itself_is_its_inverse_participation_ratio():
    x, _ = _data(n=50, d1=20)
    assert sim.legacy_index(x, x) == pytest.approx(_participation(x), abs=1e-10)
    assert sim.legacy_index(x, x) < 0.2  # 20 comparable directions: far from 1, unlike CKA
    assert sim.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(5)
    rank_one = torch.randn(30, 1, generator=g, dtype=D) @ torch.randn(1, 8, generator=g, dtype=D)
    assert sim.legacy_index(rank_one, rank_one) == pytest.approx(1.0, abs=1e-10)  # the only case it is 1


@pytest.mark.parametrize("n, d1, d2", [(64, 20, 30), (12, 40, 50)])  # feature form and Gram form
def test_legacy_index_is_linear_cka_with_the_wrong_normalisation(n, d1, d2):
    x, y = _data(n=n, d1=d1, d2=d2)
    xc, yc = x - x.mean(0), y - y.mean(0)
    fro = torch.linalg.matrix_norm
    independent = (torch.trace(xc @ xc.T @ yc @ yc.T) / (fro(xc) ** 2 * fro(yc) ** 2)).item()
    assert sim.legacy_index(x, y) == pytest.approx(independent, rel=1e-10)
    rescaled = sim.linear_cka(x, y) * (fro(xc.T @ xc) * fro(yc.T @ yc) / (fro(xc) ** 2 * fro(yc) ** 2)).item()
    assert sim.legacy_index(x, y) == pytest.approx(rescaled, rel=1e-10)
    assert sim.legacy_index(y, x) == pytest.approx(sim.legacy_index(x, y), rel=1e-12)


def test_legacy_index_rejects_what_linear_cka_rejects():
    x, y = _data()
    with pytest.raises(ValueError, match="same examples: x has 64 rows, y has 63"):
        sim.legacy_index(x, y[:63])
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        sim.legacy_index(x.index_fill(0, torch.tensor([1]), float("nan")), y)
    with pytest.raises(ValueError, match="y: all features are constant"):
        sim.legacy_index(x, torch.full((64, 5), 0.1))


def test_shared_estimates_equal_the_single_measure_functions():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 12, generator=g, dtype=D)
    y = x @ torch.randn(12, 30, generator=g, dtype=D) + torch.randn(40, 30, generator=g, dtype=D)
    shared = sim.compare(x, y, ("linear", "debiased", "rbf"), n_resamples=50, seed=7, dtype=D)
    assert shared["linear"][0] == pytest.approx(sim.linear_cka(x, y), abs=1e-12)
    assert shared["debiased"][0] == pytest.approx(sim.debiased_cka(x, y), abs=1e-12)
    assert shared["rbf"][0] == pytest.approx(sim.rbf_cka(x, y), abs=1e-12)
    assert math.isnan(shared["rbf"].ci_low) and math.isnan(shared["rbf"].ci_high)  # RBF has no interval
    for kind in ("linear", "debiased"):
        interval = (shared[kind].ci_low, shared[kind].ci_high)
        assert interval == pytest.approx(sim.bootstrap_cka(x, y, kind, 50, seed=7, dtype=D), abs=1e-12)
    assert all(not m.missing_reason for m in shared.values())
    value, low, high, _ = sim.compare(x, y, ("linear",))["linear"]
    assert value == pytest.approx(shared["linear"][0]) and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="unknown measures"):
        sim.compare(x, y, ("linear", "cka"))


def test_cosine_interval_resamples_the_examples_that_cka_resamples():
    x, y = _data(n=40, d1=12, d2=12)
    value, low, high, _ = sim.compare(x, y, ("cosine",), n_resamples=50, seed=7)["cosine"]
    per_example = sim.cosine_per_example(x, y, centered=True)
    assert value == pytest.approx(per_example.mean().item(), abs=1e-15)
    idx = torch.randint(40, (50, 40), generator=torch.Generator().manual_seed(7))  # the draws of bootstrap_cka
    expected = torch.quantile(per_example[idx].mean(dim=1), torch.tensor([0.025, 0.975], dtype=D))
    assert (low, high) == pytest.approx(expected.tolist(), abs=1e-12)


def _drifted_runs(n=256, d=384, seed=0):
    """Base features as transformer states are (a decaying spectrum, an offset, a few dimensions
    far larger than the rest) and runs from almost the base to unrelated to it."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, 129, dtype=torch.float32).pow(-0.75)
    mixing = torch.randn(128, d, generator=g) / 128**0.5
    base = (torch.randn(n, 128, generator=g) * scales) @ mixing + 0.05 * torch.randn(n, d, generator=g) + 1.0
    base[:, :3] *= 40.0
    runs = [base + noise * base.std() * torch.randn(n, d, generator=g) for noise in (0.01, 0.3, 1.0)]
    return base, [*runs, base[torch.randperm(n, generator=g)]]


def test_float32_products_stay_within_1e4_of_float64():
    """The drift stage's default (benchmarks/drift_speed.py prints the same errors at paper size)."""
    measures = ("linear", "debiased", "rbf", "cosine")
    base, runs = _drifted_runs()
    for run in runs:
        fast = sim.compare(base, run, measures, n_resamples=200, seed=1, dtype=torch.float32)
        reference = sim.compare(base, run, measures, n_resamples=200, seed=1, dtype=D)
        for measure in measures:
            assert fast[measure] == pytest.approx(reference[measure], abs=1e-4, nan_ok=True), measure


def _one_example_rogue(seed=0):
    """Like SmolLM2's mean-pooled states at n = 32: one dimension holds ~99 % of the centred
    variance, nearly all of it on one example; y is x plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 16, generator=g, dtype=D)
    x[0, 0] += 200.0
    return x, x + 0.5 * torch.randn(32, 16, generator=g, dtype=D)


@pytest.mark.parametrize("seed", range(3))
def test_a_dimension_held_by_one_example_no_longer_stops_the_bootstrap(seed):
    """This raised "bootstrap: a resample has too few distinct examples" (issue 31, symptom 3):
    the former resampled self-HSIC fell below 0, so debiased CKA was NaN on some resamples."""
    x, y = _one_example_rogue(seed)
    assert sim.top_variance_shares(x)[0] > 0.9 and sim.top_variance_shares(y)[0] > 0.9
    result = sim.compare(x, y, ("linear", "debiased", "cosine"), n_resamples=1000, seed=0)
    for measure, (value, low, high, reason) in result.items():
        assert reason == "" and low <= value <= high, measure
    assert result["debiased"].value == pytest.approx(sim.debiased_cka(x, y), abs=1e-6)  # float32 products


def test_a_measure_the_data_leave_undefined_is_nan_with_the_reason():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=D)
    y = x + torch.randn(5, 4, generator=g, dtype=D)
    debiased = sim.compare(x, y, ("debiased",), n_resamples=200)["debiased"]  # most resamples: < 4 distinct
    assert debiased.value == pytest.approx(sim.debiased_cka(x, y), abs=1e-6)
    assert math.isnan(debiased.ci_low) and math.isnan(debiased.ci_high)
    assert re.fullmatch(
        r"debiased CKA undefined on (\d+) of 200 resamples \(\1 with fewer than 4 distinct examples\): no interval",
        debiased.missing_reason,
    )
    with pytest.raises(ValueError, match="bootstrap: debiased CKA undefined on"):
        sim.bootstrap_cka(x, y, "debiased", n_resamples=200)
    three = sim.compare(x[:3], y[:3], ("debiased",), n_resamples=20)["debiased"]
    assert math.isnan(three.value) and three.missing_reason == "debiased CKA needs at least 4 examples, got 3"
    lone = torch.zeros(8, 3, dtype=D)
    lone[0, 0] = 4.0  # one example apart from seven identical ones: no pair of distinct examples varies together
    centred = lone - lone.mean(0)
    assert sim.unbiased_hsic(*[sim.off_diagonal(centred @ centred.T)] * 2).item() == 0.0
    result = sim.compare(lone, lone + 0.1 * torch.randn(8, 3, generator=g, dtype=D), ("linear", "debiased"))
    assert math.isnan(result["debiased"].value)
    assert result["debiased"].missing_reason == (
        "debiased CKA undefined: the unbiased HSIC of x or y with itself is not positive"
    )
    assert math.isfinite(result["linear"].value) and result["linear"].missing_reason == ""


def test_top_variance_shares_are_the_largest_variances_over_their_sum():
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    x = torch.stack([signs, 3 * signs, signs.roll(1), 2 * signs, -signs], dim=1) + 5.0  # variances ∝ 1, 9, 1, 4, 1
    assert sim.top_variance_shares(x) == [9 / 16, 14 / 16]
    assert sim.top_variance_shares(x, tops=(1, 2, 10)) == [9 / 16, 13 / 16, 1.0]


def test_standardized_features_are_z_scores_and_constant_ones_stay_zero():
    x, _ = _data()
    x[:, 3] = 2.5
    expected = (x - x.mean(0)) / x.std(0, correction=0)
    expected[:, 3] = 0.0
    z = sim.standardized(x)
    assert z.dtype == D and torch.allclose(z, expected, rtol=0, atol=1e-12)
