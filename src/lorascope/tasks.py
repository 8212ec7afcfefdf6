"""Task registry (GLUE SST-2 / MRPC / RTE, SQuAD v2, and custom classification or generative
tasks), loading with input checks, the train / dev / eval / probe splits, tokenization and
metrics."""

from __future__ import annotations

import dataclasses
import os
import string
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
    """A classification task (`text`, [`text_pair`], `label`) or a generative one (`kind`
    generate: a prompt, from its column or from `template` over the example's columns, and the
    completion it learns)."""

    name: str
    source: str
    subset: str | None
    text: str | None = None
    text_pair: str | None = None
    label: str = "label"
    label_names: tuple[str, ...] | None = None
    metric: str = "accuracy"
    kind: str = "classify"  # classify | generate
    prompt: str | None = None
    template: str | None = None
    completion: str | None = None
    chat_template: bool = False
    unanswerable: str | None = None  # SQuAD v2: the target of a question without answer
    unanswerable_share: float | None = None
    max_new_tokens: int | None = None  # after prepare: min(the cap, the longest training completion)
    train_split: str = "train"
    eval_split: str = "validation"
    eval_source: str | None = None
    train_max: int | None = None
    eval_max: int | None = None
    dev_max: int | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def generative(self) -> bool:
        return self.kind == "generate"

    @property
    def squad(self) -> bool:
        """Data in the SQuAD v2 layout (the built-in squad_v2: it alone has an `unanswerable` target)."""
        return self.unanswerable is not None

    def render(self, example: dict) -> str:
        """The prompt of one raw example."""
        if self.template is None:
            return str(example[self.prompt])
        return self.template.format(**example, **({"unanswerable": self.unanswerable} if self.unanswerable else {}))


GLUE_TASKS = {
    "sst2": dict(text="sentence", text_pair=None, label_names=("negative", "positive"), metric="accuracy"),
    "mrpc": dict(text="sentence1", text_pair="sentence2", label_names=("not_equivalent", "equivalent"), metric="f1"),
    "rte": dict(
        text="sentence1", text_pair="sentence2", label_names=("entailment", "not_entailment"), metric="accuracy"
    ),
}
# SQuAD v2 as a prompt -> completion task: the first gold answer, or the task's `unanswerable`
# string, follows the prompt; evaluation scores the generated answer against every gold answer.
SQUAD_V2 = "squad_v2"
SQUAD_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer (a span of the context, or '{unanswerable}'):"
SQUAD_COLUMNS = ("id", "context", "question", "answers")
CUSTOM_ONLY_KEYS = (
    "source",
    "subset",
    "eval_source",
    "text",
    "text_pair",
    "label_names",
    "metric",
    "prompt",
    "template",
    "completion",
)
GENERATIVE_KEYS = ("chat_template", "max_new_tokens")  # set on a classification task: an input error
SQUAD_ONLY_KEYS = ("unanswerable", "unanswerable_share")
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
SPLITS = ("train", "dev", "eval", "probe")


def resolve_task(name: str, cfg: TaskConfig, data: DataConfig) -> Task:
    sizes = dict(train_max=cfg.train_max, eval_max=cfg.eval_max, dev_max=cfg.dev_max)
    generation = dict(chat_template=cfg.chat_template, max_new_tokens=cfg.max_new_tokens)
    set_keys = _changed_keys(cfg)
    if name != SQUAD_V2 and (given := [k for k in SQUAD_ONLY_KEYS if k in set_keys]):
        raise InputError(f"tasks.{name}: {', '.join(given)} apply to squad_v2 only")
    if cfg.source is None:
        if name not in (*GLUE_TASKS, SQUAD_V2):
            raise InputError(
                f"unknown task '{name}': built-in tasks are {', '.join([*GLUE_TASKS, SQUAD_V2])}; "
                f"a custom task needs tasks.{name}.source"
            )
        given = [k for k in CUSTOM_ONLY_KEYS if getattr(cfg, k) is not None]
        if given:
            raise InputError(f"tasks.{name}: built-in task; remove {', '.join(given)} or give it a new name")
        if name == SQUAD_V2:
            return Task(
                name=name,
                source=data.squad_v2_source(),
                subset=None,
                metric="f1",
                kind="generate",
                template=SQUAD_TEMPLATE,
                unanswerable=cfg.unanswerable,
                unanswerable_share=cfg.unanswerable_share,
                **generation,
                **sizes,
            )
        _refuse_generation_keys(name, set_keys)
        return Task(name=name, source=data.glue_source(), subset=name, label="label", **GLUE_TASKS[name], **sizes)
    if cfg.completion is not None:
        return _generative_task(name, cfg, generation, sizes)
    _refuse_generation_keys(name, set_keys)
    if cfg.text is None:
        raise InputError(
            f"tasks.{name}: a custom task needs `text` (a classification task's text column) or `completion` "
            "(a generative task's completion column)"
        )
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


