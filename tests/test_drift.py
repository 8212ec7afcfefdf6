import pandas as pd
import pytest
import torch

from lorascope import drift
from lorascope import similarity as sim

MEASURES = ["linear_cka", "debiased_cka", "cosine"]


def _stack(layers=3, n=64, width=16, seed=0):
    return torch.randn(layers, n, width, generator=torch.Generator().manual_seed(seed))


def _rows(base, again, runs, bootstrap=50):
    return pd.DataFrame(
        drift.task_drift_rows(
            "sst2", "mean", base, again, runs, [0, 1, 2], MEASURES, bootstrap=bootstrap, confidence=0.9, seed=0
        )
    )


def test_references_and_runs_have_the_expected_values():
    base = _stack()
    same = base.clone()
    moved = base + 0.5 * _stack(seed=1)
    table = _rows(base, base.clone(), {("lora", 42): same, ("lora", 7): moved, ("full", 42): _stack(seed=2)})
    by = table.set_index(["comparison", "method", "seed", "layer", "measure"])["value"]
    assert table[table.comparison == "base_vs_base"]["value"].sub(1).abs().max() < 1e-12
    assert by[("run_vs_base", "lora", "42", 1, "linear_cka")] == pytest.approx(1.0)
    assert by[("run_vs_base", "lora", "7", 1, "linear_cka")] < 1
    assert set(table[table.comparison == "seed_vs_seed"]["seed"]) == {"7-42"}  # one pair, within lora only
    shuffled = table[table.comparison == "shuffled_base"].set_index("measure")["value"]
    assert shuffled["linear_cka"].min() > 0.1  # biased estimator's floor on unrelated rows of n=64
    assert shuffled["debiased_cka"].abs().max() < 0.1
    runs = table[table.comparison == "run_vs_base"]
    assert runs["ci_low"].le(runs["value"] + 1e-9).all() and runs["ci_high"].ge(runs["value"] - 1e-9).all()
    assert len(table) == 3 * 3 * (2 + 3 + 1)  # layers x measures x (references + runs + seed pairs)


def test_base_that_is_not_itself_stops_the_stage():
    base = _stack()
    again = base.clone()
    again[1] += 0.01 * torch.randn_like(again[1])
    with pytest.raises(drift.DriftCheckFailed, match="sst2 mean layer 1: linear_cka of the base model with itself"):
        _rows(base, again, {})


def test_a_constant_layer_is_left_out():
    base = _stack()
    base[0] = 1.0  # e.g. an encoder's first token at the embedding layer: always [CLS]
    table = _rows(base, base.clone(), {("full", 1): base + 0.1 * _stack(seed=3)}, bootstrap=0)
    assert sorted(table["layer"].unique()) == [1, 2]
    assert table["ci_low"].isna().all()


def test_summary_means_over_all_and_over_the_last_third_of_layers():
    rows = [
        {
            "task": "t",
            "comparison": "run_vs_base",
            "method": "lora",
            "seed": "1",
            "pooling": "mean",
            "measure": "linear_cka",
            "layer": layer,
            "value": value,
        }
        for layer, value in enumerate([1.0, 0.9, 0.8, 0.7, 0.6, 0.3])
    ]
    (summary,) = drift.summary_rows(pd.DataFrame(rows))
    assert summary["mean_over_layers"] == pytest.approx(4.3 / 6)
    assert summary["mean_last_third"] == pytest.approx(0.45)


def test_legacy_index_is_opt_in_and_exempt_from_the_base_vs_base_check():
    from lorascope.config import DriftConfig

    assert "legacy_index" not in DriftConfig().measures
    assert DriftConfig(measures=["linear_cka", "legacy_index"]).measures[-1] == "legacy_index"
    base = _stack()
    table = pd.DataFrame(
        drift.task_drift_rows(
            "sst2",
            "mean",
            base,
            base.clone(),
            {("lora", 1): base + 0.3 * _stack(seed=4)},
            [0, 1, 2],
            [*MEASURES, "legacy_index"],
            bootstrap=20,
            confidence=0.9,
            seed=0,
        )
    )
    own = table[(table.comparison == "base_vs_base")].set_index("measure")["value"]
    assert own["legacy_index"].max() < 1  # an inverse participation ratio, not 1
    assert own["linear_cka"].sub(1).abs().max() < 1e-12  # the check still holds the CKA measures
    assert table[table.measure == "legacy_index"]["ci_low"].isna().all()  # no interval for it


