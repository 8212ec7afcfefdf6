"""vLLM vs PEFT on the same model and inputs, and how repeatable separate-over-merged is per engine.

    python benchmarks/vllm_vs_peft.py [--model smollm2-135m] [--requests 320] [--runs 2]
                                      [--engines peft vllm] [--out DIR]

Two LoRA adapters on the model (written as a study's LoRA runs write them: lorascope's
prepare_for_method and PEFT's save_pretrained; B and the score head perturbed, so each adapter
changes the outputs and the correctness check is not vacuous), SST-2 and RTE eval texts. The
engine grid (lorascope.serving.engines) runs twice (--runs), merged and separate at concurrency 1 and 16
(one example per request), each engine's two strategies interleaved in turns as short as the
engine allows (serving.engines.TURNS: request by request on PEFT at one client, 20 requests on vLLM,
16 on PEFT at concurrency 16); each run starts its own vLLM servers, both up at once. PEFT gets one torch thread,
as vLLM's CPU worker binds one core (it reserves the other) on this machine. Prints:
- with both engines: latency at concurrency 1 (p50, PEFT / vLLM) and throughput at 16 (examples/s, vLLM / PEFT);
- separate over merged per engine in every run (bootstrap intervals over turns), and how many
  points apart the runs are.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from lorascope.config import DeployConfig, LoraMethodConfig
from lorascope.modeling import load_model, load_tokenizer, prepare_for_method, resolve_model_path
from lorascope.serving.engines import run_engines
from lorascope.serving.inputs import tokenize_texts

GLUE = Path(os.environ.get("LORASCOPE_GLUE", "../shared/data/glue"))


def adapters(base: str, tokenizer, folder: Path) -> dict[str, str]:
    out = {}
    for task, seed in (("sst2", 1), ("rte", 2)):
        model = prepare_for_method(load_model(base, ("0", "1"), seed, tokenizer.pad_token_id), "lora",
                                   LoraMethodConfig(lr=1e-3), seed)  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    param.add_(0.02 * torch.randn(param.shape, generator=g))
        model.save_pretrained(folder / task)
        out[task] = str(folder / task)
    return out


def examples(tokenizer, n: int) -> dict[str, list[dict]]:
    sst2 = pd.read_parquet(GLUE / "sst2" / "validation-00000-of-00001.parquet").head(n)
    rte = pd.read_parquet(GLUE / "rte" / "validation-00000-of-00001.parquet").head(n)
    return {"sst2": tokenize_texts(tokenizer, [(s, None) for s in sst2.sentence], 128, sst2.label.tolist()),
            "rte": tokenize_texts(tokenizer, list(zip(rte.sentence1, rte.sentence2)), 128, rte.label.tolist())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=320,
                        help="timed requests per cell (320: 20 turns of PEFT at 16 clients; 100 gave 6, and its "
                             "separate over merged moved up to 6.8 points between runs)")
    parser.add_argument("--runs", type=int, default=2, help="runs of the grid, each on fresh models and servers")
    parser.add_argument("--engines", nargs="+", choices=["peft", "vllm"], default=["peft", "vllm"])
    parser.add_argument("--out", default=None, help="folder for the tables and vLLM logs (default: a temp folder)")
    args = parser.parse_args()
    base = resolve_model_path(args.model)
    tokenizer = load_tokenizer(args.model)
    cfg = DeployConfig(engines=args.engines, strategies=["merged", "separate"], concurrency=[1, 16], batch_sizes=[1],
                       engine_requests=args.requests, warmup=2, threads=1, check_examples=32)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch)
        served, inputs = adapters(base, tokenizer, Path(scratch) / "adapters"), examples(tokenizer, 64)
        runs = []
        for run in range(1, args.runs + 1):
            started = time.monotonic()
            rows = run_engines(base, served, None, inputs, tokenizer, cfg, out / f"run{run}", check_examples=32).rows
            print(f"run {run}: {time.monotonic() - started:.0f} s", flush=True)
            runs.append(rows.assign(run=run))
    grid = pd.concat(runs)
    bad = grid[grid["status"] != "ok"].drop_duplicates(["engine", "strategy"])
    for r in bad.itertuples():
        print(f"{r.engine} {r.strategy}: {r.status}: {r.note}")
    cell = lambda e, s, c, col: grid[(grid.engine == e) & (grid.strategy == s) & (grid.concurrency == c)][col].mean()
    if set(cfg.engines) == {"peft", "vllm"}:
        print(f"\n{args.model}, {args.requests} requests per cell, mean of {args.runs} runs")
        print(f"{'strategy':10} {'PEFT p50 c1':>12} {'vLLM p50 c1':>12} {'PEFT/vLLM':>10} "
              f"{'PEFT ex/s c16':>14} {'vLLM ex/s c16':>14} {'vLLM/PEFT':>10}")  # fmt: skip
        for s in cfg.strategies:
            p, v = cell("peft", s, 1, "p50_ms"), cell("vllm", s, 1, "p50_ms")
            pt, vt = cell("peft", s, 16, "examples_per_s"), cell("vllm", s, 16, "examples_per_s")
            print(f"{s:10} {p:12.1f} {v:12.1f} {p / v:10.2f} {pt:14.1f} {vt:14.1f} {vt / pt:10.2f}")
    print("\nseparate over merged (%, median of per-request ratios, interval over turns), concurrency 1 and 16")
    for e in cfg.engines:
        for c in cfg.concurrency:
            rows = grid[(grid.engine == e) & (grid.strategy == "separate") & (grid.concurrency == c)]
            o, low, high = ([100 * (v - 1) for v in rows[col]] for col in
                            ("overhead_vs_merged", "overhead_vs_merged_ci_low", "overhead_vs_merged_ci_high"))  # fmt: skip
            each = "   ".join(f"run {r} {v:+6.1f} [{lo:.1f}, {hi:.1f}]" for r, v, lo, hi in zip(rows.run, o, low, high))
            print(f"{e:5} c{c:<3} {each}   runs apart by {max(o) - min(o):4.1f} points")


if __name__ == "__main__":
    main()
