"""Stage `train`: one run per task x method x seed, and tables/performance.csv."""

from __future__ import annotations

from tqdm.auto import tqdm

from lorascope import modeling, runs
from lorascope.config import StudyConfig
from lorascope.study import Stage, Study
from lorascope.tuning import tuned_hparams


class RunsFailed(RuntimeError):
    """Some runs raised; every other result is kept and the failures are listed."""


def method_hparams(study: Study, config: StudyConfig, task: str, method: str):
    """training.<method>, or the tuned values when tune.enabled, and where each value came from."""
    if not config.tune.enabled:
        return getattr(config.training, method), None
    return tuned_hparams(study, config, task, method)


def run(study: Study, config: StudyConfig) -> None:
    grid = [(t, m, s) for t in config.tasks for m in config.methods for s in config.seeds]
    tokenizer = modeling.load_tokenizer(config.model.name)
    bar = tqdm(grid, desc="study runs", unit="run", disable=not config.runtime.progress)
    prepared = {}
    for name, method, seed in bar:
        bar.set_postfix_str(f"{name} {method} seed{seed}")
        if name not in prepared:
            prepared[name] = runs.load_prepared(study, name)
        task, splits = prepared[name]
        hp, source = method_hparams(study, config, name, method)
        setup = runs.run_setup(config, task, method, seed, hp=hp, hp_source=source)
        runs.train_or_reuse(config, setup, splits, study.run_dir(name, method, seed),
                            runs.prepared_fingerprint(study, name), tokenizer)  # fmt: skip
    runs.write_performance_table(study)
    failed = runs.study_failures(study)
    if failed:
        raise RunsFailed(f"{len(failed)} run(s) failed: " + "; ".join(failed))


STAGE = Stage("train", "train the study's grid, or one run with --task/--method/--seed", run=run,
              needs=("prepare", "tune"), reads=("model", "data", "tasks", "methods", "seeds", "training", "tune",
                                               "runtime"))  # fmt: skip
