"""The command line: help everywhere, bad input is one clear line and exit code 2."""

import json

import pytest

from lorascope.cli import build_parser, main
from lorascope.stages import STAGES

SUBCOMMANDS = ("run", *(stage.name for stage in STAGES), "verify", "bench")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: lorascope " + command in capsys.readouterr().out


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS)
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(SUBCOMMANDS)


def _fails_with(argv, message, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    return err


@pytest.fixture()
def tiny_args(tiny_config, tmp_path):
    """CLI args for the tiny config, written as a YAML file."""
    from lorascope.config_io import to_yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(to_yaml(tiny_config))
    return [str(path), "--out", str(tmp_path / "study")]


def test_unknown_config_key(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("modle:\n  name: x\n")
    _fails_with(["run", str(path)], "unknown key 'modle' (did you mean 'model'?)", capsys)


def test_wrong_type_and_missing_key_in_set(tiny_args, capsys):
    _fails_with(["run", *tiny_args, "--set", "training.lora.r=eight"], "training.lora.r", capsys)
    _fails_with(["run", *tiny_args, "--set", "training.lora.rr=8"], "no key 'rr' in training.lora", capsys)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("deploy.grid.batch_sizes=[0]", "deploy.grid.batch_sizes.0: Input should be greater than 0"),
        ("deploy.grid.batch_sizes=[]", "deploy.grid.batch_sizes: List should have at least 1 item"),
        ("deploy.grid.seq_lens=[natural, 0]", "deploy.grid.seq_lens.1"),
        ("deploy.strategies=[separate, vllm]", "deploy.strategies.1: Input should be 'base', 'full'"),
        (
            "deploy.grid.batch_sizes=[4, 8]",
            "the deployment criterion reads batch size 1, natural length, strategies separate "
            "and full; deploy.grid.batch_sizes lacks 1",
        ),
    ],
)
def test_bad_deploy_settings_stop_before_anything_runs(tiny_args, tmp_path, setting, message, capsys):
    _fails_with(["run", *tiny_args, "--set", setting], message, capsys)
    assert not (tmp_path / "study").exists()  # nothing was started: no study directory at all


def test_unknown_task(tiny_args, capsys):
    _fails_with(["run", *tiny_args, "--set", "tasks.cola={}"], "unknown task 'cola'", capsys)


def test_missing_dataset_and_model(tiny_args, tmp_path, capsys):
    _fails_with(["run", *tiny_args, "--set", f"data.glue={tmp_path}/nowhere"], "dataset folder not found", capsys)
    _fails_with(["run", *tiny_args, "--set", f"model.name={tmp_path}/no-model"], "no model found", capsys)


def _custom(tmp_path, header, rows):
    path = tmp_path / f"data-{len(rows)}-{header.replace(',', '')}.csv"
    path.write_text(header + "\n" + "".join(f"{r}\n" for r in rows))
    return path


def test_bad_data_is_caught_before_training(tiny_args, tmp_path, capsys):
    good = _custom(tmp_path, "text,label", [f"example {i},{i % 2}" for i in range(20)])
    missing_column = _custom(tmp_path, "sentence,label", [f"example {i},{i % 2}" for i in range(20)])
    bad_labels = _custom(tmp_path, "text,label", [f"example {i},{i % 3}" for i in range(20)])
    empty = _custom(tmp_path, "text,label", [])

    def task(train, evaluation=good):
        return [
            "--set",
            f"tasks={{mine: {{source: {train}, eval_source: {evaluation}, text: text, label_names: [a, b]}}}}",
        ]

    _fails_with(["run", *tiny_args, *task(missing_column)], "missing column(s) ['text']", capsys)
    _fails_with(["run", *tiny_args, *task(bad_labels)], "labels outside the label set ['a', 'b']: [2]", capsys)
    _fails_with(["run", *tiny_args, *task(good, empty)], "the split is empty", capsys)
    assert not (tmp_path / "study" / "runs").exists()  # nothing trained on bad data


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "run", str(tmp_path / "none.yaml")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_stage_commands_need_a_study(tmp_path, capsys):
    _fails_with(["train", str(tmp_path)], "is not a study directory", capsys)


