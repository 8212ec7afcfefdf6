"""The prepare stage's outputs: every task loaded, checked, split and tokenized once, and
read back by every later stage. The raw rows' content digest, not their path, identifies the
data, so a study pointed at a copy of its data, or moved, recomputes nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import datasets
import pyarrow as pa

from lorascope import dependencies, modeling
from lorascope.config import StudyConfig
from lorascope.errors import InputError
from lorascope.study import Study, current_dir, is_current, stamp_of
from lorascope.tasks import Task, load_raw, make_splits, resolve_task, tokenize, tokenize_completions


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


def prepare_tasks(study: Study, config: StudyConfig, tasks: list[str] | None = None) -> None:
    """Load, check, split and tokenize every task (or `tasks`); all input errors surface here,
    before any training starts. The raw data is read every time (about a second per task) so
    its content, not its path, decides whether the prepared splits are still valid."""
    tokenizer = None
    for name in tasks or list(config.tasks):
        task, train, evaluation = load_raw(resolve_task(name, config.tasks[name], config.data))
        fp = dependencies.PREPARED.fingerprint(config, content_digest(train, evaluation), task=name)
        target = study.prepared_dir(name)
        if is_current(target, fp):
            continue
        tokenizer = tokenizer or modeling.load_tokenizer(config.model.name)
        task, splits, left_out = split_and_tokenize(task, train, evaluation, tokenizer, config)
        with current_dir(target, fp) as scratch:
            splits.save_to_disk(str(scratch / "splits"))
            meta = {"task": dataclasses.asdict(task), "sizes": {k: len(v) for k, v in splits.items()}}
            if left_out is not None:
                meta["left_out"] = left_out  # examples longer than model.max_length, by split
            (scratch / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def split_and_tokenize(
    task: Task, train: datasets.Dataset, evaluation: datasets.Dataset, tokenizer, config: StudyConfig
):
    """(task, tokenized train / dev / eval / probe splits, examples left out per split or None).
    A generative task's examples longer than model.max_length are left out before the splits are
    drawn, so their sizes hold; the task comes back with its max_new_tokens."""
    if not task.generative:
        return (
            task,
            tokenize(make_splits(task, train, evaluation, config.data), tokenizer, config.model.max_length),
            None,
        )
    modeling.check_context(config.model.name, config.model.max_length)
    raw = datasets.DatasetDict(train=train, eval=evaluation)
    task, fitting, left_out = tokenize_completions(task, raw, tokenizer, config.model.max_length)
    return task, make_splits(task, fitting["train"], fitting["eval"], config.data), left_out


def prepared_fingerprint(study: Study, name: str) -> str:
    fp = stamp_of(study.prepared_dir(name))
    if fp is None:
        raise InputError(f"{study.prepared_dir(name)}: task {name} is not prepared; run `lorascope prepare`")
    return fp


def prepared_task(study: Study, name: str) -> Task:
    """The prepared task's description alone (its meta.json), without loading its splits."""
    task = json.loads((study.prepared_dir(name) / "meta.json").read_text())["task"]
    if task["label_names"] is not None:
        task["label_names"] = tuple(task["label_names"])
    return Task(**task)


def load_prepared(study: Study, name: str) -> tuple[Task, datasets.DatasetDict]:
    return prepared_task(study, name), datasets.load_from_disk(str(study.prepared_dir(name) / "splits"))
