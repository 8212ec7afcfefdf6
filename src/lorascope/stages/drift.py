"""Stage `drift`: per-layer similarity of every run to the base, with base-vs-base (must be 1),
seed-vs-seed and shuffled-base references and bootstrap intervals over probe examples; and
`single_drift`, the same comparison for one model trained anywhere, without a study."""

from __future__ import annotations

import pandas as pd
import torch

from lorascope import dependencies, drift, modeling, runs, runtime
from lorascope import representations as rep
from lorascope.config import StudyConfig, TaskConfig
from lorascope.errors import InputError
from lorascope.prepared import split_and_tokenize
from lorascope.study import Stage, Study, is_current, stamp_of
from lorascope.tasks import load_raw, resolve_task


def run(study: Study, config: StudyConfig) -> None:
    files = sorted(study.root.glob("features/*/*.safetensors"))
    fp = dependencies.DRIFT.fingerprint(config, [stamp_of(f) for f in files])
    tables = study.tables
    if is_current(drift.DRIFT_LAYERS.path(tables), fp) and is_current(drift.DRIFT_SUMMARY.path(tables), fp):
        return
    rows = []
    with runtime.threads(1):
        for name in config.tasks:
            rows += _task_rows(study, config, name)
    layer_table, summary = drift.drift_tables(rows)
    drift.DRIFT_SUMMARY.write(tables, summary, fp)
    drift.DRIFT_LAYERS.write(tables, layer_table, fp)


def _rows(config: StudyConfig, task: str, pooling: str, base, again, tuned: dict, layers: list[int]) -> list[dict]:
    return drift.task_drift_rows(
        task,
        pooling,
        base[pooling],
        again[pooling],
        {k: v[pooling] for k, v in tuned.items()},
        layers,
        config.drift.measures,
        bootstrap=config.drift.bootstrap,
        confidence=config.drift.confidence,
        seed=config.drift.seed,
        bf16=runtime.uses_bf16(config.runtime, runtime.pick_device(config.runtime)),
        standardize=config.drift.standardize,
    )


def _task_rows(study: Study, config: StudyConfig, name: str) -> list[dict]:
    base, _, layers = rep.load_features(study.features_path(name, "base"))
    again, _, _ = rep.load_features(study.features_path(name, "base-again"))
    tuned = {
        (m, s): rep.load_features(study.features_path(name, f"{m}-seed{s}"))[0]
        for m, s, _ in runs.finished_runs(study, config, name)
    }
    return [
        row for pooling in config.represent.poolings for row in _rows(config, name, pooling, base, again, tuned, layers)
    ]


def single_drift(
    config: StudyConfig, base: str, task_name: str, *, model: str | None = None, adapter: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`lorascope drift --base ... --model|--adapter ... --task ...`: one model trained anywhere
    against its base, no study. The probe split is the one `prepare` would make from `config`
    (data.probe_size, data.split_seed, the task's eval_max), tokenized with the base's tokenizer;
    represent and drift settings come from `config`. The base is represented twice (the second
    pass with half the batch size: the base-vs-base check), the model once."""
    if (model is None) == (adapter is None):
        raise InputError("give exactly one of --model (a fully fine-tuned model) or --adapter (a PEFT adapter)")
    task, train, evaluation = load_raw(resolve_task(task_name, config.tasks.get(task_name, TaskConfig()), config.data))
    tokenizer = modeling.load_tokenizer(base)
    based = config.model_copy(update={"model": config.model.model_copy(update={"name": base})})
    task, splits, _ = split_and_tokenize(task, train, evaluation, tokenizer, based)
    probe = splits["probe"]
    device = runtime.pick_device(config.runtime)
    bf16 = runtime.uses_bf16(config.runtime, device)
    rc = config.represent

    def features(net: torch.nn.Module, batch_size: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        return rep.study_features(net, probe, rc, tokenizer, batch_size, device, bf16)

    base_model = modeling.load_model(base, task.label_names, 0, tokenizer.pad_token_id)
    base_features, layers = features(base_model, rc.batch_size)
    again, _ = features(base_model, max(1, rc.batch_size // 2))
    del base_model
    source = model if model is not None else adapter
    flag = "--model" if model is not None else "--adapter"
    try:
        path = modeling.resolve_model_path(model) if model is not None else adapter
        tuned = modeling.load_run_model(path, base, task.label_names, tokenizer.pad_token_id)
        method = "full" if model is not None else modeling.adapter_type(adapter)  # what the rows call it
    except (OSError, ValueError, RuntimeError, InputError) as err:
        raise InputError(f"{flag}: cannot load '{source}': {str(err).splitlines()[0]}") from None
    tuned_features, tuned_layers = features(tuned, rc.batch_size)
    if tuned_layers != layers:
        raise InputError(f"{flag}: '{source}' has layers {tuned_layers}, the base {layers}: not the same architecture")
    with runtime.threads(1):
        rows = [
            row
            for pooling in rc.poolings
            for row in _rows(config, task.name, pooling, base_features, again, {(method, ""): tuned_features}, layers)
        ]
    return drift.drift_tables(rows)


STAGE = Stage(
    "drift",
    "layer-wise CKA / cosine of every run against the base, with references",
    run=run,
    needs=("represent",),
    outputs=(dependencies.DRIFT,),
)
