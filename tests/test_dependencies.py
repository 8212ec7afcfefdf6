"""Reuse is decided by declared inputs (lorascope.dependencies): every declared key changes its
output's fingerprint, an undeclared one does not, a stage redoes exactly the outputs whose
declared inputs changed, and a writer's output cannot change without its version."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import BaseModel
from safetensors import safe_open

from lorascope import dependencies
from lorascope.dependencies import Declared
from lorascope.prepared import load_prepared
from lorascope.stages import BY_NAME
from lorascope.study import Study, run_stages

DECLARED = {name: value for name, value in vars(dependencies).items() if isinstance(value, Declared)}
UNIT = {"task": "sst2", "method": "lora"}
UNDECLARED = "analysis.quality_max_gap_pp"  # read by the analyze stage, which reuses nothing
WRITERS = Path(__file__).with_name("writer_outputs.json")


def _changed(value):
    """Another value of the same type (a section: its first changeable field changed)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if value is None:
        return 7
    if isinstance(value, list | tuple):
        return [*value, value[0]] if value else [1]
    if isinstance(value, BaseModel):
        paths = set().union(*dependencies.PATH_KEYS.values())
        for field in type(value).model_fields:
            current = getattr(value, field)
            if field not in paths and not isinstance(current, BaseModel | dict):
                return value.model_copy(update={field: _changed(current)})
    raise TypeError(f"no change for {value!r}")


def _with(model: BaseModel, parts: list[str], new) -> BaseModel:
    """`model` with the dotted key `parts` set to `new` (copies, never in place)."""
    head, rest = parts[0], parts[1:]
    current = model[head] if isinstance(model, dict) else getattr(model, head)
    value = new if not rest else _with(current, rest, new)
    if isinstance(model, dict):
        return {**model, head: value}
    return model.model_copy(update={head: value})


def _set(config, key: str):
    parts = key.split(".")
    if parts[:2] == ["tune", "spaces"]:  # a method's searched space: configured over its defaults
        space = {parts[2]: {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}
        return config.model_copy(update={"tune": config.tune.model_copy(update={"spaces": space})})
    current = config
    for part in parts:
        current = current[part] if isinstance(current, dict) else getattr(current, part)
    if parts == ["model", "name"] or parts == ["model"]:  # the model is named by identity: another alias
        return config.model_copy(update={"model": config.model.model_copy(update={"name": "smollm2-135m"})})
    return _with(config, parts, _changed(current))


def test_every_output_kind_is_declared_once_with_a_distinct_name():
    assert len({d.name for d in DECLARED.values()}) == len(DECLARED) >= 12


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_each_declared_key_changes_the_fingerprint_and_an_undeclared_one_does_not(name, tiny_config):
    declared = DECLARED[name]
    config = tiny_config.model_copy(update={"tune": tiny_config.tune.model_copy(update={"enabled": True})})
    before = declared.fingerprint(config, "upstream", **UNIT)
    for key in declared.keys(**UNIT):
        assert declared.fingerprint(_set(config, key), "upstream", **UNIT) != before, key
    assert UNDECLARED.split(".")[0] not in declared.sections()
    assert declared.fingerprint(_set(config, UNDECLARED), "upstream", **UNIT) == before
    assert declared.fingerprint(config, "other upstream", **UNIT) != before
    assert declared.fingerprint(config, "upstream", **(UNIT | {"seed": 1})) != before


def test_a_path_is_never_part_of_a_fingerprint(tiny_config, tmp_path):
    moved = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"glue": str(tmp_path)})})
    for declared in DECLARED.values():
        assert declared.fingerprint(moved, **UNIT) == declared.fingerprint(tiny_config, **UNIT)


STAGES = [BY_NAME[name] for name in ("prepare", "train", "represent", "drift", "weights")]


def _stamps(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob(".*.fingerprint"))}


def test_a_stage_redoes_exactly_the_outputs_whose_declared_inputs_changed(tiny_config, tmp_path):
    config = tiny_config.model_copy(update={"tasks": {"sst2": tiny_config.tasks["sst2"]}})
    run_stages(config, tmp_path, STAGES)
    first = _stamps(tmp_path)
    features = [k for k in first if k.startswith("features/")]
    assert len(features) == 4 and "tables/.drift_layers.csv.fingerprint" in first

    def redone(changed) -> set[str]:
        run_stages(changed, tmp_path, STAGES)
        now = _stamps(tmp_path)
        assert now.keys() == first.keys()
        return {k for k in first if now[k] != first[k]}

    assert redone(_set(config, UNDECLARED)) == set()  # undeclared: nothing redone
    assert redone(_set(config, "drift.bootstrap")) == {
        "tables/.drift_layers.csv.fingerprint",
        "tables/.drift_summary.csv.fingerprint",
    }
    assert redone(_set(config, "weights.intruder_k")) == {"tables/.weights.csv.fingerprint"}
    assert redone(_set(config, "represent.batch_size")) >= {*features, "tables/.drift_layers.csv.fingerprint"}


