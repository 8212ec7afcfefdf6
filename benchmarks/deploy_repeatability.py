"""Repeatability of the deployment benchmark on a finished study: the benchmark runs twice, each
time in a fresh process, and the script prints the separate/merged overhead at batch 1 of both
runs with their difference in percentage points, and the merged/full latency ratio of every
cell (merged and full have the same architecture and compute, so it should sit in [0.97, 1.03]).

    python benchmarks/deploy_repeatability.py [--study studies/quick] [--repeats 50] [--threads 1]

Inputs are what the `deploy` stage serves: each task's LoRA run and the first task's full run of
one seed, on the study's prepared eval splits."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

warnings.filterwarnings("ignore", category=FutureWarning)


def run_once(args, out: Path) -> None:
    """One benchmark of the study's runs, written to `out` (in this process)."""
    import transformers

    from lorascope import modeling
    from lorascope.config import DeployConfig
    from lorascope.prepared import load_prepared
    from lorascope.serving.benchmark import benchmark
    from lorascope.serving.inputs import examples_from_dataset
    from lorascope.study import Study

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    study = Study(args.study)
    config = study.load_config()
    seed = config.deploy.seed if config.deploy.seed is not None else config.seeds[0]
    tasks = list(config.tasks)
    adapters = {t: str(study.run_dir(t, "lora", seed)) for t in tasks}
    splits = {t: load_prepared(study, t)[1] for t in tasks}
    examples = {t: examples_from_dataset(splits[t]["eval"]) for t in tasks}
    cells = {
        "batch_sizes": args.batch_sizes,
        "seq_lens": [s if s == "natural" else int(s) for s in args.seq_lens],
        "concurrency": [1],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
    }
    cfg = DeployConfig.model_validate(
        config.deploy.model_dump()
        | {"engines": ["peft"], "bootstrap": 1000, "grid": cells, "checks": {"examples": args.check_examples}}
    )
    benchmark(
        modeling.resolve_model_path(config.model.name),
        adapters,
        str(study.run_dir(tasks[0], "full", seed)),
        examples,
        modeling.load_tokenizer(config.model.name),
        cfg,
        out,
        memory=args.memory,
    )


def summary(outs: list[Path], n_boot: int = 1000) -> pd.DataFrame:
    """Per run and cell: separate/merged and merged/full, as the table reports them (median of
    per-round ratios) and as a ratio of medians, recomputed from the raw per-call times."""
    from lorascope.stats import median_paired_ratio, ratio_of_medians

    rows = []
    for k, out in enumerate(outs, 1):
        times = pd.read_csv(out / "deployment_times.csv")
        env = json.loads((out / "deployment_checks.json").read_text())["environment"]
        for (batch_size, seq_len), cell in times.groupby(["batch_size", "seq_len"], sort=False):
            ms = {s: g.sort_values("repetition")["ms"].to_numpy() for s, g in cell.groupby("strategy")}
            paired = median_paired_ratio(ms["separate"], ms["merged"], n_boot)
            rows.append(
                {
                    "run": k,
                    "batch_size": batch_size,
                    "seq_len": seq_len,
                    "separate_p50_ms": np.median(ms["separate"]),
                    "merged_p50_ms": np.median(ms["merged"]),
                    "sep_vs_merged_pct": 100 * (paired[0] - 1),
                    "ci_pct": f"[{100 * (paired[1] - 1):.1f}, {100 * (paired[2] - 1):.1f}]",
                    "sep_vs_merged_pct_ratio_of_medians": 100
                    * (ratio_of_medians(ms["separate"], ms["merged"], 0)[0] - 1),
                    "merged_over_full": median_paired_ratio(ms["merged"], ms["full"], 0)[0],
                    "merged_over_full_ratio_of_medians": ratio_of_medians(ms["merged"], ms["full"], 0)[0],
                    "load_avg": "{:.1f} -> {:.1f}".format(
                        env["load_average_before_timing"][0], env["load_average_after_timing"][0]
                    ),
                }
            )
    return pd.DataFrame(rows)


def spread(table: pd.DataFrame, column: str) -> pd.DataFrame:
    at1 = table[table["batch_size"] == 1].pivot(index="seq_len", columns="run", values=column)
    at1["spread_pp"] = at1.max(axis=1) - at1.min(axis=1)
    return at1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/quick")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq-lens", nargs="+", default=["natural", "32"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--check-examples", type=int, default=128, help="eval examples per task for the checks")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="also measure memory (one process per strategy)")
    parser.add_argument("--out", help="keep each run's outputs under this folder")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one run into this folder
    args = parser.parse_args()
    if args.single:
        run_once(args, Path(args.single))
        return
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="deploy-repeat-"))
    outs = [root / f"run{k}" for k in range(1, args.runs + 1)]
    for out in outs:
        command = [sys.executable, __file__, "--single", str(out), *sys.argv[1:]]
        subprocess.run(command, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    table = summary(outs)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nseparate/merged overhead at batch 1 (%), median of per-round ratios (the table's estimator):")
    print(spread(table, "sep_vs_merged_pct").to_string(float_format=lambda v: f"{v:.2f}"))
    print("\nthe same as a ratio of medians:")
    print(spread(table, "sep_vs_merged_pct_ratio_of_medians").to_string(float_format=lambda v: f"{v:.2f}"))
    for column in ("merged_over_full", "merged_over_full_ratio_of_medians"):
        ratio = table[column]
        print(
            f"\n{column}: min {ratio.min():.3f}, max {ratio.max():.3f} "
            f"({'inside' if ratio.between(0.97, 1.03).all() else 'outside'} [0.97, 1.03])"
        )
    print(f"outputs: {root}")


if __name__ == "__main__":
    main()
