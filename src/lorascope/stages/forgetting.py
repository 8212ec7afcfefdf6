"""Stage `forget`: transfer retention of the base and every run on every probed task (linear
probes on pooled features, kept per model and task under forget/features/), and the change of
LM loss under the base's LM head (kept per model under forget/lm/); a run of a generative task,
a causal LM itself, is also scored with its own LM head. Each file and each table is redone only
when its fingerprint changes, so a killed stage resumes at the next model. Only classification
tasks are probed (a probe needs labels); a generative task's held-out documents are its eval
prompts."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from lorascope import dependencies, executors, forgetting, modeling, preflight, runs, runtime
from lorascope import representations as rep
from lorascope.bundled import file_sha256
from lorascope.config import StudyConfig
from lorascope.errors import InputError
from lorascope.prepared import load_prepared, prepared_fingerprint
from lorascope.study import Stage, Study, is_current, stamp_of, write_current
from lorascope.tasks import prompts_only


def run(study: Study, config: StudyConfig) -> None:
    tokenizer = modeling.load_tokenizer(config.model.name)
    prepared = {name: load_prepared(study, name) for name in config.tasks}
    models = [("base", "base", None)] + [
        (f"{task}-{m}-seed{s}", run_fp, (task, m, s))
        for task in config.tasks
        for m, s, run_fp in runs.finished_runs(study, config, task)
    ]
    probe_table(study, config, tokenizer, prepared, models)
    if config.forget.lm:
        lm_table(study, config, tokenizer, prepared, models)


def _load(study: Study, config: StudyConfig, prepared: dict, trained, tokenizer) -> torch.nn.Module:
    if trained is None:  # the base: any task's labels, the head is not used
        labels = next(iter(prepared.values()))[0].label_names
        return modeling.load_model(config.model.name, labels, 0, tokenizer.pad_token_id)
    task, method, seed = trained
    return modeling.load_run_model(
        study.run_dir(task, method, seed),
        config.model.name,
        prepared[task][0].label_names,
        tokenizer.pad_token_id,
    )


def _device(config: StudyConfig) -> tuple[torch.device, bool]:
    device = runtime.pick_device(config.runtime)
    return device, runtime.uses_bf16(config.runtime, device)


# ---------------------------------------------------------------- transfer retention


def probe_examples(splits: datasets.DatasetDict, config: StudyConfig) -> tuple[datasets.Dataset, int]:
    """The probe's fixed examples of one task, training rows (from dev) first, then eval rows."""
    fc = config.forget
    train = splits["dev"].select(forgetting.fixed_sample(splits["dev"]["label"], fc.probe_train, fc.seed))
    evaluation = splits["eval"].select(forgetting.fixed_sample(splits["eval"]["label"], fc.probe_eval, fc.seed))
    return datasets.concatenate_datasets([train, evaluation]), len(train)


def probe_table(study: Study, config: StudyConfig, tokenizer, prepared: dict, models: list) -> None:
    fc = config.forget
    probed = preflight.probed_tasks(config)
    if not probed:  # a study of generative tasks only: nothing to probe
        forgetting.FORGETTING.write(study.tables, pd.DataFrame(columns=forgetting.FORGETTING.columns))
        return
    examples = {name: probe_examples(prepared[name][1], config) for name in probed}
    wanted = {
        (model_id, name): (
            study.probe_features_path(name, model_id),
            dependencies.PROBE_FEATURES.fingerprint(config, prepared_fingerprint(study, name), model_fp),
        )
        for model_id, model_fp, _ in models
        for name in probed
    }
    units = []
    for model_id, _, trained in models:
        missing = [(name, *wanted[(model_id, name)]) for name in probed if not is_current(*wanted[(model_id, name)])]
        if missing:
            units.append(
                executors.Unit(
                    probe_features_one, (str(study.root), config, trained, missing), f"forget features {model_id}"
                )
            )
    executors.run_units(units, "forget features", config.runtime.progress)
    table_fp = dependencies.FORGETTING.fingerprint(config, [stamp_of(path) for path, _ in wanted.values()])
    if is_current(forgetting.FORGETTING.path(study.tables), table_fp):
        return
    rows = []
    for name in probed:
        split, n_train = examples[name]
        labels = np.asarray(split["label"])
        for model_id, _, trained in models:
            features, _, layers = rep.load_features(wanted[(model_id, name)][0])
            rows += forgetting.probe_rows(features[fc.pooling], layers, labels, n_train, name, trained, fc)
    forgetting.FORGETTING.write(study.tables, forgetting.with_base_reference(pd.DataFrame(rows), fc), table_fp)


def probe_features_one(root: str, config: StudyConfig, trained, missing: list[tuple[str, Path, str]]) -> None:
    """One model's probe features on each task in `missing` ((task, path, fingerprint)); a worker's unit."""
    study, tokenizer, fc, (device, bf16) = (
        Study(root),
        modeling.load_tokenizer(config.model.name),
        config.forget,
        _device(config),
    )
    prepared = {name: load_prepared(study, name) for name in config.tasks}
    model = _load(study, config, prepared, trained, tokenizer)
    layers = forgetting.probe_layers(model.config.num_hidden_layers, fc.layer_every)
    represent = config.represent.model_copy(update={"layers": layers, "poolings": [fc.pooling]})
    for name, path, fp in missing:
        split = probe_examples(prepared[name][1], config)[0]
        features, layers = rep.study_features(model, split, represent, tokenizer, represent.batch_size, device, bf16)
        write_current(path, rep.features_bytes(features, split["example_id"], layers), fp)


