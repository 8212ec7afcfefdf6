"""Optuna search: spaces checked before any trial, dev-only objective through train_run,
reproducible and resumable sequences, stale trials retried, several worker processes on one
storage (journal file, SQLite, a real PostgreSQL server), and the tuned outputs."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import filelock
import optuna
import pandas as pd
import pytest
import torch
import yaml
from optuna.trial import TrialState

from lorascope import executors, optuna_storage, tuning
from lorascope.config_io import load_config, to_yaml, validate
from lorascope.errors import InputError
from lorascope.optuna_search import TrialSeededTPE
from lorascope.prepared import prepare_tasks
from lorascope.study import Study

SPACES = [
    "tune.spaces.lora={lr: {low: 1.0e-3, high: 1.0e-1, log: true}, alpha: {choices: [8, 16]}, r: {low: 2, high: 8},"
    " epochs: null, warmup_ratio: null, weight_decay: null, dropout: null}",
    "tune.spaces.full={lr: {low: 1.0e-4, high: 1.0e-2, log: true}, warmup_ratio: {low: 0.0, high: 0.2},"
    " epochs: null, weight_decay: null}",
]


def _config(model_dir, *overrides):
    """One task, 48 training examples, 3 steps per trial with a dev evaluation after each."""
    return load_config(
        None,
        "smoke",
        [
            f"model.name={model_dir}",
            "model.max_length=48",
            "tasks={sst2: {train_max: 48, eval_max: 40}}",
            "data.dev_max=16",
            "data.probe_size=16",
            "runtime.progress=false",
            "training.lora.eval_every=1",
            "training.full.eval_every=1",
            "tune.trials=3",
            "tune.startup_trials=1",
            *SPACES,
            *overrides,
        ],
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def searched(tiny_bert_dir, tmp_path_factory):
    """A finished 3-trial search for LoRA and for full fine-tuning."""
    config = _config(tiny_bert_dir, "methods=[lora, full]")
    study = Study(tmp_path_factory.mktemp("searched"))
    records = tuning.tune_study(study, config)
    return config, study, records


def _trials(study, config, method="lora", task="sst2", storage=None):
    backend = optuna_storage.open_storage(study.root, config, storage)
    return optuna.load_study(study_name=tuning.study_name(study, config, task, method), storage=backend.storage).trials


def _sequence(trials):
    return [(t.number, t.params) for t in trials if t.state in tuning.FINISHED]


# ---------------------------------------------------------------- search spaces


def test_default_spaces_cover_the_profile_learning_rates():
    for profile in ("quick", "smoke"):
        config = load_config(None, profile)
        assert not config.tune.enabled and config.tune.startup_trials < config.tune.trials
        for method in ("lora", "full"):
            lr = config.search_space(method).lr
            assert lr.log and lr.low <= config.method(method).lr <= lr.high
    lora, full = config.search_space("lora"), config.search_space("full")
    assert lora.lr.high / full.lr.high >= 10  # LoRA wants higher learning rates
    assert {"lr", "alpha", "dropout", "warmup_ratio", "weight_decay", "epochs"} <= set(lora.params())
    assert {"lr", "warmup_ratio", "weight_decay", "epochs"} == set(full.params())
    assert lora.r is None  # rank: optional


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"lora": {"lr": {"low": 1e-2, "high": 1e-4}}}, "tune.spaces.lora.lr: low 0.01 > high 0.0001"),
        ({"lora": {"learning_rate": {"low": 1e-4, "high": 1e-2}}}, "tune.spaces.lora.learning_rate: unknown parameter"),
        ({"full": {"r": {"choices": [4, 8]}}}, "tune.spaces.full.r: 'r' is not a hyperparameter of method full"),
        ({"full": {"alpha": {"low": 8, "high": 32}}}, "tune.spaces.full.alpha: 'alpha' is not a hyperparameter"),
        ({"lora": {"batch_size": {"choices": [8, 16]}}}, "tune.spaces.lora.batch_size cannot be searched"),
        ({"lora": {"dropout": {"low": 0.0, "high": 1.5}}}, "tune.spaces.lora.dropout.high: 1.5 is not a valid dropout"),
        ({"lora": {"r": {"low": 2, "high": 8.5}}}, "tune.spaces.lora.r.high: 8.5 is not a valid r"),
        ({"lora": {"lr": {"low": 0.0, "high": 1e-3, "log": True}}}, "a log range needs low > 0"),
        ({"lora": {"lr": {"low": 1e-4}}}, "a range needs both `low` and `high`"),
        ({"lora": {"alpha": {"choices": []}}}, "`choices` must not be empty"),
        ({"lora": {"scheduler": {"choices": ["linear", "cosin"]}}}, "'cosin' is not a valid scheduler"),
    ],
)
def test_invalid_spaces_are_rejected_with_the_dotted_key(space, expected):
    with pytest.raises(InputError, match=r"^config: ") as err:
        validate({"tune": {"spaces": space}})
    assert expected in str(err.value)


def test_startup_trials_must_be_fewer_than_trials():
    with pytest.raises(InputError, match=r"tune.startup_trials \(8\) must be below tune.trials \(8\)") as err:
        validate({"tune": {"trials": 8, "startup_trials": 8}}, source="tune")
    assert str(err.value).startswith("tune: tune.startup_trials (8)")  # one prefix, no "Value error"


def test_fewer_trials_than_startup_trials_take_one_startup_trial_less(capsys):
    config = load_config(None, "quick")  # tune.startup_trials 8
    assert tuning.startup_below(config, 2).tune.startup_trials == 1
    assert "2 trials are not more than tune.startup_trials (8): using 1 random" in capsys.readouterr().err
    assert tuning.startup_below(config, 20) is config


def test_a_bad_search_stops_before_any_trial(tiny_bert_dir, tmp_path, monkeypatch):
    config = _config(tiny_bert_dir, "methods=[lora]", "tune.startup_trials=2")
    monkeypatch.setattr(tuning, "train_run", lambda *a, **k: pytest.fail("a trial ran"))
    study = Study(tmp_path)
    with pytest.raises(InputError, match="--trials must be at least 2"):
        tuning.tune_study(study, config, trials=1)
    bad = config.model_copy(update={"tune": config.tune.model_copy(update={"startup_trials": 9})})  # not validated
    with pytest.raises(InputError, match=r"must be below tune\.trials"):
        tuning.tune_study(study, bad)
    with pytest.raises(InputError, match="--task cola: not a task of this study"):
        tuning.tune_study(study, config, tasks=["cola"])
    assert not (tmp_path / "tune").exists()


# ---------------------------------------------------------------- trials


def test_trials_train_through_train_run_and_are_scored_on_dev_only(searched):
    """Same code path and batch size as `train`; eval is never scored; the value is the dev
    metric of the selected checkpoint, and each dev evaluation was reported to the trial."""
    config, study, _ = searched
    for method in ("lora", "full"):
        trials = [t for t in _trials(study, config, method) if t.state == TrialState.COMPLETE]
        assert trials
        for trial in trials:
            run = study.root / "tune" / "sst2" / method / f"trial{trial.number:04d}"
            metrics = json.loads((run / "metrics.json").read_text())
            assert not [k for k in metrics if k.startswith("eval_")] and metrics["primary_value"] is None
            assert not list(run.glob("*.safetensors")) and not (run / "predictions.csv").exists()
            history = pd.read_csv(run / "history.csv").dropna(subset=["dev_accuracy"])
            assert trial.value == metrics["dev_accuracy"] == history["dev_accuracy"].max()
            assert sorted(trial.intermediate_values) == [1, 2, 3]  # eval_every=1, 3 steps
            assert list(trial.intermediate_values.values()) == history["dev_accuracy"].tolist()[:3]
            resolved = json.loads((run / "hparams.json").read_text())
            assert resolved["trainer"]["per_device_train_batch_size"] == getattr(config.training, method).batch_size
            assert resolved["trainer"]["learning_rate"] == pytest.approx(trial.params["lr"])
            if method == "lora":
                assert resolved["peft"]["r"] == trial.params["r"]
                assert resolved["peft"]["lora_alpha"] == trial.params["alpha"]
            else:
                assert resolved["configured"]["warmup_ratio"] == pytest.approx(trial.params["warmup_ratio"])


def test_same_config_and_seed_give_the_same_trials_and_a_rerun_continues(searched, tmp_path):
    """A fresh storage replays the search trial for trial; stopped after 2 trials and rerun to 3
    it continues without repeating, and ends with the same 3 trials as the uninterrupted search."""
    config, reference, _ = searched
    study = Study(tmp_path)
    tuning.tune_study(study, config, methods=["lora"], trials=2)
    assert _sequence(_trials(study, config)) == _sequence(_trials(reference, config))[:2]
    tuning.tune_study(study, config, methods=["lora"])  # tune.trials = 3
    trials = _trials(study, config)
    assert [t.number for t in trials] == [0, 1, 2]
    assert _sequence(trials) == _sequence(_trials(reference, config))


def test_a_search_on_the_pool_runs_one_unit_per_worker_on_a_journal_in_the_study(tiny_bert_dir, tmp_path):
    """--workers 2: both searches' trials run in the pool's workers (not the driver), on the
    journal file in the study, exactly 3 finished trials each; the random start-up trials equal
    a serial search's (each is seeded by its number), and the records name the journal."""
    config = _config(tiny_bert_dir, "methods=[lora, full]", "tune.startup_trials=2", "tune.prune=false")
    serial = Study(tmp_path / "serial")
    tuning.tune_study(serial, config)
    pooled = config.model_copy(update={"runtime": config.runtime.model_copy(update={"workers": 2, "threads": 1})})
    study = Study(tmp_path / "pool")
    with executors.started(pooled.runtime):
        records = tuning.tune_study(study, pooled)
    journal = str((study.root / "tune" / "optuna.journal").resolve())
    assert not (study.root / "tune" / "optuna.db").exists()
    for method in ("lora", "full"):
        trials = _trials(study, config, method, storage=journal)
        finished = [t for t in trials if t.state in tuning.FINISHED]
        assert len(finished) == 3 and len({t.number for t in trials}) == len(trials)
        workers = {t.user_attrs["worker"] for t in finished}
        assert f"{socket.gethostname()}:{os.getpid()}" not in workers and len(workers) <= 2
        assert _sequence(trials)[:2] == _sequence(_trials(serial, config, method))[:2]
        assert records["sst2", method]["storage"] == journal
        assert records["sst2", method]["trials"]["complete"] == 3