def test_base_vs_base_tolerance_depends_on_the_precision_and_still_catches_broken_features():
    """Real MiniLM head features under bf16 autocast, batches of 16 vs 5: base vs base moves
    off 1 by more than fp32 allows but within the bf16 bound; features of a perturbed model and
    the reference study's formula stay far outside it."""
    import datasets

    from lorascope import modeling
    from lorascope import representations as rep
    from lorascope.config import DataConfig, TaskConfig
    from lorascope.tasks import load_raw, resolve_task, tokenize

    task, _, evaluation = load_raw(resolve_task("sst2", TaskConfig(eval_max=48), DataConfig()))
    tokenizer = modeling.load_tokenizer("minilm-l6")
    probe = tokenize(datasets.DatasetDict(train=evaluation.select(range(48))), tokenizer, 64)["train"]
    model = modeling.load_model("minilm-l6", task.label_names, 0, tokenizer.pad_token_id)

    def head(batch_size, bf16):
        features, _ = rep.pooled_features(
            model, probe, tokenizer=tokenizer, layers=None, poolings=("head",), batch_size=batch_size, bf16=bf16
        )
        return features["head"][1:]  # layer 0's first token is always [CLS]: constant, left out by the stage

    base, again = head(16, True), head(5, True)
    deviation = max(abs(1 - sim.linear_cka(base[i], again[i])) for i in range(len(base)))
    assert drift.BASE_VS_BASE_TOLERANCE[False] < deviation < drift.BASE_VS_BASE_TOLERANCE[True]
    layers = list(range(1, len(base) + 1))
    common = dict(bootstrap=0, confidence=0.9, seed=0)
    drift.task_drift_rows("sst2", "head", base, again, {}, layers, MEASURES, bf16=True, **common)
    with pytest.raises(drift.DriftCheckFailed, match=r"within 1e-06 \(fp32\)"):
        drift.task_drift_rows("sst2", "head", base, again, {}, layers, MEASURES, bf16=False, **common)
    with torch.no_grad():
        model.bert.encoder.layer[3].attention.self.query.weight.mul_(-1)  # another model from layer 4 on
    with pytest.raises(drift.DriftCheckFailed):
        drift.task_drift_rows("sst2", "head", base, head(5, True), {}, layers, MEASURES, bf16=True, **common)
    assert abs(1 - sim.legacy_index(base[-1], base[-1])) > 10 * drift.BASE_VS_BASE_TOLERANCE[True]


def _hadamard8() -> torch.Tensor:
    """8 orthogonal ±1 columns, the last 7 of mean zero."""
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    return torch.kron(torch.kron(h2, h2), h2)


def test_variance_share_columns_are_exact_for_planted_features():
    columns = _hadamard8()[:, 1:6]  # five orthogonal zero-mean columns, sum of squares 8 each
    base = (columns * torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0]) + 4.0).expand(3, 8, 5)  # shares 9/16, 14/16
    run = (columns * torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0]) - 1.0).expand(3, 8, 5)  # shares 4/8, 6/8
    table = pd.DataFrame(
        drift.task_drift_rows(
            "sst2",
            "mean",
            base,
            base.clone(),
            {("full", 1): run},
            [0, 1, 2],
            MEASURES,
            bootstrap=0,
            confidence=0.9,
            seed=0,
        )
    )
    runs = table[table.comparison == "run_vs_base"]
    assert (runs["top1_share_x"] == 9 / 16).all() and (runs["top3_share_x"] == 14 / 16).all()
    assert (runs["top1_share_y"] == 4 / 8).all() and (runs["top3_share_y"] == 6 / 8).all()
    own = table[table.comparison == "base_vs_base"]
    assert (own["top1_share_y"] == 9 / 16).all() and (own["missing_reason"] == "").all()


def _z_scored(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (x - x.mean(0)) / x.std(0, correction=0)


def test_standardized_measures_equal_the_measures_of_z_scored_inputs():
    x = _stack(layers=1)[0] * torch.linspace(0.1, 30.0, 16)  # features of very different scales
    y = x + 3.0 * torch.randn(64, 16, generator=torch.Generator().manual_seed(5))
    rows = drift.layer_measures(x, y, MEASURES, 50, 3, 0.9, torch.float64, standardize=True)
    by_hand = sim.compare(_z_scored(x), _z_scored(y), ("linear", "debiased", "cosine"), 50, 3, 0.9, torch.float64)
    for row in rows:
        expected = by_hand[drift.SHARED[row["measure"]]]
        assert (row["value"], row["ci_low"], row["ci_high"]) == pytest.approx(expected[:3], abs=1e-12)
    assert rows[0]["value"] == pytest.approx(sim.linear_cka(_z_scored(x), _z_scored(y)), abs=1e-12)
    plain = drift.layer_measures(x, y, MEASURES, 0, 3, 0.9, torch.float64)
    assert abs(plain[0]["value"] - rows[0]["value"]) > 0.01  # the option changes what is measured


def test_a_rogue_dimension_decides_linear_cka_unless_the_features_are_standardized():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 32, generator=g), torch.randn(200, 32, generator=g)  # unrelated but for:
    x[:, 0] = y[:, 0] = 1000.0 * torch.randn(200, generator=g)  # one huge dimension both share
    shares = drift.variance_shares(x, y)
    assert shares["top1_share_x"] > 0.99 and shares["top1_share_y"] > 0.99
    measure = ["linear_cka", "cosine"]
    plain = {r["measure"]: r["value"] for r in drift.layer_measures(x, y, measure, 0, 0, 0.9)}
    scaled = {r["measure"]: r["value"] for r in drift.layer_measures(x, y, measure, 0, 0, 0.9, standardize=True)}
    assert plain["linear_cka"] > 0.99 and plain["cosine"] > 0.99
    assert scaled["linear_cka"] < 0.3 and scaled["cosine"] < 0.1  # 1 of 32 shared dimensions


def test_an_interval_the_data_leave_undefined_is_a_row_with_its_reason():
    """Five probe examples: most resamples have fewer than the 4 distinct examples debiased CKA
    needs; the stage writes the row with its reason instead of stopping."""
    base = _stack(n=5)
    table = _rows(base, base.clone(), {("lora", 1): base + 0.5 * _stack(n=5, seed=1)})
    debiased = table[(table.measure == "debiased_cka") & (table.comparison == "run_vs_base")]
    assert debiased["value"].notna().all() and debiased["ci_low"].isna().all()
    assert debiased["missing_reason"].str.match(r"debiased CKA undefined on \d+ of 50 resamples").all()
    layers, summary = drift.drift_tables(table.to_dict("records"))
    assert list(layers.columns) == list(drift.DRIFT_LAYERS.columns)
    assert summary["mean_over_layers"].notna().all()
