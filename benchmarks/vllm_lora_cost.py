"""Where vLLM's cost of a LoRA request comes from on CPU, and how repeatable it is on the same servers.

    python benchmarks/vllm_lora_cost.py [--model smollm2-135m] [--requests 100]

Four servers up at once, measured by the engine grid's interleaved loop (lorascope.serving.engines,
2 s quiet before each turn), the same adapters, inputs and cells as vllm_vs_peft.py (concurrency 1
and 16, one example per request), twice in a row:
- merged: the merged folder as vLLM serves it by default (on CPU: torch.compile, Inductor);
- merged eager: the same folder with compilation off, as vLLM's CPU platform forces for any server
  with LoRA enabled (vllm/platforms/cpu.py: lora_config -> CompilationMode.NONE);
- separate, all modules: the adapters with every module vLLM supports wrapped (its default:
  packed q/k/v, o, gate/up, down), though they train q and v only;
- separate: the adapters as lorascope serves them, --lora-target-modules from their configs.
Ratios are medians of per-request ratios with bootstrap intervals; two grids on the same servers
show how much of the run-to-run spread is the servers' own."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

from vllm_vs_peft import adapters, examples  # this folder is on sys.path when the script runs

from lorascope import stats
from lorascope.config import DeployConfig
from lorascope.modeling import load_tokenizer, resolve_model_path
from lorascope.serving import engines
from lorascope.serving.inputs import Models, num_labels_of
from lorascope.serving.vllm_server import VllmServer

EAGER = ["--compilation-config", '{"mode": 0}']  # what the CPU platform sets when LoRA is enabled
ALL_LLAMA_MODULES = ["--lora-target-modules", "qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
RATIOS = (("separate", "merged"), ("merged eager", "merged"), ("separate", "merged eager"),
          ("separate, all modules", "merged eager"), ("separate", "separate, all modules"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=100, help="timed requests per cell")
    args = parser.parse_args()
    base, tokenizer = resolve_model_path(args.model), load_tokenizer(args.model)
    cfg = DeployConfig(engines=["vllm"], strategies=["merged", "separate"], concurrency=[1, 16], batch_sizes=[1],
                       engine_requests=args.requests, warmup=2, threads=1)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as running:
        folder = Path(scratch)
        models = Models(base, adapters(base, tokenizer, folder / "adapters"), None)
        num_labels, inputs = num_labels_of(models), examples(tokenizer, 64)
        merged_dir = engines.write_merged(models, num_labels, tokenizer.pad_token_id, tokenizer, folder / "merged")
        lora = {"model_dir": base, "lora_modules": models.adapters, "num_labels": num_labels,
                "hf_overrides": {"architectures": [engines.seq_cls_architecture(base)]}}  # fmt: skip
        plan = {"merged": {"model_dir": merged_dir}, "merged eager": {"model_dir": merged_dir, "extra_args": EAGER},
                "separate, all modules": lora | {"extra_args": ALL_LLAMA_MODULES}, "separate": lora}  # fmt: skip
        sends = {}
        for i, (name, arguments) in enumerate(plan.items()):
            server = running.enter_context(VllmServer(**arguments, log_path=folder / f"{i}.log", max_num_seqs=16))
            print(f"{name}: ready in {server.startup_seconds:.0f} s", flush=True)
            sends[name] = engines.vllm_send(server, "merged" if name.startswith("merged") else "separate")
        for grid in (1, 2):
            for concurrency in cfg.concurrency:
                items = {name: engines.workload(inputs, [models.first], 1, cfg.engine_requests) for name in sends}
                measured = engines.measure(sends, items, concurrency, cfg, engines.TURNS["vllm"])
                p50 = ", ".join(f"{name} {row['p50_ms']:.0f}" for name, (row, _) in measured.items())
                print(f"grid {grid}, concurrency {concurrency}: p50 ms {p50}")
                turns = engines.rounds(cfg, concurrency, engines.TURNS["vllm"])
                for a, b in RATIOS:
                    ratio, low, high = stats.median_paired_ratio(measured[a][1], measured[b][1], cfg.bootstrap,
                                                                 blocks=turns)  # fmt: skip
                    print(f"  {a + ' over ' + b:44} {100 * (ratio - 1):+6.1f} % [{100 * (low - 1):.1f}, "
                          f"{100 * (high - 1):.1f}]", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
