"""One end-to-end smoke study: the real bundled MiniLM-L6 on real GLUE, through the CLI."""

import json

import pandas as pd
import pytest

from lorascope.cli import main
from lorascope.config_io import load_config
from lorascope.preflight import disk_need
from lorascope.stages import STAGES

pytestmark = pytest.mark.e2e
MINILM_LORA_PARAMS = 6 * 2 * (2 * 384 * 8) + (384 * 2 + 2) + (384 * 384 + 384)  # q,v adapters + classifier + pooler
MINILM_PARAMS = 22_713_986


def test_smoke_study_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    argv = ["run", "--profile", "smoke", "--out", str(out), "--set", "runtime.progress=false"]
    # natural lengths only: the 32-token cells add a third of deploy and nothing this test reads
    assert main([*argv, "--set", "deploy.grid.seq_lens=[natural]"]) == 0

    performance = pd.read_csv(out / "tables" / "performance.csv")
    assert list(performance.columns[:10]) == [
        "task",
        "method",
        "seed",
        "status",
        "primary_metric",
        "primary_value",
        "accuracy",
        "f1",
        "train_seconds",
        "trainable_params",
    ]
    assert len(performance) == 6 and set(performance["status"]) == {"ok"}
    assert dict(zip(performance["task"], performance["primary_metric"])) == {
        "sst2": "accuracy",
        "mrpc": "f1",
        "rte": "accuracy",
    }
    assert set(performance.loc[performance["method"] == "lora", "trainable_params"]) == {MINILM_LORA_PARAMS}
    assert set(performance.loc[performance["method"] == "full", "trainable_params"]) == {MINILM_PARAMS}

    for row in performance.itertuples():
        run = out / "runs" / row.task / row.method / f"seed{row.seed}"
        weights = "adapter_model.safetensors" if row.method == "lora" else "model.safetensors"
        for name in (weights, "metrics.json", "history.csv", "hparams.json", "predictions.csv"):
            assert (run / name).is_file(), run / name
        predictions = pd.read_csv(run / "predictions.csv")
        assert len(predictions) == 64
        assert row.accuracy == pytest.approx((predictions["label"] == predictions["prediction"]).mean())

    baselines = pd.read_csv(out / "tables" / "baselines.csv")
    assert set(baselines["baseline"]) == {"majority", "head_only", "overfit_lora", "overfit_full"}
    assert len(baselines) == 3 * 4
    mrpc_majority = baselines[(baselines["task"] == "mrpc") & (baselines["baseline"] == "majority")].iloc[0]
    assert mrpc_majority["accuracy"] < mrpc_majority["f1"]  # all-positive: F1 above accuracy, as in GLUE

    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v["status"] for k, v in manifest["stages"].items()} == dict.fromkeys((s.name for s in STAGES), "done")
    assert (out / "config.yaml").is_file()

    drift = pd.read_csv(out / "tables" / "drift_layers.csv")
    base = drift[(drift.comparison == "base_vs_base") & (drift.measure != "cosine")]
    assert base["value"].sub(1).abs().max() < 1e-6  # the real MiniLM against itself, batched differently
    assert set(drift[drift.comparison == "run_vs_base"]["layer"]) == set(range(7))  # embeddings + 6 blocks
    positions = pd.read_csv(out / "tables" / "pooled_positions.csv")
    assert set(positions["positions"]) == {"all attended tokens"}  # an encoder's mean keeps every token
    assert len(positions) == 3 * 7 and positions["excluded_norm_share"].isna().all()
    deployment = pd.read_csv(out / "tables" / "deployment.csv")
    assert {"base", "full", "merged", "separate", "switch", "multi"} <= set(deployment["strategy"])
    checks = pd.read_csv(out / "tables" / "deployment_checks.csv")
    assert checks["passed"].all() and set(checks["n_examples"]) == {24}  # deploy.checks.examples reached the checks
    verdict = pd.read_csv(out / "tables" / "verdict.csv")
    rows = {
        "quality",
        "drift",
        "forgetting: LoRA − full FT",
        "deployment",
        "recommended",
        "failure rate lora",
        "failure rate full",
    }
    probes = pd.read_csv(out / "tables" / "forgetting.csv")
    assert len(probes) == 7 * 3 and set(probes["layer"]) == {6}  # (base + 6 runs) x 3 tasks, the last block
    assert probes.loc[probes.method == "base", "forgetting"].isna().all()
    assert set(pd.read_csv(out / "tables" / "lm_forgetting.csv")["status"]) == {"skipped"}  # MiniLM: no MLM head
    assert {t: set(g["criterion"]) for t, g in verdict.groupby("task")} == {
        "sst2": rows,
        "rte": rows,
        "mrpc": rows | {"quality (f1)"},
    }  # accuracy is the criterion, F1 is shown
    assert verdict["outcome"].notna().all()
    assert "data:image/png;base64," in (out / "report.html").read_text()

    # the pre-flight disk estimate (lorascope.preflight) against what the study wrote: 289 vs 294 MB here
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert 0.5 < disk_need(load_config(None, "smoke")) / written < 2
