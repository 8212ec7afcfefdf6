"""What each kind of output a study writes depends on, declared once, in this module.

A declaration names the config keys an output depends on (dotted paths; `{task}` and
`{method}` are filled per unit), whether the device and precision change it, and the version
of the code that writes it. Its fingerprint is made from those keys' values, the stamps or
content digests of the upstream outputs it reads, and the unit's own values (a seed, a run's
hyperparameters). The study's one cache rule (`study.is_current`) compares that fingerprint
with the output's stamp: nothing else decides reuse, so a key left out here is a key whose
change is deliberately ignored (tests/test_dependencies.py changes each declared key and one
undeclared key of every declaration).

`version`: bump it here when a change of code alters what that writer writes, so outputs of
the older code are redone; tests/test_dependencies.py holds every writer's output on a tiny
study to its version and fails when one changes without a bump."""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel

from lorascope import modeling, runtime
from lorascope.config import StudyConfig
from lorascope.config_io import fingerprint

# Keys identified by the content they point at (a digest among the upstream values), never a path.
PATH_KEYS = {"data": {"glue", "squad_v2"}, "task": {"source", "eval_source"}, "forget": {"lm_text"}}


@dataclasses.dataclass(frozen=True)
class Declared:
    """One kind of output and the inputs that decide whether it is current."""

    name: str
    config: tuple[str, ...] = ()
    device: bool = False
    version: int = 1

    def keys(self, **unit: Any) -> list[str]:
        """The declared config keys with this unit's `{task}` / `{method}` filled in."""
        return [key.format(**unit) for key in self.config]

    def fingerprint(self, config: StudyConfig, *upstream: Any, **unit: Any) -> str:
        """The fingerprint an output of this kind is current for: the declared config values,
        the device (when declared), the upstream outputs' stamps or digests, and `unit`."""
        values = {key: config_value(config, key) for key in self.keys(**unit)}
        if self.device:
            device = runtime.pick_device(config.runtime)
            values["device"] = [device.type, runtime.uses_bf16(config.runtime, device)]
        return fingerprint(self.name, self.version, values, list(upstream), unit)

    def sections(self) -> set[str]:
        """The top-level config sections it reads (for the stage's record in the manifest)."""
        return {key.split(".")[0] for key in self.config} | ({"runtime"} if self.device else set())


def config_value(config: StudyConfig, key: str) -> Any:
    """The value of a dotted config key as fingerprints hold it: the model by its identity (a
    local folder by its content), path keys left out (their content is an upstream digest)."""
    parts = key.split(".")
    if parts[0] == "tasks" and len(parts) > 1:
        return (
            config.tasks[parts[1]].model_dump(mode="json", exclude=PATH_KEYS["task"])
            if len(parts) == 2
            else _plain(_walk(config, parts))
        )
    if parts[:2] == ["tune", "spaces"] and len(parts) == 3:  # the space searched: the configured keys over its defaults
        return config.search_space(parts[2]).model_dump(mode="json")
    if parts == ["model", "name"]:
        return modeling.model_identity(config.model.name)
    if parts == ["model"]:
        return _plain(config.model) | {"name": modeling.model_identity(config.model.name)}
    value = _walk(config, parts)
    if len(parts) == 1 and parts[0] in PATH_KEYS:
        return value.model_dump(mode="json", exclude=PATH_KEYS[parts[0]])
    return _plain(value)


def _walk(config: StudyConfig, parts: list[str]) -> Any:
    value: Any = config
    for part in parts:
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


# ---------------------------------------------------------------- the declarations

# tokenized train / dev / eval / probe splits of one task; upstream: the raw rows' content digest
PREPARED = Declared("prepared", ("model.name", "model.max_length", "data", "tasks.{task}"), version=4)
# one trained run (and each trained baseline); upstream: its task's prepared splits; unit:
# method, seed, the hyperparameters it trained with (configured, tuned or a baseline's), max_steps
RUN = Declared("run", ("model", "training.eval_batch_size"), device=True, version=5)
# one Optuna search's study name; unit: the method's fixed hyperparameters and training seed
SEARCH = Declared(
    "search",
    (
        "model",
        "training.eval_batch_size",
        "tune.spaces.{method}",
        "tune.seed",
        "tune.startup_trials",
        "tune.prune",
        "tune.prune_startup_trials",
        "tune.prune_warmup_steps",
    ),
    device=True,
    version=4,
)
# pooled features of one model on one task's probe split; upstream: prepared splits (and the run)
FEATURES = Declared("features", ("model", "represent"), device=True, version=4)
# tables/pooled_positions.csv; upstream: the base features' stamps
POOLED_POSITIONS = Declared("pooled_positions", version=4)
# tables/drift_layers.csv and drift_summary.csv; upstream: every features file's stamp
DRIFT = Declared("drift", ("drift", "represent"), version=5)
# tables/weights.csv; upstream: every finished run's stamp
WEIGHTS = Declared("weights", ("weights",), version=4)
# one model's features on one probed task's fixed examples; upstream: prepared splits, the model
_PROBE_KEYS = ("probe_train", "probe_eval", "pooling", "layer_every", "seed")
PROBE_FEATURES = Declared(
    "probe_features",
    ("model", "represent.skip_special_tokens", "represent.skip_first_position", *(f"forget.{k}" for k in _PROBE_KEYS)),
    device=True,
    version=4,
)
# tables/forgetting.csv; upstream: every probe features file's stamp
FORGETTING = Declared(
    "forgetting", (*PROBE_FEATURES.config, "forget.folds", "forget.bootstrap", "forget.confidence"), version=4
)
# one model's per-document LM losses; upstream: the documents' source (file digest or prepared
# splits), the model
LM_LOSSES = Declared("lm_losses", ("model", "forget.lm_documents", "forget.seed"), device=True, version=4)
# tables/lm_forgetting.csv; upstream: every LM-loss file's stamp
LM_FORGETTING = Declared("lm_forgetting", (*LM_LOSSES.config, "forget.bootstrap", "forget.confidence"), version=4)
# tables/deployment*.csv; upstream: the served runs' stamps
DEPLOYMENT = Declared("deployment", ("deploy",), device=True, version=5)
# tables/deployment_generation*.csv; upstream: the served LoRA runs' stamps and the full run's
DEPLOYMENT_GENERATION = Declared("deployment_generation", ("deploy", "model.max_length"), device=True)
