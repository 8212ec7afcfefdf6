"""Optuna hyperparameter search: one study per task x method, scored on the `dev` split (the
reported `eval` split is never handed to a trial), trained by the same `train_run` code path at
the production batch size as the runs it stands for.

Reproducible: the TPE sampler is seeded anew for every trial from (tune.seed, the trial's place
in the search), so the same config gives the same sequence of trials, also across a kill and
a resume. Resumable: finished trials stay in the storage; rerunning continues to the requested
number of finished (complete or pruned) trials; a trial left RUNNING by a killed process is
failed and rerun with its parameters. Scalable: workers on several machines fill one search
through a shared storage (a PostgreSQL / MySQL URL or a journal file); on a study's executor
with several workers (--workers, --ray) each search gets one unit per worker, all filling it."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections import Counter

import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState
from tqdm.auto import tqdm

from lorascope import dependencies, executors, modeling, runs
from lorascope.atomic import atomic_dir
from lorascope.config import StudyConfig
from lorascope.config_io import validate
from lorascope.errors import InputError
from lorascope.hparams import MethodConfig, fingerprint_values
from lorascope.optuna_search import DevReporter, TrialSeededTPE, is_surplus, pruner
from lorascope.optuna_storage import Backend, drop_searches, fail_stale, heartbeat, lost_trials, open_storage
from lorascope.prepared import load_prepared, prepare_tasks, prepared_fingerprint
from lorascope.study import Study, Table, is_current, stamp_of, write_current
from lorascope.training import train_run

# one row per trial; each trial's parameters follow the declared columns
TRIALS = Table(
    "trials",
    (
        "task",
        "method",
        "trial",
        "state",
        "value",
        "duration_s",
        "last_step",
        "last_dev_value",
        "best_step",
        "retry_of",
        "worker",
        "note",
    ),
)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WAIT_S = 1.0  # poll interval while other workers finish the last trials
MAX_FAILURES_IN_A_ROW = 3  # trials that raise; then the search stops with the last error


class SurplusTrial(Exception):
    """Other workers already hold the requested number of trials; this one is dropped (FAIL)."""


class TrialError(Exception):
    """A trial raised (not a config problem): it is recorded as FAIL and the search goes on."""


# ---------------------------------------------------------------- entry points


def tune_study(
    study: Study,
    config: StudyConfig,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    trials: int | None = None,
    storage: str | None = None,
) -> dict[tuple[str, str], dict]:
    """Search every task x method (or the given ones) until `trials` (default tune.trials) trials
    have finished, then write tuned/<task>_<method>.yaml, tables/trials.csv and
    figures/tune_<task>_<method>.png. `storage` (default tune.storage, else a SQLite file in the
    study) is any Optuna storage URL or a journal file path. When the study's tuned files already
    record finished searches of this config, nothing is opened or run. Returns the tuned records."""
    target = trials or config.tune.trials
    config = startup_below(config, target) if trials is not None else config
    check_search(config, target)
    tasks, methods = _select(config, tasks, methods)
    prepare_tasks(study, config, tasks)  # the searches are named by the prepared data's content
    done = {(t, m): _finished_record(study, config, t, m, target) for t in tasks for m in methods}
    if storage is None and config.tune.storage is None:  # a storage given is never checked, never deleted
        _redo_lost(study, done)
    if all(done.values()):  # e.g. filled by workers on a shared storage; nothing left to search
        return done
    workers = executors.current().workers
    backend = open_storage(study.root, config, storage, shared=workers > 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if workers > 1:
        units = [
            executors.Unit(
                search_worker,
                (str(study.root), config, t, m, target, backend.address),
                f"tune {t} {m} worker {k + 1}/{workers}",
            )
            for t in tasks
            for m in methods
            for k in range(workers)
        ]
        executors.run_units(units, "tune", config.runtime.progress, lambda ran: f"{ran} trial(s) run here")
    tokenizer = modeling.load_tokenizer(config.model.name) if workers == 1 else None
    records = {}
    with backend.exclusive():
        for task_name in tasks:
            task, splits = load_prepared(study, task_name)
            for method in methods:
                ostudy = _open_search(study, config, task_name, method, backend)
                if workers == 1:
                    objective = _Objective(study, config, task, method, splits, tokenizer, backend, target)
                    _fill(ostudy, objective, target, backend, config, f"tune {task_name} {method}")
                records[task_name, method] = write_tuned(
                    study, config, task_name, method, task.metric, ostudy, backend, target
                )
        write_trials_table(study, config, backend)
    return records


def _redo_lost(study: Study, done: dict[tuple[str, str], dict | None]) -> None:
    """Searches whose finished trials the study's own storage lost (truncated, deleted, cannot
    be opened) start again from nothing, with one line naming the file: their tuned files are
    rewritten, with the same values when the seeded searches reach the same trials."""
    records = [(str(study.tuned_path(t, m).relative_to(study.root)), r) for (t, m), r in done.items() if r]
    for lost in lost_trials(study.root, records):
        print(f"{lost.file} {lost.why}; redoing {len(lost.searches)} search(es)", file=sys.stderr)
        drop_searches(study.root, lost)
        for key, record in done.items():
            if record is not None and record["study_name"] in lost.searches:
                done[key] = None


def search_worker(root: str, config: StudyConfig, task: str, method: str, target: int, storage: str) -> int:
    """One worker's part of a search on a shared storage (a unit on the study's executor): trials
    until `target` have finished, then wait for the others'. Returns the trials it ran."""
    study, backend = Study(root), open_storage(root, config, storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = _open_search(study, config, task, method, backend)
    prepared, splits = load_prepared(study, task)
    objective = _Objective(
        study, config, prepared, method, splits, modeling.load_tokenizer(config.model.name), backend, target
    )
    _fill(ostudy, objective, target, backend, config, f"tune {task} {method}")
    return sum(t.user_attrs.get("worker") == _worker() for t in ostudy.get_trials(deepcopy=False, states=FINISHED))


def _open_search(study: Study, config: StudyConfig, task: str, method: str, backend: Backend) -> optuna.Study:
    return optuna.create_study(
        storage=backend.storage,
        study_name=study_name(study, config, task, method),
        direction="maximize",
        load_if_exists=True,
        pruner=pruner(config),
        sampler=TrialSeededTPE(config.tune.seed, config.tune.startup_trials),
    )


def _worker() -> str:
    """The process a trial ran in, as its `worker` attribute records it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def tuned_hparams(study: Study, config: StudyConfig, task: str, method: str) -> tuple[MethodConfig, dict[str, str]]:
    """The hyperparameters `train` uses when tune.enabled: training.<method> with the best trial's
    values, and where each value came from ("tuned" or "config"). Refuses a tuned file written
    for another search (data, model, base hyperparameters, space or sampler changed) or one
    whose search has not reached tune.trials finished trials."""
    path = study.tuned_path(task, method)
    if not path.is_file():
        raise InputError(f"no tuned hyperparameters for {task}/{method} ({path}); run `lorascope tune` first")
    if not is_current(path, study_name(study, config, task, method)):
        raise InputError(f"{path} comes from another search than this config's; rerun `lorascope tune`")
    data = yaml.safe_load(path.read_text())
    finished = data["trials"]["complete"] + data["trials"]["pruned"]
    if finished < config.tune.trials:
        raise InputError(
            f"{path}: {finished} of tune.trials={config.tune.trials} trials finished; "
            "rerun `lorascope tune` to finish the search"
        )
    if data.get("best_params") is None:
        raise InputError(f"{path}: no trial of the search completed; nothing to train with")
    hp = hparams_with(config.method(method), data["best_params"], f"{path}: best_params")
    return hp, {key: "tuned" if key in data["best_params"] else "config" for key in type(hp).model_fields}


def _finished_record(study: Study, config: StudyConfig, task: str, method: str, target: int) -> dict | None:
    path = study.tuned_path(task, method)
    if not is_current(path, study_name(study, config, task, method)):
        return None
    data = yaml.safe_load(path.read_text())
    return data if data["trials"]["complete"] + data["trials"]["pruned"] >= target else None


def startup_below(config: StudyConfig, trials: int) -> StudyConfig:
    """With fewer trials than tune.startup_trials, TPE would never leave its random phase: a
    search asked for that way gets trials - 1 start-up trials, and says so."""
    startup = config.tune.startup_trials
    if trials < 2 or startup < trials:
        return config
    print(
        f"tune: {trials} trials are not more than tune.startup_trials ({startup}): using {trials - 1} random "
        "start-up trial(s) before TPE (set tune.startup_trials to choose)",
        file=sys.stderr,
    )
    return config.model_copy(update={"tune": config.tune.model_copy(update={"startup_trials": trials - 1})})


def check_search(config: StudyConfig, trials: int | None = None) -> None:
    """Every rule on tune.* again (a config built with model_copy skipped validation), with
    `trials` as the number of trials; raises InputError before any trial runs."""
    raw = config.model_dump(mode="json")
    if trials is not None:
        if trials < 2:
            raise InputError(f"--trials must be at least 2, got {trials}")
        raw["tune"]["trials"] = trials
    validate(raw, source="tune")


def study_name(study: Study, config: StudyConfig, task: str, method: str) -> str:
    """lorascope/<study>/<task>/<method>/<fingerprint of everything a trial's value depends on>.
    The number of trials is left out, so asking for more continues the same search."""
    space = config.search_space(method)
    fixed = fingerprint_values(method, config.method(method), exclude=set(space.params()))
    fp = dependencies.SEARCH.fingerprint(
        config, prepared_fingerprint(study, task), method=method, fixed=fixed, train_seed=_train_seed(config)
    )
    return f"lorascope/{config.name}/{task}/{method}/{fp}"


def hparams_with(base: MethodConfig, params: dict, where: str = "trial") -> MethodConfig:
    """training.<method> with some values replaced, validated (model_copy would not check)."""
    try:
        return type(base).model_validate({**base.model_dump(), **params})
    except Exception as err:
        raise InputError(f"{where}: {' '.join(str(err).split())}") from None


# ---------------------------------------------------------------- trials


def _fill(ostudy: optuna.Study, objective, target: int, backend: Backend, config: StudyConfig, desc: str) -> None:
    """Run trials until `target` have finished. When the rest are running on other workers, wait
    for them (so every worker writes the same final results), and take over the slot of one
    that fails or whose worker dies. A trial that raises is recorded as FAIL and does not count;
    after MAX_FAILURES_IN_A_ROW of them the search stops with the last error."""
    bar = tqdm(total=target, desc=desc, unit="trial", disable=not config.runtime.progress)
    try:
        while True:
            fail_stale(ostudy, backend, config)
            counts = Counter(t.state for t in ostudy.get_trials(deepcopy=False))
            finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
            bar.update(finished - bar.n)
            if finished >= target:
                return
            taken = finished + counts[TrialState.RUNNING]
            if taken >= target:
                time.sleep(WAIT_S)
                continue
            ostudy.optimize(objective, n_trials=1, catch=(SurplusTrial, TrialError))
            if objective.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise RuntimeError(
                    f"{desc}: {objective.failures_in_a_row} trials in a row failed; the last: {objective.last_error}"
                )
    finally:
        bar.close()


class _Objective:
    """One trial: training.<method> with the trial's values, trained by train_run on train and
    selected on dev; the value is the dev metric of the selected checkpoint."""

    def __init__(self, study, config, task, method, splits, tokenizer, backend, target):
        self.study, self.config, self.task, self.method = study, config, task, method
        self.splits = {"train": splits["train"], "dev": splits["dev"]}  # never the reported eval split
        self.tokenizer, self.backend, self.target = tokenizer, backend, target
        self.failures_in_a_row, self.last_error = 0, None

    def __call__(self, trial: optuna.Trial) -> float:
        self._check_not_surplus(trial)
        trial.set_user_attr("worker", _worker())
        hp = trial_hparams(self.config, self.method, trial)
        reporter = DevReporter(trial, self.task.metric, self.config.tune.prune)
        setup = runs.run_setup(
            self.config,
            self.task,
            self.method,
            _train_seed(self.config),
            hp=hp,
            save_weights=False,
            callbacks=[reporter],
        )
        target = self.study.root / "tune" / self.task.name / self.method / f"trial{trial.number:04d}"
        alive = heartbeat(trial, self.config.tune.heartbeat_s) if self.backend.kind == "journal" else None
        try:
            with alive or contextlib.nullcontext(), atomic_dir(target) as scratch:
                result = train_run(setup, self.splits, self.tokenizer, scratch)
        except (InputError, optuna.TrialPruned):
            raise
        except KeyboardInterrupt:  # Ctrl-C: the rerun trains these parameters first, in this trial's place
            again = {"retry_of": trial.number, "attempt": trial.user_attrs.get("attempt", 0)}
            trial.study.enqueue_trial(trial.params, user_attrs=again)
            raise
        except Exception as err:
            self.failures_in_a_row, self.last_error = self.failures_in_a_row + 1, f"{type(err).__name__}: {err}"
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("error", self.last_error)
            raise TrialError(self.last_error) from err
        self.failures_in_a_row = 0
        trial.set_user_attr("status", result["status"])
        if result["status"] == "diverged":
            raise optuna.TrialPruned(f"training diverged at step {result['diverged_step']}")
        trial.set_user_attr("best_step", result["best_step"])
        return float(result[f"dev_{self.task.metric}"])

    def _check_not_surplus(self, trial: optuna.Trial) -> None:
        """Workers that asked for a trial at the same moment can overshoot the target; the
        trials beyond it (by number) end at once, before any training."""
        alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        ahead = sum(t.number < trial.number for t in trial.study.get_trials(deepcopy=False, states=alive))
        if ahead >= self.target:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"other workers already hold the {self.target} requested trials")


def trial_hparams(config: StudyConfig, method: str, trial: optuna.Trial) -> MethodConfig:
    """training.<method> with every parameter of tune.spaces.<method> suggested by the trial."""
    params = {}
    for name, p in config.search_space(method).params().items():
        if p.choices is not None:
            params[name] = trial.suggest_categorical(name, p.choices)
        elif isinstance(p.low, int) and isinstance(p.high, int):
            params[name] = trial.suggest_int(name, p.low, p.high, step=int(p.step or 1), log=p.log)
        else:
            params[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
    return hparams_with(config.method(method), params, f"tune.spaces.{method}")


def _train_seed(config: StudyConfig) -> int:
    return config.seeds[0]


def _select(config: StudyConfig, tasks, methods) -> tuple[list[str], list[str]]:
    tasks, methods = list(tasks or config.tasks), list(methods or config.methods)
    for task in tasks:
        if task not in config.tasks:
            raise InputError(f"--task {task}: not a task of this study ({', '.join(config.tasks)})")
    for method in methods:
        if method not in config.methods:
            raise InputError(f"--method {method}: choose one of {', '.join(config.methods)}")
    return tasks, methods


# ---------------------------------------------------------------- outputs


def _best(trials) -> optuna.trial.FrozenTrial | None:
    """Highest value; ties go to the lowest trial number, so every worker names the same one."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def _state_counts(trials) -> dict[str, int]:
    counts = Counter(t.state.name.lower() for t in trials if not is_surplus(t))
    states = ("complete", "pruned", "fail", "running", "waiting")
    return {s: counts.get(s, 0) for s in states} | {"surplus": sum(map(is_surplus, trials))}


def write_tuned(
    study: Study, config: StudyConfig, task: str, method: str, metric: str, ostudy, backend: Backend, target: int
) -> dict:
    """tuned/<task>_<method>.yaml: the best trial, its values merged into training.<method>, trial
    counts by state, and the search's name, storage, sampler, pruner and space."""
    trials = ostudy.get_trials(deepcopy=False)
    best = _best(trials)
    tune = config.tune
    record = {
        "task": task,
        "method": method,
        "metric": metric,
        "split": "dev",
        "best_value": None if best is None else float(best.value),
        "best_trial": None if best is None else best.number,
        "best_params": None if best is None else dict(best.params),
        "hparams": None,
        "trials": {"requested": target, **_state_counts(trials)},
        "study_name": ostudy.study_name,
        "storage": backend.url,
        "own_storage": backend.own,
        "train_seed": _train_seed(config),
        "sampler": {"name": "TPESampler", "seed": tune.seed, "startup_trials": tune.startup_trials},
        "pruner": {
            "name": "MedianPruner",
            "startup_trials": tune.prune_startup_trials,
            "warmup_steps": tune.prune_warmup_steps,
        }
        if tune.prune
        else {"name": "NopPruner"},
        "space": {k: v.model_dump(exclude_defaults=True) for k, v in config.search_space(method).params().items()},
    }
    if best is not None:
        hp = hparams_with(config.method(method), best.params, "best trial")
        record["hparams"] = hp.model_dump(mode="json")
    write_current(study.tuned_path(task, method), yaml.safe_dump(record, sort_keys=False), ostudy.study_name)
    return record


def trial_rows(task: str, method: str, ostudy: optuna.Study) -> list[dict]:
    """One trials.csv row per trial of a search: state, value, duration, where it stopped, the
    worker that ran it, then its parameters."""
    rows = []
    for t in ostudy.get_trials(deepcopy=False):
        duration = t.duration.total_seconds() if t.duration is not None else None
        steps = sorted(t.intermediate_values)
        rows.append(
            {
                "task": task,
                "method": method,
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                "duration_s": None if duration is None else round(duration, 3),
                "last_step": steps[-1] if steps else None,
                "last_dev_value": t.intermediate_values[steps[-1]] if steps else None,
                "best_step": t.user_attrs.get("best_step"),
                "retry_of": t.user_attrs.get("retry_of", t.system_attrs.get("failed_trial")),
                "worker": t.user_attrs.get("worker"),
                "note": "surplus" if is_surplus(t) else t.user_attrs.get("error", t.user_attrs.get("status", "")),
                **t.params,
            }
        )
    return rows


def write_trials_table(study: Study, config: StudyConfig, backend: Backend) -> pd.DataFrame:
    """Every trial of this config's searches found in the storage, one row each."""
    rows = []
    for task in config.tasks:
        for method in config.methods:
            try:
                ostudy = optuna.load_study(study_name=study_name(study, config, task, method), storage=backend.storage)
            except KeyError:
                continue
            rows += trial_rows(task, method, ostudy)
    return TRIALS.write(study.tables, pd.DataFrame(rows) if rows else pd.DataFrame(columns=TRIALS.columns))


def tuned_records(study: Study) -> list[dict]:
    """Every tuned/<task>_<method>.yaml of the study (as `write_tuned` writes them), in name order."""
    return [
        yaml.safe_load(path.read_text())
        for path in sorted((study.root / "tuned").glob("*_*.yaml"))
        if stamp_of(path) is not None
    ]
