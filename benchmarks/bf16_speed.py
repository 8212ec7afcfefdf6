"""What bf16 autocast buys on this machine: training tokens/s of a lorascope run (LoRA and full
FT) and the time of the represent stage's feature pass, fp32 vs bf16 autocast, per model.

    python benchmarks/bf16_speed.py [--models minilm-l6 smollm2-135m] [--steps 20] [--rounds 3]

Rounds interleave the two precisions (fp32 first in even rounds, bf16 first in odd ones) and
the ratio is taken within each round; the table gives the median ratio (> 1: bf16 faster)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from train_throughput import lorascope_run

from lorascope import modeling, runs
from lorascope import representations as rep
from lorascope.config import load_config
from lorascope.stages import BY_NAME
from lorascope.study import run_stages


def feature_seconds(model, probe, config, tokenizer, bf16: bool) -> float:
    started = time.perf_counter()
    rep.study_features(model, probe, config.represent, tokenizer, config.represent.batch_size, torch.device("cpu"), bf16)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"## bf16 autocast vs fp32 on CPU, {torch.get_num_threads()} threads, SST-2, {args.steps} training steps, "
          f"median of {args.rounds} interleaved rounds\n")  # fmt: skip
    print("| model | work | fp32 | bf16 | bf16 speed-up |\n|---|---|---|---|---|")
    for name in args.models:
        settings = {bf16: load_config(None, "quick", [f"model.name={name}", "runtime.progress=false",
                                                     "tasks={sst2: {train_max: 1000}}", f"runtime.bf16={str(bf16).lower()}"])
                    for bf16 in (False, True)}  # fmt: skip
        study = run_stages(settings[False], Path(tempfile.mkdtemp(prefix="lorascope-bf16-")), [BY_NAME["prepare"]])
        task, splits = runs.load_prepared(study, "sst2")
        tokenizer = modeling.load_tokenizer(name)
        work = {method: {bf16: (lambda b=bf16, m=method: lorascope_run(
                    runs.run_setup(settings[b], task, m, 42, max_steps=args.steps, save_weights=False),
                    splits["train"], tokenizer, args.steps)) for bf16 in (False, True)}
                for method in ("lora", "full")}  # fmt: skip
        model = modeling.load_model(name, task.label_names, 0, tokenizer.pad_token_id)
        work["features"] = {bf16: (lambda b=bf16: 1 / feature_seconds(model, splits["probe"], settings[b], tokenizer, b))
                            for bf16 in (False, True)}  # fmt: skip
        for label, calls in work.items():
            speeds = {False: [], True: []}
            for round_ in range(args.rounds):
                for bf16 in ((False, True) if round_ % 2 == 0 else (True, False)):
                    speeds[bf16].append(calls[bf16]())
            ratio = statistics.median(b / f for f, b in zip(speeds[False], speeds[True]))
            unit = (lambda v: f"{1 / v:.1f} s") if label == "features" else (lambda v: f"{v:,.0f} tok/s")
            what = f"features, {len(splits['probe'])} probe examples" if label == "features" else f"train {label}"
            print(f"| {name} | {what} | {unit(statistics.median(speeds[False]))} | {unit(statistics.median(speeds[True]))} "
                  f"| {ratio:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