# ---------------------------------------------------------------- language modelling


def lm_documents(config: StudyConfig, prepared: dict, tokenizer) -> dict[str, datasets.Dataset]:
    """Held-out documents: the named text file (one per line), else each task's first eval
    examples (a run is scored on the tasks it did not train on); a generative task's without
    their completions (the prompts: SQuAD's held-out Wikipedia paragraphs and questions)."""
    fc = config.forget
    if fc.lm_text is None:
        return {
            name: prompts_only(splits["eval"].select(range(min(fc.lm_documents, len(splits["eval"])))))
            for name, (_, splits) in prepared.items()
        }
    try:
        lines = [line.strip() for line in Path(fc.lm_text).read_text(encoding="utf-8").splitlines()]
    except OSError as err:
        raise InputError(f"forget.lm_text: cannot read {fc.lm_text} ({err.strerror})") from None
    lines = [line for line in lines if line][: fc.lm_documents]
    if not lines:
        raise InputError(f"forget.lm_text: {fc.lm_text} has no non-empty line")
    encoded = tokenizer(lines, truncation=True, max_length=config.model.max_length)
    encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
    return {"text": datasets.Dataset.from_dict(dict(encoded))}


def lm_table(study: Study, config: StudyConfig, tokenizer, prepared: dict, models: list) -> None:
    fc, (device, bf16) = config.forget, _device(config)
    sources = [file_sha256(fc.lm_text)] if fc.lm_text else [prepared_fingerprint(study, name) for name in config.tasks]
    wanted = {
        model_id: dependencies.LM_LOSSES.fingerprint(config, sources, model_fp) for model_id, model_fp, _ in models
    }
    table_fp = dependencies.LM_FORGETTING.fingerprint(config, sources, wanted)
    if is_current(forgetting.LM_FORGETTING.path(study.tables), table_fp):
        return
    base = _load(study, config, prepared, None, tokenizer)
    decoder = rep.head_reads_last_token(base)
    lm, note = forgetting.lm_with_head(modeling.resolve_model_path(config.model.name), decoder)
    objective = "causal" if decoder else "masked"
    if lm is None:
        rows = [
            {"task": task, "method": method, "seed": seed, "objective": objective, "status": "skipped", "note": note}
            for _, _, (task, method, seed) in models[1:]
        ]
        forgetting.LM_FORGETTING.write(
            study.tables, pd.DataFrame(rows, columns=forgetting.LM_FORGETTING.columns), table_fp
        )
        return
    documents = lm_documents(config, prepared, tokenizer)

    def sets_of(trained) -> list[str]:
        """The tasks a run did not train on; in a one-task study, that task's eval sentences
        (held out from training, but its domain: the note says so)."""
        return [name for name in documents if trained is None or name != trained[0]] or [trained[0]]

    todo = [(m, t) for m, _, t in models if not is_current(study.lm_losses_path(m), wanted[m])]
    for model_id, trained in tqdm(todo, desc="forget LM loss", disable=not config.runtime.progress):
        classifier = base if trained is None else _load(study, config, prepared, trained, tokenizer)
        own = trained is not None and modeling.is_causal_lm(classifier)  # a generative run: its own head too
        forgetting.with_backbone(lm, classifier)
        tensors = {}
        for name in sets_of(trained):
            for prefix, scorer in [("", lm), *([("own.", classifier)] if own else [])]:
                sums, counts = forgetting.document_losses(
                    scorer,
                    documents[name],
                    tokenizer,
                    decoder=decoder,
                    batch_size=config.training.eval_batch_size,
                    device=device,
                    bf16=bf16,
                    seed=fc.seed,
                )
                tensors |= {
                    f"{prefix}sums.{name}": torch.from_numpy(sums),
                    f"{prefix}counts.{name}": torch.from_numpy(counts),
                }
        write_current(study.lm_losses_path(model_id), save(tensors), wanted[model_id])
    losses = {model_id: load_file(str(study.lm_losses_path(model_id))) for model_id in wanted}
    rows = []
    for model_id, _, trained in models[1:]:
        names = sets_of(trained)
        base_part = _losses(losses["base"], names)
        rows.append(
            forgetting.lm_change_row(trained, objective, names, base_part, _losses(losses[model_id], names), fc)
        )
        if f"own.sums.{names[0]}" in losses[model_id]:
            own = _losses(losses[model_id], names, "own.")
            rows.append(forgetting.lm_change_row(trained, forgetting.OWN_HEAD, names, base_part, own, fc))
    forgetting.LM_FORGETTING.write(study.tables, pd.DataFrame(rows, columns=forgetting.LM_FORGETTING.columns), table_fp)


def _losses(tensors: dict, names: list[str], prefix: str = "") -> list[np.ndarray]:
    """Per-document loss sums and token counts of one LM-loss file over the document sets `names`."""
    return [np.concatenate([tensors[f"{prefix}{kind}.{n}"].numpy() for n in names]) for kind in ("sums", "counts")]


STAGE = Stage(
    "forget",
    "transfer retention (linear probes) of every run on every task, and LM-loss change",
    run=run,
    needs=("prepare", "train"),
    outputs=(dependencies.PROBE_FEATURES, dependencies.FORGETTING, dependencies.LM_LOSSES, dependencies.LM_FORGETTING),
)