# ---------------------------------------------------------------- writers and their versions


def _rounded(values) -> list:
    """3 significant digits: a changed result shows, last-bit noise does not."""
    return [float(f"{v:.3g}") for v in np.asarray(values, dtype=float).ravel() if np.isfinite(v)]


def _tensors(path: Path) -> list:
    with safe_open(str(path), "pt") as f:
        names = sorted(f.keys())
        tensors = {n: f.get_tensor(n).double() for n in names}
    return [(n, _rounded([t.sum(), t.abs().sum()])) for n, t in tensors.items()]


def _table(path: Path, drop: tuple[str, ...] = ()) -> list:
    frame = pd.read_csv(path).drop(columns=list(drop), errors="ignore")
    numbers = frame.select_dtypes("number")
    return [list(frame.columns), _rounded(numbers.to_numpy()), frame.select_dtypes("object").fillna("").values.tolist()]


# What each writer wrote on the tiny study, in a form that ignores timing and last-bit noise.
COST_COLUMNS = ("train_seconds", "train_tokens_per_second", "peak_rss_bytes", "peak_rss_added_bytes", "artifact_bytes")
OUTPUTS = {
    "prepared": lambda root: {
        name: [list(split["example_id"]), list(split["input_ids"]), list(split["label"])]
        for name, split in load_prepared(Study(root), "sst2")[1].items()
    },
    "run": lambda root: (
        [_tensors(next((root / f"runs/sst2/{m}/seed42").glob("*.safetensors"))) for m in ("lora", "full")]
        + [_table(root / "tables/performance.csv", COST_COLUMNS)]
    ),
    "features": lambda root: [_tensors(p) for p in sorted((root / "features/sst2").glob("*.safetensors"))],
    "pooled_positions": lambda root: _table(root / "tables/pooled_positions.csv"),
    "drift": lambda root: [_table(root / f"tables/{t}.csv") for t in ("drift_layers", "drift_summary")],
    "weights": lambda root: _table(root / "tables/weights.csv"),
    "probe_features": lambda root: [_tensors(p) for p in sorted((root / "forget/features").rglob("*.safetensors"))],
    "forgetting": lambda root: _table(root / "tables/forgetting.csv"),
    "lm_losses": lambda root: [_tensors(p) for p in sorted((root / "forget/lm").glob("*.safetensors"))],
    "lm_forgetting": lambda root: _table(root / "tables/lm_forgetting.csv"),
}
# Timings and searches are not reproducible outputs: their versions are bumped by judgement.
NOT_REPRODUCIBLE = {"deployment", "deployment_generation", "search"}


def test_a_writers_output_changes_only_with_its_version(tiny_config, tmp_path):
    """Each writer's output on a tiny study (one thread, so bit-stable) against the digest
    recorded for its declared version in tests/writer_outputs.json. A change of output under
    the same version fails: bump the version in lorascope.dependencies (old outputs are redone)
    and record with LORASCOPE_RECORD_WRITERS=1."""
    assert set(OUTPUTS) | NOT_REPRODUCIBLE == {d.name for d in DECLARED.values()}
    config = tiny_config.model_copy(
        update={
            "tasks": {"sst2": tiny_config.tasks["sst2"]},
            "runtime": tiny_config.runtime.model_copy(update={"threads": 1}),
            "forget": tiny_config.forget.model_copy(update={"lm_documents": 8, "bootstrap": 50}),
            "drift": tiny_config.drift.model_copy(update={"bootstrap": 50}),
        }
    )
    run_stages(config, tmp_path, [*STAGES, BY_NAME["forget"]])
    versions = {d.name: d.version for d in DECLARED.values()}
    found = {
        name: {
            "version": versions[name],
            "digest": hashlib.sha256(json.dumps(read(tmp_path)).encode()).hexdigest()[:16],
        }
        for name, read in OUTPUTS.items()
    }
    if os.environ.get("LORASCOPE_RECORD_WRITERS"):
        WRITERS.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
    recorded = json.loads(WRITERS.read_text())
    for name, now in found.items():
        was = recorded[name]
        assert now["version"] == was["version"], (
            f"{name}: version {now['version']} is not the recorded {was['version']}: record with LORASCOPE_RECORD_WRITERS=1"
        )
        assert now["digest"] == was["digest"], (
            f"{name}: the output changed under version {now['version']}: bump dependencies' version of {name} "
            "(finished outputs of the old code are then redone) and record with LORASCOPE_RECORD_WRITERS=1"
        )
