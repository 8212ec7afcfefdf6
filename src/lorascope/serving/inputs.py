"""What is served and the requests it is served: tokenized examples, the interleaved request
stream of several tasks, and padded batches."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoConfig

from lorascope.errors import InputError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BATCH_SEED = 0


@dataclasses.dataclass(frozen=True)
class Models:
    """What is served: a base checkpoint, LoRA adapters by task (the first is the one served
    by `merged` and `separate`), optionally a fully fine-tuned checkpoint, and adapters of
    further methods on the first task by method name (each served merged and separate too)."""

    base: str
    adapters: dict[str, str]
    full: str | None = None
    methods: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def first(self) -> str:
        return next(iter(self.adapters))

    def of_method(self, method: str) -> Models:
        """The further method's adapter as the one adapter served."""
        return Models(self.base, {self.first: self.methods[method]}, self.full)


@dataclasses.dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    tasks: list[str]  # the task each example comes from: its adapter under `multi`

    @property
    def real_tokens(self) -> int:
        return int(self.inputs["attention_mask"].sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.inputs["attention_mask"].numel())

    def to(self, device: torch.device) -> Batch:
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.tasks)


def tokenize_texts(tokenizer, texts: list[tuple[str, str | None]], max_length: int, labels=None) -> list[dict]:
    """Plain texts (single or pairs) to the example dicts `benchmark` takes, encoded the way
    the study encodes them (tokenizer's own pair format, truncation, no padding)."""
    out = []
    for i, (text, pair) in enumerate(texts):
        encoded = dict(tokenizer(text, pair, truncation=True, max_length=max_length))
        if labels is not None:
            encoded["label"] = int(labels[i])
        out.append(encoded)
    return out


def examples_from_dataset(split, max_examples: int | None = None) -> list[dict]:
    """A tokenized split (e.g. a study's prepared `eval`) to example dicts with labels."""
    keep = [c for c in (*MODEL_INPUTS, "label") if c in split.column_names and c != "attention_mask"]
    rows = split.select(range(min(len(split), max_examples or len(split)))).select_columns(keep)
    return rows.to_list()


def interleave(examples: dict[str, list[dict]], seed: int = BATCH_SEED) -> list[dict]:
    """One request stream: each task's examples shuffled, then taken in turn (t0, t1, t2, t0,
    ...) until the smallest task runs out, so every batch of K or more mixes all K tasks."""
    rng = np.random.default_rng(seed)
    orders = {t: rng.permutation(len(rows)) for t, rows in examples.items()}
    n = min(len(o) for o in orders.values())
    return [{**examples[t][int(orders[t][i])], "task": t} for i in range(n) for t in examples]


def pad_batch(rows: list[dict], pad_token_id: int, input_names, length: int | None = None, left: bool = False) -> Batch:
    """Right-padded tensors (left-padded with `left`, as generation needs). `length=None` pads to
    the batch's longest example (natural length); an int truncates or pads every example to
    exactly that many tokens."""
    target = length or max(len(r["input_ids"]) for r in rows)
    pads = {"input_ids": pad_token_id, "token_type_ids": 0}
    inputs = {}
    for name in input_names:
        if name == "attention_mask":
            values = [[1] * min(len(r["input_ids"]), target) for r in rows]
        else:
            values = [list(r[name][:target]) for r in rows]
        pad = pads.get(name, 0)
        padded = [[pad] * (target - len(v)) + v if left else v + [pad] * (target - len(v)) for v in values]
        inputs[name] = torch.tensor(padded, dtype=torch.long)
    return Batch(inputs, [r.get("task", "") for r in rows])


def make_batches(
    pool: list[dict], batch_size: int, seq_len, count: int, pad_token_id: int, input_names, offset: int = 0
) -> list[Batch]:
    """`count` consecutive batches of the request stream (wrapping around); seq_len is
    "natural" or a fixed number of tokens."""
    length = None if seq_len == "natural" else int(seq_len)
    return [
        pad_batch(request_rows(pool, batch_size, offset + b * batch_size), pad_token_id, input_names, length)
        for b in range(count)
    ]


def request_rows(pool: list[dict], size: int, start: int) -> list[dict]:
    """`size` consecutive examples of the request stream from position `start` (wrapping around,
    negative positions counting from its end)."""
    return [pool[(start + i) % len(pool)] for i in range(size)]


def forward_inputs(base: str) -> tuple[str, ...]:
    """The tensors this architecture's classifier accepts (Llama takes no token_type_ids)."""
    config = AutoConfig.from_pretrained(base)
    params = inspect.signature(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)].forward).parameters
    return tuple(name for name in MODEL_INPUTS if name in params)


def num_labels_of(models: Models) -> int:
    """Read from the first adapter's saved head, so the base can be built with the same shape."""
    suffixes = ("classifier.out_proj.weight", "classifier.weight", "score.weight")
    with safe_open(str(Path(models.adapters[models.first]) / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if key.endswith(suffixes):
                return int(f.get_slice(key).get_shape()[0])
    if models.full:
        return int(AutoConfig.from_pretrained(models.full).num_labels)
    raise InputError(
        f"{models.adapters[models.first]}: the adapter holds no classifier head, so the number of labels is unknown"
    )
