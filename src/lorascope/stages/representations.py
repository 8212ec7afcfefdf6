"""Stage `represent`: pooled features of every layer on each task's probe split, for the base
model twice (the second pass with other batches, for the base-vs-base check) and every run;
tables/pooled_positions.csv says which positions the mean pooled and what the left-out ones
carried in the base model."""

from __future__ import annotations

import pandas as pd

from lorascope import dependencies, executors, modeling, runs, runtime
from lorascope import representations as rep
from lorascope.config import StudyConfig
from lorascope.prepared import load_prepared, prepared_fingerprint
from lorascope.study import Stage, Study, is_current, stamp_of, write_current


def features_one(
    root: str, config: StudyConfig, name: str, model_id: str, fp: str, batch_size: int, trained: tuple[str, int] | None
) -> None:
    """One model's pooled features on one task's probe split (a worker's unit)."""
    study, tokenizer = Study(root), modeling.load_tokenizer(config.model.name)
    device = runtime.pick_device(config.runtime)
    task, splits = load_prepared(study, name)
    if trained is None:
        model = modeling.load_model(config.model.name, task.label_names, 0, tokenizer.pad_token_id)
    else:
        model = modeling.load_run_model(
            study.run_dir(name, *trained), config.model.name, task.label_names, tokenizer.pad_token_id
        )
    rc = config.represent
    features, layers = rep.study_features(
        model, splits["probe"], rc, tokenizer, batch_size, device, runtime.uses_bf16(config.runtime, device)
    )
    data = rep.features_bytes(features, splits["probe"]["example_id"], layers, rep.pooled_positions(rc, model))
    write_current(study.features_path(name, model_id), data, fp)


def run(study: Study, config: StudyConfig) -> None:
    rc, units = config.represent, []
    for name in config.tasks:
        splits_fp = prepared_fingerprint(study, name)
        base_fp = dependencies.FEATURES.fingerprint(config, splits_fp)
        items = [("base", base_fp, rc.batch_size, None), ("base-again", base_fp, max(1, rc.batch_size // 2), None)]
        items += [
            (f"{m}-seed{s}", dependencies.FEATURES.fingerprint(config, splits_fp, run_fp), rc.batch_size, (m, s))
            for m, s, run_fp in runs.finished_runs(study, config, name)
        ]
        units += [
            executors.Unit(features_one, (str(study.root), config, name, *item), f"{name} {item[0]} features")
            for item in items
            if not is_current(study.features_path(name, item[0]), item[1])
        ]
    executors.run_units(units, "represent", config.runtime.progress)
    bases = [study.features_path(name, "base") for name in config.tasks]
    table_fp = dependencies.POOLED_POSITIONS.fingerprint(config, [stamp_of(path) for path in bases])
    if not is_current(rep.POOLED_POSITIONS.path(study.tables), table_fp):
        rows = [row for name, path in zip(config.tasks, bases) for row in rep.position_rows(name, path)]
        rep.POOLED_POSITIONS.write(study.tables, pd.DataFrame(rows, columns=rep.POOLED_POSITIONS.columns), table_fp)


STAGE = Stage(
    "represent",
    "pooled hidden states of every layer on the probe split",
    run=run,
    needs=("prepare", "train"),
    outputs=(dependencies.FEATURES, dependencies.POOLED_POSITIONS),
)
