"""Stage `baselines`: majority class on eval, the head-only (frozen backbone) probe, and the
overfit sanity check (each method must fit a few training examples)."""

from __future__ import annotations

import datasets
import numpy as np
from tqdm.auto import tqdm

from lorascope import dependencies, executors, modeling, runs
from lorascope.config import StudyConfig
from lorascope.prepared import load_prepared, prepared_fingerprint
from lorascope.study import Stage, Study
from lorascope.tasks import Task, compute_metrics, majority_label


def _baseline(study: Study, config: StudyConfig, prepared: tuple, name: str, kind: str):
    """(setup, splits, target) of one trained baseline of task `name` (`prepared`: its task and
    splits): `head_only`, or `overfit_<method>` on a few training examples."""
    task, splits = prepared
    if kind == "head_only":
        return runs.run_setup(config, task, "head", config.seeds[0]), splits, study.baseline_dir(name, kind)
    method = kind.removeprefix("overfit_")
    few = few_examples(splits["train"], config.baselines.overfit_examples, config.data.split_seed)
    hp = getattr(config.training, method).model_copy(
        update={
            "epochs": 1.0,
            "warmup_ratio": 0.0,
            "scheduler": "constant_with_warmup",
            "batch_size": len(few),
            "grad_accum": 1,
            "patience": 0,
        }
    )
    setup = runs.run_setup(
        config, task, method, config.seeds[0], hp=hp, max_steps=config.baselines.overfit_steps, save_weights=False
    )
    return setup, {"train": few, "eval": few}, study.baseline_dir(name, kind)


def _row(config: StudyConfig, kind: str, result: dict) -> dict:
    row = {"baseline": kind, **result}
    if kind.startswith("overfit"):
        row["passed"] = result.get("accuracy") is not None and result["accuracy"] >= config.baselines.overfit_threshold
    return row


def baseline_one(root: str, config: StudyConfig, name: str, kind: str) -> dict:
    """One trained baseline, trained or reused (a worker's unit)."""
    study = Study(root)
    setup, splits, target = _baseline(study, config, load_prepared(study, name), name, kind)
    result = runs.train_or_reuse(
        config,
        setup,
        splits,
        target,
        prepared_fingerprint(study, name),
        modeling.load_tokenizer(config.model.name),
    )
    return _row(config, kind, result)


def run(study: Study, config: StudyConfig) -> None:
    kinds = (["head_only"] if config.baselines.head_only else []) + [f"overfit_{m}" for m in config.methods]
    rows, units = {}, []
    for name in config.tasks:
        prepared, splits_fp = load_prepared(study, name), prepared_fingerprint(study, name)
        rows[name, "majority"] = majority(*prepared)
        for kind in kinds:
            setup, _, target = _baseline(study, config, prepared, name, kind)
            done = runs.reusable_result(config, setup, target, splits_fp)
            if done is not None:
                rows[name, kind] = _row(config, kind, done)
            else:
                units.append(executors.Unit(baseline_one, (str(study.root), config, name, kind), f"{name} {kind}"))
    for unit, row in zip(units, executors.run_units(units, "baselines", config.runtime.progress, runs.describe)):
        rows[unit.args[2], unit.args[3]] = row
    ordered = [rows[name, kind] for name in config.tasks for kind in ("majority", *kinds)]
    table = runs.BASELINES.write(study.tables, [{c: row.get(c) for c in runs.BASELINES.columns} for row in ordered])
    failed = table[table["baseline"].str.startswith("overfit") & (table["passed"] != True)]  # noqa: E712
    for _, row in failed.iterrows():
        tqdm.write(
            f"warning: {row.task} {row.method} did not fit {config.baselines.overfit_examples} examples "
            f"(train accuracy {row.accuracy}); check its learning rate"
        )


def majority(task: Task, splits: datasets.DatasetDict) -> dict:
    label = majority_label(splits["train"])
    labels = np.asarray(splits["eval"]["label"])
    metrics = compute_metrics(labels, np.full_like(labels, label), task.num_labels)
    return {
        "task": task.name,
        "baseline": "majority",
        "method": "",
        "status": "ok",
        "primary_metric": task.metric,
        "primary_value": metrics[task.metric],
        **metrics,
    }


def few_examples(train: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:
    rows = np.sort(np.random.default_rng(seed).permutation(len(train))[:n])
    return train.select(rows)


STAGE = Stage(
    "baselines",
    "majority class, head-only probe, overfit sanity check",
    run=run,
    needs=("prepare",),
    outputs=(dependencies.RUN,),
)
