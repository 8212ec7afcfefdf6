"""The command line: help everywhere, bad input is one clear line and exit code 2."""

import json

import pytest

from lorascope.cli import build_parser, main

SUBCOMMANDS = ("run", "prepare", "baselines", "tune", "train", "represent", "drift", "weights", "deploy", "analyze", "report", "bench")


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
    from lorascope.config import to_yaml

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
        return ["--set", f"tasks={{mine: {{source: {train}, eval_source: {evaluation}, text: text, label_names: [a, b]}}}}"]

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
    assert main(["train", "--config", config_path, "--out", out, "--task", "rte", "--method", "lora", "--seed", "7"]) == 0
    metrics = json.loads((tmp_path / "study" / "runs" / "rte" / "lora" / "seed7" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["method"] == "lora" and metrics["seed"] == 7
    assert (tmp_path / "study" / "tables" / "performance.csv").is_file()
    # into the same study, a second run keeps the first and the study's config
    assert main(["train", out, "--task", "rte", "--method", "full", "--seed", "7"]) == 0
    assert len(list((tmp_path / "study" / "runs" / "rte").glob("*/seed7/metrics.json"))) == 2
    _fails_with(["train", out, "--task", "rte"], "a single run needs --method, --seed", capsys)
