"""Throughput of the train stage on each executor, and the fixed costs of the pool and of Ray.

    python benchmarks/scale_out.py [--tasks sst2,mrpc,rte] [--seeds 1] [--train-max N] [--rounds 2] [--skip-ray]

Part 1: the quick profile's own train stage (its tasks at its sizes, LoRA and full FT, the
first `--seeds` seeds; `--train-max` resizes SST-2) trained from scratch by the serial executor
(one process, all cores), the process pool (2 workers x 1 thread) and Ray (a local instance,
2 tasks x 1 CPU), in rounds whose order alternates (A B C, then C B A), so machine drift hits
all three alike. Reported: wall seconds of the stage and training tokens per second
(tokens_seen of all runs / wall), as ratios to serial per round.
Part 2: what the executors cost before any work: the pool's first result of a no-op unit
(spawn + imports), Ray's init, first task and per-task overhead (200 no-op tasks), shutdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from lorascope import executors, runtime
from lorascope.config_io import load_config
from lorascope.stages import with_inputs
from lorascope.study import run_stages


def noop() -> int:
    return os.getpid()


def grid_config(tasks: list[str], seeds: int, train_max: int | None, **runtime):
    config = load_config(None, "quick", ["runtime.progress=false", "baselines.head_only=false"])
    chosen = {name: config.tasks[name] for name in tasks}
    if train_max:
        chosen["sst2"] = chosen["sst2"].model_copy(update={"train_max": train_max})
    return config.model_copy(
        update={"tasks": chosen, "seeds": config.seeds[:seeds], "runtime": config.runtime.model_copy(update=runtime)}
    )


def train_grid(config, root: Path) -> tuple[float, int]:
    """Wall seconds of the train stage alone (prepare and baselines run first, untimed) and tokens trained."""
    run_stages(config, root, with_inputs("baselines"))
    started = time.perf_counter()
    run_stages(config, root, with_inputs("train")[-1:], write_config=False)
    wall = time.perf_counter() - started
    tokens = sum(json.loads(p.read_text())["tokens_seen"] for p in root.glob("runs/*/*/seed*/metrics.json"))
    return wall, tokens


def seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def fixed_costs(skip_ray: bool) -> list[tuple[str, float]]:
    """The same no-op units on each executor: the first result (worker start) and 200 more."""
    one, many = [executors.Unit(noop, (), "noop")], [executors.Unit(noop, (), "noop")] * 200
    pool = executors.LocalPool(workers=2, threads=1)
    rows = [
        ("pool: first no-op result (spawn + imports)", seconds(lambda: list(pool.map(one)))),
        ("pool: per no-op unit, 200 units (ms)", seconds(lambda: list(pool.map(many))) / 200 * 1e3),
    ]
    pool.close()
    if skip_ray:
        return rows
    import ray

    started = time.perf_counter()
    ray_tasks = executors.RayTasks("local", workers=2, threads=1, gpus=0)
    rows.append(("Ray: init of a local instance", time.perf_counter() - started))
    rows += [
        ("Ray: first no-op result (worker start)", seconds(lambda: list(ray_tasks.map(one)))),
        ("Ray: per no-op task, 200 tasks (ms)", seconds(lambda: list(ray_tasks.map(many))) / 200 * 1e3),
        ("Ray: shutdown", seconds(ray_tasks.close)),
    ]
    assert not ray.is_initialized()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,mrpc,rte")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--train-max", type=int, default=None, help="SST-2 train examples (default: the profile's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    runtime.quiet_libraries()
    print(f"cores {executors.cores()}, load average {os.getloadavg()[0]:.2f}")
    ways = {"serial (1 x all cores)": {"workers": 1}, "pool (2 x 1 thread)": {"workers": 2, "threads": 1}}
    if not args.skip_ray:
        ways["Ray local (2 x 1 CPU)"] = {"ray_address": "local", "workers": 2, "threads": 1}
    names = list(ways)
    results = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            root = Path(tempfile.mkdtemp(prefix="scale-out-"))
            try:
                config = grid_config(args.tasks.split(","), args.seeds, args.train_max, **ways[name])
                results[name].append(train_grid(config, root))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    sizes = ", ".join(f"{t} {c.train_max}" for t, c in config.tasks.items())
    print(f"\ntrain stage of the quick profile ({sizes}) x lora/full x {args.seeds} seed(s), {args.rounds} rounds")
    print(f"{'executor':28} {'wall s per round':>24} {'tokens/s':>10} {'vs serial per round':>22}")
    serial = results[names[0]]
    for name in names:
        walls = [w for w, _ in results[name]]
        rate = sum(t for _, t in results[name]) / sum(walls)
        ratios = [s[0] / w for s, w in zip(serial, walls)]
        print(
            f"{name:28} {' / '.join(f'{w:.1f}' for w in walls):>24} {rate:>10.0f} "
            f"{' / '.join(f'{x:.2f}x' for x in ratios):>22}"
        )
    print("\nfixed costs")
    for label, value in fixed_costs(args.skip_ray):
        print(f"{label:48} {value:8.2f}")


if __name__ == "__main__":
    main()
