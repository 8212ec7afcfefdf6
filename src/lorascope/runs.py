"""The study's runs: the run setup built from the config, train-or-reuse of one run (and of
each trained baseline), the finished runs later stages read, and the tables of their results."""

from __future__ import annotations

import json
import traceback

import pandas as pd

from lorascope import dependencies
from lorascope.config import StudyConfig
from lorascope.errors import DiskFull, InputError, is_disk_full
from lorascope.hparams import fingerprint_values
from lorascope.study import Study, Table, current_dir, is_current, stamp_of
from lorascope.tasks import Task
from lorascope.training import RunSetup, train_run

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
    "baselines",
    ("task", "baseline", "method", "status", "primary_metric", "primary_value", "accuracy", "f1", "exact", "passed"),
)


def run_setup(config: StudyConfig, task: Task, method: str, seed: int, hp=None, **changes) -> RunSetup:
    """One run of the study's model on `task`: training.<method> (or `hp`) and the runtime."""
    return RunSetup(
        model_name=config.model.name,
        task=task,
        method=method,
        seed=seed,
        hp=hp or config.method(method),
        runtime=config.runtime,
        eval_batch_size=config.training.eval_batch_size,
        gradient_checkpointing=config.model.gradient_checkpointing,
        dropout=config.model.dropout,
        max_length=config.model.max_length,
        **changes,
    )


def run_fingerprint(config: StudyConfig, setup: RunSetup, splits_fp: str) -> str:
    return dependencies.RUN.fingerprint(
        config,
        splits_fp,
        method=setup.method,
        seed=setup.seed,
        hp=fingerprint_values(setup.method, setup.hp),
        max_steps=setup.max_steps,
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
            if is_disk_full(err):  # every other run would fail the same way: stop, keep what is done
                raise DiskFull.at(target) from err
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


def run_metrics(study: Study) -> list[tuple[str, dict]]:
    return [
        (str(p.parent.relative_to(study.root)), json.loads(p.read_text()))
        for p in sorted(study.root.glob("runs/*/*/seed*/metrics.json"))
    ]


def write_performance_table(study: Study) -> pd.DataFrame:
    """One row per run folder found, every metric of its metrics.json but the traceback."""
    frame = pd.DataFrame([{k: v for k, v in metrics.items() if k != "traceback"} for _, metrics in run_metrics(study)])
    return PERFORMANCE.write(study.tables, frame.reindex(columns=list(dict.fromkeys([*PERFORMANCE.columns, *frame]))))


def failed_runs(study: Study) -> list[str]:
    return [f"{where}: {metrics['error']}" for where, metrics in run_metrics(study) if metrics["status"] == "failed"]
