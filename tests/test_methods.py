"""Methods as data: any PEFT type defined in the config trains, is saved so that it reloads as
the model it trained, and has its weight change measured; bad definitions stop before any stage."""

import json

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorascope import modeling, runs, runtime
from lorascope import weights as change
from lorascope.cli import main
from lorascope.config_io import load_config, to_yaml
from lorascope.evaluation import evaluate_task
from lorascope.hparams import AdapterMethodConfig, LoraMethodConfig
from lorascope.prepared import load_prepared
from lorascope.report import methods as methods_report
from lorascope.report.figures import method_label
from lorascope.stages import STAGES
from lorascope.study import run_stages

# Every type the methods profile compares, on the tiny BERT: each trains 3 steps at batch 16.
METHODS = {
    "lora": "{type: lora, lr: 1.0e-2}",
    "dora": "{type: lora, use_dora: true, lr: 1.0e-2}",
    "rslora": "{type: lora, use_rslora: true, r: 16, lr: 1.0e-2}",
    "pissa": "{type: lora, init_lora_weights: pissa, lr: 1.0e-2}",
    "ia3": "{type: ia3, lr: 1.0e-2}",
    "loha": "{type: loha, r: 4, alpha: 8, lr: 1.0e-2}",
    "lokr": "{type: lokr, r: 4, alpha: 8, lr: 1.0e-2}",
    "vera": "{type: vera, r: 16, lr: 1.0e-2}",
}


@pytest.fixture(scope="module")
def methods_study(tiny_study_config, tmp_path_factory):
    config = tiny_study_config(
        *(f"training.{name}={spec}" for name, spec in METHODS.items()),
        f"methods=[{', '.join(METHODS)}, full]",
        "tasks={sst2: {train_max: 48, eval_max: 40}, rte: {train_max: 48, eval_max: 40}}",  # forgetting: the other task
        "seeds=[42]",
        "runtime.workers=1",
        "deploy.strategies=[full, merged, separate]",
        "deploy.grid={batch_sizes: [1], seq_lens: [natural], concurrency: [1], warmup: 1, repeats: 3, threads: 1}",
        "deploy.checks.examples=16",
        *("baselines.head_only=false", "forget.lm=false", "drift.bootstrap=10", "forget.bootstrap=10"),
    )
    return run_stages(config, tmp_path_factory.mktemp("methods"), list(STAGES))


def test_every_peft_type_trains_and_writes_its_weight_change(methods_study):
    performance = pd.read_csv(methods_study.tables / "performance.csv")
    assert set(performance["method"]) == {*METHODS, "full"} and set(performance["status"]) == {"ok"}
    trainable = dict(zip(performance["method"], performance["trainable_params"]))
    assert trainable["ia3"] < trainable["lora"] < trainable["full"]  # IA3 scales vectors: fewer than LoRA
    table = pd.read_csv(methods_study.tables / "weights.csv")
    for method in METHODS:
        rows = table[table["method"] == method]
        assert len(rows) and (rows["relative_update"] > 0).all(), method
    kinds = {m: set(table.loc[table["method"] == m, "module"].str.rsplit(".", n=1).str[-1]) for m in METHODS}
    assert kinds["lora"] == kinds["dora"] == kinds["vera"] == {"query", "value"}  # the attention projections
    assert kinds["ia3"] == {"key", "value", "dense"}  # PEFT's own default for IA3 on BERT
    assert (table.loc[table["method"] == "lora", "effective_rank"] <= 8 + 1e-6).all()


