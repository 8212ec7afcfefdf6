"""Stage `train`: one run per task x method x seed, and tables/performance.csv. Runs that are
not current yet go to the study's executor (lorascope.executors), one unit each."""

from __future__ import annotations

from lorascope import dependencies, executors, modeling, runs
from lorascope.config import StudyConfig
from lorascope.prepared import load_prepared, prepared_fingerprint, prepared_task
from lorascope.study import Stage, Study
from lorascope.tuning import tuned_hparams


class RunsFailed(RuntimeError):
    """Some runs raised; every other result is kept and the failures are listed."""


def method_hparams(study: Study, config: StudyConfig, task: str, method: str):
    """training.<method>, or the tuned values when tune.enabled, and where each value came from."""
    if not config.tune.enabled:
        return config.method(method), None
    return tuned_hparams(study, config, task, method)


def _setup(study: Study, config: StudyConfig, task, name: str, method: str, seed: int):
    hp, source = method_hparams(study, config, name, method)
    return runs.run_setup(config, task, method, seed, hp=hp, hp_source=source)


def train_one(root: str, config: StudyConfig, name: str, method: str, seed: int) -> dict:
    """One run of the grid, trained or reused (a worker's unit: everything from plain values)."""
    study = Study(root)
    task, splits = load_prepared(study, name)
    return runs.train_or_reuse(
        config,
        _setup(study, config, task, name, method, seed),
        splits,
        study.run_dir(name, method, seed),
        prepared_fingerprint(study, name),
        modeling.load_tokenizer(config.model.name),
    )


def run(study: Study, config: StudyConfig) -> None:
    todo = []
    for name in config.tasks:
        task = prepared_task(study, name)
        splits_fp = prepared_fingerprint(study, name)
        for method in config.methods:
            for seed in config.seeds:
                setup = _setup(study, config, task, name, method, seed)
                if runs.reusable_result(config, setup, study.run_dir(name, method, seed), splits_fp) is None:
                    todo.append(
                        executors.Unit(
                            train_one, (str(study.root), config, name, method, seed), f"{name} {method} seed{seed}"
                        )
                    )
    executors.run_units(todo, "study runs", config.runtime.progress, runs.describe)
    runs.write_performance_table(study)
    failed = runs.failed_runs(study)
    if failed:
        raise RunsFailed(f"{len(failed)} run(s) failed: " + "; ".join(failed))


STAGE = Stage(
    "train",
    "train the study's grid, or one run with --task/--method/--seed",
    run=run,
    needs=("prepare", "tune"),
    outputs=(dependencies.RUN,),
)