def _changed_keys(cfg: TaskConfig) -> set[str]:
    """The keys whose value is not the default: a config written back to a study's config.yaml
    holds every key, so whether a key was given is read from its value."""
    return {key for key, field in TaskConfig.model_fields.items() if getattr(cfg, key) != field.default}


def _refuse_generation_keys(name: str, set_keys: set[str]) -> None:
    if given := [k for k in GENERATIVE_KEYS if k in set_keys]:
        raise InputError(f"tasks.{name}: {', '.join(given)} apply to generative tasks only (`completion` given)")


def _generative_task(name: str, cfg: TaskConfig, generation: dict, sizes: dict) -> Task:
    if (cfg.prompt is None) == (cfg.template is None):
        raise InputError(f"tasks.{name}: a generative task needs one of `prompt` (a column) or `template`")
    given = [k for k in ("text", "text_pair", "label_names", "metric") if getattr(cfg, k) is not None]
    if given:
        raise InputError(f"tasks.{name}: {', '.join(given)} apply to classification tasks; remove them")
    if cfg.template is not None:
        try:
            fields = template_fields(cfg.template)
        except ValueError as err:
            raise InputError(f"tasks.{name}.template: {err}") from None
        if not fields:
            raise InputError(f"tasks.{name}.template: names no {{column}}, so every prompt would be the same")
    return Task(
        name=name,
        source=cfg.source,
        subset=cfg.subset,
        metric="f1",
        kind="generate",
        prompt=cfg.prompt,
        template=cfg.template,
        completion=cfg.completion,
        train_split=cfg.train_split,
        eval_split=cfg.eval_split,
        eval_source=cfg.eval_source,
        **generation,
        **sizes,
    )


def template_fields(template: str) -> list[str]:
    """The {column} names a prompt template uses (ValueError for a malformed template)."""
    fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    bad = [f for f in fields if not f.isidentifier()]
    if bad:
        raise ValueError(f"placeholders must be plain column names, not {bad}")
    return list(dict.fromkeys(fields))


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
    if task.generative:
        return task, _normalise_generative(task, train, "train"), _normalise_generative(task, evaluation, "eval")
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
    missing = [c for c in _source_columns(task) if c not in ds.column_names]
    if missing:
        raise InputError(f"{_where(task, split)}: missing column(s) {missing}; columns are {ds.column_names}")


def _source_columns(task: Task) -> list[str]:
    if task.squad:
        return list(SQUAD_COLUMNS)
    if task.generative:
        return (template_fields(task.template) if task.template else [task.prompt]) + [task.completion]
    return [task.text, task.label] + ([task.text_pair] if task.text_pair else [])


