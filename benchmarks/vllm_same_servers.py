"""Where vLLM's run-to-run spread in separate-over-merged comes from: the engine grid measured
twice on the same two servers (benchmarks/vllm_vs_peft.py starts fresh servers for each run).
If the two grids agree, the spread between runs is the servers' own; if not, it is noise in time.

    python benchmarks/vllm_same_servers.py [--model smollm2-135m] [--requests 100]

Same adapters, inputs and cells as vllm_vs_peft.py (merged and separate, concurrency 1 and 16,
one example per request, interleaved rounds)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from vllm_vs_peft import adapters, examples  # this folder is on sys.path when the script runs

from lorascope.config import DeployConfig
from lorascope.modeling import load_tokenizer, resolve_model_path
from lorascope.serving import engines
from lorascope.serving.inputs import Models, num_labels_of
from lorascope.serving.vllm_server import VllmServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=100, help="timed requests per cell")
    args = parser.parse_args()
    base, tokenizer = resolve_model_path(args.model), load_tokenizer(args.model)
    cfg = DeployConfig(engines=["vllm"], strategies=["merged", "separate"], concurrency=[1, 16], batch_sizes=[1],
                       engine_requests=args.requests, warmup=2, threads=1)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        models = Models(base, adapters(base, tokenizer, folder / "adapters"), None)
        num_labels, inputs = num_labels_of(models), examples(tokenizer, 64)
        merged_dir = engines.write_merged(models, num_labels, tokenizer.pad_token_id, tokenizer, folder / "merged")
        architecture = {"architectures": [engines.seq_cls_architecture(base)]}
        with (VllmServer(merged_dir, log_path=folder / "merged.log", max_num_seqs=16) as merged,
              VllmServer(base, lora_modules=models.adapters, num_labels=num_labels, hf_overrides=architecture,
                         log_path=folder / "adapters.log", max_num_seqs=16) as separate):  # fmt: skip
            sends = {"merged": engines.vllm_send(merged, "merged"), "separate": engines.vllm_send(separate, "separate")}
            memory = {"merged": merged.memory_mb, "separate": separate.memory_mb}
            for grid in (1, 2):
                rows, latencies = engines.grid("vllm", sends, inputs, models, cfg, "cpu", memory)
                engines.overheads(rows, {("vllm", *key): v for key, v in latencies.items()}, cfg)
                for r in (r for r in rows if r["strategy"] == "separate"):
                    print(f"same servers, grid {grid}, concurrency {r['concurrency']:2}: separate over merged "
                          f"{100 * (r['overhead_vs_merged'] - 1):+.1f} % [{100 * (r['overhead_vs_merged_ci_low'] - 1):.1f}, "
                          f"{100 * (r['overhead_vs_merged_ci_high'] - 1):.1f}]", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
