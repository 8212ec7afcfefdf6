"""What a run needs, below training, tuning and the stages: prepared splits, the run setup
built from the config, and the fingerprints that decide whether an output is still valid.

Fingerprints hold what changes results: config values, the content of the data (a hash of
the loaded rows) and the model's identity (modeling.model_identity), never absolute paths,
so a study pointed at a copy of its data, or moved, recomputes nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import traceback

import datasets
import pandas as pd
import pyarrow as pa

from lorascope import modeling, runtime
from lorascope.config import StudyConfig, fingerprint
from lorascope.errors import InputError
from lorascope.study import Study, Table, current_dir, is_current, stamp_of
from lorascope.tasks import Task, load_raw, make_splits, resolve_task, tokenize
from lorascope.training import RunSetup, train_run

RESULTS_VERSION = 3  # bump when a code change alters results, so old outputs are redone (3: fused AdamW on CPU)
# One row per run (its metrics.json, written by write_performance_table), and the baselines
# stage's rows: read by the analyze stage and the report through these records.
PERFORMANCE = Table(
    "performance",
    (
        "task",
        "method",
        "seed",
        "status",
        "primary_metric",
        "primary_value",
        "accuracy",
        "f1",
        "train_seconds",
        "trainable_params",
        "train_tokens_per_second",
        "peak_rss_bytes",
        "peak_rss_added_bytes",
        "cuda_max_allocated_bytes",
        "cuda_max_reserved_bytes",
        "optimizer_state_bytes",
        "artifact_bytes",
    ),
)
BASELINES = Table(
    "baselines", ("task", "baseline", "method", "status", "primary_metric", "primary_value", "accuracy", "f1", "passed")
)
PATH_KEYS = {"data": {"glue"}, "task": {"source", "eval_source"}}  # identified by their content instead


def task_key(task_cfg) -> dict:
    """The task's config as its prepared splits are fingerprinted. An unset dev_max (added after
    studies existed) is left out, so those studies' splits and runs stay current."""
    key = task_cfg.model_dump(mode="json", exclude=PATH_KEYS["task"])
    if key["dev_max"] is None:
        del key["dev_max"]
    return key


# ---------------------------------------------------------------- prepared splits


def content_digest(*splits: datasets.Dataset) -> str:
    """Hash of the rows (Arrow IPC bytes) of loaded splits: the data's identity wherever it lives."""
    digest = hashlib.sha256()
    for split in splits:
        sink = pa.BufferOutputStream()
        table = split.data.table
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue().to_pybytes())
    return digest.hexdigest()[:16]


def model_key(config: StudyConfig) -> dict:
    """The model section with the model named by its identity (a folder by its content)."""
    return config.model.model_dump(mode="json") | {"name": modeling.model_identity(config.model.name)}


