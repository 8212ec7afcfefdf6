"""The one evaluation path. Every model (LoRA, full, head-only, on dev or on eval) is scored
here with the same tokenized split, collator, dtype policy and metrics; the reference study
scored its two methods with different pipelines."""

from __future__ import annotations

import dataclasses

import datasets
import numpy as np
import pandas as pd
import torch
from transformers import DataCollatorWithPadding

from lorascope.runtime import autocast
from lorascope.tasks import compute_metrics

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class Evaluation:
    metrics: dict[str, float]
    predictions: pd.DataFrame  # example_id, label, prediction, prob_<k>


def make_collator(tokenizer, device: torch.device) -> DataCollatorWithPadding:
    """Dynamic padding to the longest example of each batch (multiple of 8 on CUDA)."""
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if device.type == "cuda" else None)


def length_batches(split: datasets.Dataset, tokenizer, batch_size: int, device: torch.device):
    """(row indices, padded model inputs on `device`), examples ordered by length so batches
    carry little padding; callers write results back at the row indices."""
    collate = make_collator(tokenizer, device)
    inputs = [c for c in MODEL_INPUTS if c in split.column_names]
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
