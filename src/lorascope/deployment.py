"""Deployment cost of serving fine-tuned classifiers: full fine-tuning vs LoRA merged vs LoRA
kept separate vs several adapters on one base (switched per request, or mixed in one batch).

The reference study timed batch size 1 only, without device synchronisation, in blocks, on
its warm-up inputs, with peak memory that included loading and a multi-adapter "check" on
unlabelled data. Here every number comes from a measurement that rules those out:

- correctness first: merged vs separate logits in fp32, each example of a mixed batch vs its
  adapter alone, the switch path vs a freshly loaded adapter; a failure stops the benchmark;
- every strategy of a cell sees the same batches; warm-up calls use batches that are not
  timed; strategies are interleaved round robin (the first one rotates) so machine drift
  hits all of them alike; CUDA is synchronised around every timed call; thread count fixed;
- overhead is the median of per-round latency ratios (both strategies ran the same batch in
  the same round) with a bootstrap interval over rounds;
- memory is measured in a fresh process per strategy, after loading, so loading never counts
  as inference memory.

Entry point: `benchmark(...)`. `python -m lorascope.deployment memory SPEC.json` is the child
process that measures one strategy's memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import importlib.util
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from peft import PeftConfig, PeftModel
from safetensors import safe_open
from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoConfig, AutoModelForSequenceClassification

from lorascope.config import DeployConfig
from lorascope.errors import InputError
from lorascope.modeling import autocast

STRATEGIES = ("base", "full", "merged", "separate", "switch", "mixed")
COMPILED = {"merged_compiled": "merged", "separate_compiled": "separate"}
MULTI_ADAPTER = ("switch", "mixed")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TIMING_COLUMNS = [
    "strategy", "batch_size", "seq_len", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "examples_per_s",
    "overhead_vs_full", "tokens_per_s", "overhead_ci_low", "overhead_ci_high", "threads", "repeats", "warmup",
    "real_tokens_per_s", "mean_padded_length", "overhead_vs_merged", "overhead_vs_merged_ci_low",
    "overhead_vs_merged_ci_high", "device", "status", "note",
]  # fmt: skip
MEMORY_COLUMNS = [
    "strategy", "load_seconds", "peak_mb", "loaded_mb", "inference_mb", "disk_mb", "adapter_disk_mb",
    "measure", "method", "device",
]  # fmt: skip
CHECK_COLUMNS = [
    "check", "task", "n_examples", "max_abs_diff", "prediction_mismatches", "tolerance", "passed",
    "accuracy", "reference_accuracy",
]  # fmt: skip
ATOL = 1e-4  # fp32 logits of merged vs unmerged LoRA differ by rounding (~1e-6), never by 1e-4
CONFIDENCE = 0.95
BATCH_SEED = 0
CHECK_BATCH_SIZE = 32
COLORS = {
    "base": "#7f7f7f", "full": "#000000", "merged": "#1f77b4", "separate": "#ff7f0e", "switch": "#2ca02c",
    "mixed": "#d62728", "merged_compiled": "#9ecae1", "separate_compiled": "#fdae6b",
}  # fmt: skip
# PEFT routes the examples of a mixed batch to their adapters only through these wrappers
MIXABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_SET_ADAPTER_HAS_MODE = "inference_mode" in inspect.signature(PeftModel.set_adapter).parameters


class DeploymentCheckFailed(RuntimeError):
    """A serving path gave other logits than its reference; the table says by how much."""

    def __init__(self, checks: pd.DataFrame):
        self.checks = checks
        failed = checks[~checks["passed"].astype(bool)]
        lines = [f"{r.check} {r.task}: max |Δlogit| {r.max_abs_diff:.3g} (tolerance {r.tolerance:g}), "
                 f"{r.prediction_mismatches} of {r.n_examples} predictions differ"
                 for r in failed.itertuples()]  # fmt: skip
        super().__init__("deployment correctness check failed: " + "; ".join(lines))


@dataclasses.dataclass(frozen=True)
class Models:
    """What is served: a base checkpoint, LoRA adapters by task (the first is the one served
    by `merged` and `separate`), and optionally a fully fine-tuned checkpoint."""

    base: str
    adapters: dict[str, str]
    full: str | None = None

    @property
    def first(self) -> str:
        return next(iter(self.adapters))


@dataclasses.dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    tasks: list[str]  # the task each example comes from: its adapter in a mixed batch

    @property
    def real_tokens(self) -> int:
        return int(self.inputs["attention_mask"].sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.inputs["attention_mask"].numel())

    def to(self, device: torch.device) -> Batch:
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.tasks)


@dataclasses.dataclass
class DeploymentResult:
    timings: pd.DataFrame
    checks: pd.DataFrame
    memory: pd.DataFrame
    skipped: dict[str, str]


def _say(message: str) -> None:
    print(f"deploy: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs


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


def pad_batch(rows: list[dict], pad_token_id: int, input_names, length: int | None = None) -> Batch:
    """Right-padded tensors. `length=None` pads to the batch's longest example (natural
    length); an int truncates or pads every example to exactly that many tokens."""
    target = length or max(len(r["input_ids"]) for r in rows)
    pads = {"input_ids": pad_token_id, "token_type_ids": 0}
    inputs = {}
    for name in input_names:
        if name == "attention_mask":
            values = [[1] * min(len(r["input_ids"]), target) for r in rows]
        else:
            values = [list(r[name][:target]) for r in rows]
        pad = pads.get(name, 0)
        inputs[name] = torch.tensor([v + [pad] * (target - len(v)) for v in values], dtype=torch.long)
    return Batch(inputs, [r.get("task", "") for r in rows])


def make_batches(pool: list[dict], batch_size: int, seq_len, count: int, pad_token_id: int, input_names,
                 offset: int = 0) -> list[Batch]:  # fmt: skip
    """`count` consecutive batches of the request stream (wrapping around); seq_len is
    "natural" or a fixed number of tokens."""
    length = None if seq_len == "natural" else int(seq_len)
    batches = []
    for b in range(count):
        start = offset + b * batch_size
        rows = [pool[(start + i) % len(pool)] for i in range(batch_size)]
        batches.append(pad_batch(rows, pad_token_id, input_names, length))
    return batches


def forward_inputs(base: str) -> tuple[str, ...]:
    """The tensors this architecture's classifier accepts (Llama takes no token_type_ids)."""
    config = AutoConfig.from_pretrained(base)
    params = inspect.signature(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)].forward).parameters
    return tuple(name for name in MODEL_INPUTS if name in params)