def prepare_tasks(study: Study, config: StudyConfig, tasks: list[str] | None = None) -> None:
    """Load, check, split and tokenize every task (or `tasks`); all input errors surface here,
    before any training starts. The raw data is read every time (about a second per task) so
    its content, not its path, decides whether the prepared splits are still valid."""
    tokenizer = None
    data = config.data.model_dump(mode="json", exclude=PATH_KEYS["data"])
    for name in tasks or list(config.tasks):
        task_cfg = config.tasks[name]
        task, train, evaluation = load_raw(resolve_task(name, task_cfg, config.data))
        fp = fingerprint(
            RESULTS_VERSION,
            model_key(config)["name"],
            config.model.max_length,
            data,
            task_key(task_cfg),
            content_digest(train, evaluation),
        )
        target = study.prepared_dir(name)
        if is_current(target, fp):
            continue
        tokenizer = tokenizer or modeling.load_tokenizer(config.model.name)
        splits = tokenize(make_splits(task, train, evaluation, config.data), tokenizer, config.model.max_length)
        with current_dir(target, fp) as scratch:
            splits.save_to_disk(str(scratch / "splits"))
            meta = {"task": dataclasses.asdict(task), "sizes": {k: len(v) for k, v in splits.items()}}
            (scratch / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def prepared_fingerprint(study: Study, name: str) -> str:
    fp = stamp_of(study.prepared_dir(name))
    if fp is None:
        raise InputError(f"{study.prepared_dir(name)}: task {name} is not prepared; run `lorascope prepare`")
    return fp


def load_prepared(study: Study, name: str) -> tuple[Task, datasets.DatasetDict]:
    folder = study.prepared_dir(name)
    task = json.loads((folder / "meta.json").read_text())["task"]
    task = Task(**{**task, "label_names": tuple(task["label_names"])})
    return task, datasets.load_from_disk(str(folder / "splits"))


# ---------------------------------------------------------------- runs


def run_setup(config: StudyConfig, task: Task, method: str, seed: int, hp=None, **changes) -> RunSetup:
    """One run of the study's model on `task`: training.<method> (or `hp`) and the runtime."""
    return RunSetup(
        model_name=config.model.name,
        task=task,
        method=method,
        seed=seed,
        hp=hp or getattr(config.training, method),
        runtime=config.runtime,
        eval_batch_size=config.training.eval_batch_size,
        gradient_checkpointing=config.model.gradient_checkpointing,
        dropout=config.model.dropout,
        max_length=config.model.max_length,
        **changes,
    )


def run_fingerprint(config: StudyConfig, setup: RunSetup, splits_fp: str) -> str:
    device = runtime.pick_device(config.runtime)
    return fingerprint(
        RESULTS_VERSION,
        splits_fp,
        model_key(config),
        setup.method,
        setup.seed,
        setup.hp,
        setup.max_steps,
        config.training.eval_batch_size,
        device.type,
        runtime.uses_bf16(config.runtime, device),
    )


def reusable_result(config: StudyConfig, setup: RunSetup, target, splits_fp: str) -> dict | None:
    """The metrics of a finished, not failed run in `target` with this setup's fingerprint, else None."""
    if is_current(target, run_fingerprint(config, setup, splits_fp)):
        done = json.loads((target / "metrics.json").read_text())
        if done["status"] != "failed":
            return done
    return None


def train_or_reuse(config: StudyConfig, setup: RunSetup, splits: dict, target, splits_fp: str, tokenizer) -> dict:
    """The metrics of a finished run with the same fingerprint, else the run trained in a
    scratch folder that replaces `target`. A run that raised is recorded as failed (and redone
    by the next invocation); a config problem (InputError) stops the study."""
    done = reusable_result(config, setup, target, splits_fp)
    if done is not None:
        return done
    with current_dir(target, run_fingerprint(config, setup, splits_fp)) as scratch:
        try:
            result = train_run(setup, splits, tokenizer, scratch)
        except InputError:
            raise
        except Exception as err:
            result = {
                "task": setup.task.name,
                "method": setup.method,
                "seed": setup.seed,
                "status": "failed",
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
            }
            (scratch / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def describe(result: dict) -> str:
    """A run's (or baseline's) result in a progress line: its primary metric, or why it failed."""
    if result["status"] != "ok":
        return result["status"] + (f" ({result['error']})" if result.get("error") else "")
    return f"{result['primary_metric']} {result['primary_value']:.3f}"


def finished_runs(study: Study, config: StudyConfig, task: str) -> list[tuple[str, int, str]]:
    """(method, seed, fingerprint) of the configured runs of `task` that trained without error."""
    runs = []
    for method in config.methods:
        for seed in config.seeds:
            folder = study.run_dir(task, method, seed)
            fp = stamp_of(folder)
            if fp is not None and json.loads((folder / "metrics.json").read_text())["status"] == "ok":
                runs.append((method, seed, fp))
    return runs


def _run_metrics(study: Study) -> list[tuple[str, dict]]:
    return [
        (str(p.parent.relative_to(study.root)), json.loads(p.read_text()))
        for p in sorted(study.root.glob("runs/*/*/seed*/metrics.json"))
    ]


def write_performance_table(study: Study) -> pd.DataFrame:
    """One row per run folder found, every metric of its metrics.json but the traceback."""
    frame = pd.DataFrame([{k: v for k, v in metrics.items() if k != "traceback"} for _, metrics in _run_metrics(study)])
    return PERFORMANCE.write(study.tables, frame.reindex(columns=list(dict.fromkeys([*PERFORMANCE.columns, *frame]))))


def study_failures(study: Study) -> list[str]:
    return [f"{where}: {metrics['error']}" for where, metrics in _run_metrics(study) if metrics["status"] == "failed"]
