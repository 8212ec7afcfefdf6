"""Stage `baselines`: majority class on eval, the head-only (frozen backbone) probe, and the
overfit sanity check (each method must fit a few training examples)."""

from __future__ import annotations

import datasets
import numpy as np
from tqdm.auto import tqdm

from lorascope import modeling, runs
from lorascope.config import StudyConfig
from lorascope.study import Stage, Study
from lorascope.tasks import Task, compute_metrics, majority_label


def run(study: Study, config: StudyConfig) -> None:
    tokenizer = modeling.load_tokenizer(config.model.name)
    rows = []
    for name in config.tasks:
        task, splits = runs.load_prepared(study, name)
        splits_fp = runs.prepared_fingerprint(study, name)
        rows.append(majority(task, splits))
        if config.baselines.head_only:
            setup = runs.run_setup(config, task, "head", config.seeds[0])
            target = study.baseline_dir(name, "head_only")
            rows.append({"baseline": "head_only", **runs.train_or_reuse(config, setup, splits, target, splits_fp,
                                                                         tokenizer)})  # fmt: skip
        few = few_examples(splits["train"], config.baselines.overfit_examples, config.data.split_seed)
        for method in config.methods:
            hp = getattr(config.training, method).model_copy(
                update={"epochs": 1.0, "warmup_ratio": 0.0, "scheduler": "constant_with_warmup",
                        "batch_size": len(few), "grad_accum": 1, "patience": 0}  # fmt: skip
            )
            setup = runs.run_setup(config, task, method, config.seeds[0], hp=hp,
                                   max_steps=config.baselines.overfit_steps, save_weights=False)  # fmt: skip
            target = study.baseline_dir(name, f"overfit_{method}")
            result = runs.train_or_reuse(config, setup, {"train": few, "eval": few}, target, splits_fp, tokenizer)
            passed = result.get("accuracy") is not None and result["accuracy"] >= config.baselines.overfit_threshold
            rows.append({"baseline": f"overfit_{method}", **result, "passed": passed})
    table = runs.BASELINES.write(study.tables, [{c: row.get(c) for c in runs.BASELINES.columns} for row in rows])
    failed = table[table["baseline"].str.startswith("overfit") & (table["passed"] != True)]  # noqa: E712
    for _, row in failed.iterrows():
        tqdm.write(f"warning: {row.task} {row.method} did not fit {config.baselines.overfit_examples} examples "
                   f"(train accuracy {row.accuracy}); check its learning rate")  # fmt: skip


def majority(task: Task, splits: datasets.DatasetDict) -> dict:
    label = majority_label(splits["train"])
    labels = np.asarray(splits["eval"]["label"])
    metrics = compute_metrics(labels, np.full_like(labels, label), task.num_labels)
    return {"task": task.name, "baseline": "majority", "method": "", "status": "ok",
            "primary_metric": task.metric, "primary_value": metrics[task.metric], **metrics}  # fmt: skip


def few_examples(train: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:
    rows = np.sort(np.random.default_rng(seed).permutation(len(train))[:n])
    return train.select(rows)


STAGE = Stage("baselines", "majority class, head-only probe, overfit sanity check", run=run, needs=("prepare",),
              reads=("model", "data", "tasks", "methods", "seeds", "training", "baselines", "runtime"))  # fmt: skip
