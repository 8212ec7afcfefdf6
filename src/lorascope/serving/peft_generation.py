"""The PEFT engine for generation requests, and the token-level references every engine is
checked against.

A timed request is `generate` on its left-padded prompts for exactly `output_tokens` new tokens
(end-of-sequence suppressed: every strategy does the same work), greedy, the KV cache on, one
request at a time under the model's first-come-first-served lock (peft_engine.FifoLock: a
single-worker server without batching). A streamer stamps each step's tokens as generate hands
them over, so time to first token includes the prompt's forward pass and any wait in the queue.

The checks score the reference completion of labelled eval examples teacher-forced (each
completion token's log-probability given the prompt and the tokens before it) and compare
greedy completions: an adapter that is not applied, or another task's, moves log-probabilities
by far more than kernels do."""

from __future__ import annotations

import gc

import pandas as pd
import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from lorascope.runtime import autocast
from lorascope.serving.checks import CHECK_BATCH_SIZE, DEPLOYMENT_CHECKS
from lorascope.serving.grid import Request, Send
from lorascope.serving.inputs import Models, pad_batch
from lorascope.serving.peft_engine import FifoLock
from lorascope.serving.strategies import REGISTRY, activate, load_multi
from lorascope.serving.streaming import Streamed

ENGINE = "peft"
INPUTS = ("input_ids", "attention_mask")
# fp32 log-probabilities of merged vs unmerged LoRA differ by rounding (~1e-5 on SmolLM2-135M)
LOGPROB_ATOL = 1e-3
# near-ties may break differently under other kernels; an adapter not applied changes most
MIN_IDENTICAL = 0.9
LOGPROB_BATCH = 8


class TokenClock(BaseStreamer):
    """generate() hands the streamer the prompt first, then each step's new token of every
    sequence: each step is stamped as an arrival for every prompt of the request."""

    def __init__(self, streamed: Streamed, device: torch.device):
        self.streamed, self.device, self.prompt_seen = streamed, device, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for prompt in range(len(self.streamed.arrivals)):
            self.streamed.arrived(prompt)

    def end(self) -> None:
        pass


def fixed_length(output_tokens: int, pad_token_id: int, eos_token_id: int | None) -> GenerationConfig:
    """Greedy, exactly `output_tokens` new tokens: min_new_tokens masks end-of-sequence until then."""
    return GenerationConfig(
        max_new_tokens=output_tokens,
        min_new_tokens=output_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )


def load(strategies: list[str], skipped: dict[str, str], models: Models, pad_token_id: int, device) -> dict:
    """Every strategy that can serve a causal LM, loaded; compiled variants are classification's."""
    loaded = {}
    for name in strategies:
        if REGISTRY[name].compiled_from:
            skipped.setdefault(name, "torch.compile variants are timed for classification only")
        if name not in skipped:
            loaded[name] = REGISTRY[name].load(models, None, pad_token_id).to(device)
    return loaded


def sender(
    model, strategy: str, tasks: list[str], device: torch.device, bf16: bool, generation: GenerationConfig
) -> Send:
    """One request: the strategy's generate on the request's prompts under the model's lock, its
    tokens stamped as they come (streaming.Streamed)."""
    route, lock = REGISTRY[strategy].route(model, tasks), FifoLock()

    def send(request: Request) -> Streamed:
        streamed = Streamed.start(len(request.rows))
        with lock, torch.inference_mode(), autocast(device, bf16):
            model.generate(
                **request.batch.inputs,
                **route(request.batch, request.number),
                generation_config=generation,
                streamer=TokenClock(streamed, device),
            )
        return streamed.finish()

    return send


@torch.inference_mode()
def completion_logprobs(model, rows: list[dict], pad_token_id: int, device, multi: bool = False) -> list[torch.Tensor]:
    """fp32 log-probability of each reference completion token given everything before it, per
    row (no autocast); under `multi` each row is routed to its own task's adapter. Batches of
    LOGPROB_BATCH: a prompt's logits over the whole vocabulary are the memory (SmolLM2: 200 MB a
    250-token prompt), and only the completion's positions are normalised."""
    out = []
    for start in range(0, len(rows), LOGPROB_BATCH):
        chunk = rows[start : start + LOGPROB_BATCH]
        whole = [{"input_ids": [*r["input_ids"], *r["completion_ids"]], "task": r.get("task", "")} for r in chunk]
        batch = pad_batch(whole, pad_token_id, INPUTS).to(device)
        extra = {"adapter_names": batch.tasks} if multi else {}
        logits = model(**batch.inputs, **extra).logits
        for i, r in enumerate(chunk):
            n, targets = len(r["input_ids"]), torch.tensor(r["completion_ids"], device=logits.device)
            logprobs = logits[i, n - 1 : n - 1 + len(targets)].float().log_softmax(-1)
            out.append(logprobs.gather(-1, targets[:, None])[:, 0].cpu())
    return out


