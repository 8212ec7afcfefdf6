"""Stage `baselines`: majority class on eval, the head-only (frozen backbone) probe, and the
overfit sanity check (each method must fit a few training examples). Generative tasks: the
base model zero-shot through the same evaluation path as every run (where fine-tuning starts),
"always unanswerable" (SQuAD v2: EM = the share of questions without answer), and the overfit
check scored by exact match on the examples it trained on."""

from __future__ import annotations

import json

import datasets
import numpy as np
from tqdm.auto import tqdm

from lorascope import dependencies, executors, modeling, runs, runtime
from lorascope.config import StudyConfig
from lorascope.evaluation import evaluate_task, score_answers
from lorascope.prepared import load_prepared, prepared_fingerprint
from lorascope.study import Stage, Study, current_dir, is_current
from lorascope.tasks import Task, compute_metrics, majority_label

ZERO_SHOT = "zero_shot"


def _baseline(study: Study, config: StudyConfig, prepared: tuple, name: str, kind: str):
    """(setup, splits, target) of one trained baseline of task `name` (`prepared`: its task and
    splits): `head_only`, or `overfit_<method>` on a few training examples."""
    task, splits = prepared
    if kind == "head_only":
        return runs.run_setup(config, task, "head", config.seeds[0]), splits, study.baseline_dir(name, kind)
    method = kind.removeprefix("overfit_")
    few = few_examples(splits["train"], config.baselines.overfit_examples, config.data.split_seed)
    hp = config.method(method).model_copy(
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
        fitted = result.get("exact", result.get("accuracy"))  # generative: exact match on the fitted examples
        row["passed"] = fitted is not None and fitted >= config.baselines.overfit_threshold
    return row


def _zero_shot_fingerprint(config: StudyConfig, splits_fp: str) -> str:
    return dependencies.RUN.fingerprint(config, splits_fp, method="base", seed=0, hp=None, max_steps=0)


def zero_shot_one(root: str, config: StudyConfig, name: str) -> dict:
    """The base model on a generative task's eval split through the runs' evaluation path (a
    worker's unit): metrics.json and predictions.csv in baselines/<task>/zero_shot."""
    study = Study(root)
    task, splits = load_prepared(study, name)
    tokenizer = modeling.load_tokenizer(config.model.name)
    device = runtime.pick_device(config.runtime)
    model = modeling.load_model(config.model.name, None, 0, tokenizer.pad_token_id).to(device)
    evaluation = evaluate_task(
        model,
        splits["eval"],
        task,
        tokenizer=tokenizer,
        batch_size=config.training.eval_batch_size,
        device=device,
        bf16=runtime.uses_bf16(config.runtime, device),
    )
    result = {
        "task": name,
        "method": "base",
        "status": "ok",
        "primary_metric": task.metric,
        "primary_value": evaluation.metrics[task.metric],
        "accuracy": None,
        **evaluation.metrics,
    }
    with current_dir(
        study.baseline_dir(name, ZERO_SHOT), _zero_shot_fingerprint(config, prepared_fingerprint(study, name))
    ) as scratch:
        evaluation.predictions.to_csv(scratch / "predictions.csv", index=False)
        (scratch / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return _row(config, ZERO_SHOT, result)


def always_unanswerable(task: Task, splits: datasets.DatasetDict) -> dict:
    """SQuAD v2 scores of answering "no answer" to every eval question."""
    metrics = score_answers(task, splits["eval"], [""] * len(splits["eval"])).metrics
    return {
        "task": task.name,
        "baseline": "always_unanswerable",
        "method": "",
        "status": "ok",
        "primary_metric": task.metric,
        "primary_value": metrics[task.metric],
        "accuracy": None,
        **metrics,
    }


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


def kinds_of(config: StudyConfig, task: Task) -> list[str]:
    """The baselines of one task, in the table's order."""
    overfit = [f"overfit_{m}" for m in config.methods]
    if task.generative:
        return [*(["always_unanswerable"] if task.squad else []), ZERO_SHOT, *overfit]
    return ["majority", *(["head_only"] if config.baselines.head_only else []), *overfit]


def run(study: Study, config: StudyConfig) -> None:
    rows, units, order = {}, [], []
    for name in config.tasks:
        prepared, splits_fp = load_prepared(study, name), prepared_fingerprint(study, name)
        task = prepared[0]
        order += [(name, kind) for kind in kinds_of(config, task)]
        if task.generative:
            if task.squad:
                rows[name, "always_unanswerable"] = always_unanswerable(*prepared)
            target = study.baseline_dir(name, ZERO_SHOT)
            if is_current(target, _zero_shot_fingerprint(config, splits_fp)):
                rows[name, ZERO_SHOT] = _row(config, ZERO_SHOT, json.loads((target / "metrics.json").read_text()))
            else:
                units.append(executors.Unit(zero_shot_one, (str(study.root), config, name), f"{name} {ZERO_SHOT}"))
        else:
            rows[name, "majority"] = majority(*prepared)
        for kind in kinds_of(config, task):
            if not kind.startswith(("head_only", "overfit")):
                continue
            setup, _, target = _baseline(study, config, prepared, name, kind)
            done = runs.reusable_result(config, setup, target, splits_fp)
            if done is not None:
                rows[name, kind] = _row(config, kind, done)
            else:
                units.append(executors.Unit(baseline_one, (str(study.root), config, name, kind), f"{name} {kind}"))
    for unit, row in zip(units, executors.run_units(units, "baselines", config.runtime.progress, runs.describe)):
        rows[unit.args[2], row["baseline"]] = row
    ordered = [rows[key] for key in order]
    table = runs.BASELINES.write(study.tables, [{c: row.get(c) for c in runs.BASELINES.columns} for row in ordered])
    failed = table[table["baseline"].str.startswith("overfit") & (table["passed"] != True)]  # noqa: E712
    for _, row in failed.iterrows():
        fitted = (
            f"exact match {row.exact}"
            if "exact" in row and row.exact == row.exact
            else f"train accuracy {row.accuracy}"
        )
        tqdm.write(
            f"warning: {row.task} {row.method} did not fit {config.baselines.overfit_examples} examples "
            f"({fitted}); check its learning rate"
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
