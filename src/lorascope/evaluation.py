"""The one evaluation path. Every model (LoRA, full, head-only, the base zero-shot; on dev or
on eval) is scored here with the same tokenized split, collator, dtype policy and metrics; the
reference study scored its two methods with different pipelines. Generative tasks: dev is
scored by the completion loss (generating on dev every few steps is too slow on a CPU), eval
by greedy generation and the SQuAD v2 scorer (lorascope.squad)."""

from __future__ import annotations

import dataclasses

import datasets
import numpy as np
import pandas as pd
import torch
from transformers import DataCollatorWithPadding

from lorascope import squad
from lorascope.generation import TRAIN_COLUMNS, CompletionCollator, generate_answers
from lorascope.runtime import autocast
from lorascope.tasks import Task, compute_metrics

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class Evaluation:
    metrics: dict[str, float]
    predictions: pd.DataFrame  # example_id, label, prediction, prob_<k>; generative: GENERATION_COLUMNS


# A generative evaluation's predictions.csv: the question id, the generated line, the answer it
# maps to ("" for the task's unanswerable string), and squad.squad_v2_rows' scores of it.
GENERATION_COLUMNS = (
    "example_id",
    "id",
    "generated",
    "prediction",
    "normalized_prediction",
    "has_answer",
    "exact",
    "f1",
)
# Generative metrics (fractions, as classification's): the scorer's keys in lower case.
GENERATION_METRICS = {
    "exact": "exact",
    "f1": "f1",
    "HasAns_exact": "has_ans_exact",
    "HasAns_f1": "has_ans_f1",
    "NoAns_exact": "no_ans_exact",
    "NoAns_f1": "no_ans_f1",
}


def make_collator(tokenizer, device: torch.device) -> DataCollatorWithPadding:
    """Dynamic padding to the longest example of each batch (multiple of 8 on CUDA)."""
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if device.type == "cuda" else None)


def length_batches(
    split: datasets.Dataset, tokenizer, batch_size: int, device: torch.device, collate=None, columns=MODEL_INPUTS
):
    """(row indices, padded model inputs on `device`), examples ordered by length so batches
    carry little padding; callers write results back at the row indices. `collate` pads
    `columns` (default: dynamic padding of the model inputs)."""
    collate = collate or make_collator(tokenizer, device)
    inputs = [c for c in columns if c in split.column_names]
    order = np.argsort(split["length"][:], kind="stable")
    for start in range(0, len(split), batch_size):
        rows = order[start : start + batch_size]
        batch = collate(split.select(rows).select_columns(inputs).to_list())
        yield rows, {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: datasets.Dataset,
    *,
    tokenizer,
    num_labels: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
) -> Evaluation:
    """Metrics and per-example predictions in the split's own order. Examples are batched by
    length (less padding) and put back in order afterwards."""
    was_training = model.training
    model.eval()
    logits = np.empty((len(split), num_labels), dtype=np.float32)
    for rows, batch in length_batches(split, tokenizer, batch_size, device):
        with autocast(device, bf16):
            out = model(**batch)
        logits[rows] = out.logits.float().cpu().numpy()
    model.train(was_training)

    labels = np.asarray(split["label"][:])
    probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    predictions = probs.argmax(-1)
    metrics = compute_metrics(labels, predictions, num_labels)
    metrics["loss"] = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    table = pd.DataFrame({"example_id": split["example_id"][:], "label": labels, "prediction": predictions})
    for k in range(num_labels):
        table[f"prob_{k}"] = probs[:, k]
    return Evaluation(metrics, table)


@torch.no_grad()
def completion_loss(
    model: torch.nn.Module, split: datasets.Dataset, *, tokenizer, batch_size: int, device: torch.device, bf16: bool
) -> float:
    """Mean cross-entropy per completion token (eos included) over a generative split."""
    was_training = model.training
    model.eval()
    collate = CompletionCollator(tokenizer, device)
    total, tokens = 0.0, 0
    for _, batch in length_batches(split, tokenizer, batch_size, device, collate, TRAIN_COLUMNS):
        with autocast(device, bf16):
            loss = model(**batch).loss
        counted = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
        total, tokens = total + float(loss) * counted, tokens + counted
    model.train(was_training)
    return total / tokens


def score_answers(task: Task, split: datasets.Dataset, generated: list[str]) -> Evaluation:
    """SQuAD v2 scores of one generated answer per example; the task's unanswerable string
    (any case or punctuation) is the empty answer."""
    unanswerable = squad.normalize_answer(task.unanswerable) if task.unanswerable else None
    answers = [
        "" if unanswerable is not None and squad.normalize_answer(text) == unanswerable else text for text in generated
    ]
    ids = split["id"][:]
    rows = squad.squad_v2_rows(dict(zip(ids, answers)), split)
    scores = squad.scores_of_rows(rows)
    metrics = {
        key: scores[official] / 100 if official in scores else float("nan")
        for official, key in GENERATION_METRICS.items()
    }
    table = pd.DataFrame(rows).drop(columns="id")
    table.insert(0, "generated", generated)
    table.insert(0, "id", ids)
    table.insert(0, "example_id", split["example_id"][:])
    return Evaluation(metrics, table[list(GENERATION_COLUMNS)])


def evaluate_task(
    model: torch.nn.Module,
    split: datasets.Dataset,
    task: Task,
    *,
    tokenizer,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    generate: bool = True,
) -> Evaluation:
    """`evaluate` for a classification task; for a generative one, greedy answers scored
    (`generate`) or the completion loss alone (dev selection: metrics {"loss"}, no predictions)."""
    common = dict(tokenizer=tokenizer, batch_size=batch_size, device=device, bf16=bf16)
    if not task.generative:
        return evaluate(model, split, num_labels=task.num_labels, **common)
    if not generate:
        return Evaluation({"loss": completion_loss(model, split, **common)}, pd.DataFrame())
    texts, new_tokens = generate_answers(model, split, max_new_tokens=task.max_new_tokens, **common)
    evaluation = score_answers(task, split, texts)
    evaluation.metrics["generated_tokens"] = new_tokens
    return evaluation