def until_eos(ids, eos_token_id: int | None) -> list[int]:
    ids = [int(t) for t in ids]
    return ids[: ids.index(eos_token_id)] if eos_token_id in ids else ids


@torch.inference_mode()
def greedy(model, rows: list[dict], tokens: int, pad_token_id: int, eos_token_id, device, multi=False) -> list:
    """fp32 greedy completions (at most `tokens`, cut at end-of-sequence) of each row's prompt."""
    config = GenerationConfig(
        max_new_tokens=tokens, do_sample=False, pad_token_id=pad_token_id, eos_token_id=eos_token_id
    )
    out = []
    for start in range(0, len(rows), CHECK_BATCH_SIZE):
        batch = pad_batch(rows[start : start + CHECK_BATCH_SIZE], pad_token_id, INPUTS, left=True).to(device)
        extra = {"adapter_names": batch.tasks} if multi else {}
        generated = model.generate(**batch.inputs, **extra, generation_config=config)
        width = batch.inputs["input_ids"].shape[1]
        out += [until_eos(row[width:], eos_token_id) for row in generated.tolist()]
    return out


def answers(model, rows, tokens, pad_token_id, eos_token_id, device, multi=False) -> dict:
    """What a check compares: teacher-forced log-probabilities and greedy completions."""
    return {
        "logprobs": completion_logprobs(model, rows, pad_token_id, device, multi),
        "greedy": greedy(model, rows, tokens, pad_token_id, eos_token_id, device, multi),
    }


def compare(check: str, task: str, candidate: dict, reference: dict, atol: float = LOGPROB_ATOL) -> dict:
    """One check row (deployment_checks' columns): max |Δ log-probability| over every reference
    completion token, and in how many prompts the greedy completions differ."""
    diff = max(float((a - b).abs().max()) for a, b in zip(candidate["logprobs"], reference["logprobs"]))
    mismatches = sum(a != b for a, b in zip(candidate["greedy"], reference["greedy"]))
    n = len(candidate["greedy"])
    return {
        "check": check,
        "task": task,
        "n_examples": n,
        "max_abs_diff": diff,
        "prediction_mismatches": mismatches,
        "tolerance": atol,
        "passed": diff <= atol and (n - mismatches) >= MIN_IDENTICAL * n,
        "accuracy": float("nan"),
        "reference_accuracy": float("nan"),
    }


def check_correctness(models: Models, examples: dict[str, list[dict]], tokens: int, pad_token_id, eos, device):
    """fp32 answers of every PEFT serving path against its reference on each task's labelled
    examples: merged vs the same adapter unmerged; with 2+ adapters, the switch path and prompts
    of several adapters in one batch (multi) vs the adapter loaded alone. Returns the check rows
    and each path's answers by strategy and task (what vLLM is checked against)."""
    rows, served = [], {"separate": {}, "merged": {}, "multi": {}}
    for task in models.adapters:
        one = Models(models.base, {task: models.adapters[task]})
        separate = REGISTRY["separate"].load(one, None, pad_token_id).to(device)
        alone = answers(separate, examples[task], tokens, pad_token_id, eos, device)
        merged = answers(separate.merge_and_unload(), examples[task], tokens, pad_token_id, eos, device)
        rows.append(compare("merged_vs_separate", task, merged, alone))
        served["separate"][task], served["merged"][task], served["multi"][task] = alone, merged, alone
        del separate
    if len(models.adapters) >= 2:
        multi = load_multi(models, None, pad_token_id).to(device)
        order = [
            (t, i) for i in range(max(map(len, examples.values()))) for t in models.adapters if i < len(examples[t])
        ]
        mixed = answers(
            multi, [{**examples[t][i], "task": t} for t, i in order], tokens, pad_token_id, eos, device, True
        )
        for task in models.adapters:
            mine = [k for k, (t, _) in enumerate(order) if t == task]
            together = {key: [values[k] for k in mine] for key, values in mixed.items()}
            rows.append(compare("multi_vs_alone", task, together, served["separate"][task]))
            activate(multi, task)
            rows.append(
                compare(
                    "switch_vs_fresh",
                    task,
                    answers(multi, examples[task], tokens, pad_token_id, eos, device),
                    served["separate"][task],
                )
            )
        del multi
    if models.full is not None:
        full = REGISTRY["full"].load(models, None, pad_token_id).to(device)
        served["full"] = {models.first: answers(full, examples[models.first], tokens, pad_token_id, eos, device)}
        del full
    gc.collect()
    return DEPLOYMENT_CHECKS.frame(pd.DataFrame(rows, columns=DEPLOYMENT_CHECKS.columns)), served
