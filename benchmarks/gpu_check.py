"""GPU readiness in one call (<= 10 minutes on one GPU, nothing from a network): a smoke study
on a tiny random Llama with bf16 autocast and gradient checkpointing, then timings at the
paper's size on a randomly initialised TinyLlama-1.1B (same shapes; weights do not change
speed): training tokens/s of LoRA and full FT through lorascope against a bare PyTorch loop,
peak GPU memory, features and drift for one model pair, deploy latency at batch 1 and 16.

    python benchmarks/gpu_check.py [--steps 30] [--out DIR] [--tokenizer DIR]
    python benchmarks/gpu_check.py --tiny --device cpu   # the same path at toy size, to test it

Needs GLUE SST-2 at $LORASCOPE_GLUE and a tokenizer folder (default: the bundled MiniLM's or
SmolLM2's); the model's vocabulary is the tokenizer's (TinyLlama has 32,000)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from drift_speed import synthetic_pair, time_measures
from lorascope import modeling, runs, runtime
from lorascope import representations as rep
from lorascope.config import DeployConfig
from lorascope.config_io import load_config
from lorascope.prepared import load_prepared
from lorascope.serving.benchmark import benchmark
from lorascope.serving.inputs import examples_from_dataset
from lorascope.stages import BY_NAME, STAGES
from lorascope.study import run_stages
from lorascope.training import train_run
from train_throughput import bare_loop

warnings.filterwarnings("ignore", category=FutureWarning)
transformers.logging.set_verbosity_error()
TINYLLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
)
TOY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def random_llama(folder: Path, shape: dict, tokenizer) -> Path:
    """A randomly initialised Llama of `shape` with the tokenizer's vocabulary, saved as a model folder."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def default_tokenizer() -> str:
    for alias in ("smollm2-135m", "minilm-l6"):
        try:
            return modeling.resolve_model_path(alias)
        except Exception:
            continue
    raise SystemExit("no tokenizer: pass --tokenizer DIR (any Hugging Face tokenizer folder)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy shapes instead of TinyLlama's (a test of the script)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    work = Path(args.out or tempfile.mkdtemp(prefix="lorascope-gpu-"))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_tokenizer())
    rows: list[tuple[str, str, str]] = []
    common = [
        f"runtime.device={args.device}",
        "runtime.bf16=true",
        "runtime.progress=false",
        "model.gradient_checkpointing=true",
    ]

    # 1. every stage on a tiny random Llama
    tiny = random_llama(work / "tiny-llama", TOY | dict(hidden_size=64, num_attention_heads=2), tokenizer)
    smoke = load_config(None, "smoke", [f"model.name={tiny}", "tasks={sst2: {train_max: 64, eval_max: 64}}", *common])
    started = time.perf_counter()
    study = run_stages(smoke, work / "smoke", list(STAGES))
    performance = runs.PERFORMANCE.read(study.tables)
    rows.append(("smoke study, all stages", f"{time.perf_counter() - started:.1f}", "s"))
    rows.append(("smoke runs ok", f"{int((performance['status'] == 'ok').sum())} / {len(performance)}", "runs"))

    # 2. paper size
    paper = random_llama(work / "tinyllama-random", TOY if args.tiny else TINYLLAMA, tokenizer)
    config = load_config(None, "paper", [f"model.name={paper}", "tasks={sst2: {train_max: 2000}}", *common])
    study = run_stages(config, work / "paper", [BY_NAME["prepare"]])
    task, splits = load_prepared(study, "sst2")
    for method in ("lora", "full"):
        setup = runs.run_setup(config, task, method, 42, max_steps=args.steps)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        metrics = train_run(
            setup,
            {"train": splits["train"], "eval": splits["eval"].select(range(64))},
            tokenizer,
            work / "paper" / method,
        )
        ours = metrics["tokens_seen"] / metrics["train_seconds"]
        plain = bare_loop(setup, splits["train"], tokenizer, args.steps)
        rows += [
            (f"train {method}: lorascope", f"{ours:,.0f}", "tokens/s"),
            (f"train {method}: bare loop", f"{plain:,.0f}", "tokens/s"),
            (f"train {method}: lorascope / bare", f"{ours / plain:.3f}", "ratio"),
            (
                f"train {method}: peak GPU memory allocated",
                f"{(metrics.get('cuda_max_allocated_bytes') or 0) / 2**30:.2f}",
                "GiB",
            ),
        ]

    model = modeling.load_model(str(paper), task.label_names, 0, tokenizer.pad_token_id).to(device)
    started = time.perf_counter()
    features, layers = rep.study_features(model, splits["eval"], config.represent, tokenizer, 64, device, True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rows.append(
        (
            f"features, {len(splits['eval'])} examples x {len(layers)} layers",
            f"{time.perf_counter() - started:.1f}",
            "s",
        )
    )
    del model
    base, run = synthetic_pair(len(layers), len(splits["eval"]), features["mean"].shape[-1])
    for measure, seconds, _ in time_measures(base, run, list(config.drift.measures), config.drift.bootstrap, 1):
        if measure == "all, one call":
            rows.append((f"drift, one model pair, {config.drift.bootstrap} resamples", f"{seconds:.1f}", "s"))

    deploy = DeployConfig(
        strategies=["merged", "separate"],
        grid={"batch_sizes": [1, 16], "seq_lens": ["natural"], "concurrency": [1], "warmup": 3, "repeats": 20},
        checks={"examples": 32},
    )
    result = benchmark(
        str(paper),
        {"sst2": str(work / "paper" / "lora")},
        None,
        {"sst2": examples_from_dataset(splits["eval"])},
        tokenizer,
        deploy,
        work / "deploy",
        device=device,
        bf16=True,
        memory=False,
    )
    for _, row in result.timings[result.timings["status"] == "ok"].iterrows():
        rows.append((f"deploy {row['strategy']}, batch {row['batch_size']}: p50 latency", f"{row['p50_ms']:.1f}", "ms"))

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"## lorascope GPU check on {gpu} ({'toy shapes' if args.tiny else 'TinyLlama-1.1B shapes'}, "
        f"{args.steps} training steps, batch {config.training.lora.batch_size}, bf16 autocast, "
        f"gradient checkpointing)\n"
    )
    print("| measurement | value | unit |\n|---|---|---|")
    for name, value, unit in rows:
        print(f"| {name} | {value} | {unit} |")
    (work / "gpu_check.json").write_text(
        json.dumps({"device": gpu, "hardware": runtime.hardware(device), "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
