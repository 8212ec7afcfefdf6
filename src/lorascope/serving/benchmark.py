"""The serving benchmark's entry point: correctness checks, then the timing grid, then memory
and size, written as tables. The reference study timed batch size 1 only, without device
synchronisation, in blocks, on its warm-up inputs, with peak memory that included loading."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from lorascope import runtime
from lorascope.config import DeployConfig
from lorascope.errors import InputError
from lorascope.serving.checks import ATOL, DEPLOYMENT_CHECKS, DeploymentCheckFailed, check_correctness
from lorascope.serving.inputs import Batch, Models, forward_inputs, interleave, make_batches, num_labels_of
from lorascope.serving.memory import DEPLOYMENT_MEMORY, memory_table
from lorascope.serving.strategies import REGISTRY, compile_model, variants
from lorascope.serving.timing import (
    DEPLOYMENT,
    DEPLOYMENT_TIMES,
    others_busy_cores,
    say,
    time_grid,
    times_table,
    timing_table,
)
from lorascope.study import atomic_write


@dataclasses.dataclass
class DeploymentResult:
    timings: pd.DataFrame
    checks: pd.DataFrame
    memory: pd.DataFrame
    skipped: dict[str, str]


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


def serve(
    strategies: list[str],
    skipped: dict[str, str],
    models: Models,
    num_labels: int,
    pad_token_id: int,
    device: torch.device,
    bf16: bool,
    probe: Batch,
) -> dict[str, Callable]:
    """One request function per strategy that can run; a compiled variant that fails to
    compile is added to `skipped` with the first line of its error."""
    calls, loaded = {}, {}
    for name in strategies:
        if name in skipped:
            continue
        strategy = REGISTRY[name]
        if strategy.compiled_from:
            try:
                model = compile_model(loaded[strategy.compiled_from], probe, device, bf16)
            except Exception as err:
                skipped[name] = f"torch.compile failed: {(str(err).strip() or type(err).__name__).splitlines()[0]}"
                continue
        else:
            model = loaded[name] = strategy.load(models, num_labels, pad_token_id).to(device)
        calls[name] = strategy.call(model, list(models.adapters))
    return calls


def _write_checks(out_dir: Path, checks: pd.DataFrame, skipped: dict[str, str], env: dict, meta: dict) -> None:
    DEPLOYMENT_CHECKS.write(out_dir, checks)
    payload = {
        "passed": bool(checks["passed"].all()),
        "tolerance": ATOL,
        "checks": checks.to_dict("records"),
        "skipped": skipped,
        "environment": env,
        "meta": meta,
    }
    atomic_write(out_dir / "deployment_checks.json", json.dumps(payload, indent=2, default=str) + "\n")


def benchmark(
    base: str,
    adapters: dict[str, str],
    full: str | None,
    examples: dict[str, list[dict]],
    tokenizer,
    cfg: DeployConfig,
    out_dir: Path,
    *,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    memory: bool = True,
    check_examples: int | None = None,
    meta: dict | None = None,
) -> DeploymentResult:
    """Correctness checks, then the timing grid, then memory and size; writes deployment.csv,
    deployment_times.csv (every timed call), deployment_checks.csv/.json and
    deployment_memory.csv to `out_dir`.

    `adapters` maps task names to adapter folders (the first is served by merged / separate);
    `examples[task]` are that task's tokenized eval examples (dicts with input_ids, optional
    token_type_ids and label: see `inputs.examples_from_dataset`, `inputs.tokenize_texts`);
    checks use the first `check_examples` of each (all by default). `meta` (e.g. the caller's
    fingerprint) is stored in deployment_checks.json. Raises DeploymentCheckFailed, after
    writing the check tables, when a serving path changes the logits."""
    device, out_dir = torch.device(device), Path(out_dir)
    models = Models(base, dict(adapters), full)
    _validate(models, examples)
    strategies = variants(cfg.strategies, cfg.compile)
    skipped = {name: why for name in strategies if (why := REGISTRY[name].unavailable(models))}
    threads = cfg.threads or torch.get_num_threads()
    pad_token_id, input_names, num_labels = tokenizer.pad_token_id, forward_inputs(base), num_labels_of(models)
    env = runtime.hardware(device) | runtime.versions() | {"device": device.type, "threads": threads}
    pool = interleave({t: examples[t] for t in models.adapters})

    # the checks are not timed, so they use every core (44 s of the quick study's deploy stage on one)
    checked = {t: examples[t][:check_examples] for t in models.adapters}
    checks = check_correctness(models, checked, num_labels, pad_token_id, input_names, device)
    _write_checks(out_dir, checks, skipped, env, meta or {})
    if not checks["passed"].all():
        raise DeploymentCheckFailed(checks)
    say(f"correctness checks passed (max |Δlogit| {checks['max_abs_diff'].max():.2g}, tolerance {ATOL:g})")

    with runtime.threads(threads):
        probe = make_batches(pool, 2, "natural", 1, pad_token_id, input_names, offset=len(pool) // 2)[0].to(device)
        calls = serve(strategies, skipped, models, num_labels, pad_token_id, device, bf16, probe)
        for strategy, reason in skipped.items():
            say(f"{strategy} skipped: {reason}")
        env["load_average_before_timing"] = list(os.getloadavg())
        env["others_busy_cores_before_timing"] = others = others_busy_cores()
        if device.type == "cpu" and others > 0.5:
            say(
                f"the machine is busy (other processes used {others:.1f} of {os.cpu_count()} cores in the last "
                "second): timings include contention from them"
            )
        results = time_grid(calls, pool, cfg, pad_token_id, input_names, device, bf16)
        env["load_average_after_timing"] = list(os.getloadavg())
        del calls
        gc.collect()

    timings = DEPLOYMENT.write(out_dir, timing_table(results, strategies, skipped, cfg, threads, device))
    DEPLOYMENT_TIMES.write(out_dir, times_table(results))
    memory_rows = pd.DataFrame(columns=DEPLOYMENT_MEMORY.columns)
    if memory:
        workload = [make_batches(pool, max(cfg.batch_sizes), s, 1, pad_token_id, input_names)[0] for s in cfg.seq_lens]
        spec = {
            "models": dataclasses.asdict(models),
            "num_labels": num_labels,
            "pad_token_id": pad_token_id,
            "device": str(device),
            "threads": threads,
            "bf16": bf16,
            "batches": [{"inputs": {k: v.tolist() for k, v in b.inputs.items()}, "tasks": b.tasks} for b in workload],
        }
        memory_rows = DEPLOYMENT_MEMORY.write(
            out_dir, memory_table([s for s in strategies if s not in skipped], models, spec)
        )
    _write_checks(out_dir, checks, skipped, env, meta or {})
    return DeploymentResult(timings, checks, memory_rows, skipped)
