"""Time of the drift stage for one model pair (base vs run) at the paper's size, per measure,
with its products in float32 (the default) against the float64 reference, the largest error
of the first against the second, and the size on disk of a study's features.

    python benchmarks/drift_speed.py [--examples 872] [--hidden 2048] [--layers 23]
                                     [--bootstrap 1000] [--measures ...] [--threads 1 2]
                                     [--repeats 1] [--study studies/quick]

The paper-size case: n = 872 probe examples (SST-2 validation), TinyLlama's 2048-wide hidden
states, 23 layers (embedding output + 22 blocks), 1,000 bootstrap resamples. Features are
synthetic (a decaying spectrum plus noise, float32 as stored; the run is the base plus a
perturbation): time depends on the shapes only. Each measure goes through drift.layer_rows,
the stage's own code path, with dtype=torch.float64 and then float32, one after the other so
that both see the same load; the error columns are max |float32 − float64| over layers for the
value (so for 1 − value) and each interval bound. The stage runs in one thread
(runtime.threads(1)); the all-measures call is timed again at every other --threads count. The
target is < 10 s for all measures of one pair in one thread."""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import torch

from lorascope import drift, runtime

TARGET_S = 10.0
MEASURES = ["linear_cka", "debiased_cka", "cosine", "rbf_cka"]
BOUNDS = ("value", "ci_low", "ci_high")


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


def timed_rows(base, run, measures: list[str], bootstrap: int, dtype: torch.dtype, repeats: int):
    """Median wall and CPU seconds over `repeats` of drift.layer_rows, and its rows. On a shared
    machine the CPU time of one thread is close to what the wall time would be on an idle one."""
    times = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        rows = drift.layer_rows(
            base,
            run,
            list(range(base.shape[0])),
            measures,
            bootstrap=bootstrap,
            bootstrap_seed=0,
            confidence=0.95,
            dtype=dtype,
            task="bench",
            comparison="run_vs_base",
        )
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return *sorted(times)[len(times) // 2], rows


def max_errors(rows: list[dict], reference: list[dict]) -> list[float]:
    """max |row − reference| for the value and each bound (NaN where there is no interval)."""
    errors = [[abs(row[key] - ref[key]) for row, ref in zip(rows, reference)] for key in BOUNDS]
    return [max(e) if not all(map(math.isnan, e)) else math.nan for e in errors]


def compare_dtypes(base, run, measures: list[str], bootstrap: int, repeats: int, threads: list[int]) -> list[tuple]:
    """(threads, label, float64 s, float32 s, float32 CPU s, errors, rows) for each measure alone
    and all in one call (as the stage computes them) at threads[0], and all in one call at every
    other count."""
    results = []
    for count in threads:
        with runtime.threads(count):
            drift.layer_rows(base[:1, :16], run[:1, :16], [0], measures, bootstrap=2)  # warm-up: first-call costs
            for selection in [*([m] for m in measures), measures] if count == threads[0] else [measures]:
                reference_s, _, reference = timed_rows(base, run, selection, bootstrap, torch.float64, repeats)
                seconds, cpu, rows = timed_rows(base, run, selection, bootstrap, torch.float32, repeats)
                label = "all, one call" if len(selection) > 1 else selection[0]
                results.append((count, label, reference_s, seconds, cpu, max_errors(rows, reference), len(rows)))
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
    parser.add_argument("--measures", nargs="+", default=MEASURES, choices=sorted([*drift.SHARED, *drift.POINT]))
    parser.add_argument(
        "--threads",
        nargs="+",
        type=int,
        default=[1, 2],
        help="torch threads; every measure at the first (the stage's 1), all at once at the others",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per measure; the median is shown")
    parser.add_argument("--study", type=Path, help="study directory or its features folder: print its size on disk")
    args = parser.parse_args()

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(f"one pair: n={args.examples}, d={args.hidden}, {args.layers} layers, {args.bootstrap} resamples")
    base, run = synthetic_pair(args.layers, args.examples, args.hidden)
    results = compare_dtypes(base, run, args.measures, args.bootstrap, args.repeats, args.threads)
    print(
        f"\n{'threads':>7} {'measure':<14} {'float64 s':>9} {'float32 s':>9} {'ratio':>6} {'cpu s':>6} "
        f"{'s / layer':>9} {'rows':>5} {'Δ value':>9} {'Δ ci_low':>9} {'Δ ci_high':>9}"
    )
    for count, label, reference_s, seconds, cpu, errors, rows in results:
        print(
            f"{count:>7} {label:<14} {reference_s:>9.2f} {seconds:>9.2f} {reference_s / seconds:>5.1f}x {cpu:>6.2f} "
            f"{seconds / args.layers:>9.3f} {rows:>5}{''.join(f'{e:>10.1e}' for e in errors)}"
        )
    print("cpu s, s / layer: float32; Δ: max |float32 - float64| over layers")
    total = next(r[3] for r in results if r[0] == args.threads[0] and r[1] == "all, one call")
    verdict = "met" if total < TARGET_S else "not met"
    print(
        f"target: < {TARGET_S:.0f} s for all measures of one pair in {args.threads[0]} thread(s), float32: "
        f"{total:.2f} s, {verdict}; load average now {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    per_model = args.layers * args.examples * args.hidden * 4 * 2  # float32, mean + head pooling
    print(f"one model's features at this size (2 poolings, float32): {per_model / 1e6:.0f} MB")
    if args.study:
        features_report(args.study)


if __name__ == "__main__":
    main()
