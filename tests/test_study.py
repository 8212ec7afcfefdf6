import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorascope.atomic import PARTIAL, atomic_dir
from lorascope.config_io import to_yaml
from lorascope.errors import InputError
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
    import shutil

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
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    first_run = Study(out).run_dir("sst2", "lora", 1) / "metrics.json"
    deadline = time.time() + 240
    while not first_run.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert first_run.exists(), "the first run never finished"
    time.sleep(0.5)  # well into the next run
    process.send_signal(signal.SIGKILL)
    process.wait()
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