def test_every_stage_and_the_report_take_any_set_of_methods(methods_study):
    drift = pd.read_csv(methods_study.tables / "drift_summary.csv")
    forgetting = pd.read_csv(methods_study.tables / "forgetting.csv")
    for method in (*METHODS, "full"):
        assert (drift.loc[drift["comparison"] == "run_vs_base", "method"] == method).any(), method
        assert (forgetting["method"] == method).any(), method
    table = pd.read_csv(methods_study.tables / "methods.csv")
    table = table[table["task"] == "sst2"]
    assert list(table["method"]) == [*METHODS, "full"]  # config order
    assert list(table["type"]) == ["lora"] * 4 + ["ia3", "loha", "lokr", "vera", "full"]
    performance = pd.read_csv(methods_study.tables / "performance.csv")
    performance = performance[performance["task"] == "sst2"].set_index("method")
    assert table.set_index("method")["trainable_params"].to_dict() == performance["trainable_params"].to_dict()
    assert table["drift_mean"].notna().all() and table["forgetting_pp"].notna().all()
    # each method against the reference (full), paired by seed: one seed, so the value is the difference
    quality = performance["primary_value"]
    versus = table.set_index("method")
    for method in METHODS:
        assert versus.loc[method, "quality_gap_value"] == pytest.approx(100 * (quality["full"] - quality[method]))
        assert versus.loc[method, "quality_gap_outcome"] == "inconclusive"  # one pair gives no interval
    assert versus.loc["full", ["quality_gap_value", "drift_reduction_value"]].isna().all()
    # the verdict judges every method against the reference, deployment included: every method served
    verdict = pd.read_csv(methods_study.tables / "verdict.csv")
    verdict = verdict[verdict["task"] == "sst2"]
    judged = verdict[verdict["criterion"] == "recommended"]
    assert list(judged["method"]) == list(METHODS)
    served = pd.read_csv(methods_study.tables / "deployment.csv").query("strategy == 'separate'").set_index("method")
    deployment = verdict[verdict["criterion"] == "deployment"].set_index("method")
    assert list(served.index) == list(METHODS) and served["status"].eq("ok").all()
    assert deployment["value"].to_dict() == pytest.approx((served["overhead_vs_full"] - 1).to_dict())
    assert versus.loc[list(METHODS), "separate_over_merged"].to_dict() == pytest.approx(
        served["overhead_vs_merged"].to_dict()
    )
    assert pd.isna(versus.loc["full", "separate_over_merged"])
    checks = pd.read_csv(methods_study.tables / "deployment_checks.csv")
    merged = checks.query("check == 'merged_vs_separate' and task == 'sst2'")
    assert list(merged["method"]) == list(METHODS) and checks["passed"].all()  # merged = unmerged, each method
    assert (
        "full − dora"
        in verdict.loc[(verdict["method"] == "dora") & (verdict["criterion"] == "quality"), "rule"].iloc[0]
    )
    rates = verdict[verdict["criterion"].str.startswith("failure rate")]
    assert list(rates["method"]) == [*METHODS, "full"]
    # statistics: each against full FT, then each pair of the others
    compared = pd.read_csv(methods_study.tables / "statistics.csv").query("kind == 'compare' and task == 'sst2'")
    others = list(METHODS)
    pairs = [f"{m}-full" for m in others] + [f"{a}-{b}" for i, a in enumerate(others) for b in others[i + 1 :]]
    assert list(dict.fromkeys(compared["method"])) == pairs
    drift = pd.read_csv(methods_study.tables / "drift_statistics.csv").query("task == 'sst2'")
    assert list(dict.fromkeys(drift["method"])) == [*METHODS, "full"]
    assert drift.loc[drift["method"] == "full", "drift_reduction"].isna().all()
    report = (methods_study.root / "report.md").read_text()
    assert report.startswith(
        "# lorascope report — smoke\n\nLoRA, dora, rslora, pissa, ia3, loha, lokr, vera against full FT"
    )
    assert "| **sst2** | **dora recommended** = quality and (drift or deployment) |" in report
    assert "| sst2 | quality gap: full FT − dora (one-sided) |" in report
    section = report[report.index("## Methods") : report.index("## Training cost")]
    assert all(f"| {method_label(m)} | " in section for m in METHODS) and "report_methods_tradeoff.png" in section
    assert "| against full FT |" in section


