"""represent -> drift -> weights -> analyze -> report on a tiny study: the tables' contents."""

import pandas as pd
import pytest

from lorascope.stages import BY_NAME
from lorascope.study import run_stages

STAGES = [BY_NAME[s] for s in ("prepare", "baselines", "train", "represent", "drift", "weights", "analyze", "report")]


@pytest.fixture(scope="module")
def study(tiny_config_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return run_stages(tiny_config_module, root, STAGES)


@pytest.fixture(scope="module")
def tiny_config_module(tiny_study_config):
    return tiny_study_config("seeds=[1, 2]", "data.probe_size=24", "drift.bootstrap=20")


def test_drift_table_has_runs_and_every_reference(study):
    table = pd.read_csv(study.tables / "drift_layers.csv", dtype={"seed": str})
    cka = table[table.measure != "cosine"]
    assert cka[cka.comparison == "base_vs_base"]["value"].sub(1).abs().max() < 1e-6
    runs = table[table.comparison == "run_vs_base"]
    assert set(zip(runs.method, runs.seed)) == {("lora", "1"), ("lora", "2"), ("full", "1"), ("full", "2")}
    assert set(table[table.comparison == "seed_vs_seed"]["seed"]) == {"1-2"}
    assert {"shuffled_base"} <= set(table.comparison)
    head = table[(table.pooling == "head") & (table.comparison == "run_vs_base")]
    assert 0 not in set(head.layer)  # the [CLS] embedding is the same for every example
    assert runs[runs.measure == "linear_cka"]["ci_low"].notna().all()
    summary = pd.read_csv(study.tables / "drift_summary.csv")
    assert list(summary.columns[:6]) == ["task", "method", "seed", "pooling", "measure", "mean_over_layers"]


def test_weights_table_covers_adapted_and_fully_trained_matrices(study):
    table = pd.read_csv(study.tables / "weights.csv")
    lora = table[(table.method == "lora") & (table.seed == 1)]
    assert sorted(lora.kind) == ["query", "query", "value", "value"]  # 2 layers x q, v
    full = table[(table.method == "full") & (table.seed == 1)]
    assert len(full) == 2 * 6  # q, k, v, attention out, intermediate, output per layer
    assert (table.relative_update > 0).all() and (lora.effective_rank <= 8 + 1e-6).all()


def test_verdict_and_statistics_come_from_the_study(study):
    verdict = pd.read_csv(study.tables / "verdict.csv")
    assert list(verdict.criterion) == [
        "quality",
        "drift",
        "forgetting: LoRA − full FT",
        "deployment",
        "recommended",
        "failure rate lora",
        "failure rate full",
    ]
    assert verdict.set_index("criterion").loc["deployment", "outcome"] == "not run"
    assert set(verdict.set_index("criterion").loc[["failure rate lora", "failure rate full"], "outcome"]) == {"shown"}
    performance = pd.read_csv(study.tables / "performance.csv")
    by = performance.pivot(index="seed", columns="method", values="primary_value")
    gap = 100 * (by["full"] - by["lora"]).mean()
    assert verdict.set_index("criterion").loc["quality", "value"] == pytest.approx(gap)
    statistics = pd.read_csv(study.tables / "statistics.csv")
    assert {"describe", "compare"} == set(statistics.kind)
    assert (study.root / "report.md").read_text().count("erdict") >= 1


def test_a_second_pass_recomputes_nothing(study, tiny_config_module):
    before = {
        p: p.stat().st_mtime_ns
        for p in [*study.root.glob("features/*/*"), study.tables / "drift_layers.csv", study.tables / "weights.csv"]
    }
    run_stages(tiny_config_module, study.root, STAGES)
    assert {p: p.stat().st_mtime_ns for p in before} == before
