"""What a study will need before it starts: the disk its outputs will take, from the model's
size and the grid, against the free space where it is written; and the sizes its measures
need, from the config (at validation) and from the prepared splits (after `prepare`). A study
that cannot fit, or whose splits are too small for a measure that would otherwise stop a
later stage, stops before the first training step (exit 2, one line naming the setting to
change), not after hours of runs. docs/study-directory.md ("Sizes checked before training")
lists what each measure needs and which sizes are refused and which are written as missing."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from safetensors import safe_open

from lorascope import modeling
from lorascope.bundled import hub_copy, is_alias
from lorascope.config import StudyConfig
from lorascope.errors import InputError
from lorascope.similarity import FEWEST_DISTINCT

FLOAT32 = 4
ADAPTER_SHARE = 0.02  # an adapter and its head, as a share of the model's weights (MiniLM r=8: 1 %)
MARGIN = 1.2  # warn when the need comes within 20 % of the free space
# Drift compares two models' features over the probe examples: similarity's measures raise on
# fewer than 2 (one example has no variance), and debiased CKA, an estimator over distinct
# quadruples of examples, is undefined below 4 for every layer and model, so no run would have
# a drift value. A value or interval undefined by the data at a larger size is written as
# missing with the reason instead (drift_layers.csv), and analysis leaves such a run out.
MIN_PROBE = {"debiased_cka": FEWEST_DISTINCT["debiased"]}
MIN_PROBE_ANY = FEWEST_DISTINCT["linear"]
# A forgetting probe chooses its regularisation by stratified cross-validation on its training
# examples: at least 2 folds, so 2 examples of every class (forgetting.probe raises below).
MIN_PER_CLASS = 2


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
    """Bytes the study's outputs will take: fp32 weights of every full run, adapters, the study's
    copy of a bundled base no Hub id names (artifacts.study_base), and the pooled features of the
    represent and forget stages; None when the model's size is unknown."""
    size = model_size(config.model.name)
    if size is None:
        return None
    params, hidden, blocks = size
    runs_per_task = len(config.seeds)
    adapter_methods = len(config.adapter_methods())
    full_methods = len(config.methods) - adapter_methods
    full = FLOAT32 * params * runs_per_task * len(config.tasks) * full_methods
    adapters = ADAPTER_SHARE * FLOAT32 * params * runs_per_task * len(config.tasks) * adapter_methods
    own_base = is_alias(config.model.name) and hub_copy(config.model.name) is None and adapter_methods > 0
    base_copy = FLOAT32 * params * own_base
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
    return int(full + adapters + base_copy + features + forget)


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


# ---------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class SplitSizes:
    """What `prepare` found of one task, as the size checks read it: the probe split's examples
    and the examples of each class the forgetting probes train on (None: the task is not probed)."""

    eval: int
    probe: int
    probe_train: Mapping[str, int] | None


def probed_tasks(config: StudyConfig) -> list[str]:
    """The tasks the forget stage probes (forget.tasks, else every classification task); a config
    narrowed to one task (`lorascope train --task`) probes only what it still has."""
    generative = config.generative_tasks()
    return [name for name in (config.forget.tasks or config.tasks) if name in config.tasks and name not in generative]


def probe_need(config: StudyConfig) -> tuple[int, str, str]:
    """The fewest probe examples drift.measures can be computed on, that need as a phrase, and
    the other way out than more examples ('' when there is none)."""
    least = max([MIN_PROBE_ANY, *(MIN_PROBE.get(measure, 0) for measure in config.drift.measures)])
    if least == MIN_PROBE_ANY:
        return least, f"drift needs at least {least} probe examples", ""
    return (
        least,
        f"drift needs at least {least} probe examples for debiased CKA",
        "leave debiased_cka out of drift.measures",
    )


def config_size_problems(config: StudyConfig) -> list[str]:
    """The sizes a measure needs that the config alone already rules out (a split is never larger
    than its cap), one line each; `validate` refuses them before anything is read."""
    problems = []
    least, need, instead = probe_need(config)
    for name, task in config.tasks.items():
        caps = {"data.probe_size": config.data.probe_size, f"tasks.{name}.eval_max": task.eval_max}
        problems += _below(caps, least, f"tasks.{name}: {need}", instead)
    for name in probed_tasks(config):
        dev_key = f"tasks.{name}.dev_max" if config.tasks[name].dev_max else "data.dev_max"
        caps = {
            "forget.probe_train": config.forget.probe_train,
            dev_key: config.tasks[name].dev_max or config.data.dev_max,
        }
        need = f"tasks.{name}: the forgetting probe needs {MIN_PER_CLASS} dev examples of each of two classes or more"
        problems += _below(caps, 2 * MIN_PER_CLASS, need, f"leave {name} out of forget.tasks")
    return problems


def _below(caps: Mapping[str, int | None], least: int, need: str, instead: str) -> list[str]:
    """`need`, the settings among `caps` that leave fewer than `least` examples and what to do,
    as one problem (none when every cap allows enough)."""
    low = [f"{key}={value}" for key, value in caps.items() if value is not None and value < least]
    if not low:
        return []
    raise_them = f"raise {'it' if len(low) == 1 else 'them'}" + (f", or {instead}" if instead else "")
    return [f"{need}; {' and '.join(low)} allow{'s' if len(low) == 1 else ''} fewer: {raise_them}"]


def check_sizes(config: StudyConfig, sizes: Mapping[str, SplitSizes]) -> None:
    """Refuse (InputError, one line) prepared splits too small for a measure that would stop a
    later stage after training; measures that are merely undefined at these sizes are written
    as missing with the reason by their stage (docs/study-directory.md)."""
    problems = []
    least, need, instead = probe_need(config)
    for name, found in sizes.items():
        if found.probe < least:
            problems.append(
                f"tasks.{name}: the eval split holds {found.eval} example(s), so the probe split {found.probe}; "
                f"{need}: give the task a larger eval split{f', or {instead}' if instead else ''}"
            )
        classes = found.probe_train
        if classes is not None and (len(classes) < 2 or min(classes.values()) < MIN_PER_CLASS):
            counts = ", ".join(f"{count} {label}" for label, count in classes.items())
            problems.append(
                f"tasks.{name}: the forgetting probe trains on {counts} dev example(s); it needs at least "
                f"{MIN_PER_CLASS} of each of two classes or more: raise forget.probe_train, data.dev_max "
                f"(tasks.{name}.dev_max) or data.dev_fraction, or leave {name} out of forget.tasks"
            )
    if problems:
        raise InputError("; ".join(problems))


def check_layers(config: StudyConfig) -> None:
    """represent.layers must exist in the model; the represent stage would otherwise say so only
    after every run is trained. Skipped for a Hub id (nothing is downloaded to know)."""
    size = model_size(config.model.name)
    requested = config.represent.layers or []
    if size is None or not requested:
        return
    available = size[2] + 1  # the embedding output, then one per block
    bad = [layer for layer in requested if not 0 <= layer < available]
    if bad:
        raise InputError(f"represent.layers: {bad} out of range; this model has layers 0..{available - 1}")