def test_merged_minus_base_equals_the_lora_factors(methods_study, tiny_bert_dir):
    base = modeling.load_model(str(tiny_bert_dir), ("0", "1"), 0, 0).state_dict()
    for method in ("lora", "rslora", "pissa"):  # pissa's adapter is saved converted: a plain LoRA of rank 2r
        folder = methods_study.run_dir("sst2", method, 42)
        adapter = json.loads((folder / "adapter_config.json").read_text())
        assert change.is_plain_lora(adapter)
        factors = change.lora_deltas(
            load_file(str(folder / "adapter_model.safetensors")),
            base,
            adapter["lora_alpha"],
            adapter["r"],
            adapter["use_rslora"],
        )
        merged = modeling.load_run_model(folder, str(tiny_bert_dir), ("negative", "positive"), 0).state_dict()
        by_merge = {module: delta for module, _, delta in change.merged_deltas(merged, base)}
        exact = {module: delta for module, _, delta in factors}
        assert set(by_merge) == set(exact), method
        assert max((by_merge[m] - exact[m]).abs().max().item() for m in exact) < 1e-6, method
    assert json.loads((methods_study.run_dir("sst2", "pissa", 42) / "adapter_config.json").read_text())["r"] == 16


def test_each_saved_method_reloads_as_the_model_it_trained(methods_study):
    """The eval accuracy the run recorded, again from the folder alone: DoRA's magnitude vector
    and PiSSA's rewritten base travel with the adapter."""
    task, splits = load_prepared(methods_study, "sst2")
    config = load_config(methods_study.root / "config.yaml")
    tokenizer = modeling.load_tokenizer(config.model.name)
    for method in (*METHODS, "full"):
        folder = methods_study.run_dir("sst2", method, 42)
        model = modeling.load_run_model(folder, config.model.name, task.label_names, tokenizer.pad_token_id)
        again = evaluate_task(
            model,
            splits["eval"],
            task,
            tokenizer=tokenizer,
            batch_size=32,
            device=torch.device("cpu"),
            bf16=runtime.uses_bf16(config.runtime, torch.device("cpu")),
        )
        recorded = json.loads((folder / "metrics.json").read_text())
        assert again.metrics["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-9), method
    saved = load_file(str(methods_study.run_dir("sst2", "dora", 42) / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in key for key in saved)


def test_a_method_named_after_its_type_keeps_its_fingerprint():
    """The built-in lora and full keep the run fingerprints they had before methods had types
    (values computed with the code before; the device fixed so any machine computes them)."""
    config = load_config(None, "quick", ["runtime.device=cpu", "runtime.bf16=false"])
    got = {
        m: runs.run_fingerprint(config, runs.run_setup(config, None, m, 42), "splits-digest") for m in ("lora", "full")
    }
    assert got == {"lora": "b5ea61b4a83c9173", "full": "069a6ed6f31cfe44"}


def test_methods_mapping_defines_and_picks_them():
    config = load_config(
        None,
        "smoke",
        ["methods={dora: {type: lora, use_dora: true, lr: 1.0e-3}, ia3: {type: ia3, lr: 1.0e-2}, full: {}}"],
    )
    assert config.methods == ["dora", "ia3", "full"]
    assert isinstance(config.method("dora"), LoraMethodConfig) and config.method("dora").peft_fields()["use_dora"]
    assert type(config.method("ia3")) is AdapterMethodConfig and config.adapter_methods() == ["dora", "ia3"]
    assert config.method("full").lr == load_config(None, "smoke").training.full.lr  # {} keeps the profile's


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["methods=[dora, full]"], "methods: dora is not defined; define it as training.dora"),
        (["training.x={type: lora, lr: 1.0e-3, use_dorra: true}", "methods=[x]"], "did you mean 'use_dora'?"),
        (["training.x={type: lorra, lr: 1.0e-3}", "methods=[x]"], "type 'lorra' is neither full nor a PEFT type"),
        (
            ["training.x={type: ia3, lr: 1.0e-3, r: 4}", "methods=[x]"],
            "'r' is neither an optimiser hyperparameter nor a field of PEFT's IA3Config",
        ),
        (["training.x={lr: 1.0e-3}", "methods=[x]"], "training: x is not a method; a method of your own needs a type"),
        (["training.lroa.r=4"], "lroa is not a method; a method of your own needs a type (did you mean 'lora'?)"),
        (["methods=[lora, lora]"], "a method is named twice"),
        (["deploy.methods=[full]"], "deploy.methods: full is not a further adapter method of `methods`"),
        (["training.x={type: prompt_tuning, lr: 1.0e-2}", "methods=[x]"], "learns prompts, which PEFT cannot merge"),
        (["analysis.reference=dora"], "analysis.reference: dora is not one of methods"),
        (
            [
                "training.x={type: ia3, lr: 1.0e-3, target_modules: [query], feedforward_modules: [value]}",
                "methods=[x]",
            ],
            "PEFT refuses it: `feedforward_modules` should be a subset of `target_modules`",
        ),
    ],
)
def test_a_bad_method_is_one_line_and_exit_2_before_any_stage(overrides, message, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["run", "--profile", "smoke", "--out", str(out)]
    assert main([*argv, *(item for o in overrides for item in ("--set", o))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert "did you mean 'lr'" not in err  # IA3's r is LoRA's field, not a typo of the learning rate
    assert not out.exists()


def test_a_method_given_twice_in_a_yaml_file_is_refused(tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text("methods:\n  dora: {type: lora, use_dora: true, lr: 1.0e-3}\n  dora: {type: lora, lr: 1.0e-3}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err.strip()
    assert "key 'dora' is given twice" in err and len(err.splitlines()) == 1


def test_the_rank_sweep_figure_has_one_point_per_rank_and_full_ft_as_a_line():
    config = yaml.safe_load(to_yaml(load_config(None, "rank-sweep")))
    ranks = methods_report.sweep_ranks(config)
    assert ranks == {"lora_r1": 1, "lora_r4": 4, "lora_r16": 16, "lora_r64": 64, "lora_r256": 256}
    assert methods_report.sweep_ranks(yaml.safe_load(to_yaml(load_config(None, "methods")))) == {"lora": 8}
    rows = [
        {
            "task": "sst2",
            "method": m,
            "metric": "accuracy",
            "quality_mean": 0.8 + r / 1e4,
            "quality_low": 0.79,
            "quality_high": 0.9,
            "drift_mean": 0.01 * r,
            "drift_low": 0.0,
            "drift_high": 0.05 * r,
            "forgetting_pp": 0.1,
            "forgetting_low": 0.0,
            "forgetting_high": 0.2,
        }
        for m, r in [*ranks.items(), ("full", 512)]
    ]
    figure = methods_report.rank_figure(pd.DataFrame(rows), ["sst2"], ranks)
    quality, drift, _ = figure.axes
    assert list(quality.lines[0].get_xdata()) == [1, 4, 16, 64, 256]  # one point per rank, in rank order
    assert list(drift.lines[0].get_ydata()) == pytest.approx([0.01, 0.04, 0.16, 0.64, 2.56])
    assert quality.lines[-1].get_ydata()[0] == pytest.approx(0.8 + 512 / 1e4)  # full FT's dashed line
    assert methods_report.rank_figure(pd.DataFrame(rows), ["sst2"], {"lora": 8}) is None  # one rank: no sweep
    unprobed = methods_report.rank_figure(pd.DataFrame(rows).assign(forgetting_pp=float("nan")), ["sst2"], ranks)
    forgetting = unprobed.axes[2]  # the task a study probes has no forgetting: said, not an empty axis
    assert not forgetting.lines and [t.get_text() for t in forgetting.texts] == ["not measured"]
