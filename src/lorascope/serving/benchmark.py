"""The serving measurement's entry point: correctness checks, then the grid on every engine of
deploy.engines (PEFT in-process first, then vLLM servers), memory, and the tables. See
docs/serving.md for what each number means."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from pathlib import Path

import pandas as pd
import torch

from lorascope import runtime
from lorascope.atomic import atomic_write
from lorascope.config import DeployConfig
from lorascope.errors import InputError
from lorascope.serving import peft_engine, vllm_engine
from lorascope.serving.checks import ATOL, DEPLOYMENT_CHECKS, DeploymentCheckFailed, check_correctness
from lorascope.serving.grid import (
    DEPLOYMENT,
    DEPLOYMENT_ENGINES,
    DEPLOYMENT_TIMES,
    Measured,
    Workload,
    cells,
    deployment_table,
    engine_cells,
    engines_table,
    measure,
    not_measured,
    overheads,
    served_name,
    times_table,
)
from lorascope.serving.inputs import Models, forward_inputs, interleave, make_batches, num_labels_of
from lorascope.serving.load import TURNS, others_busy_cores, say
from lorascope.serving.memory import DEPLOYMENT_MEMORY, memory_table
from lorascope.serving.strategies import REGISTRY, variants
from lorascope.serving.vllm_adapters import vllm_refusal
from lorascope.serving.vllm_engine import ENGINE_CHECKS, ENGINE_VERSIONS
from lorascope.serving.vllm_server import find_vllm_python


@dataclasses.dataclass
class DeploymentResult:
    timings: pd.DataFrame  # deployment.csv: PEFT's one-client cells
    checks: pd.DataFrame
    memory: pd.DataFrame
    skipped: dict[str, str]
    engines: pd.DataFrame  # deployment_engines.csv: every engine's natural-length cells
    engine_checks: pd.DataFrame
    versions: pd.DataFrame


def validate(models: Models, examples: dict[str, list[dict]]) -> None:
    if not models.adapters:
        raise InputError("deployment needs at least one LoRA adapter")
    for name in models.adapters:
        if not examples.get(name):
            raise InputError(f"adapter '{name}': no examples given for it")
    for name, path in {**models.adapters, **models.methods}.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise InputError(f"adapter '{name}': no adapter_config.json in {path}")
    if models.full is not None and not (Path(models.full) / "config.json").is_file():
        raise InputError(f"full model: no config.json in {models.full}")


def write_checks(out_dir: Path, checks: pd.DataFrame, skipped: dict[str, str], env: dict, meta: dict) -> None:
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


def peft_memory(measured: list[Measured], strategies: list[str], models: Models, spec: dict) -> pd.DataFrame:
    """One fresh process per strategy (serving.memory); its whole-process peak becomes the engines
    table's server memory of PEFT (a compiled variant: its source's). Further methods' strategies
    (served_name) are not measured apart."""
    table = memory_table(strategies, models, spec)
    by_strategy = {r["strategy"]: r for r in table.to_dict("records")}
    for m in measured:
        if m.strategy not in REGISTRY:
            continue
        row = by_strategy.get(REGISTRY[m.strategy].compiled_from or m.strategy)
        if row is not None:
            m.memory = {"server_rss_mb": row["process_mb"], "server_gpu_mb": row["gpu_mb"]}
    return table


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
    meta: dict | None = None,
    methods: dict[str, str] | None = None,
    names: tuple[str, str] = ("", ""),
) -> DeploymentResult:
    """Correctness checks, then the grid on each engine of cfg.engines, then PEFT's memory; writes
    deployment_checks.csv/.json, and with PEFT deployment.csv, deployment_times.csv (every timed
    request of its one-client cells) and deployment_memory.csv, then deployment_engines.csv,
    deployment_engine_checks.csv, deployment_engine_versions.csv and vLLM's logs (logs/), to
    `out_dir`.

    `adapters` maps task names to adapter folders (the first is served by merged / separate);
    `examples[task]` are that task's tokenized eval examples (dicts with input_ids, optional
    token_type_ids and label: see `inputs.examples_from_dataset`, `inputs.tokenize_texts`);
    checks use the first cfg.checks.examples of each (all by default). `meta` (e.g. the caller's
    fingerprint) is stored in deployment_checks.json. `methods`: adapters of further methods on
    the first task, by method name, each checked and timed merged and separate in PEFT beside the
    others (served_name); `names`: the methods of `adapters` and of `full`, for the tables' method
    column. Raises DeploymentCheckFailed, after writing the check tables, when a serving path
    changes the logits."""
    device, out_dir = torch.device(device), Path(out_dir)
    models = Models(base, dict(adapters), full, dict(methods or {}))
    validate(models, examples)
    strategies = variants(cfg.strategies, cfg.compile)
    skipped = {name: why for name in strategies if (why := REGISTRY[name].unavailable(models))}
    one_adapter = [s for s in ("merged", "separate") if s in strategies]  # what further methods are served by
    further = [served_name(s, m) for m in models.methods for s in one_adapter]
    threads = cfg.grid.threads or torch.get_num_threads()
    pad_token_id, input_names, num_labels = tokenizer.pad_token_id, forward_inputs(base), num_labels_of(models)
    env = runtime.hardware(device) | runtime.versions() | {"device": device.type, "threads": threads}
    pool = interleave({t: examples[t] for t in models.adapters})
    workload = Workload(pool, pad_token_id, input_names, cfg.grid.warmup, device)
    peft = "peft" in cfg.engines
    vllm = [s for s in strategies if s in vllm_engine.SERVED] if "vllm" in cfg.engines else []

    # the checks are not timed, so they use every core
    checked = {t: examples[t][: cfg.checks.examples] for t in models.adapters}
    shape = (num_labels, pad_token_id, input_names, device)
    checks = [check_correctness(models, checked, *shape, names[0])]
    for m in models.methods:  # a further method: its merged adapter against itself unmerged
        checks.append(check_correctness(models.of_method(m), {models.first: checked[models.first]}, *shape, m))
    checks = pd.concat(checks, ignore_index=True)
    write_checks(out_dir, checks, skipped, env, meta or {})
    if not checks["passed"].all():
        raise DeploymentCheckFailed(checks)
    say(f"correctness checks passed (max |Δlogit| {checks['max_abs_diff'].max():.2g}, tolerance {ATOL:g})")

    measured, references = [], {}
    with runtime.threads(threads):
        probe = make_batches(pool, 2, "natural", 1, pad_token_id, input_names, offset=len(pool) // 2)[0].to(device)
        wanted = strategies if peft else [s for s in vllm if s not in skipped]
        loaded = peft_engine.load(wanted, skipped, models, num_labels, pad_token_id, device, bf16, probe)
        if peft:
            loaded |= peft_engine.load_methods(one_adapter, models, num_labels, pad_token_id, device)
        for strategy in vllm:
            if strategy in loaded:
                references[strategy] = peft_engine.references(
                    loaded[strategy], strategy, checked, models, pad_token_id, input_names, device
                )
        for strategy, reason in skipped.items():
            say(f"{strategy} skipped: {reason}")
        if peft:
            env["load_average_before_timing"] = list(os.getloadavg())
            env["others_busy_cores_before_timing"] = others = others_busy_cores()
            if device.type == "cpu" and others > 0.5:
                say(
                    f"the machine is busy (other processes used {others:.1f} of {os.cpu_count()} cores in the "
                    "last second): timings include contention from them"
                )
            sends = peft_engine.senders(loaded, models, device, bf16)
            for cell in cells(cfg.grid):
                measured += measure("peft", sends, workload, cell, cfg.grid, TURNS["peft"])
            env["load_average_after_timing"] = list(os.getloadavg())
            del sends
        del loaded
        gc.collect()

    overheads(measured, cfg.bootstrap)
    timings = pd.DataFrame(columns=DEPLOYMENT.columns)
    memory_rows = pd.DataFrame(columns=DEPLOYMENT_MEMORY.columns)
    if peft:
        timings = DEPLOYMENT.write(
            out_dir, deployment_table(measured, strategies + further, skipped, cfg, threads, device.type, names)
        )
        DEPLOYMENT_TIMES.write(out_dir, times_table(measured, names))
        if memory:
            largest = [
                make_batches(pool, max(cfg.grid.batch_sizes), s, 1, pad_token_id, input_names)[0]
                for s in cfg.grid.seq_lens
            ]
            spec = {
                "models": dataclasses.asdict(models),
                "num_labels": num_labels,
                "pad_token_id": pad_token_id,
                "device": str(device),
                "threads": threads,
                "bf16": bf16,
                "batches": [
                    {"inputs": {k: v.tolist() for k, v in b.inputs.items()}, "tasks": b.tasks} for b in largest
                ],
            }
            measuring = [s for s in strategies if s not in skipped and not REGISTRY[s].compiled_from]
            memory_rows = DEPLOYMENT_MEMORY.write(out_dir, peft_memory(measured, measuring, models, spec))
    write_checks(out_dir, checks, skipped, env, meta or {})

    extra = [
        r
        for s, why in skipped.items()
        for e in cfg.engines
        if e == "peft" or s in vllm
        for r in not_measured(e, s, engine_cells(cfg.grid), "skipped", why, device.type)
    ]
    extra += [  # further methods on vLLM: why not
        r
        for m, path in models.methods.items()
        for s in one_adapter
        if s in vllm
        for r in not_measured("vllm", s, engine_cells(cfg.grid), "skipped", vllm_refusal(path), device.type, m)
    ]
    versions = [
        {"engine": "peft", "package": p, "version": v}
        for p, v in runtime.versions().items()
        if p in ("torch", "transformers", "peft")
    ]
    engine_checks = []
    served = [s for s in vllm if s not in skipped]
    if served:
        measured_vllm, more, engine_checks, versions = run_vllm(
            served, models, workload, checked, references, num_labels, tokenizer, cfg, out_dir, input_names, versions
        )
        overheads(measured_vllm, cfg.bootstrap)
        measured, extra = measured + measured_vllm, extra + more
    return DeploymentResult(
        timings,
        checks,
        memory_rows,
        skipped,
        DEPLOYMENT_ENGINES.write(out_dir, engines_table(measured, extra, device.type, names)),
        ENGINE_CHECKS.write(out_dir, pd.DataFrame(engine_checks, columns=ENGINE_CHECKS.columns)),
        ENGINE_VERSIONS.write(out_dir, pd.DataFrame(versions, columns=ENGINE_VERSIONS.columns)),
    )


def run_vllm(served, models, workload, checked, references, num_labels, tokenizer, cfg, out_dir, input_names, versions):
    """vLLM on the strategies it can serve here: BERT sentence pairs and a missing vLLM
    environment are skipped rows with their reason, never an error."""
    rows, device = [], "cuda" if torch.cuda.is_available() else "cpu"
    where = engine_cells(cfg.grid)
    for strategy in list(served):
        if why := vllm_engine.pair_reason(strategy, models, checked, input_names):
            rows += not_measured("vllm", strategy, where, "skipped", why, device)
            served.remove(strategy)
    try:
        python = find_vllm_python(cfg.vllm.python)
    except InputError as err:
        say(f"vLLM skipped: {err}")
        return (
            [],
            rows + [r for s in served for r in not_measured("vllm", s, where, "skipped", str(err), device)],
            [],
            versions,
        )
    versions = versions + [
        {"engine": "vllm", "package": p, "version": v} for p, v in vllm_engine.venv_versions(python).items()
    ]
    if not served:
        return [], rows, [], versions
    kind = vllm_engine.classification(models, checked, references, num_labels)
    result = vllm_engine.run(served, models, workload, kind, tokenizer, cfg, out_dir, python)
    return result.measured, rows + result.rows, result.checks, versions