def test_the_sampler_is_seeded_per_trial_from_the_config_seed():
    def search(seed, n=6):
        ostudy = optuna.create_study(direction="maximize", sampler=TrialSeededTPE(seed, startup_trials=2))
        ostudy.optimize(lambda t: -((t.suggest_float("x", 0, 1) - 0.3) ** 2), n_trials=n)
        return [t.params for t in ostudy.trials]

    assert search(0) == search(0) != search(1)
    assert search(0)[0] != search(1)[0]  # the random start-up trials too


@pytest.mark.parametrize("storage", ["default", "journal"])
def test_a_trial_left_running_by_a_dead_worker_is_failed_and_retried(searched, tiny_bert_dir, tmp_path, storage):
    """A worker killed (SIGKILL) during its third trial; the rerun fails that trial, trains its
    parameters again, and ends with the trials of the uninterrupted search."""
    config = _config(tiny_bert_dir, "methods=[lora]", "tune.heartbeat_s=1")
    url = None if storage == "default" else str(tmp_path / "journal.log")
    study = Study(tmp_path / "study")
    tuning.tune_study(study, config, trials=2, storage=url)
    backend = optuna_storage.open_storage(study.root, config, url)
    sampler = TrialSeededTPE(config.tune.seed, config.tune.startup_trials)
    name = tuning.study_name(study, config, "sst2", "lora")
    ostudy = optuna.load_study(study_name=name, storage=backend.storage, sampler=sampler)
    dead = ostudy.ask()  # the worker sampled its parameters, then was killed
    tuning.trial_hparams(config, "lora", dead)
    dead.set_user_attr("heartbeat", time.time() - 60)  # silent for longer than 4 heartbeats
    tuning.tune_study(study, config, storage=url)
    trials = _trials(study, config, storage=url)
    assert trials[dead.number].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == dead.params
    assert sum(t.state in tuning.FINISHED for t in trials) == 3
    assert [p for _, p in _sequence(trials)] == [p for _, p in _sequence(_trials(searched[1], searched[0]))]
    table = pd.read_csv(study.tables / "trials.csv")
    assert table.set_index("trial").loc[dead.number, "state"] == "FAIL"
    assert table.set_index("trial").loc[retry[0].number, "retry_of"] == dead.number


