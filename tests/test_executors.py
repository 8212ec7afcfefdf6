"""Executors (lorascope.executors): a local process pool and Ray run the same grid as serial with
identical results; a worker killed mid-unit is replaced and the unit redone; a driver killed
with -9 leaves no worker behind and the rerun redoes only what was not finished; bad
--workers / --ray values stop with exit 2 before anything is written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

import pool_units
from conftest import installed
from lorascope import executors
from lorascope.cli import main
from lorascope.config import RuntimeConfig
from lorascope.config_io import to_yaml
from lorascope.errors import InputError
from lorascope.stages import with_inputs
from lorascope.study import Study, run_stages

RESULT_KEYS = (
    "status",
    "steps",
    "tokens_seen",
    "head_init_digest",
    "data_order_digest",
    "best_step",
    "dev_accuracy",
    "eval_loss",
    "eval_accuracy",
    "eval_f1",
)


def _grid_results(study: Study) -> dict:
    """What a run's numbers are: its metrics (no timings), its predictions and its saved weights."""
    out = {}
    for metrics_path in sorted(study.root.glob("runs/*/*/seed*/metrics.json")):
        folder = metrics_path.parent
        metrics = json.loads(metrics_path.read_text())
        weights = next(folder.glob("*.safetensors"))
        out[str(folder.relative_to(study.root))] = (
            {k: metrics.get(k) for k in RESULT_KEYS},
            (folder / "predictions.csv").read_text(),
            {name: tensor.tolist() for name, tensor in sorted(load_file(str(weights)).items())},
        )
    return out


def _with_runtime(config, **runtime):
    return config.model_copy(update={"runtime": config.runtime.model_copy(update=runtime)})


@pytest.fixture(scope="module")
def serial_results(tiny_config, tmp_path_factory):
    study = run_stages(
        _with_runtime(tiny_config, workers=1, threads=1), tmp_path_factory.mktemp("serial"), with_inputs("train")
    )
    return _grid_results(study)


@pytest.fixture(scope="module")
def tiny_config(tiny_study_config):  # module scope: shared by the serial reference and both executors
    return tiny_study_config("seeds=[42, 7]")


def test_process_pool_grid_equals_serial(tiny_config, serial_results, tmp_path):
    study = run_stages(_with_runtime(tiny_config, workers=2, threads=1), tmp_path, with_inputs("train"))
    results = _grid_results(study)
    assert len(results) == 4 and all(r[0]["status"] == "ok" for r in results.values())
    assert results == serial_results
    # and a study finished on the pool is current for serial: nothing is trained again
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/*/seed*/metrics.json")}
    run_stages(_with_runtime(tiny_config, workers=1, threads=1), tmp_path, with_inputs("train"))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/*/seed*/metrics.json")} == before


@pytest.mark.skipif(not installed("ray"), reason="Ray not installed (pip install 'lorascope[ray]')")
def test_ray_local_grid_equals_serial(tiny_config, serial_results, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # "local" starts its own instance, never joins this one
    study = run_stages(
        _with_runtime(tiny_config, ray_address="local", workers=2, threads=1), tmp_path, with_inputs("train")
    )
    assert _grid_results(study) == serial_results
    import ray

    assert not ray.is_initialized(), "the local Ray instance stops with the study"


def test_pool_replaces_a_killed_worker_and_redoes_its_unit(tmp_path):
    pool = executors.LocalPool(workers=2, threads=1)
    units = [executors.Unit(pool_units.record_pid, (str(tmp_path), name), name) for name in ("a", "victim", "b", "c")]
    try:
        results = dict(pool.map(units))
    finally:
        pool.close()
    assert sorted(results) == [0, 1, 2, 3]
    assert len(list(tmp_path.glob("victim-*"))) == 2, "the killed unit ran again, once"
    assert all(isinstance(results[i][0], int) for i in results)


def test_pool_gives_up_on_a_unit_that_always_kills_its_worker():
    pool = executors.LocalPool(workers=1, threads=1, retries=1)
    try:
        with pytest.raises(RuntimeError, match=r"a worker died 2 times while running doomed"):
            list(pool.map([executors.Unit(pool_units.kill_myself, (), "doomed")]))
    finally:
        pool.close()


def test_driver_killed_leaves_no_worker_and_rerun_keeps_finished_runs(tiny_config, tmp_path):
    config_path = tmp_path / "study.yaml"
    config_path.write_text(to_yaml(_with_runtime(tiny_config, workers=2, threads=1)))
    out = tmp_path / "study"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    command = [sys.executable, "-m", "lorascope", "run", str(config_path), "--out", str(out)]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(out.glob("runs/*/*/seed*/metrics.json")) and time.monotonic() < deadline:
        assert driver.poll() is None, "the study ended before a run finished"
        time.sleep(0.2)
    workers = psutil.Process(driver.pid).children(recursive=True)
    assert len(workers) >= 2
    driver.kill()
    driver.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "workers die with their driver"
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/seed*/metrics.json")}
    assert finished
    resume = [sys.executable, "-m", "lorascope", "train", str(out)]  # the grid only; `run` would go on to the report
    assert subprocess.run(resume, env=env, capture_output=True, check=False).returncode == 0
    assert len(list(out.glob("runs/*/*/seed*/metrics.json"))) == 4
    assert not list(out.glob("runs/**/.partial-*")), "half-written runs were cleaned up"
    assert {p: p.stat().st_mtime_ns for p in finished} == finished, "finished runs were not trained again"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--workers", "0"], "runtime.workers"),
        (["--workers", str(executors.cores() + 1)], "cores"),
        (["--ray", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
        (["--ray", "nonsense"], "is not local, auto, host:port"),
    ],
)
def test_bad_executor_flags_exit_2_before_anything_is_written(flags, message, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["run", "--profile", "smoke", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_ray_missing_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InputError, match=r"Ray is not installed; pip install 'lorascope\[ray\]'"):
        executors.for_runtime(RuntimeConfig(ray_address="local"))


def test_auto_workers_on_cpu_are_one_per_core_and_explicit_workers_split_the_cores(monkeypatch):
    for cores, expected in ((1, 1), (2, 2), (3, 3), (16, executors.MAX_CPU_WORKERS)):
        monkeypatch.setattr(executors, "cores", lambda cores=cores: cores)
        executor = executors.for_runtime(RuntimeConfig(device="cpu"))
        assert executor.workers == expected
        if expected == 1:
            assert isinstance(executor, executors.Serial)
        else:
            assert isinstance(executor, executors.LocalPool) and executor.threads == cores // expected
    monkeypatch.undo()
    if executors.cores() >= 2:
        pool = executors.for_runtime(RuntimeConfig(workers=2))
        assert pool.workers == 2 and pool.threads == executors.cores() // 2


def test_progress_has_a_line_per_finished_unit_with_its_result_time_and_place(capsys):
    units = [executors.Unit(pool_units.square, (n,), f"unit {n}") for n in (2, 3)]
    with executors.started(RuntimeConfig(workers=2, threads=1)):
        results = executors.run_units(units, "squares", describe=lambda r: f"square {r}")
    assert results == [4, 9]
    captured = capsys.readouterr()  # the lines go to stdout (tqdm.write), the bar to stderr
    for n in (2, 3):
        assert re.search(rf"unit {n}: square {n * n} \(\d+\.\d s, \S+ pid \d+\)", captured.out)
    assert "squares" in captured.err and "2/2" in captured.err
