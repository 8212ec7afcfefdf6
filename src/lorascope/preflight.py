"""What a study will need before it starts: the disk its outputs will take, from the model's
size and the grid, against the free space where it is written. A study that cannot fit stops
before the first training step (exit 2, both figures), not after hours of runs."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from safetensors import safe_open

from lorascope import modeling
from lorascope.config import StudyConfig
from lorascope.errors import InputError

FLOAT32 = 4
ADAPTER_SHARE = 0.02  # an adapter and its head, as a share of the model's weights (MiniLM r=8: 1 %)
MARGIN = 1.2  # warn when the need comes within 20 % of the free space


def model_size(name: str) -> tuple[int, int, int] | None:
    """(parameters, hidden size, blocks) of a local or bundled model, read from its safetensors
    headers and config.json; None for a Hub id (nothing is downloaded to know)."""
    folder = Path(modeling.resolve_model_path(name))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files or not (folder / "config.json").is_file():
        return None
    params = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                shape = f.get_slice(key).get_shape()
                params += math.prod(shape)
    config = json.loads((folder / "config.json").read_text())
    return params, config["hidden_size"], config["num_hidden_layers"]


def disk_need(config: StudyConfig) -> int | None:
    """Bytes the study's outputs will take: fp32 weights of every full run, adapters, and the
    pooled features of the represent and forget stages; None when the model's size is unknown."""
    size = model_size(config.model.name)
    if size is None:
        return None
    params, hidden, blocks = size
    runs_per_task = len(config.seeds)
    full = FLOAT32 * params * runs_per_task * len(config.tasks) * ("full" in config.methods)
    adapters = ADAPTER_SHARE * FLOAT32 * params * runs_per_task * len(config.tasks) * ("lora" in config.methods)
    layers = len(config.represent.layers) if config.represent.layers else blocks + 1
    models_per_task = 2 + runs_per_task * len(config.methods)  # base, base again, the task's runs
    features = (
        len(config.tasks)
        * models_per_task
        * layers
        * config.data.probe_size
        * hidden
        * FLOAT32
        * len(config.represent.poolings)
    )
    fc = config.forget
    probed = len(fc.tasks or config.tasks)
    eval_rows = fc.probe_eval or max(task.eval_max or fc.probe_train for task in config.tasks.values())
    probe_rows = min(fc.probe_train, config.data.dev_max) + eval_rows
    models = 1 + len(config.tasks) * runs_per_task * len(config.methods)
    forget = probed * models * probe_rows * hidden * FLOAT32
    return int(full + adapters + features + forget)


def check_disk(config: StudyConfig, out: Path) -> None:
    """Refuse (InputError) a study whose outputs will not fit in the free space at `out`, less
    what it already holds; warn when they come within 20 % of it."""
    need = disk_need(config)
    if need is None:
        return
    out = Path(out)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else 0
    need = max(0, need - written)
    free = shutil.disk_usage(next(p for p in (out, *out.parents) if p.exists())).free
    figures = f"about {need / 1e6:,.0f} MB still to write, {free / 1e6:,.0f} MB free at {out}"
    if need > free:
        raise InputError(f"the study will not fit: {figures}; free space or choose another --out")
    if need * MARGIN > free:
        print(f"warning: the study may not fit: {figures}", file=sys.stderr)
