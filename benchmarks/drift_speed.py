"""Time of the drift stage for one model pair (base vs run) at the paper's size, per measure,
and the size on disk of a study's features.

    python benchmarks/drift_speed.py [--examples 872] [--hidden 2048] [--layers 23]
                                     [--bootstrap 1000] [--measures ...] [--study studies/quick]

The paper-size case: n = 872 probe examples (SST-2 validation), TinyLlama's 2048-wide hidden
states, 23 layers (embedding output + 22 blocks), 1,000 bootstrap resamples. Features are
synthetic (a decaying spectrum plus noise, float32 as stored; the run is the base plus a
perturbation): time depends on the shapes only. Each measure goes through drift.layer_rows,
the stage's own code path, in one thread as the stage runs it (runtime.threads(1)). The target
is < 10 s for all measures of one pair."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from lorascope import drift, runtime

TARGET_S = 10.0
MEASURES = ["linear_cka", "debiased_cka", "cosine", "rbf_cka"]


def synthetic_pair(layers: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[layers × n × d] float32 base and run features with a transformer-like decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    rank = min(n, d, 256)
    scales = torch.arange(1, rank + 1, dtype=torch.float32).pow(-0.75)
    base = torch.empty(layers, n, d)
    run = torch.empty(layers, n, d)
    for i in range(layers):
        latent = torch.randn(n, rank, generator=g) * scales
        mixed = latent @ torch.randn(rank, d, generator=g) / rank**0.5
        base[i] = mixed + 0.05 * torch.randn(n, d, generator=g) + 1.0  # an offset, as hidden states have
        run[i] = base[i] + 0.3 * mixed.std() * torch.randn(n, d, generator=g)
    return base, run


def time_measures(base, run, measures, bootstrap: int, repeats: int) -> list[tuple[str, float, int]]:
    """Median seconds over `repeats` of drift.layer_rows for each measure, in one thread."""
    layers = list(range(base.shape[0]))
    results = []
    with runtime.threads(1):
        drift.layer_rows(base[:1, :16], run[:1, :16], [0], measures, bootstrap=2)  # warm-up: first-call costs
        for measure in [*measures, measures]:  # each alone, then all in one call as the stage does
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                together = isinstance(measure, list)
                rows = drift.layer_rows(base, run, layers, measure if together else [measure], bootstrap=bootstrap,
                                        bootstrap_seed=0, confidence=0.95, task="bench", comparison="run_vs_base")  # fmt: skip
                times.append(time.perf_counter() - started)
            results.append(("all, one call" if together else measure, sorted(times)[len(times) // 2], len(rows)))
    return results


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def features_report(study: Path) -> None:
    folder = study / "features" if (study / "features").is_dir() else study
    if not folder.is_dir():
        raise SystemExit(f"--study: no features folder at {study}")
    total, count = folder_size(folder)
    print(f"\nfeatures on disk: {folder}")
    print(f"{'task':<12} {'files':>6} {'MB':>10}")
    for task in sorted(p for p in folder.iterdir() if p.is_dir()):
        size, n = folder_size(task)
        print(f"{task.name:<12} {n:>6} {size / 1e6:>10.1f}")
    print(f"{'total':<12} {count:>6} {total / 1e6:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=872, help="probe examples n (default 872, SST-2 validation)")
    parser.add_argument("--hidden", type=int, default=2048, help="feature width d (default 2048, TinyLlama)")
    parser.add_argument("--layers", type=int, default=23, help="layers compared (default 23)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--measures", nargs="+", default=MEASURES, choices=sorted(drift.POINT))
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per measure; the median is shown")
    parser.add_argument("--study", type=Path, help="study directory or its features folder: print its size on disk")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"1 thread (as the drift stage)")  # fmt: skip
    print(f"one pair: n={args.examples}, d={args.hidden}, {args.layers} layers, {args.bootstrap} resamples")
    base, run = synthetic_pair(args.layers, args.examples, args.hidden)
    results = time_measures(base, run, args.measures, args.bootstrap, args.repeats)
    total = results[-1][1]  # all measures in one call, as the stage computes them
    print(f"\n{'measure':<14} {'seconds':>9} {'s / layer':>10} {'rows':>6}")
    for measure, seconds, rows in results:
        print(f"{measure:<14} {seconds:>9.2f} {seconds / args.layers:>10.3f} {rows:>6}")
    verdict = "met" if total < TARGET_S else "not met"
    print(f"target: < {TARGET_S:.0f} s for all measures of one pair: {verdict}")
    per_model = args.layers * args.examples * args.hidden * 4 * 2  # float32, mean + head pooling
    print(f"one model's features at this size (2 poolings, float32): {per_model / 1e6:.0f} MB")
    if args.study:
        features_report(args.study)


if __name__ == "__main__":
    main()
