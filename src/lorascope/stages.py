"""The study's stages. Each one is a function of the config and of earlier stages' outputs,
skips every item already done with the same fingerprint, and writes items atomically."""

from __future__ import annotations

import dataclasses
import json
import traceback

import datasets
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lorascope import modeling
from lorascope.config import StudyConfig, fingerprint
from lorascope.errors import InputError
from lorascope.study import Study, atomic_dir, atomic_write_text, load_done
from lorascope.tasks import Task, compute_metrics, load_raw, majority_label, make_splits, resolve_task, tokenize
from lorascope.training import RunSetup, train_run

RESULTS_VERSION = 1  # bump when a code change alters results, so old outputs are redone
PERFORMANCE_COLUMNS = [
    "task", "method", "seed", "status", "primary_metric", "primary_value", "accuracy", "f1",
    "train_seconds", "trainable_params",
]  # fmt: skip


class RunsFailed(RuntimeError):
    """Some runs raised; every other result is kept and the failures are listed."""


# ---------------------------------------------------------------- prepare


def _prepare_fingerprint(config: StudyConfig, name: str) -> str:
    return fingerprint(RESULTS_VERSION, config.model.name, config.model.max_length, config.data, config.tasks[name])


def prepare(study: Study, config: StudyConfig) -> None:
    """Load, check, split and tokenize every task; all input errors surface here, before any
    training starts."""
    tokenizer = None
    for name, task_cfg in config.tasks.items():
        fp = _prepare_fingerprint(config, name)
        target = study.prepared_dir(name)
        if _meta(target).get("fingerprint") == fp:
            continue
        task, train, evaluation = load_raw(resolve_task(name, task_cfg, config.data))
        tokenizer = tokenizer or modeling.load_tokenizer(config.model.name)
        splits = tokenize(make_splits(task, train, evaluation, config.data), tokenizer, config.model.max_length)
        with atomic_dir(target) as scratch:
            splits.save_to_disk(str(scratch / "splits"))
            sizes = {k: len(v) for k, v in splits.items()}
            meta = {"fingerprint": fp, "task": dataclasses.asdict(task), "sizes": sizes}
            (scratch / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_prepared(study: Study, name: str) -> tuple[Task, datasets.DatasetDict]:
    meta = _meta(study.prepared_dir(name))
    task = meta["task"]
    task = Task(**{**task, "label_names": tuple(task["label_names"])})
    return task, datasets.load_from_disk(str(study.prepared_dir(name) / "splits"))


def _meta(folder) -> dict:
    path = folder / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------- runs


def _setup(config: StudyConfig, task: Task, method: str, seed: int, hp=None, **changes) -> RunSetup:
    return RunSetup(
        model_name=config.model.name, task=task, method=method, seed=seed,
        hp=hp or getattr(config.training, method), runtime=config.runtime,
        eval_batch_size=config.training.eval_batch_size,
        gradient_checkpointing=config.model.gradient_checkpointing, dropout=config.model.dropout, **changes,
    )  # fmt: skip


def _run_fingerprint(config: StudyConfig, setup: RunSetup, splits_fp: str) -> str:
    device = modeling.pick_device(config.runtime).type
    bf16 = config.runtime.bf16 and device == "cuda"
    return fingerprint(
        RESULTS_VERSION, splits_fp, config.model, setup.method, setup.seed, setup.hp, setup.max_steps,
        config.training.eval_batch_size, device, bf16,
    )  # fmt: skip


def _run_once(config, setup: RunSetup, splits: dict, target, splits_fp: str, tokenizer) -> dict:
    """Reuse a finished item with the same fingerprint, else train it in a scratch folder."""
    fp = _run_fingerprint(config, setup, splits_fp)
    done = load_done(target, fp)
    if done is not None and done["status"] != "failed":
        return done
    with atomic_dir(target) as scratch:
        try:
            result = train_run(setup, splits, tokenizer, scratch)
        except InputError:
            raise  # a config problem concerns every run: stop with exit code 2
        except Exception as err:  # noqa: BLE001 - recorded as a failed run; the study goes on
            result = {"task": setup.task.name, "method": setup.method, "seed": setup.seed, "status": "failed",
                      "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}  # fmt: skip
        result["fingerprint"] = fp
        (scratch / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def train(study: Study, config: StudyConfig) -> None:
    grid = [(t, m, s) for t in config.tasks for m in config.methods for s in config.seeds]
    tokenizer = modeling.load_tokenizer(config.model.name)
    bar = tqdm(grid, desc="study runs", unit="run", disable=not config.runtime.progress)
    prepared = {}
    for name, method, seed in bar:
        bar.set_postfix_str(f"{name} {method} seed{seed}")
        if name not in prepared:
            prepared[name] = load_prepared(study, name)
        task, splits = prepared[name]
        setup = _setup(config, task, method, seed)
        _run_once(config, setup, splits, study.run_dir(name, method, seed), _prepare_fingerprint(config, name), tokenizer)
    write_performance_table(study)
    failed = study_failures(study)
    if failed:
        raise RunsFailed(f"{len(failed)} run(s) failed: " + "; ".join(failed))


def write_performance_table(study: Study) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted(study.root.glob("runs/*/*/seed*/metrics.json"))]
    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame(columns=PERFORMANCE_COLUMNS)
    drop = [c for c in ("traceback", "fingerprint") if c in table]
    table = table.drop(columns=drop)
    table = table[PERFORMANCE_COLUMNS + [c for c in table.columns if c not in PERFORMANCE_COLUMNS]]
    atomic_write_text(study.tables / "performance.csv", table.to_csv(index=False))
    return table


def study_failures(study: Study) -> list[str]:
    failed = []
    for path in sorted(study.root.glob("runs/*/*/seed*/metrics.json")):
        data = json.loads(path.read_text())
        if data["status"] == "failed":
            failed.append(f"{path.parent.relative_to(study.root)}: {data['error']}")
    return failed


# ---------------------------------------------------------------- baselines


def baselines(study: Study, config: StudyConfig) -> None:
    """Majority class on eval, the head-only (frozen backbone) probe, and the overfit sanity
    check: each method must fit `overfit_examples` training examples to `overfit_threshold`."""
    tokenizer = modeling.load_tokenizer(config.model.name)
    rows = []
    for name in config.tasks:
        task, splits = load_prepared(study, name)
        splits_fp = _prepare_fingerprint(config, name)
        rows.append(_majority(task, splits))
        if config.baselines.head_only:
            setup = _setup(config, task, "head", config.seeds[0])
            result = _run_once(config, setup, splits, study.baseline_dir(name, "head_only"), splits_fp, tokenizer)
            rows.append({"baseline": "head_only", **result})
        few = _few_examples(splits["train"], config.baselines.overfit_examples, config.data.split_seed)
        for method in config.methods:
            hp = getattr(config.training, method).model_copy(
                update={"epochs": 1.0, "warmup_ratio": 0.0, "scheduler": "constant_with_warmup",
                        "batch_size": len(few), "grad_accum": 1, "patience": 0}  # fmt: skip
            )
            setup = _setup(config, task, method, config.seeds[0], hp=hp, max_steps=config.baselines.overfit_steps,
                           save_weights=False)  # fmt: skip
            target = study.baseline_dir(name, f"overfit_{method}")
            result = _run_once(config, setup, {"train": few, "eval": few}, target, splits_fp, tokenizer)
            passed = result.get("accuracy") is not None and result["accuracy"] >= config.baselines.overfit_threshold
            rows.append({"baseline": f"overfit_{method}", **result, "passed": passed})
    columns = ["task", "baseline", "method", "status", "primary_metric", "primary_value", "accuracy", "f1", "passed"]
    table = pd.DataFrame(rows).reindex(columns=columns)
    atomic_write_text(study.tables / "baselines.csv", table.to_csv(index=False))
    failed = table[table["baseline"].str.startswith("overfit") & (table["passed"] != True)]  # noqa: E712
    for _, row in failed.iterrows():
        tqdm.write(f"warning: {row.task} {row.method} did not fit {config.baselines.overfit_examples} examples "
                   f"(train accuracy {row.accuracy}); check its learning rate")  # fmt: skip


def _majority(task: Task, splits: datasets.DatasetDict) -> dict:
    label = majority_label(splits["train"])
    labels = np.asarray(splits["eval"]["label"])
    metrics = compute_metrics(labels, np.full_like(labels, label), task.num_labels)
    return {"task": task.name, "baseline": "majority", "method": "", "status": "ok",
            "primary_metric": task.metric, "primary_value": metrics[task.metric], **metrics}  # fmt: skip


def _few_examples(train: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:
    rows = np.sort(np.random.default_rng(seed).permutation(len(train))[:n])
    return train.select(rows)


STAGES = {"prepare": prepare, "baselines": baselines, "train": train}