def _normalise_generative(task: Task, ds: datasets.Dataset, split: str) -> datasets.Dataset:
    """Columns prompt (rendered, before any chat template), completion (the target), answers
    ({text: gold answers}; SQuAD v2: [] when unanswerable), id (str) and example_id (row)."""
    rows = ds.select_columns(_source_columns(task)).to_list()
    if task.squad:
        golds = [row["answers"]["text"] for row in rows]
        completions = [texts[0] if texts else task.unanswerable for texts in golds]
        ids = [str(row["id"]) for row in rows]
    else:
        completions = ["" if row[task.completion] is None else str(row[task.completion]) for row in rows]
        golds = [[text] for text in completions]
        ids = [str(i) for i in range(len(rows))]
    empty = [i for i, text in enumerate(completions) if not text.strip()]
    if empty:
        raise InputError(
            f"{_where(task, split)}: {len(empty)} example(s) have an empty completion (column "
            f"'{task.completion or 'answers'}'), e.g. row {empty[0]}"
        )
    columns = {
        "prompt": [task.render(row) for row in rows],
        "completion": completions,
        "answers": [{"text": texts} for texts in golds],
        "id": ids,
        "example_id": list(range(len(rows))),
    }
    return datasets.Dataset.from_dict(columns)


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
    every run of a study sees the same splits. Strata: the label; for SQuAD v2, whether the
    question has an answer."""
    strata = _strata(task, train)
    fewest = len(task.label_names) if not task.generative else 2
    n_dev = min(task.dev_max or data.dev_max, max(fewest, round(data.dev_fraction * len(train))))
    keep, dev = train_test_split(np.arange(len(train)), test_size=n_dev, stratify=strata, random_state=data.split_seed)
    if task.unanswerable_share is not None:
        keep = _with_share(task, keep, strata, data.split_seed)
    elif task.train_max and task.train_max < len(keep):
        by = None if strata is None else strata[keep]
        keep, _ = train_test_split(keep, train_size=task.train_max, stratify=by, random_state=data.split_seed)
    train_part, dev = train.select(np.sort(keep)), train.select(np.sort(dev))
    rng = np.random.default_rng(data.split_seed)
    if task.eval_max and task.generative:
        evaluation = evaluation.select(np.sort(rng.permutation(len(evaluation))[: task.eval_max]))
    elif task.eval_max:
        evaluation = evaluation.select(range(min(task.eval_max, len(evaluation))))
    probe_rows = np.sort(rng.permutation(len(evaluation))[: data.probe_size])
    return datasets.DatasetDict(train=train_part, dev=dev, eval=evaluation, probe=evaluation.select(probe_rows))


def _strata(task: Task, train: datasets.Dataset) -> np.ndarray | None:
    if not task.generative:
        return np.asarray(train["label"])
    if task.squad:
        answerable = np.array([bool(a["text"]) for a in train["answers"]])
        return answerable if min(answerable.sum(), (~answerable).sum()) >= 2 else None
    return None


def _with_share(task: Task, keep: np.ndarray, strata: np.ndarray | None, seed: int) -> np.ndarray:
    """The train rows with `unanswerable_share` of them unanswerable (SQuAD v2), drawn with `seed`."""
    answerable = strata[keep] if strata is not None else np.array([True] * len(keep))
    total = min(task.train_max or len(keep), len(keep))
    wanted = round(task.unanswerable_share * total)
    have = int((~answerable).sum())
    if wanted > have:
        raise InputError(
            f"tasks.{task.name}: unanswerable_share {task.unanswerable_share} of {total} training questions needs "
            f"{wanted} unanswerable ones; the train split has {have} after the dev hold-out (lower train_max or "
            "the share)"
        )
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(keep[~answerable])[:wanted], rng.permutation(keep[answerable])[: total - wanted]]
    return np.sort(np.concatenate(chosen))


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


def prompt_text(task: Task, prompt: str, tokenizer) -> str:
    """The text a prompt is tokenized from: as is, or as a user turn of the chat template
    followed by the assistant's header (`chat_template`)."""
    if not task.chat_template:
        return prompt
    if tokenizer.chat_template is None:
        raise InputError(f"tasks.{task.name}.chat_template: the model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def tokenize_completions(task: Task, splits: datasets.DatasetDict, tokenizer, max_length: int):
    """Generative splits: input_ids = prompt + completion + eos, labels = -100 on the prompt
    (the loss is on the completion only), prompt_length, length. Prompt and completion are
    tokenized apart, so the prompt's tokens are the ones generation later starts from.

    Returns the task with `max_new_tokens` set (the longest training completion with its eos,
    at most the configured cap), the splits without the examples that do not fit max_length
    (prompt + max_new_tokens, and prompt + completion), and how many each split left out."""
    chat = task.chat_template

    def encode(batch):
        texts = [prompt_text(task, p, tokenizer) for p in batch["prompt"]]
        prompts = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
        # without a chat template the completion follows the prompt's last word after a space
        targets = tokenizer([c if chat else " " + c for c in batch["completion"]], add_special_tokens=False)
        out = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_length": [], "length": []}
        for prompt, target in zip(prompts, targets["input_ids"]):
            ids = prompt + target + [tokenizer.eos_token_id]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([-100] * len(prompt) + ids[len(prompt) :])
            out["prompt_length"].append(len(prompt))
            out["length"].append(len(ids))
        return out

    encoded = splits.map(encode, batched=True, batch_size=256)
    longest = max(n - p for n, p in zip(encoded["train"]["length"], encoded["train"]["prompt_length"]))
    task = dataclasses.replace(task, max_new_tokens=min(task.max_new_tokens or longest, longest))
    budget = max_length - task.max_new_tokens

    def fits(example):
        return example["length"] <= max_length and example["prompt_length"] <= budget

    kept = encoded.filter(fits)
    left_out = {name: len(encoded[name]) - len(kept[name]) for name in encoded}
    for name, split in kept.items():
        if len(split) == 0:
            raise InputError(
                f"tasks.{task.name}: no {name} example fits model.max_length {max_length} (prompt + "
                f"{task.max_new_tokens} generated tokens); raise model.max_length"
            )
    return task, kept, left_out


def prompts_only(split: datasets.Dataset) -> datasets.Dataset:
    """A generative split cut to its prompts (what representations pool, and what generation
    starts from); a classification split as it is."""
    if "prompt_length" not in split.column_names:
        return split

    def cut(example):
        n = example["prompt_length"]
        return {"input_ids": example["input_ids"][:n], "attention_mask": example["attention_mask"][:n], "length": n}

    return split.map(cut, remove_columns=["labels"])


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
