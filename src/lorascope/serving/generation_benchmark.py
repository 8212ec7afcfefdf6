"""Serving cost of fine-tuned decoders that generate: the correctness checks (PEFT's paths against
each other, then every vLLM strategy against PEFT), then the grid's cells with generation
requests on every engine of deploy.engines (PEFT in-process first, then vLLM servers), written
as deployment_generation.csv (serving.generation_grid), deployment_generation_checks.csv and
deployment_generation_versions.csv. See docs/serving.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lorascope import runtime
from lorascope.config import DeployConfig
from lorascope.errors import InputError
from lorascope.serving import peft_generation, vllm_engine, vllm_generation
from lorascope.serving.benchmark import validate
from lorascope.serving.checks import DEPLOYMENT_CHECKS, DeploymentCheckFailed
from lorascope.serving.generation_grid import DEPLOYMENT_GENERATION, generation_table, tpot_ms
from lorascope.serving.grid import GENERATE, Workload, engine_cells, measure, not_measured, overheads
from lorascope.serving.inputs import Models, interleave
from lorascope.serving.load import TURNS, say
from lorascope.serving.strategies import REGISTRY
from lorascope.serving.vllm_engine import ENGINE_VERSIONS
from lorascope.serving.vllm_server import find_vllm_python
from lorascope.study import Table

CHECKED_PROMPTS = 16  # labelled prompts per adapter the checks score, unless deploy.checks.examples says
DEPLOYMENT_GENERATION_CHECKS = Table("deployment_generation_checks", ("engine", "strategy", *DEPLOYMENT_CHECKS.columns))
DEPLOYMENT_GENERATION_VERSIONS = Table("deployment_generation_versions", ENGINE_VERSIONS.columns)


@dataclasses.dataclass
class GenerationResult:
    table: pd.DataFrame  # deployment_generation.csv
    checks: pd.DataFrame
    left_out: int  # prompts too long for max_length with output_tokens more


def servable(examples: dict[str, list[dict]], max_length: int, output_tokens: int) -> tuple[dict, int]:
    """Each task's prompts that leave room for output_tokens within max_length, and how many did not."""
    kept = {t: [r for r in rows if len(r["input_ids"]) + output_tokens <= max_length] for t, rows in examples.items()}
    left_out = sum(map(len, examples.values())) - sum(map(len, kept.values()))
    if empty := [t for t, rows in kept.items() if not rows]:
        raise InputError(
            f"deploy.grid.output_tokens: no prompt of {empty} leaves room for {output_tokens} tokens within "
            f"model.max_length {max_length}"
        )
    return kept, left_out


def benchmark_generation(
    base: str,
    adapters: dict[str, str],
    full: str | None,
    examples: dict[str, list[dict]],
    tokenizer,
    cfg: DeployConfig,
    out_dir: str | Path,
    max_length: int,
    device: str | torch.device = "cpu",
    bf16: bool = False,
) -> GenerationResult:
    """`adapters` maps names to causal-LM adapter folders (the first is served by merged and
    separate; multi spreads requests over all of them); `examples[name]` are that adapter's
    labelled prompts (input_ids: the prompt, completion_ids: the reference completion; see
    generation_grid.generation_examples). Raises DeploymentCheckFailed, after writing the
    checks, when a PEFT serving path changes what the model answers."""
    device, out_dir = torch.device(device), Path(out_dir)
    models = Models(base, dict(adapters), full)
    validate(models, examples)
    tokens, pad, eos = cfg.grid.output_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id
    examples, left_out = servable(examples, max_length, tokens)
    strategies = list(dict.fromkeys(cfg.strategies))
    skipped = {name: why for name in strategies if (why := REGISTRY[name].unavailable(models))}
    checked = {t: examples[t][: cfg.checks.examples or CHECKED_PROMPTS] for t in models.adapters}

    checks, references = peft_generation.check_correctness(models, checked, tokens, pad, eos, device)
    checks.insert(0, "strategy", checks["check"].str.split("_vs_").str[0])
    checks.insert(0, "engine", "peft")
    DEPLOYMENT_GENERATION_CHECKS.write(out_dir, checks)
    if not checks["passed"].all():
        raise DeploymentCheckFailed(checks)
    say(f"generation checks passed (max |Δ log-probability| {checks['max_abs_diff'].max():.2g})")

    pool = interleave({t: examples[t] for t in models.adapters})
    workload = Workload(pool, pad, peft_generation.INPUTS, cfg.grid.warmup, device, kind=GENERATE)
    cells = engine_cells(cfg.grid)
    extra = [r for s, why in skipped.items() for r in not_measured("peft", s, cells, "skipped", why, device.type)]
    measured = []
    if "peft" in cfg.engines:
        with runtime.threads(cfg.grid.threads or torch.get_num_threads()):
            loaded = peft_generation.load(strategies, skipped, models, pad, device)
            generation = peft_generation.fixed_length(tokens, pad, eos)
            sends = {
                s: peft_generation.sender(model, s, list(models.adapters), device, bf16, generation)
                for s, model in loaded.items()
            }
            for cell in cells:
                measured += measure("peft", sends, workload, cell, cfg.grid, TURNS["peft"])
            del sends, loaded
    versions = [
        {"engine": "peft", "package": p, "version": v}
        for p, v in runtime.versions().items()
        if p in ("torch", "transformers", "peft")
    ]
    engine_checks = []
    served = [s for s in strategies if s in vllm_engine.SERVED and s not in skipped] if "vllm" in cfg.engines else []
    if served:
        python = find_vllm_python(cfg.vllm.python)
        versions += [
            {"engine": "vllm", "package": p, "version": v} for p, v in vllm_engine.venv_versions(python).items()
        ]
        kind = vllm_generation.generation(models, checked, references, tokens, eos, max_length)
        result = vllm_engine.run(served, models, workload, kind, tokenizer, cfg, out_dir, python)
        measured, extra, engine_checks = measured + result.measured, extra + result.rows, result.checks
    overheads(measured, cfg.bootstrap, value=tpot_ms, prefix="tpot_overhead")
    if engine_checks:
        checks = pd.concat([checks, pd.DataFrame(engine_checks)], ignore_index=True)
        DEPLOYMENT_GENERATION_CHECKS.write(out_dir, checks)
    DEPLOYMENT_GENERATION_VERSIONS.write(out_dir, pd.DataFrame(versions, columns=ENGINE_VERSIONS.columns))
    lengths = np.array([len(r["input_ids"]) for r in pool])
    table = generation_table(measured, extra, tokens, lengths, device.type)
    if left_out:
        say(f"{left_out} prompts left out: longer than model.max_length {max_length} less {tokens} output tokens")
    return GenerationResult(DEPLOYMENT_GENERATION.write(out_dir, table), checks, left_out)