# ---------------------------------------------------------------- loading


def num_labels_of(models: Models) -> int:
    """Read from the first adapter's saved head, so the base can be built with the same shape."""
    suffixes = ("classifier.out_proj.weight", "classifier.weight", "score.weight")
    with safe_open(str(Path(models.adapters[models.first]) / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if key.endswith(suffixes):
                return int(f.get_slice(key).get_shape()[0])
    if models.full:
        return int(AutoConfig.from_pretrained(models.full).num_labels)
    raise InputError(f"{models.adapters[models.first]}: the adapter holds no classifier head, "
                     "so the number of labels is unknown")


def load_base(base: str, num_labels: int, pad_token_id: int) -> torch.nn.Module:
    """fp32 classifier on the base weights. The head of the `base` strategy is random (seeded):
    it is a compute reference, not a predictor; adapters overwrite it with their own."""
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels, dtype=torch.float32)
    model.config.pad_token_id = pad_token_id
    return model.eval()


def _merge(model: PeftModel) -> torch.nn.Module:
    """merge_and_unload returns the merged model (the wrapper must not be used afterwards)."""
    return model.merge_and_unload()


def mixable_modules(model: torch.nn.Module, names: list[str] | None) -> list[str]:
    """PEFT can route each example of a batch to its own adapter only through Linear /
    Embedding / Conv wrappers; a trained block such as BERT's pooler (Linear + tanh) is
    targeted through its Linear children instead: the same weights and the same function."""
    out = []
    for name in names or []:
        hits = [m for key, m in model.named_modules() if key.endswith(name)]  # PEFT's matching rule
        if all(isinstance(m, MIXABLE) for m in hits):
            out.append(name)
            continue
        for module in hits:
            parts = {child: sub for child, sub in module.named_modules() if child and isinstance(sub, MIXABLE)}
            covered = sum(p.numel() for sub in parts.values() for p in sub.parameters())
            if covered != sum(p.numel() for p in module.parameters()):
                raise InputError(f"modules_to_save '{name}' ({type(module).__name__}) has parameters PEFT cannot "
                                 "route per example, so its adapters cannot be mixed in one batch")  # fmt: skip
            out.extend(f"{name}.{child}" for child in parts)
    return list(dict.fromkeys(out))


def load_multi(models: Models, num_labels: int, pad_token_id: int) -> PeftModel:
    """All adapters on one base, each under its task's name (for `switch` and `mixed`). Their
    trained head blocks are wrapped where PEFT can mix them (see `mixable_modules`)."""
    base_model = load_base(models.base, num_labels, pad_token_id)
    configs = {}
    for name, path in models.adapters.items():
        config = PeftConfig.from_pretrained(path)
        config.inference_mode = True
        config.modules_to_save = mixable_modules(base_model, config.modules_to_save)
        configs[name] = config
    names = list(models.adapters)
    first = names[0]
    model = PeftModel.from_pretrained(base_model, models.adapters[first], adapter_name=first, config=configs[first])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
        loaded = model.load_adapter(models.adapters[name], adapter_name=name)
        if getattr(loaded, "unexpected_keys", None):
            raise InputError(f"{models.adapters[name]}: weights that fit no module: {loaded.unexpected_keys[:3]}")
    activate(model, names[0])
    return model


def activate(model: PeftModel, name: str) -> None:
    """Switch the active adapter as a server would: without touching requires_grad."""
    if _SET_ADAPTER_HAS_MODE:
        model.set_adapter(name, inference_mode=True)
    else:  # older PEFT
        model.set_adapter(name)


def load_strategy(strategy: str, models: Models, num_labels: int, pad_token_id: int) -> torch.nn.Module:
    """A model ready to serve `strategy`, in eval mode, fp32, on the CPU."""
    if strategy == "base":
        return load_base(models.base, num_labels, pad_token_id)
    if strategy == "full":
        model = AutoModelForSequenceClassification.from_pretrained(models.full, dtype=torch.float32)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
        return model.eval()
    if strategy in ("merged", "separate"):
        base_model = load_base(models.base, num_labels, pad_token_id)
        model = PeftModel.from_pretrained(base_model, models.adapters[models.first])
        return _merge(model).eval() if strategy == "merged" else model.eval()
    if strategy in MULTI_ADAPTER:
        return load_multi(models, num_labels, pad_token_id).eval()
    raise ValueError(f"unknown strategy '{strategy}'")


def serving_call(strategy: str, model: torch.nn.Module, tasks: list[str]) -> Callable[[Batch, int], torch.Tensor]:
    """What one request costs under `strategy`. `switch`: requests alternate between tasks and
    each activates its adapter inside the call; `mixed`: each example names its adapter."""
    if strategy == "switch":

        def call(batch: Batch, request: int) -> torch.Tensor:
            activate(model, tasks[request % len(tasks)])
            return model(**batch.inputs).logits

    elif strategy == "mixed":

        def call(batch: Batch, request: int) -> torch.Tensor:
            return model(**batch.inputs, adapter_names=batch.tasks).logits

    else:

        def call(batch: Batch, request: int) -> torch.Tensor:
            return model(**batch.inputs).logits

    return call


# ---------------------------------------------------------------- correctness


@torch.inference_mode()
def _logits(model, rows: list[dict], pad_token_id: int, input_names, device, mixed: bool = False) -> torch.Tensor:
    """fp32 logits (no autocast) in the order of `rows`, batches padded to their longest."""
    out = []
    for start in range(0, len(rows), CHECK_BATCH_SIZE):
        batch = pad_batch(rows[start : start + CHECK_BATCH_SIZE], pad_token_id, input_names).to(device)
        extra = {"adapter_names": batch.tasks} if mixed else {}
        out.append(model(**batch.inputs, **extra).logits.float().cpu())
    return torch.cat(out)


def _switched_logits(model: PeftModel, examples: dict[str, list[dict]], pad_token_id, input_names, device):
    """Each task's logits through the switch path, the active adapter changing every batch."""
    chunks = {t: [rows[i : i + CHECK_BATCH_SIZE] for i in range(0, len(rows), CHECK_BATCH_SIZE)]
              for t, rows in examples.items()}  # fmt: skip
    out: dict[str, list[torch.Tensor]] = {t: [] for t in examples}
    for i in range(max(len(c) for c in chunks.values())):
        for task in examples:
            if i < len(chunks[task]):
                activate(model, task)
                out[task].append(_logits(model, chunks[task][i], pad_token_id, input_names, device))
    return {t: torch.cat(v) for t, v in out.items()}


def _mixed_logits(model: PeftModel, examples: dict[str, list[dict]], pad_token_id, input_names, device):
    """Each task's logits from batches that mix all tasks (t0, t1, ..., t0, ...)."""
    order = [(t, i) for i in range(max(map(len, examples.values()))) for t in examples if i < len(examples[t])]
    logits = _logits(model, [{**examples[t][i], "task": t} for t, i in order], pad_token_id, input_names, device,
                     mixed=True)  # fmt: skip
    return {t: logits[[k for k, (task, _) in enumerate(order) if task == t]] for t in examples}


def compare_logits(check: str, task: str, candidate: torch.Tensor, reference: torch.Tensor, labels=None,
                   atol: float = ATOL) -> dict:  # fmt: skip
    """One check row: max |Δlogit|, how many predictions differ, accuracy of both if labelled."""
    predicted, expected = candidate.argmax(-1), reference.argmax(-1)
    diff = float((candidate - reference).abs().max())
    mismatches = int((predicted != expected).sum())
    row = {"check": check, "task": task, "n_examples": len(candidate), "max_abs_diff": diff,
           "prediction_mismatches": mismatches, "tolerance": atol, "passed": diff <= atol and mismatches == 0,
           "accuracy": np.nan, "reference_accuracy": np.nan}  # fmt: skip
    if labels is not None:
        labels = torch.as_tensor(labels)
        row["accuracy"] = float((predicted == labels).float().mean())
        row["reference_accuracy"] = float((expected == labels).float().mean())
    return row


def check_correctness(models: Models, examples: dict[str, list[dict]], num_labels: int, pad_token_id: int,
                      input_names, device: torch.device) -> pd.DataFrame:  # fmt: skip
    """fp32 logits of every serving path against its reference, on each task's examples:
    merged vs the same adapter unmerged; with 2+ adapters, the switch path and each example of
    a mixed batch vs a freshly loaded single adapter."""
    rows, alone = [], {}
    labels = {t: [r["label"] for r in ex] if all("label" in r for r in ex) else None for t, ex in examples.items()}
    for task, path in models.adapters.items():
        separate = PeftModel.from_pretrained(load_base(models.base, num_labels, pad_token_id), path).to(device).eval()
        alone[task] = _logits(separate, examples[task], pad_token_id, input_names, device)
        merged = _merge(separate)
        rows.append(compare_logits("merged_vs_separate", task, _logits(merged, examples[task], pad_token_id,
                                   input_names, device), alone[task], labels[task]))  # fmt: skip
        del separate, merged
    if len(models.adapters) >= 2:
        multi = load_multi(models, num_labels, pad_token_id).to(device).eval()
        task_examples = {t: examples[t] for t in models.adapters}
        switched = _switched_logits(multi, task_examples, pad_token_id, input_names, device)
        mixed = _mixed_logits(multi, task_examples, pad_token_id, input_names, device)
        for task in models.adapters:
            rows.append(compare_logits("switch_vs_fresh", task, switched[task], alone[task], labels[task]))
            rows.append(compare_logits("mixed_vs_alone", task, mixed[task], alone[task], labels[task]))
        del multi
    gc.collect()
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)


