"""The PEFT engine: every strategy loaded in this process at once, one request a forward pass.

At concurrency C, C client threads share one in-process model that serves one request at a time
(a first-come-first-served lock), as a plain single-worker server without batching does; latency
includes the wait in that queue. At one client the requests are plain sequential calls. A
request's tensors are padded before its clock starts; CUDA is synchronised after every forward
pass (the queue is empty before it: the previous request synchronised too), so a latency is the
request's own work. Memory is measured apart, in a fresh process per strategy (serving.memory)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from lorascope.runtime import autocast
from lorascope.serving.checks import logits
from lorascope.serving.grid import Request, Send, served_name, split_served
from lorascope.serving.inputs import Batch, Models
from lorascope.serving.strategies import REGISTRY, compile_model

ENGINE = "peft"


class FifoLock:
    """A lock granted in arrival order, as a server's request queue is. threading.Lock is not
    FIFO: at 16 clients the order of its grants, not the model, set per-request latencies, and
    separate over merged differed by 145 points between two runs."""

    def __init__(self):
        self.turn, self.next_ticket, self.serving = threading.Condition(), 0, 0

    def __enter__(self) -> None:
        with self.turn:
            ticket, self.next_ticket = self.next_ticket, self.next_ticket + 1
            self.turn.wait_for(lambda: self.serving == ticket)

    def __exit__(self, *exc) -> None:
        with self.turn:
            self.serving += 1
            self.turn.notify_all()


def load(
    strategies: list[str],
    skipped: dict[str, str],
    models: Models,
    num_labels: int,
    pad_token_id: int,
    device: torch.device,
    bf16: bool,
    probe: Batch,
) -> dict[str, torch.nn.Module]:
    """Every strategy that can run, loaded (compiled variants compiled on `probe` now); one that
    fails to compile is added to `skipped` with the first line of its error."""
    loaded = {}
    for name in strategies:
        if name in skipped:
            continue
        strategy = REGISTRY[name]
        if strategy.compiled_from:
            try:
                loaded[name] = compile_model(loaded[strategy.compiled_from], probe, device, bf16)
            except Exception as err:
                skipped[name] = f"torch.compile failed: {(str(err).strip() or type(err).__name__).splitlines()[0]}"
        else:
            loaded[name] = strategy.load(models, num_labels, pad_token_id).to(device)
    return loaded


def load_methods(
    strategies: list[str], models: Models, num_labels: int, pad_token_id: int, device: torch.device
) -> dict[str, torch.nn.Module]:
    """The further adapter methods of `models` (Models.methods), each by every one of `strategies`
    that serves one adapter (merged, separate), under its served name."""
    return {
        served_name(strategy, method): REGISTRY[strategy]
        .load(models.of_method(method), num_labels, pad_token_id)
        .to(device)
        for method in models.methods
        for strategy in strategies
    }


def sender(model: torch.nn.Module, strategy: str, tasks: list[str], device: torch.device, bf16: bool) -> Send:
    """One request: the strategy's forward pass on the request's padded batch under the model's
    lock (first come, first served), inference mode and autocast (both per thread); the logits
    stay on the device."""
    call, lock = REGISTRY[split_served(strategy)[0]].call(model, tasks), FifoLock()

    def send(request: Request) -> torch.Tensor:
        with lock, torch.inference_mode(), autocast(device, bf16):
            out = call(request.batch, request.number)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return out

    return send


def senders(
    loaded: dict[str, torch.nn.Module], models: Models, device: torch.device, bf16: bool
) -> dict[str, Callable[[Request], object]]:
    return {name: sender(model, name, list(models.adapters), device, bf16) for name, model in loaded.items()}


def tasks_of(strategy: str, models: Models) -> list[str]:
    """The tasks whose adapters a strategy serves (full and merged: the first task's)."""
    return list(models.adapters) if REGISTRY[strategy].adapters == "all" else [models.first]


def references(
    model: torch.nn.Module, strategy: str, checked: dict, models: Models, pad_token_id, input_names, device
) -> dict:
    """PEFT's fp32 probabilities per task on the check examples (batches padded to their longest),
    what another engine's answers are checked against."""
    return {
        t: logits(
            model, [{**r, "task": t} for r in checked[t]], pad_token_id, input_names, device, multi=strategy == "multi"
        ).softmax(-1)
        for t in tasks_of(strategy, models)
    }
