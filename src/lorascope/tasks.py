"""Task registry (GLUE SST-2 / MRPC / RTE and custom tasks), loading with input checks,
the train / dev / eval / probe splits, tokenization and metrics."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import datasets
import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from sklearn.model_selection import train_test_split

from lorascope.config import DataConfig, TaskConfig
from lorascope.errors import InputError, first_line

datasets.disable_progress_bars()


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    source: str
    subset: str | None
    text: str
    text_pair: str | None
    label: str
    label_names: tuple[str, ...] | None
    metric: str
    train_split: str = "train"
    eval_split: str = "validation"
    eval_source: str | None = None
    train_max: int | None = None
    eval_max: int | None = None
    dev_max: int | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


GLUE_TASKS = {
    "sst2": dict(text="sentence", text_pair=None, label_names=("negative", "positive"), metric="accuracy"),
    "mrpc": dict(text="sentence1", text_pair="sentence2", label_names=("not_equivalent", "equivalent"), metric="f1"),
    "rte": dict(
        text="sentence1", text_pair="sentence2", label_names=("entailment", "not_entailment"), metric="accuracy"
    ),
}
CUSTOM_ONLY_KEYS = ("source", "subset", "eval_source", "text", "text_pair", "label_names", "metric")
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
SPLITS = ("train", "dev", "eval", "probe")


def resolve_task(name: str, cfg: TaskConfig, data: DataConfig) -> Task:
    sizes = dict(train_max=cfg.train_max, eval_max=cfg.eval_max, dev_max=cfg.dev_max)
    if cfg.source is None:
        if name not in GLUE_TASKS:
            raise InputError(
                f"unknown task '{name}': built-in tasks are {', '.join(GLUE_TASKS)}; "
                f"a custom task needs tasks.{name}.source"
            )
        given = [k for k in CUSTOM_ONLY_KEYS if getattr(cfg, k) is not None]
        if given:
            raise InputError(f"tasks.{name}: built-in task; remove {', '.join(given)} or give it a new name")
        return Task(name=name, source=data.glue_source(), subset=name, label="label", **GLUE_TASKS[name], **sizes)
    if cfg.text is None:
        raise InputError(f"tasks.{name}: a custom task needs `text` (the text column)")
    return Task(
        name=name,
        source=cfg.source,
        subset=cfg.subset,
        text=cfg.text,
        text_pair=cfg.text_pair,
        label=cfg.label,
        label_names=tuple(cfg.label_names) if cfg.label_names else None,
        metric=cfg.metric or "accuracy",
        train_split=cfg.train_split,
        eval_split=cfg.eval_split,
        eval_source=cfg.eval_source,
        **sizes,
    )


# ---------------------------------------------------------------- loading


def load_raw(task: Task) -> tuple[Task, datasets.Dataset, datasets.Dataset]:
    """Train and eval splits with columns text, [text_pair], label (int), example_id.
    Returns the task with its label names filled in when the data declared them."""
    suffix = Path(task.source).suffix.lower()
    if suffix in FILE_FORMATS:
        splits = _load_files(task, FILE_FORMATS[suffix])
    else:
        splits = _load_dataset(task)
    train, evaluation = splits
    for split, ds in (("train", train), ("eval", evaluation)):
        _require_columns(task, ds, split)
    if task.label_names is None:
        feature = train.features.get(task.label)
        if not isinstance(feature, datasets.ClassLabel):
            raise InputError(f"tasks.{task.name}: give `label_names` (the data does not declare them)")
        task = dataclasses.replace(task, label_names=tuple(feature.names))
    return task, _normalise(task, train, "train"), _normalise(task, evaluation, "eval")


def _load_files(task: Task, fmt: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    if task.eval_source is None:
        raise InputError(f"tasks.{task.name}: a file source needs `eval_source`, the file of the eval split")
    files = {"train": task.source, "eval": task.eval_source}
    for path in files.values():
        if not Path(path).is_file():
            raise InputError(f"tasks.{task.name}: data file not found: {path}")
    kwargs = {"delimiter": "\t"} if Path(task.source).suffix.lower() == ".tsv" else {}
    if fmt == "csv":
        kwargs["keep_default_na"] = False  # an empty text stays "", not NaN
    loaded = []
    for split, path in files.items():  # one file at a time: their columns may differ, checked after
        try:
            loaded.append(datasets.load_dataset(fmt, data_files=path, split="train", **kwargs))
        except Exception as err:
            if "corresponds to no data" in str(err):  # how datasets says a file has no rows
                raise InputError(f"{_where(task, split)}: the split is empty (no rows in {path})") from None
            raise InputError(f"tasks.{task.name}: cannot read {path}: {first_line(err)}") from None
    return loaded[0], loaded[1]


def _load_dataset(task: Task) -> tuple[datasets.Dataset, datasets.Dataset]:
    looks_local = task.source.startswith((".", "/", "~")) or os.path.exists(task.source)
    if looks_local and not Path(task.source).expanduser().is_dir():
        raise InputError(f"tasks.{task.name}: dataset folder not found: {task.source}")
    try:
        loaded = datasets.load_dataset(str(Path(task.source).expanduser()) if looks_local else task.source, task.subset)
    except Exception as err:
        where = f"{task.source}" + (f" ({task.subset})" if task.subset else "")
        raise InputError(f"tasks.{task.name}: cannot load dataset {where}: {first_line(err)}") from None
    for split in (task.train_split, task.eval_split):
        if split not in loaded:
            raise InputError(f"tasks.{task.name}: split '{split}' not in {task.source}; it has {list(loaded)}")
    return loaded[task.train_split], loaded[task.eval_split]


def _where(task: Task, split: str) -> str:
    return f"tasks.{task.name} ({split} split of {task.source})"


def _require_columns(task: Task, ds: datasets.Dataset, split: str) -> None:
    if len(ds) == 0:
        raise InputError(f"{_where(task, split)}: the split is empty")
    wanted = [task.text, task.label] + ([task.text_pair] if task.text_pair else [])
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise InputError(f"{_where(task, split)}: missing column(s) {missing}; columns are {ds.column_names}")


def _normalise(task: Task, ds: datasets.Dataset, split: str) -> datasets.Dataset:
    names = [task.text, task.label] + ([task.text_pair] if task.text_pair else [])
    raw = ds.select_columns(names + (["idx"] if "idx" in ds.column_names else [])).to_dict()
    columns = {
        "text": [str(t) for t in raw[task.text]],
        "label": _label_ids(task, raw[task.label], _where(task, split)),
        "example_id": raw.get("idx", list(range(len(ds)))),
    }
    if task.text_pair:
        columns["text_pair"] = [str(t) for t in raw[task.text_pair]]
    features = datasets.Features(
        {k: datasets.Value("string") for k in columns if k.startswith("text")}
        | {"label": datasets.ClassLabel(names=list(task.label_names)), "example_id": datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict(columns, features=features)


def _label_ids(task: Task, values: list, where: str) -> list[int]:
    names = list(task.label_names)
    if all(isinstance(v, str) for v in values):
        bad = sorted(set(values) - set(names))
        ids = [names.index(v) for v in values] if not bad else []
    else:
        bad = sorted({v for v in values if not isinstance(v, (int, np.integer)) or not 0 <= v < len(names)}, key=str)
        ids = [int(v) for v in values]
    if bad:
        raise InputError(f"{where}: labels outside the label set {names}: {bad[:5]} (column '{task.label}')")
    return ids


# ---------------------------------------------------------------- splits and tokens


def make_splits(task: Task, train: datasets.Dataset, evaluation: datasets.Dataset, data: DataConfig):
    """train / dev (stratified hold-out of train) / eval (the reported split) / probe (fixed,
    ordered subset of eval for representations). Deterministic in `data.split_seed` only, so
    every run of a study sees the same splits."""
    labels = np.asarray(train["label"])
    n_dev = min(task.dev_max or data.dev_max, max(len(task.label_names), round(data.dev_fraction * len(train))))
    keep, dev = train_test_split(np.arange(len(train)), test_size=n_dev, stratify=labels, random_state=data.split_seed)
    if task.train_max and task.train_max < len(keep):
        keep, _ = train_test_split(keep, train_size=task.train_max, stratify=labels[keep], random_state=data.split_seed)
    train_part, dev = train.select(np.sort(keep)), train.select(np.sort(dev))
    if task.eval_max:
        evaluation = evaluation.select(range(min(task.eval_max, len(evaluation))))
    rng = np.random.default_rng(data.split_seed)
    probe_rows = np.sort(rng.permutation(len(evaluation))[: data.probe_size])
    return datasets.DatasetDict(train=train_part, dev=dev, eval=evaluation, probe=evaluation.select(probe_rows))


def tokenize(splits: datasets.DatasetDict, tokenizer, max_length: int) -> datasets.DatasetDict:
    """The tokenizer's own single / pair encoding, truncated to max_length, no padding (the
    collator pads each batch)."""
    pair = "text_pair" in splits["train"].column_names

    def encode(batch):
        args = (batch["text"], batch["text_pair"]) if pair else (batch["text"],)
        out = tokenizer(*args, truncation=True, max_length=max_length)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    return splits.map(encode, batched=True, remove_columns=["text"] + (["text_pair"] if pair else []))


# ---------------------------------------------------------------- metrics


def compute_metrics(labels, predictions, num_labels: int) -> dict[str, float]:
    """Accuracy, F1 (binary: of label 1, as GLUE reports MRPC; otherwise macro) and MCC."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    average = "binary" if num_labels == 2 else "macro"
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, average=average, zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }


def majority_label(train: datasets.Dataset) -> int:
    return int(np.bincount(train["label"]).argmax())
