"""Where the batch-1 overhead of an unmerged LoRA adapter comes from: extra FLOPs, or extra
operators (kernel launches and Python dispatch through PEFT's wrappers)?

    python benchmarks/separate_overhead_profile.py [--study studies/quick] [--task sst2] [--repeats 200]

Serves one natural-length eval example of the study's LoRA run (first seed) merged and
separate, on one thread: counts the aten operators and their FLOPs per forward with
torch.profiler, and times both interleaved call by call (median of per-pair ratios)."""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import datasets
import torch
from torch.profiler import ProfilerActivity, profile

from lorascope import modeling
from lorascope.serving import inputs
from lorascope.serving.strategies import REGISTRY
from lorascope.study import Study

warnings.filterwarnings("ignore")


def profile_forward(model, inputs) -> tuple[int, float]:
    """aten operators and GFLOPs (matmuls, as the profiler counts them) of one forward."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        model(**inputs)
    def is_aten(event) -> bool:
        return event is not None and event.name.startswith("aten::")

    top_level = [e for e in prof.events() if is_aten(e) and not is_aten(e.cpu_parent)]  # ops the model called
    return len(top_level), sum(e.flops for e in prof.events()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/quick")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    study = Study(args.study)
    config = study.load_config()
    models = inputs.Models(modeling.resolve_model_path(config.model.name),
                               {args.task: str(study.run_dir(args.task, "lora", config.seeds[0]))})  # fmt: skip
    split = datasets.load_from_disk(str(study.prepared_dir(args.task) / "splits"))["eval"]
    example = inputs.examples_from_dataset(split)[:1]
    tokenizer = modeling.load_tokenizer(config.model.name)
    names = inputs.forward_inputs(models.base)
    batch = inputs.pad_batch(example, tokenizer.pad_token_id, names)
    served = {s: REGISTRY[s].load(models, inputs.num_labels_of(models), tokenizer.pad_token_id)
              for s in ("merged", "separate")}  # fmt: skip
    times = {s: [] for s in served}
    with torch.inference_mode():
        stats = {s: profile_forward(m, batch.inputs) for s, m in served.items()}
        for _ in range(20):  # warm-up
            for m in served.values():
                m(**batch.inputs)
        for _ in range(args.repeats):
            for s, m in served.items():
                started = time.perf_counter()
                m(**batch.inputs)
                times[s].append(time.perf_counter() - started)
    ratio = statistics.median(a / b for a, b in zip(times["separate"], times["merged"]))
    ms = {s: 1000 * statistics.median(t) for s, t in times.items()}
    extra_ms = ms["separate"] - ms["merged"]
    flop_share = stats["separate"][1] / stats["merged"][1] - 1
    print(f"{args.task}, one example of {batch.real_tokens} tokens, 1 thread, {args.repeats} interleaved pairs\n")
    print("| strategy | aten ops / forward | GFLOP / forward | median ms |")
    print("|---|---|---|---|")
    for s in served:
        print(f"| {s} | {stats[s][0]} | {stats[s][1]:.4f} | {ms[s]:.2f} |")
    print(f"\nseparate / merged: {100 * (ratio - 1):+.1f} % time (median of per-pair ratios), "
          f"{100 * flop_share:+.2f} % FLOPs, {stats['separate'][0] - stats['merged'][0]:+d} operators")  # fmt: skip
    print(f"extra time {extra_ms:.2f} ms; FLOPs explain ~{100 * flop_share * ms['merged'] / max(extra_ms, 1e-9):.0f} % "
          f"of it at the merged model's FLOP rate, the rest is per-operator cost "
          f"(~{1000 * extra_ms / max(stats['separate'][0] - stats['merged'][0], 1):.1f} µs per extra operator)")  # fmt: skip


if __name__ == "__main__":
    main()