def test_a_poor_trial_is_pruned_at_a_dev_evaluation(tiny_bert_dir, tmp_path, monkeypatch):
    """The pruner's verdict stops training (nothing is written) and the trial counts as finished;
    with no completed trial there is nothing to train with."""
    config = _config(tiny_bert_dir, "methods=[lora]")
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    study = Study(tmp_path)
    record = tuning.tune_study(study, config, trials=3)["sst2", "lora"]
    assert record["trials"] | {"requested": 0} == {
        "requested": 0,
        "complete": 0,
        "pruned": 3,
        "fail": 0,
        "running": 0,
        "waiting": 0,
        "surplus": 0,
    }
    assert record["best_params"] is None
    table = pd.read_csv(study.tables / "trials.csv")
    assert table["state"].tolist() == ["PRUNED"] * 3 and table["last_step"].tolist() == [1, 1, 1]
    assert not list((tmp_path / "tune" / "sst2" / "lora").iterdir())
    with pytest.raises(InputError, match="no trial of the search completed"):
        tuning.tuned_hparams(study, config, "sst2", "lora")


def test_a_trial_that_raises_is_recorded_and_the_search_goes_on(tiny_bert_dir, tmp_path, monkeypatch):
    """The failed trial does not count and the next one gets new parameters; a search whose
    trials keep failing stops with the error instead of looping."""
    config = _config(tiny_bert_dir, "methods=[lora]")
    calls = []

    def fake_train_run(setup, splits, tokenizer, out_dir):
        calls.append(setup.hp.lr)
        if len(calls) == 2 or fail_always:
            raise RuntimeError("out of memory")
        return {"status": "ok", "best_step": 1, "dev_accuracy": setup.hp.lr}

    fail_always = False
    monkeypatch.setattr(tuning, "train_run", fake_train_run)
    study = Study(tmp_path)
    tuning.tune_study(study, config)
    trials = _trials(study, config)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["error"] == "RuntimeError: out of memory"
    assert trials[2].params != trials[1].params and len(calls) == 4
    assert pd.read_csv(study.tables / "trials.csv")["note"].tolist()[1] == "RuntimeError: out of memory"

    fail_always = True
    with pytest.raises(RuntimeError, match="tune sst2 lora: 3 trials in a row failed; the last: RuntimeError: out of"):
        tuning.tune_study(study, config, trials=5)