# ---------------------------------------------------------------- timing


def round_robin(strategies: list[str], repeats: int) -> list[list[str]]:
    """Order of the timed calls: each repetition calls every strategy once, and the first one
    rotates, so neither machine drift nor position in the round favours a strategy."""
    n = len(strategies)
    return [strategies[r % n :] + strategies[: r % n] for r in range(repeats)]


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call; on CUDA the queue is drained before and after, so the time is
    the call's own work and not the launch of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


@contextlib.contextmanager
def _gc_paused():
    """A garbage-collector pass would land on a random call of a random strategy."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_cell(calls: dict[str, Callable], warm: list[Batch], timed: list[Batch], device: torch.device,
              bf16: bool) -> dict[str, np.ndarray]:  # fmt: skip
    """Warm-up calls on `warm` (never timed), then one timed call per strategy and batch of
    `timed`, strategies interleaved round robin; all strategies see the same batches."""
    times = {s: np.empty(len(timed)) for s in calls}
    with torch.inference_mode(), autocast(device, bf16), _gc_paused():
        for call in calls.values():
            for i, batch in enumerate(warm):
                call(batch, i)
        for rep, order in enumerate(round_robin(list(calls), len(timed))):
            for strategy in order:
                times[strategy][rep] = time_call(lambda: calls[strategy](timed[rep], rep), device)  # noqa: B023
    return times


def summarize(times_ms: np.ndarray, batch_size: int, padded_tokens: np.ndarray, real_tokens: np.ndarray) -> dict:
    """Latency percentiles (numpy's linear interpolation) and throughput over all timed calls.
    tokens_per_s counts every position the model computes (padding included), real_tokens_per_s
    only the attention-mask ones."""
    p50, p95, p99 = np.percentile(times_ms, [50, 95, 99])
    seconds = times_ms.sum() / 1e3
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": times_ms.mean(),
            "examples_per_s": batch_size * len(times_ms) / seconds, "tokens_per_s": padded_tokens.sum() / seconds,
            "real_tokens_per_s": real_tokens.sum() / seconds,
            "mean_padded_length": padded_tokens.sum() / (batch_size * len(times_ms))}  # fmt: skip


def ratio_of_medians(a: np.ndarray, b: np.ndarray, n_boot: int, confidence: float = CONFIDENCE,
                     seed: int = 0) -> tuple[float, float, float]:  # fmt: skip
    """median(a) / median(b) with a percentile-bootstrap interval, repetitions resampled
    jointly. Kept for comparison: with natural lengths each median mixes batches of very
    different sizes, and on a busy machine this estimate moved 3-4 points between identical runs
    where `median_paired_ratio` moved about 1 (benchmarks/deploy_repeatability.py)."""
    ratio = float(np.median(a) / np.median(b))
    if n_boot == 0:
        return ratio, np.nan, np.nan
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return ratio, float(low), float(high)


def median_paired_ratio(a: np.ndarray, b: np.ndarray, n_boot: int, confidence: float = CONFIDENCE,
                        seed: int = 0) -> tuple[float, float, float]:  # fmt: skip
    """Median over repetitions of a[r] / b[r], with a percentile-bootstrap interval. Call r of
    both strategies processed the same batch in the same round, so the per-round ratio cancels
    the batch's content (natural lengths vary several-fold) and slow machine drift."""
    ratios = np.asarray(a) / np.asarray(b)
    if n_boot == 0:
        return float(np.median(ratios)), np.nan, np.nan
    idx = np.random.default_rng(seed).integers(0, len(ratios), size=(n_boot, len(ratios)))
    low, high = np.quantile(np.median(ratios[idx], axis=1), [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(np.median(ratios)), float(low), float(high)


def times_table(results: dict) -> pd.DataFrame:
    """Every timed call (long format), so any statistic can be recomputed from the raw data."""
    rows = []
    for (batch_size, seq_len), (times, (padded, real)) in results.items():
        for strategy, values in times.items():
            rows += [{"strategy": strategy, "batch_size": batch_size, "seq_len": str(seq_len), "repetition": r,
                      "ms": v, "padded_tokens": padded[r], "real_tokens": real[r]}
                     for r, v in enumerate(values)]  # fmt: skip
    return pd.DataFrame(rows)


def time_grid(calls: dict[str, Callable], pool: list[dict], cfg: DeployConfig, pad_token_id: int, input_names,
              device: torch.device, bf16: bool) -> dict[tuple, tuple]:  # fmt: skip
    """Every (batch size, seq_len) cell: {strategy: times}, padded and real tokens per batch."""
    results = {}
    for seq_len in cfg.seq_lens:
        for batch_size in cfg.batch_sizes:
            batches = [b.to(device) for b in make_batches(pool, batch_size, seq_len, cfg.warmup + cfg.repeats,
                                                          pad_token_id, input_names)]  # fmt: skip
            timed = batches[cfg.warmup :]
            times = time_cell(calls, batches[: cfg.warmup], timed, device, bf16)
            tokens = (np.array([b.padded_tokens for b in timed]), np.array([b.real_tokens for b in timed]))
            results[(batch_size, seq_len)] = (times, tokens)
            _say(f"batch {batch_size}, seq_len {seq_len}: p50 " +
                 ", ".join(f"{s} {np.median(t):.2f} ms" for s, t in times.items()))  # fmt: skip
    return results


def timing_table(results: dict, strategies: list[str], skipped: dict[str, str], cfg: DeployConfig, threads: int,
                 device: torch.device) -> pd.DataFrame:  # fmt: skip
    """One row per strategy x batch size x seq_len; skipped strategies keep their rows with the
    reason in `note`. Overheads are medians of per-round latency ratios (1.0 = as fast as the
    reference; see `median_paired_ratio`)."""
    rows = []
    for strategy in strategies:
        for seq_len in cfg.seq_lens:
            for batch_size in cfg.batch_sizes:
                row = {"strategy": strategy, "batch_size": batch_size, "seq_len": str(seq_len), "threads": threads,
                       "repeats": cfg.repeats, "warmup": cfg.warmup, "device": device.type}  # fmt: skip
                if strategy in skipped:
                    rows.append(row | {"status": "skipped", "note": skipped[strategy]})
                    continue
                times, (padded, real) = results[(batch_size, seq_len)]
                row |= summarize(times[strategy], batch_size, padded, real) | {"status": "ok", "note": ""}
                for ref, names in (("full", ("overhead_vs_full", "overhead_ci_low", "overhead_ci_high")),
                                   ("merged", ("overhead_vs_merged", "overhead_vs_merged_ci_low",
                                               "overhead_vs_merged_ci_high"))):  # fmt: skip
                    if ref in times:
                        row |= dict(zip(names, median_paired_ratio(times[strategy], times[ref], cfg.bootstrap)))
                rows.append(row)
    return pd.DataFrame(rows).reindex(columns=TIMING_COLUMNS)


# ---------------------------------------------------------------- memory and size

MB = 2**20
RESULT_PREFIX = "LORASCOPE_MEMORY "


def _rss() -> int:
    return psutil.Process().memory_info().rss


@torch.no_grad()
def _touch(model: torch.nn.Module) -> None:
    """Read every weight once. Safetensors checkpoints are memory-mapped and paged in lazily:
    without this, reading the weights from disk would be counted as inference memory and the
    load would look free."""
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.sum()


def _trim_heap() -> None:
    """Hand freed loading buffers back to the OS, so post-load RSS is the model, not garbage."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRss:
    """Peak resident set of this process inside a block. Linux: the kernel's high-water mark
    (VmHWM), reset on entry through /proc/self/clear_refs; elsewhere psutil sampled every ms."""

    def __enter__(self) -> PeakRss:
        self._samples, self._stop, self._thread = [_rss()], threading.Event(), None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM reset via /proc/self/clear_refs after loading"
        except OSError:
            self.method = "psutil RSS sampled every 1 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._samples.append(_rss())

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            status = Path("/proc/self/status").read_text()
            self.peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(*self._samples, _rss())


def measure_memory(spec: dict) -> dict:
    """Load one strategy and run its workload; meant for a fresh process (see `main`). CPU:
    RSS after loading (weights paged in) and peak RSS during inference, both above the RSS
    before loading; CUDA: allocated after loading and max allocated after a reset that follows
    loading. load_seconds includes paging the weights in."""
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    models = Models(**spec["models"])
    batches = [Batch({k: torch.tensor(v) for k, v in b["inputs"].items()}, b["tasks"]).to(device)
               for b in spec["batches"]]  # fmt: skip
    gc.collect()
    before = _rss()
    start = time.perf_counter()
    model = load_strategy(spec["strategy"], models, spec["num_labels"], spec["pad_token_id"]).to(device)
    _touch(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_seconds = time.perf_counter() - start
    call = serving_call(spec["strategy"], model, list(models.adapters))
    gc.collect()
    _trim_heap()
    with torch.inference_mode(), autocast(device, spec["bf16"]):
        if device.type == "cuda":
            loaded = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for i, batch in enumerate(batches):
                call(batch, i)
            torch.cuda.synchronize(device)
            peak, measure = torch.cuda.max_memory_allocated(device), "cuda allocated"
            method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats following load"
        else:
            loaded = _rss() - before
            with PeakRss() as tracker:
                for i, batch in enumerate(batches):
                    call(batch, i)
            peak, measure, method = tracker.peak - before, "cpu rss", tracker.method
    return {"strategy": spec["strategy"], "load_seconds": load_seconds, "loaded_mb": loaded / MB,
            "peak_mb": peak / MB, "inference_mb": (peak - loaded) / MB, "runtime_mb": before / MB,
            "measure": measure, "method": method, "device": device.type}  # fmt: skip


def memory_in_subprocess(spec: dict, timeout: float = 600) -> dict:
    """`measure_memory` in a fresh interpreter, so no other strategy's memory or allocator
    state is counted."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "spec.json"
        path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "lorascope.deployment", "memory", str(path)],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement of {spec['strategy']} failed: {tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def weights_mb(folder: str | None) -> float:
    """Size of the weight files a load reads (safetensors if present, else .bin); NaN for a Hub id."""
    if folder is None or not Path(folder).is_dir():
        return float("nan")
    files = list(Path(folder).glob("*.safetensors")) or list(Path(folder).glob("*.bin"))
    return sum(f.stat().st_size for f in files) / MB


def disk_sizes(strategy: str, models: Models) -> tuple[float, float]:
    """(MB read to serve `strategy`, MB of adapters among them)."""
    strategy = COMPILED.get(strategy, strategy)
    if strategy == "full":
        return weights_mb(models.full), 0.0
    used = list(models.adapters) if strategy in MULTI_ADAPTER else [models.first] if strategy != "base" else []
    adapter_mb = sum(weights_mb(models.adapters[t]) for t in used)
    return weights_mb(models.base) + adapter_mb, adapter_mb


def memory_table(strategies: list[str], models: Models, spec: dict) -> pd.DataFrame:
    """One fresh process per strategy (compiled variants share their source's weights)."""
    rows = []
    for strategy in strategies:
        if strategy in COMPILED:
            continue
        row = memory_in_subprocess(spec | {"strategy": strategy})
        row["disk_mb"], row["adapter_disk_mb"] = disk_sizes(strategy, models)
        rows.append(row)
        _say(f"memory {strategy}: {row['loaded_mb']:.0f} MB loaded, +{row['inference_mb']:.0f} MB inference, "
             f"{row['load_seconds']:.2f} s load")  # fmt: skip
    return pd.DataFrame(rows).reindex(columns=MEMORY_COLUMNS + ["runtime_mb"])


# ---------------------------------------------------------------- optional engines


def vllm_reason(device: torch.device) -> str:
    """vLLM is only detected, never required; the reason it is not used goes into the outputs."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    if device.type != "cuda":
        return "vLLM serves on GPUs only; this run is on CPU"
    return "vLLM's LoRA serving cannot load a trained classifier head (modules_to_save), which these adapters hold"


def compile_model(model: torch.nn.Module, probe: Batch, device: torch.device, bf16: bool):
    """torch.compile with dynamic shapes (natural lengths vary per batch), compiled on `probe`
    now so that a failure becomes a skip reason, not a crash in the middle of the grid."""
    compiled = torch.compile(model, dynamic=True)
    with torch.inference_mode(), autocast(device, bf16):
        compiled(**probe.inputs)
    return compiled


# ---------------------------------------------------------------- figures


def plot_latency(timings: pd.DataFrame, path: Path) -> str | None:
    """p50 latency per call with a whisker up to p95, vs batch size; one panel per seq_len.
    Returns a reason when no figure could be drawn."""
    plt = _pyplot()
    ok = timings[timings["status"] == "ok"]
    from matplotlib import ticker

    if plt is None or ok.empty:
        return "matplotlib is not installed" if plt is None else "no timed strategy"
    seq_lens = list(dict.fromkeys(timings["seq_len"]))
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(4.2 * len(seq_lens), 3.8), squeeze=False, sharey=True)
    strategies = list(dict.fromkeys(ok["strategy"]))
    for ax, seq_len in zip(axes[0], seq_lens):
        for k, strategy in enumerate(strategies):
            rows = ok[(ok["strategy"] == strategy) & (ok["seq_len"] == seq_len)].sort_values("batch_size")
            dodge = 1 + 0.04 * (k - (len(strategies) - 1) / 2)  # side by side on the log axis
            whisker = [0 * rows["p50_ms"], rows["p95_ms"] - rows["p50_ms"]]  # up to p95 only
            ax.errorbar(rows["batch_size"] * dodge, rows["p50_ms"], yerr=whisker, marker="o", ms=4, capsize=3, lw=1.3,
                        color=COLORS.get(strategy), label=strategy)  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="batch size (examples per call)",
               title=f"seq_len = {seq_len}" + (" (eval texts)" if seq_len == "natural" else " tokens"))  # fmt: skip
        ticks = sorted(ok["batch_size"].unique())
        ax.set_xticks(ticks, [str(int(t)) for t in ticks])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("latency per call (ms): p50, whisker to p95")
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path, plt)


def plot_memory(memory: pd.DataFrame, path: Path) -> str | None:
    """Per strategy: memory after loading with the extra peak of inference stacked on it, size
    on disk of what it loads, and load time."""
    plt = _pyplot()
    if plt is None or memory.empty:
        return "matplotlib is not installed" if plt is None else "no memory measured"
    names = list(memory["strategy"])
    colors = [COLORS.get(s) for s in names]
    unit = "GPU allocated" if (memory["measure"] == "cuda allocated").all() else "resident set above runtime"
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar(names, memory["loaded_mb"], color=colors)
    top = axes[0].bar(names, memory["inference_mb"].clip(lower=0), bottom=memory["loaded_mb"], color=colors,
                      alpha=0.45, hatch="//")  # fmt: skip
    axes[0].bar_label(top, labels=[f"{v:.0f}" for v in memory["loaded_mb"] + memory["inference_mb"].clip(lower=0)],
                      fontsize=8)  # fmt: skip
    axes[0].legend(handles=[Patch(facecolor="0.5", label="after loading"),
                            Patch(facecolor="0.85", hatch="//", label="extra peak during inference")],
                   fontsize=8, loc="lower right")  # fmt: skip
    axes[0].set(ylabel=f"memory (MB, {unit})", title="peak memory")
    axes[1].bar_label(axes[1].bar(names, memory["disk_mb"], color=colors), fmt="%.1f", fontsize=8)
    axes[1].set(ylabel="size on disk (MB)", title="weights read at load (base + adapters)")
    axes[2].bar_label(axes[2].bar(names, memory["load_seconds"], color=colors), fmt="%.2f", fontsize=8)
    axes[2].set(ylabel="load time (s)", title="load time (weights paged in)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.12)
    return _save(fig, path, plt)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".partial-{path.name}")
    fig.savefig(scratch, dpi=120, format="png")
    plt.close(fig)
    os.replace(scratch, path)
    return None


# ---------------------------------------------------------------- entry point


def _write_text(path: Path, text: str) -> None:
    """Written beside the target and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".partial-{path.name}-{os.getpid()}")
    scratch.write_text(text)
    os.replace(scratch, path)


def environment(device: torch.device, threads: int) -> dict:
    """What the numbers were measured on, including the load average (other processes)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    import peft
    import transformers

    return {"device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "threads": threads, "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}  # fmt: skip


def _write_checks(out_dir: Path, checks: pd.DataFrame, skipped: dict[str, str], env: dict, meta: dict) -> None:
    _write_text(out_dir / "deployment_checks.csv", checks.to_csv(index=False))
    payload = {"passed": bool(checks["passed"].all()), "tolerance": ATOL, "checks": checks.to_dict("records"),
               "skipped": skipped, "environment": env, "meta": meta}  # fmt: skip
    _write_text(out_dir / "deployment_checks.json", json.dumps(payload, indent=2, default=str) + "\n")


def plan(cfg: DeployConfig, models: Models, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The strategies to report, in order, and why each one that cannot run is skipped."""
    strategies = list(dict.fromkeys(cfg.strategies))
    if cfg.compile:
        strategies += [c for c, source in COMPILED.items() if source in strategies]
    skipped = {}
    if models.full is None and "full" in strategies:
        skipped["full"] = "no fully fine-tuned model given"
    for strategy in MULTI_ADAPTER:
        if strategy in strategies and len(models.adapters) < 2:
            skipped[strategy] = f"needs 2 or more adapters, {len(models.adapters)} given"
    return strategies, skipped


def _validate(models: Models, examples: dict[str, list[dict]]) -> None:
    if not models.adapters:
        raise InputError("deployment needs at least one LoRA adapter")
    for name, path in models.adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise InputError(f"adapter '{name}': no adapter_config.json in {path}")
        if not examples.get(name):
            raise InputError(f"adapter '{name}': no examples given for it")
    if models.full is not None and not (Path(models.full) / "config.json").is_file():
        raise InputError(f"full model: no config.json in {models.full}")


@contextlib.contextmanager
def fixed_threads(threads: int):
    """The same torch thread count for every strategy (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def serve(strategies: list[str], skipped: dict[str, str], models: Models, num_labels: int, pad_token_id: int,
          device: torch.device, bf16: bool, probe: Batch) -> dict[str, Callable]:  # fmt: skip
    """One request function per strategy that can run; a compiled variant that fails to
    compile is added to `skipped` with the first line of its error."""
    calls, loaded = {}, {}
    for strategy in strategies:
        if strategy in skipped:
            continue
        if strategy in COMPILED:
            try:
                model = compile_model(loaded[COMPILED[strategy]], probe, device, bf16)
            except Exception as err:  # noqa: BLE001 - an optional engine: its failure is a skip reason
                skipped[strategy] = f"torch.compile failed: {(str(err).strip() or type(err).__name__).splitlines()[0]}"
                continue
        else:
            model = loaded[strategy] = load_strategy(strategy, models, num_labels, pad_token_id).to(device)
        calls[strategy] = serving_call(COMPILED.get(strategy, strategy), model, list(models.adapters))
    return calls


def benchmark(
    base: str,
    adapters: dict[str, str],
    full: str | None,
    examples: dict[str, list[dict]],
    tokenizer,
    cfg: DeployConfig,
    out_dir: Path,
    *,
    figures_dir: Path | None = None,
    device: torch.device | str = "cpu",
    bf16: bool = True,
    memory: bool = True,
    check_examples: int | None = None,
    meta: dict | None = None,
) -> DeploymentResult:
    """Correctness checks, then the timing grid, then memory and size; writes deployment.csv,
    deployment_times.csv (every timed call), deployment_checks.csv/.json and
    deployment_memory.csv to `out_dir`, and deployment_latency.png / deployment_memory.png to
    `figures_dir` (default `out_dir`).

    `adapters` maps task names to adapter folders (the first is served by merged / separate);
    `examples[task]` are that task's tokenized eval examples (dicts with input_ids, optional
    token_type_ids and label: see `examples_from_dataset`, `tokenize_texts`); checks use the
    first `check_examples` of each (all by default). `meta` (e.g. the caller's fingerprint) is
    stored in deployment_checks.json. Raises DeploymentCheckFailed, after writing the check
    tables, when a serving path changes the logits."""
    device, out_dir = torch.device(device), Path(out_dir)
    figures_dir = Path(figures_dir) if figures_dir else out_dir
    models = Models(base, dict(adapters), full)
    _validate(models, examples)
    strategies, skipped = plan(cfg, models, device)
    threads = cfg.threads or torch.get_num_threads()
    pad_token_id, input_names, num_labels = tokenizer.pad_token_id, forward_inputs(base), num_labels_of(models)
    env = environment(device, threads)
    if device.type == "cpu" and env["load_average"][0] > (os.cpu_count() or 1):
        _say(f"the machine is busy (load average {env['load_average'][0]:.1f} on {os.cpu_count()} cores): "
             "timings include contention from other processes")  # fmt: skip
    engines = {"vllm": vllm_reason(device)}
    _say(f"vllm skipped: {engines['vllm']}")
    pool = interleave({t: examples[t] for t in models.adapters})

    with fixed_threads(threads):
        checked = {t: examples[t][:check_examples] for t in models.adapters}
        checks = check_correctness(models, checked, num_labels, pad_token_id, input_names, device)
        _write_checks(out_dir, checks, skipped | engines, env, meta or {})
        if not checks["passed"].all():
            raise DeploymentCheckFailed(checks)
        _say(f"correctness checks passed (max |Δlogit| {checks['max_abs_diff'].max():.2g}, tolerance {ATOL:g})")

        probe = make_batches(pool, 2, "natural", 1, pad_token_id, input_names, offset=len(pool) // 2)[0].to(device)
        calls = serve(strategies, skipped, models, num_labels, pad_token_id, device, bf16, probe)
        for strategy, reason in skipped.items():
            _say(f"{strategy} skipped: {reason}")
        env["load_average_before_timing"] = list(os.getloadavg())
        results = time_grid(calls, pool, cfg, pad_token_id, input_names, device, bf16)
        env["load_average_after_timing"] = list(os.getloadavg())
        del calls
        gc.collect()

    timings = timing_table(results, strategies, skipped, cfg, threads, device)
    _write_text(out_dir / "deployment.csv", timings.to_csv(index=False))
    _write_text(out_dir / "deployment_times.csv", times_table(results).to_csv(index=False))
    memory_rows = pd.DataFrame(columns=MEMORY_COLUMNS)
    if memory:
        workload = [make_batches(pool, max(cfg.batch_sizes), s, 1, pad_token_id, input_names)[0] for s in cfg.seq_lens]
        spec = {"models": dataclasses.asdict(models), "num_labels": num_labels, "pad_token_id": pad_token_id,
                "device": str(device), "threads": threads, "bf16": bf16,
                "batches": [{"inputs": {k: v.tolist() for k, v in b.inputs.items()}, "tasks": b.tasks}
                            for b in workload]}  # fmt: skip
        memory_rows = memory_table([s for s in strategies if s not in skipped], models, spec)
        _write_text(out_dir / "deployment_memory.csv", memory_rows.to_csv(index=False))
    _write_checks(out_dir, checks, skipped | engines, env, meta or {})
    for reason in (plot_latency(timings, figures_dir / "deployment_latency.png"),
                   plot_memory(memory_rows, figures_dir / "deployment_memory.png") if memory else None):  # fmt: skip
        if reason:
            _say(f"figure skipped: {reason}")
    return DeploymentResult(timings, checks, memory_rows, skipped | engines)


def main(argv: list[str] | None = None) -> int:
    """`python -m lorascope.deployment memory SPEC.json`: one strategy's memory, as JSON."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "memory":
        print("usage: python -m lorascope.deployment memory SPEC.json", file=sys.stderr)
        return 2
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    result = measure_memory(json.loads(Path(args[1]).read_text()))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
