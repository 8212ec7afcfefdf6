"""Stage `weights`: weight-space change of every finished run against the base: relative
update, effective rank of the update and intruder dimensions, per matrix. A plain LoRA
adapter's update comes from its factors (exact, float64); any other adapter's from the base
with the adapter merged, minus the base."""

from __future__ import annotations

import json

import pandas as pd
from safetensors.torch import load_file

from lorascope import dependencies, executors, modeling, runs
from lorascope import weights as change
from lorascope.config import StudyConfig
from lorascope.prepared import prepared_task
from lorascope.study import Stage, Study, is_current


def weights_rows(root: str, config: StudyConfig, grid: list[tuple[str, str, int]]) -> list[dict]:
    """Weight-change rows of the runs in `grid` (a worker's unit: one base load and one cache of
    the base's singular vectors for all of them), on the threads its executor gives it: serially
    two threads took 0.8x the time of one here (SVDs of 384 x 1536 updates)."""
    study, tokenizer = Study(root), modeling.load_tokenizer(config.model.name)
    base_state = modeling.load_model(config.model.name, ("0", "1"), 0, tokenizer.pad_token_id).state_dict()
    k, epsilon = config.weights.intruder_k, config.weights.intruder_epsilon
    rows, base_vectors = [], {}
    for task, method, seed in grid:
        folder = study.run_dir(task, method, seed)
        if not modeling.is_adapter(folder):
            deltas = change.full_deltas(load_file(str(folder / "model.safetensors")), base_state)
        elif change.is_plain_lora(adapter := json.loads((folder / "adapter_config.json").read_text())):
            deltas = change.lora_deltas(
                load_file(str(folder / "adapter_model.safetensors")),
                base_state,
                adapter["lora_alpha"],
                adapter["r"],
                adapter.get("use_rslora", False),
            )
        else:  # any other adapter: merged into the base, minus the base
            labels = prepared_task(study, task).label_names
            merged = modeling.load_run_model(folder, config.model.name, labels, tokenizer.pad_token_id)
            deltas = change.merged_deltas(merged.state_dict(), base_state)
        for row in change.weight_change_rows(deltas, k=k, epsilon=epsilon, base_vectors=base_vectors):
            rows.append({"task": task, "method": method, "seed": seed, **row})
    return rows


def run(study: Study, config: StudyConfig) -> None:
    grid = [(t, m, s, fp) for t in config.tasks for m, s, fp in runs.finished_runs(study, config, t)]
    fp = dependencies.WEIGHTS.fingerprint(config, [r[3] for r in grid])
    if is_current(change.WEIGHTS.path(study.tables), fp):
        return
    shares = executors.current().workers  # one share of the runs per worker: the base is loaded once each
    units = [
        executors.Unit(
            weights_rows,
            (str(study.root), config, [r[:3] for r in grid[i::shares]]),
            f"weights of {len(grid[i::shares])} runs",
        )
        for i in range(min(shares, len(grid)))
    ]
    parts = executors.run_units(units, "weights", config.runtime.progress)
    rows = [row for part in parts for row in part]
    order = {r[:3]: i for i, r in enumerate(grid)}
    rows.sort(key=lambda row: order[row["task"], row["method"], row["seed"]])
    table = pd.DataFrame(rows).rename(columns={"intruder_dimensions": "intruders"})
    change.WEIGHTS.write(study.tables, table if rows else pd.DataFrame(columns=change.WEIGHTS.columns), fp)


STAGE = Stage(
    "weights",
    "weight-space change of every run: update norms, rank, intruders",
    run=run,
    needs=("train",),
    outputs=(dependencies.WEIGHTS,),
)