def test_an_interrupted_search_resumes_with_the_trials_it_would_have_run(tiny_bert_dir, tmp_path, monkeypatch):
    """Ctrl-C during a trial: the rerun trains that trial's parameters first and continues the
    same sequence as a search that was never interrupted."""
    config = _config(tiny_bert_dir, "methods=[lora]", "tune.trials=4")
    calls = []

    def fake_train_run(setup, splits, tokenizer, out_dir):
        calls.append(setup.hp.lr)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return {"status": "ok", "best_step": 1, "dev_accuracy": setup.hp.lr}

    monkeypatch.setattr(tuning, "train_run", fake_train_run)
    interrupt_at = None
    tuning.tune_study(Study(tmp_path / "once"), config)
    interrupt_at = len(calls) + 2
    study = Study(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        tuning.tune_study(study, config)
    tuning.tune_study(study, config)
    trials = _trials(study, config)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert trials[2].params == trials[1].params and trials[2].user_attrs["retry_of"] == 1
    assert [p for _, p in _sequence(trials)] == [p for _, p in _sequence(_trials(Study(tmp_path / "once"), config))]


# ---------------------------------------------------------------- outputs


def test_outputs_and_the_tuned_hyperparameters_for_train(searched, monkeypatch):
    config, study, records = searched
    with monkeypatch.context() as patch:  # a finished search is not opened again (its storage may be elsewhere)
        patch.setattr(tuning, "open_storage", lambda *a, **k: pytest.fail("storage opened"))
        assert tuning.tune_study(study, config) == records
    for method in ("lora", "full"):
        data = yaml.safe_load((study.root / "tuned" / f"sst2_{method}.yaml").read_text())
        assert data == records["sst2", method]
        trials = _trials(study, config, method)
        best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
        assert (data["best_trial"], data["best_value"], data["best_params"]) == (best.number, best.value, best.params)
        assert data["metric"] == "accuracy" and data["split"] == "dev" and data["train_seed"] == config.seeds[0]
        assert data["trials"]["requested"] == 3 and data["trials"]["complete"] + data["trials"]["pruned"] == 3
        assert data["study_name"] == f"lorascope/smoke/sst2/{method}/" + data["study_name"].rsplit("/", 1)[1]
        assert data["storage"] == f"sqlite:///{(study.root / 'tune' / 'optuna.db').resolve()}"
        assert data["sampler"] == {"name": "TPESampler", "seed": 0, "startup_trials": 1}

        hp, source = tuning.tuned_hparams(study, config, "sst2", method)
        for key, value in best.params.items():
            assert getattr(hp, key) == value and source[key] == "tuned"
        assert hp.batch_size == getattr(config.training, method).batch_size and source["batch_size"] == "config"
        assert set(source) == set(type(hp).model_fields)

    table = pd.read_csv(study.tables / "trials.csv")
    assert table.columns[:6].tolist() == ["task", "method", "trial", "state", "value", "duration_s"]
    assert {"lr", "alpha", "r", "warmup_ratio"} <= set(table.columns)
    assert len(table) == 6 and (table["duration_s"] > 0).all()

    changed = config.model_copy(
        update={
            "training": config.training.model_copy(
                update={"lora": config.training.lora.model_copy(update={"batch_size": 8})}
            )
        }
    )
    with pytest.raises(InputError, match="comes from another search"):
        tuning.tuned_hparams(study, changed, "sst2", "lora")
    more = config.model_copy(update={"tune": config.tune.model_copy(update={"trials": 6})})
    with pytest.raises(InputError, match=r"3 of tune\.trials=6 trials finished"):
        tuning.tuned_hparams(study, more, "sst2", "lora")


def test_storage_arguments(tmp_path):
    config = load_config(None, "smoke")
    assert optuna_storage.open_storage(tmp_path, config, str(tmp_path / "j.log")).kind == "journal"
    with pytest.raises(InputError, match="for SQLite give sqlite:///"):
        optuna_storage.open_storage(tmp_path, config, str(tmp_path / "tune.db"))
    with pytest.raises(InputError, match="cannot open it"):
        optuna_storage.open_storage(tmp_path, config, "nosuchdb://host/x")
    redacted = optuna_storage.redact("postgresql://ann:s3cret@db.example:5432/optuna")
    assert redacted == "postgresql://ann:***@db.example:5432/optuna"


def test_the_default_storage_serves_one_process(tmp_path):
    backend = optuna_storage.open_storage(tmp_path, load_config(None, "smoke"))
    assert backend.kind == "default" and backend.lock_path.parent == (tmp_path / "tune").resolve()
    with (
        filelock.FileLock(backend.lock_path),
        pytest.raises(InputError, match="several workers need a shared --storage"),
        backend.exclusive(),
    ):
        pass


# ---------------------------------------------------------------- parallel workers

WORKER = """
import pathlib, sys, time
import torch, yaml
torch.set_num_threads(1)
from lorascope import tuning
from lorascope.config_io import validate
from lorascope.study import Study
config_path, root, ready, workers, *storages = sys.argv[1:]
config = validate(yaml.safe_load(pathlib.Path(config_path).read_text()))
pathlib.Path(ready).touch()
deadline = time.time() + 120
while len(list(pathlib.Path(ready).parent.glob("*.ready"))) < int(workers) and time.time() < deadline:
    time.sleep(0.05)
for i, storage in enumerate(storages):
    tuning.tune_study(Study(pathlib.Path(root) / str(i)), config, storage=storage)
"""


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server from the Debian binaries, on a free port, as a non-root
    user (initdb refuses root)."""
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb); install Debian's postgresql")
    pytest.importorskip("psycopg", reason="psycopg, SQLAlchemy's driver for postgresql:// URLs, is not installed")
    bindir = Path(initdb[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="lorascope-pg-"))
    as_user = []
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root and no `runuser` to start PostgreSQL as another user")
        shutil.chown(root, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = root / "data"
    subprocess.run(
        [*as_user, bindir / "initdb", "-D", data, "-U", "lorascope", "--auth=trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*as_user, bindir / "pg_ctl", "-D", data, "-o", options, "-l", root / "log", "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://lorascope:not-a-secret@127.0.0.1:{port}/postgres"  # trust auth ignores the password
    finally:
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_postgresql_server_starts(postgres_url):
    """Skipped, with the reason, where the PostgreSQL server binaries are absent; the parallel
    test below then covers the journal file and SQLite only."""
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_url)
    with engine.connect() as connection:
        assert connection.execute(text("select 1")).scalar() == 1
    engine.dispose()


def test_two_worker_processes_fill_one_search(tiny_bert_dir, tmp_path, request):
    """Two processes, each with its own study directory (as on two machines), share a storage:
    a journal file, SQLite, and a real PostgreSQL server when its binaries are installed. Trial
    numbers are unique, exactly the requested trials finish, both workers ran trials, and both
    name the same best trial."""
    storages = {"journal": str(tmp_path / "search.journal"), "sqlite": f"sqlite:///{tmp_path / 'search.db'}"}
    try:
        storages["postgresql"] = request.getfixturevalue("postgres_url")
    except pytest.skip.Exception as skipped:
        print(f"PostgreSQL not tested: {skipped}")
    config = _config(tiny_bert_dir, "methods=[lora]", "tune.prune=false")
    (tmp_path / "config.yaml").write_text(to_yaml(config))
    prepared = Study(tmp_path / "prepared")
    prepare_tasks(prepared, config)
    for i in range(2):
        for s in range(len(storages)):  # spare each worker the tokenizing (their prepare finds it done)
            shutil.copytree(prepared.root / "prepared", tmp_path / f"worker{i}" / str(s) / "prepared")
    env = os.environ | {"TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    workers = []
    for i in range(2):
        args = [tmp_path / "config.yaml", tmp_path / f"worker{i}", tmp_path / f"{i}.ready", 2, *storages.values()]
        log = open(tmp_path / f"worker{i}.log", "w")  # noqa: SIM115 - open while the worker runs, closed below
        workers.append(
            (
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, *map(str, args)], env=env, stdout=log, stderr=subprocess.STDOUT
                ),
                log,
            )
        )
    for process, log in workers:
        process.wait(timeout=300)
        log.close()
    for i, (process, _) in enumerate(workers):
        assert process.returncode == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]

    ran = [0, 0]
    for s, (kind, storage) in enumerate(storages.items()):
        roots = [tmp_path / f"worker{i}" / str(s) for i in range(2)]
        trials = _trials(Study(roots[0]), config, storage=storage)
        numbers = [t.number for t in trials]
        assert len(numbers) == len(set(numbers)), kind
        assert sum(t.state in tuning.FINISHED for t in trials) == 3, kind
        assert len({json.dumps(t.params, sort_keys=True) for t in trials if t.state in tuning.FINISHED}) == 3, kind
        assert all(t.state in tuning.FINISHED or t.user_attrs.get("surplus") for t in trials), kind
        # a worker may get no trial of one storage (the other was faster); over all storages both ran
        dirs = [{p.name for p in (root / "tune" / "sst2" / "lora").glob("trial*")} for root in roots]
        assert not dirs[0] & dirs[1] and dirs[0] | dirs[1] == {
            f"trial{t.number:04d}" for t in trials if t.state in tuning.FINISHED
        }, kind
        ran = [n + len(d) for n, d in zip(ran, dirs)]
        best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
        for root in roots:
            record = yaml.safe_load((root / "tuned" / "sst2_lora.yaml").read_text())
            assert (record["best_trial"], record["best_value"], record["best_params"]) == (
                best.number,
                best.value,
                best.params,
            ), kind
            assert "not-a-secret" not in record["storage"]
    assert all(ran), ran  # both workers trained
