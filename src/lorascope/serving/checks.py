"""Correctness before timing: every serving path's fp32 logits against its reference on each
task's labelled examples. The reference study ran its multi-adapter "check" on test splits
whose labels are hidden; serving stacks have been seen to serve the base model silently."""

from __future__ import annotations

import gc

import numpy as np
import pandas as pd
import torch
from peft import PeftModel

from lorascope.serving.inputs import Models, pad_batch
from lorascope.serving.strategies import REGISTRY, activate, load_multi
from lorascope.study import Table

ATOL = 1e-4  # fp32 logits of merged vs unmerged LoRA differ by rounding (~1e-6), never by 1e-4
CHECK_BATCH_SIZE = 32
DEPLOYMENT_CHECKS = Table(
    "deployment_checks",
    (
        "check",
        "task",
        "method",
        "n_examples",
        "max_abs_diff",
        "prediction_mismatches",
        "tolerance",
        "passed",
        "accuracy",
        "reference_accuracy",
    ),
)


class DeploymentCheckFailed(RuntimeError):
    """A serving path gave other logits than its reference; the table says by how much."""

    def __init__(self, checks: pd.DataFrame):
        self.checks = checks
        failed = checks[~checks["passed"].astype(bool)]
        lines = [
            f"{r.check} {r.task}: max |Δlogit| {r.max_abs_diff:.3g} (tolerance {r.tolerance:g}), "
            f"{r.prediction_mismatches} of {r.n_examples} predictions differ"
            for r in failed.itertuples()
        ]
        super().__init__("deployment correctness check failed: " + "; ".join(lines))


@torch.inference_mode()
def logits(model, rows: list[dict], pad_token_id: int, input_names, device, multi: bool = False) -> torch.Tensor:
    """fp32 logits (no autocast) in the order of `rows`, batches padded to their longest."""
    out = []
    for start in range(0, len(rows), CHECK_BATCH_SIZE):
        batch = pad_batch(rows[start : start + CHECK_BATCH_SIZE], pad_token_id, input_names).to(device)
        extra = {"adapter_names": batch.tasks} if multi else {}
        out.append(model(**batch.inputs, **extra).logits.float().cpu())
    return torch.cat(out)


def _switched_logits(model: PeftModel, examples: dict[str, list[dict]], pad_token_id, input_names, device):
    """Each task's logits through the switch path, the active adapter changing every batch."""
    chunks = {
        t: [rows[i : i + CHECK_BATCH_SIZE] for i in range(0, len(rows), CHECK_BATCH_SIZE)]
        for t, rows in examples.items()
    }
    out: dict[str, list[torch.Tensor]] = {t: [] for t in examples}
    for i in range(max(len(c) for c in chunks.values())):
        for task in examples:
            if i < len(chunks[task]):
                activate(model, task)
                out[task].append(logits(model, chunks[task][i], pad_token_id, input_names, device))
    return {t: torch.cat(v) for t, v in out.items()}


def _multi_logits(model: PeftModel, examples: dict[str, list[dict]], pad_token_id, input_names, device):
    """Each task's logits from batches that mix all tasks (t0, t1, ..., t0, ...)."""
    order = [(t, i) for i in range(max(map(len, examples.values()))) for t in examples if i < len(examples[t])]
    multi = logits(
        model, [{**examples[t][i], "task": t} for t, i in order], pad_token_id, input_names, device, multi=True
    )
    return {t: multi[[k for k, (task, _) in enumerate(order) if task == t]] for t in examples}


def compare_logits(
    check: str, task: str, candidate: torch.Tensor, reference: torch.Tensor, labels=None, atol: float = ATOL
) -> dict:
    """One check row: max |Δlogit|, how many predictions differ, accuracy of both if labelled."""
    predicted, expected = candidate.argmax(-1), reference.argmax(-1)
    diff = float((candidate - reference).abs().max())
    mismatches = int((predicted != expected).sum())
    row = {
        "check": check,
        "task": task,
        "n_examples": len(candidate),
        "max_abs_diff": diff,
        "prediction_mismatches": mismatches,
        "tolerance": atol,
        "passed": diff <= atol and mismatches == 0,
        "accuracy": np.nan,
        "reference_accuracy": np.nan,
    }
    if labels is not None:
        labels = torch.as_tensor(labels)
        row["accuracy"] = float((predicted == labels).float().mean())
        row["reference_accuracy"] = float((expected == labels).float().mean())
    return row


def check_correctness(
    models: Models,
    examples: dict[str, list[dict]],
    num_labels: int,
    pad_token_id: int,
    input_names,
    device: torch.device,
    method: str = "",
) -> pd.DataFrame:
    """fp32 logits of every serving path against its reference, on each task's examples:
    merged vs the same adapter unmerged; with 2+ adapters, the switch path and each example of
    a batch holding every task (multi) vs a freshly loaded single adapter. `method`: the adapter
    method the rows are of, for the table."""
    rows, alone = [], {}
    # shortest first: batches pad to their longest, and every check row is order-free
    examples = {t: sorted(ex, key=lambda r: len(r["input_ids"])) for t, ex in examples.items()}
    labels = {t: [r["label"] for r in ex] if all("label" in r for r in ex) else None for t, ex in examples.items()}
    for task in models.adapters:
        one = Models(models.base, {task: models.adapters[task]})
        separate = REGISTRY["separate"].load(one, num_labels, pad_token_id).to(device)
        alone[task] = logits(separate, examples[task], pad_token_id, input_names, device)
        merged = separate.merge_and_unload()
        rows.append(
            compare_logits(
                "merged_vs_separate",
                task,
                logits(merged, examples[task], pad_token_id, input_names, device),
                alone[task],
                labels[task],
            )
        )
        del separate, merged
    if len(models.adapters) >= 2:
        multi = load_multi(models, num_labels, pad_token_id).to(device)
        task_examples = {t: examples[t] for t in models.adapters}
        switched = _switched_logits(multi, task_examples, pad_token_id, input_names, device)
        together = _multi_logits(multi, task_examples, pad_token_id, input_names, device)
        for task in models.adapters:
            rows.append(compare_logits("switch_vs_fresh", task, switched[task], alone[task], labels[task]))
            rows.append(compare_logits("multi_vs_alone", task, together[task], alone[task], labels[task]))
        del multi
    gc.collect()
    return DEPLOYMENT_CHECKS.frame(
        pd.DataFrame([r | {"method": method} for r in rows], columns=DEPLOYMENT_CHECKS.columns)
    )