def test_single_run_uses_the_same_code_path(tiny_args, tmp_path, capsys):
    config_path, _, out = tiny_args
    assert (
        main(["train", "--config", config_path, "--out", out, "--task", "rte", "--method", "lora", "--seed", "7"]) == 0
    )
    metrics = json.loads((tmp_path / "study" / "runs" / "rte" / "lora" / "seed7" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["method"] == "lora" and metrics["seed"] == 7
    assert (tmp_path / "study" / "tables" / "performance.csv").is_file()
    # into the same study, a second run keeps the first and the study's config
    assert main(["train", out, "--task", "rte", "--method", "full", "--seed", "7"]) == 0
    assert len(list((tmp_path / "study" / "runs" / "rte").glob("*/seed7/metrics.json"))) == 2
    _fails_with(["train", out, "--task", "rte"], "a single run needs --method, --seed", capsys)


def test_out_naming_another_study_is_refused_before_anything_runs(tiny_args, tiny_llama_dir, capsys):
    """--out naming the folder of another study (another model, max_length or data settings:
    nothing there could be reused, every run would be overwritten) is one line and exit 2, and
    nothing there changes; a change that leaves outputs to reuse (a learning rate) is the same
    study."""
    from pathlib import Path

    from lorascope.config_io import load_config
    from lorascope.stages import BY_NAME
    from lorascope.study import run_stages

    config_path, _, out = tiny_args
    run_stages(load_config(config_path), Path(out), [BY_NAME["prepare"]])

    def files() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.name != ".lock"}

    before = files()
    for setting, key in (
        (f"model.name={tiny_llama_dir}", "model.name"),
        ("model.max_length=32", "model.max_length"),
        ("data.split_seed=1", "data"),
    ):
        _fails_with(
            ["run", *tiny_args, "--set", setting],
            f"{out} holds another study (its {key} differs from this config's, so nothing there could be reused); "
            "choose another --out, or delete that folder to start over",
            capsys,
        )
    assert files() == before  # no run, and config.yaml and the manifest as they were
    run_stages(load_config(config_path, None, ["training.lora.lr=1e-3"]), Path(out), [BY_NAME["prepare"]])


@pytest.fixture()
def drift_args(tmp_path):
    """Small probe, few resamples: seconds on the tiny BERT."""
    return [
        "--profile",
        "smoke",
        "--task",
        "rte",
        "--set",
        "tasks={rte: {train_max: 48, eval_max: 40}}",
        "--set",
        "data.probe_size=24",
        "--set",
        "model.max_length=32",
        "--set",
        "drift.bootstrap=20",
        "--set",
        "represent.batch_size=8",
        "--set",
        "runtime.progress=false",
    ]


def _drift_tables(out):
    import pandas as pd

    layers, summary = pd.read_csv(out / "drift_layers.csv"), pd.read_csv(out / "drift_summary.csv")
    assert list(layers.columns[:10]) == [
        "task",
        "comparison",
        "method",
        "seed",
        "layer",
        "pooling",
        "measure",
        "value",
        "ci_low",
        "ci_high",
    ]
    assert list(summary.columns[:6]) == ["task", "method", "seed", "pooling", "measure", "mean_over_layers"]
    assert set(layers["comparison"]) == {"base_vs_base", "shuffled_base", "run_vs_base"}
    assert layers[layers.comparison == "base_vs_base"].query("measure != 'cosine'")["value"].sub(1).abs().max() < 1e-6
    return layers[(layers.comparison == "run_vs_base") & (layers.measure == "linear_cka")]


def test_single_drift_of_a_full_model_and_of_an_adapter(tiny_bert_dir, drift_args, tmp_path, capsys):
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    same = tmp_path / "same"
    base = ["--base", str(tiny_bert_dir)]
    assert main(["drift", *base, "--model", str(tiny_bert_dir), "--out", str(same), *drift_args]) == 0
    printed = capsys.readouterr().out
    assert "run_vs_base" in printed and "base_vs_base" in printed and "shuffled_base" in printed
    identical = _drift_tables(same)
    assert set(identical["method"]) == {"full"} and len(identical) > 0
    assert identical["value"].sub(1).abs().max() < 1e-6  # the base against itself: CKA 1 at every layer

    torch.manual_seed(3)
    perturbed = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    with torch.no_grad():
        for name, param in perturbed.named_parameters():
            if "encoder.layer" in name and name.endswith("weight"):
                param.add_(3 * param.std() * torch.randn_like(param))
    perturbed.save_pretrained(tmp_path / "perturbed")
    full = tmp_path / "full"
    assert main(["drift", *base, "--model", str(tmp_path / "perturbed"), "--out", str(full), *drift_args]) == 0
    moved = _drift_tables(full)
    assert (moved[moved.layer > 0]["value"] < 0.999).all()  # every block's output moved

    backbone = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"], init_lora_weights=False)
    get_peft_model(backbone, config).save_pretrained(tmp_path / "adapter")  # random B: the adapter changes the model
    lora = tmp_path / "lora"
    assert main(["drift", *base, "--adapter", str(tmp_path / "adapter"), "--out", str(lora), *drift_args]) == 0
    adapted = _drift_tables(lora)
    assert set(adapted["method"]) == {"lora"}
    assert (adapted[adapted.layer > 0]["value"] < 0.999).all()


def test_single_drift_bad_input(tiny_bert_dir, tmp_path, capsys):
    base = ["--base", str(tiny_bert_dir)]
    _fails_with(["drift"], "exactly one of STUDY or --base", capsys)
    model = ["--model", str(tiny_bert_dir)]
    _fails_with(["drift", str(tmp_path), *base, *model], "exactly one of STUDY or --base", capsys)
    _fails_with(["drift", str(tmp_path), "--task", "sst2"], "--task only go with --base", capsys)
    _fails_with(["drift", *base], "exactly one of --model", capsys)
    _fails_with(["drift", *base, *model, "--adapter", str(tmp_path)], "exactly one of --model", capsys)
    _fails_with(["drift", "--base", str(tmp_path / "nowhere"), *model], "--base: no model found", capsys)
    _fails_with(["drift", *base, "--model", str(tmp_path / "nowhere")], "--model: no model found", capsys)
    _fails_with(["drift", *base, "--adapter", str(tmp_path)], "--adapter: no adapter found", capsys)
    _fails_with(["drift", str(tmp_path)], "is not a study directory", capsys)  # the stage form still parses
