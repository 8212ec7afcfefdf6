"""The study's stages. Each one is a function of the config and of earlier stages' outputs,
skips every item already done with the same fingerprint, and writes items atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import traceback
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lorascope import drift as drift_mod
from lorascope import modeling
from lorascope import representations as rep
from lorascope.config import StudyConfig, TaskConfig, fingerprint
from lorascope.errors import InputError
from lorascope.study import Study, atomic_dir, atomic_write_text, load_done
from lorascope.tasks import Task, compute_metrics, load_raw, majority_label, make_splits, resolve_task, tokenize
from lorascope.training import RunSetup, train_run

RESULTS_VERSION = 1  # bump when a code change alters results, so old outputs are redone
PERFORMANCE_COLUMNS = [
    "task", "method", "seed", "status", "primary_metric", "primary_value", "accuracy", "f1",
    "train_seconds", "trainable_params",
]  # fmt: skip


class RunsFailed(RuntimeError):
    """Some runs raised; every other result is kept and the failures are listed."""


# ---------------------------------------------------------------- prepare


def _prepare_fingerprint(config: StudyConfig, name: str) -> str:
    return fingerprint(RESULTS_VERSION, config.model.name, config.model.max_length, config.data, config.tasks[name])


def prepare(study: Study, config: StudyConfig) -> None:
    """Load, check, split and tokenize every task; all input errors surface here, before any
    training starts."""
    tokenizer = None
    for name, task_cfg in config.tasks.items():
        fp = _prepare_fingerprint(config, name)
        target = study.prepared_dir(name)
        if _meta(target).get("fingerprint") == fp:
            continue
        task, train, evaluation = load_raw(resolve_task(name, task_cfg, config.data))
        tokenizer = tokenizer or modeling.load_tokenizer(config.model.name)
        splits = tokenize(make_splits(task, train, evaluation, config.data), tokenizer, config.model.max_length)
        with atomic_dir(target) as scratch:
            splits.save_to_disk(str(scratch / "splits"))
            sizes = {k: len(v) for k, v in splits.items()}
            meta = {"fingerprint": fp, "task": dataclasses.asdict(task), "sizes": sizes}
            (scratch / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_prepared(study: Study, name: str) -> tuple[Task, datasets.DatasetDict]:
    meta = _meta(study.prepared_dir(name))
    task = meta["task"]
    task = Task(**{**task, "label_names": tuple(task["label_names"])})
    return task, datasets.load_from_disk(str(study.prepared_dir(name) / "splits"))


def _meta(folder) -> dict:
    path = folder / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------- runs


def _setup(config: StudyConfig, task: Task, method: str, seed: int, hp=None, **changes) -> RunSetup:
    return RunSetup(
        model_name=config.model.name, task=task, method=method, seed=seed,
        hp=hp or getattr(config.training, method), runtime=config.runtime,
        eval_batch_size=config.training.eval_batch_size,
        gradient_checkpointing=config.model.gradient_checkpointing, dropout=config.model.dropout, **changes,
    )  # fmt: skip


def _run_fingerprint(config: StudyConfig, setup: RunSetup, splits_fp: str) -> str:
    device = modeling.pick_device(config.runtime).type
    bf16 = config.runtime.bf16 and device == "cuda"
    return fingerprint(
        RESULTS_VERSION, splits_fp, config.model, setup.method, setup.seed, setup.hp, setup.max_steps,
        config.training.eval_batch_size, device, bf16,
    )  # fmt: skip


def _run_once(config, setup: RunSetup, splits: dict, target, splits_fp: str, tokenizer) -> dict:
    """Reuse a finished item with the same fingerprint, else train it in a scratch folder."""
    fp = _run_fingerprint(config, setup, splits_fp)
    done = load_done(target, fp)
    if done is not None and done["status"] != "failed":
        return done
    with atomic_dir(target) as scratch:
        try:
            result = train_run(setup, splits, tokenizer, scratch)
        except InputError:
            raise  # a config problem concerns every run: stop with exit code 2
        except Exception as err:  # noqa: BLE001 - recorded as a failed run; the study goes on
            result = {"task": setup.task.name, "method": setup.method, "seed": setup.seed, "status": "failed",
                      "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}  # fmt: skip
        result["fingerprint"] = fp
        (scratch / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def tune(study: Study, config: StudyConfig) -> None:
    """The optional Optuna search (tune.enabled); `lorascope tune` runs it regardless."""
    if config.tune.enabled:
        from lorascope.tuning import tune_study  # lazy: tuning imports this module

        tune_study(study, config)


def _method_hparams(study: Study, config: StudyConfig, task: str, method: str):
    if not config.tune.enabled:
        return getattr(config.training, method), None
    from lorascope.tuning import tuned_hparams

    return tuned_hparams(study.root, config, task, method)


def train(study: Study, config: StudyConfig) -> None:
    grid = [(t, m, s) for t in config.tasks for m in config.methods for s in config.seeds]
    tokenizer = modeling.load_tokenizer(config.model.name)
    bar = tqdm(grid, desc="study runs", unit="run", disable=not config.runtime.progress)
    prepared = {}
    for name, method, seed in bar:
        bar.set_postfix_str(f"{name} {method} seed{seed}")
        if name not in prepared:
            prepared[name] = load_prepared(study, name)
        task, splits = prepared[name]
        hp, source = _method_hparams(study, config, name, method)
        setup = _setup(config, task, method, seed, hp=hp, hp_source=source)
        _run_once(config, setup, splits, study.run_dir(name, method, seed), _prepare_fingerprint(config, name), tokenizer)
    write_performance_table(study)
    failed = study_failures(study)
    if failed:
        raise RunsFailed(f"{len(failed)} run(s) failed: " + "; ".join(failed))


def write_performance_table(study: Study) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted(study.root.glob("runs/*/*/seed*/metrics.json"))]
    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame(columns=PERFORMANCE_COLUMNS)
    drop = [c for c in ("traceback", "fingerprint") if c in table]
    table = table.drop(columns=drop)
    table = table[PERFORMANCE_COLUMNS + [c for c in table.columns if c not in PERFORMANCE_COLUMNS]]
    atomic_write_text(study.tables / "performance.csv", table.to_csv(index=False))
    return table


def study_failures(study: Study) -> list[str]:
    failed = []
    for path in sorted(study.root.glob("runs/*/*/seed*/metrics.json")):
        data = json.loads(path.read_text())
        if data["status"] == "failed":
            failed.append(f"{path.parent.relative_to(study.root)}: {data['error']}")
    return failed


# ---------------------------------------------------------------- baselines


def baselines(study: Study, config: StudyConfig) -> None:
    """Majority class on eval, the head-only (frozen backbone) probe, and the overfit sanity
    check: each method must fit `overfit_examples` training examples to `overfit_threshold`."""
    tokenizer = modeling.load_tokenizer(config.model.name)
    rows = []
    for name in config.tasks:
        task, splits = load_prepared(study, name)
        splits_fp = _prepare_fingerprint(config, name)
        rows.append(_majority(task, splits))
        if config.baselines.head_only:
            setup = _setup(config, task, "head", config.seeds[0])
            result = _run_once(config, setup, splits, study.baseline_dir(name, "head_only"), splits_fp, tokenizer)
            rows.append({"baseline": "head_only", **result})
        few = _few_examples(splits["train"], config.baselines.overfit_examples, config.data.split_seed)
        for method in config.methods:
            hp = getattr(config.training, method).model_copy(
                update={"epochs": 1.0, "warmup_ratio": 0.0, "scheduler": "constant_with_warmup",
                        "batch_size": len(few), "grad_accum": 1, "patience": 0}  # fmt: skip
            )
            setup = _setup(config, task, method, config.seeds[0], hp=hp, max_steps=config.baselines.overfit_steps,
                           save_weights=False)  # fmt: skip
            target = study.baseline_dir(name, f"overfit_{method}")
            result = _run_once(config, setup, {"train": few, "eval": few}, target, splits_fp, tokenizer)
            passed = result.get("accuracy") is not None and result["accuracy"] >= config.baselines.overfit_threshold
            rows.append({"baseline": f"overfit_{method}", **result, "passed": passed})
    columns = ["task", "baseline", "method", "status", "primary_metric", "primary_value", "accuracy", "f1", "passed"]
    table = pd.DataFrame(rows).reindex(columns=columns)
    atomic_write_text(study.tables / "baselines.csv", table.to_csv(index=False))
    failed = table[table["baseline"].str.startswith("overfit") & (table["passed"] != True)]  # noqa: E712
    for _, row in failed.iterrows():
        tqdm.write(f"warning: {row.task} {row.method} did not fit {config.baselines.overfit_examples} examples "
                   f"(train accuracy {row.accuracy}); check its learning rate")  # fmt: skip


def _majority(task: Task, splits: datasets.DatasetDict) -> dict:
    label = majority_label(splits["train"])
    labels = np.asarray(splits["eval"]["label"])
    metrics = compute_metrics(labels, np.full_like(labels, label), task.num_labels)
    return {"task": task.name, "baseline": "majority", "method": "", "status": "ok",
            "primary_metric": task.metric, "primary_value": metrics[task.metric], **metrics}  # fmt: skip


def _few_examples(train: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:
    rows = np.sort(np.random.default_rng(seed).permutation(len(train))[:n])
    return train.select(rows)


# ---------------------------------------------------------------- represent


def _feature_path(study: Study, task: str, model_id: str) -> Path:
    return study.root / "features" / task / f"{model_id}.safetensors"


def _finished_runs(study: Study, config: StudyConfig, task: str) -> list[tuple[str, int, dict]]:
    """(method, seed, metrics) of the configured runs of `task` that trained without error."""
    runs = []
    for method in config.methods:
        for seed in config.seeds:
            path = study.run_dir(task, method, seed) / "metrics.json"
            if path.is_file() and (metrics := json.loads(path.read_text()))["status"] == "ok":
                runs.append((method, seed, metrics))
    return runs


def represent(study: Study, config: StudyConfig) -> None:
    """Pooled features of every layer on `probe`: the base model twice (the second pass with
    other batches, for the base-vs-base check) and every finished run."""
    tokenizer = modeling.load_tokenizer(config.model.name)
    device = modeling.pick_device(config.runtime)
    bf16 = config.runtime.bf16 and device.type == "cuda"
    rc = config.represent
    for name in config.tasks:
        task, splits = load_prepared(study, name)
        base_fp = fingerprint(RESULTS_VERSION, _prepare_fingerprint(config, name), config.model, rc, device.type, bf16)
        items = [("base", base_fp, rc.batch_size, None), ("base-again", base_fp, max(1, rc.batch_size // 2), None)]
        items += [(f"{m}-seed{s}", fingerprint(base_fp, metrics["fingerprint"]), rc.batch_size, (m, s))
                  for m, s, metrics in _finished_runs(study, config, name)]  # fmt: skip
        todo = [item for item in items if rep.features_fingerprint(_feature_path(study, name, item[0])) != item[1]]
        for model_id, fp, batch_size, run in tqdm(todo, desc=f"represent {name}", disable=not config.runtime.progress):
            if run is None:
                model = modeling.load_model(config.model.name, task.label_names, 0, tokenizer).eval()
            else:
                model = modeling.load_run_model(study.run_dir(name, *run), run[0], config.model.name,
                                                task.label_names, tokenizer)  # fmt: skip
            features, layers = _pool(model, splits["probe"], config, tokenizer, batch_size, device, bf16)
            rep.save_features(_feature_path(study, name, model_id), features, splits["probe"]["example_id"], layers, fp)


def _pool(model: torch.nn.Module, probe, config: StudyConfig, tokenizer, batch_size: int, device, bf16: bool):
    """Pooled features of `probe` with the study's represent settings (stage and single comparison)."""
    rc = config.represent
    return rep.pooled_features(
        model.to(device), probe, tokenizer=tokenizer, layers=rc.layers, poolings=tuple(rc.poolings),
        skip_special_tokens=rc.skip_special_tokens, batch_size=batch_size, device=device, bf16=bf16,
    )  # fmt: skip


# ---------------------------------------------------------------- drift


def _table_current(study: Study, table: str, fp: str) -> bool:
    marks = study.tables / ".fingerprints.json"
    return (study.tables / table).is_file() and json.loads(marks.read_text() if marks.is_file() else "{}").get(table) == fp


def _write_table(study: Study, table: str, frame: pd.DataFrame, fp: str) -> None:
    atomic_write_text(study.tables / table, frame.to_csv(index=False))
    _mark_table(study, table, fp)


def _mark_table(study: Study, table: str, fp: str) -> None:
    marks = study.tables / ".fingerprints.json"
    current = json.loads(marks.read_text()) if marks.is_file() else {}
    atomic_write_text(marks, json.dumps({**current, table: fp}, indent=2) + "\n")


def drift(study: Study, config: StudyConfig) -> None:
    """Per-layer similarity of every run to the base, with base-vs-base (must be 1), seed-vs-seed
    and shuffled-base references and bootstrap intervals over probe examples."""
    files = sorted(study.root.glob("features/*/*.safetensors"))
    fp = fingerprint(RESULTS_VERSION, config.drift, config.represent, [rep.features_fingerprint(f) for f in files])
    if _table_current(study, "drift_layers.csv", fp):
        return
    rows = []
    with _one_thread():
        for name in config.tasks:
            rows += _task_drift(study, config, name)
    layer_table, summary = drift_tables(rows)
    _write_table(study, "drift_summary.csv", summary, fp)
    _write_table(study, "drift_layers.csv", layer_table, fp)


DRIFT_LAYER_COLUMNS = ["task", "comparison", "method", "seed", "layer", "pooling", "measure", "value",
                       "ci_low", "ci_high"]  # fmt: skip
DRIFT_SUMMARY_COLUMNS = ["task", "method", "seed", "pooling", "measure", "mean_over_layers", "mean_last_third",
                         "comparison"]  # fmt: skip


def drift_tables(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """drift_layers.csv and drift_summary.csv from drift.task_drift_rows rows."""
    layer_table = pd.DataFrame(rows, columns=DRIFT_LAYER_COLUMNS)
    summary = pd.DataFrame(drift_mod.summary_rows(layer_table), columns=DRIFT_SUMMARY_COLUMNS)
    return layer_table, summary[DRIFT_SUMMARY_COLUMNS]


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
    probe = make_splits(task, train, evaluation, config.data)["probe"]
    probe = tokenize(datasets.DatasetDict(train=probe), tokenizer, config.model.max_length)["train"]
    device = modeling.pick_device(config.runtime)
    bf16 = config.runtime.bf16 and device.type == "cuda"
    rc = config.represent

    def features(net: torch.nn.Module, batch_size: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        return _pool(net, probe, config, tokenizer, batch_size, device, bf16)

    base_model = modeling.load_model(base, task.label_names, 0, tokenizer).eval()
    base_features, layers = features(base_model, rc.batch_size)
    again, _ = features(base_model, max(1, rc.batch_size // 2))
    del base_model
    method, source = ("full", model) if model is not None else ("lora", adapter)
    flag = "--model" if model is not None else "--adapter"
    try:
        path = modeling.resolve_model_path(model) if model is not None else adapter
        tuned = modeling.load_run_model(path, method, base, task.label_names, tokenizer)
    except (OSError, ValueError, RuntimeError, InputError) as err:
        raise InputError(f"{flag}: cannot load '{source}': {str(err).splitlines()[0]}") from None
    tuned_features, tuned_layers = features(tuned, rc.batch_size)
    if tuned_layers != layers:
        raise InputError(f"{flag}: '{source}' has layers {tuned_layers}, the base {layers}: not the same architecture")
    rows = []
    with _one_thread():
        for pooling in rc.poolings:
            rows += drift_mod.task_drift_rows(
                task.name, pooling, base_features[pooling], again[pooling], {(method, ""): tuned_features[pooling]},
                layers, config.drift.measures, bootstrap=config.drift.bootstrap, confidence=config.drift.confidence,
                seed=config.drift.seed,
            )  # fmt: skip
    return drift_tables(rows)


def _task_drift(study: Study, config: StudyConfig, name: str) -> list[dict]:
    base, _, layers = rep.load_features(_feature_path(study, name, "base"))
    again, _, _ = rep.load_features(_feature_path(study, name, "base-again"))
    runs = {(m, s): rep.load_features(_feature_path(study, name, f"{m}-seed{s}"))[0]
            for m, s, _ in _finished_runs(study, config, name)}  # fmt: skip
    rows = []
    for pooling in config.represent.poolings:
        rows += drift_mod.task_drift_rows(
            name, pooling, base[pooling], again[pooling], {k: v[pooling] for k, v in runs.items()}, layers,
            config.drift.measures, bootstrap=config.drift.bootstrap, confidence=config.drift.confidence,
            seed=config.drift.seed,
        )  # fmt: skip
    return rows


@contextlib.contextmanager
def _one_thread():
    """CKA on [256 x 384] features is many small float64 products: on a busy 2-core machine two
    threads ran them 15x slower than one (spin-waiting), and one thread is never much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- weights


def weights(study: Study, config: StudyConfig) -> None:
    """Weight-space change of every finished run against the base: relative update, effective
    rank of the update and intruder dimensions, per matrix."""
    from safetensors.torch import load_file

    from lorascope import weights as weights_mod

    runs = [(t, m, s, metrics["fingerprint"]) for t in config.tasks for m, s, metrics in _finished_runs(study, config, t)]
    fp = fingerprint(RESULTS_VERSION, config.weights, [r[3] for r in runs])
    if _table_current(study, "weights.csv", fp):
        return
    tokenizer = modeling.load_tokenizer(config.model.name)
    base_state = modeling.load_model(config.model.name, ("0", "1"), 0, tokenizer).state_dict()
    k, epsilon = config.weights.intruder_k, config.weights.intruder_epsilon
    rows, base_vectors = [], {}
    with _one_thread():
        for task, method, seed, _ in tqdm(runs, desc="weights", disable=not config.runtime.progress):
            folder = study.run_dir(task, method, seed)
            if method == "lora":
                adapter = json.loads((folder / "adapter_config.json").read_text())
                deltas = weights_mod.lora_deltas(load_file(str(folder / "adapter_model.safetensors")), base_state,
                                                 adapter["lora_alpha"], adapter["r"], adapter.get("use_rslora", False))  # fmt: skip
            else:
                deltas = weights_mod.full_deltas(load_file(str(folder / "model.safetensors")), base_state)
            for row in weights_mod.weight_change_rows(deltas, k=k, epsilon=epsilon, base_vectors=base_vectors):
                rows.append({"task": task, "method": method, "seed": seed, **row})
    table = pd.DataFrame(rows).rename(columns={"intruder_dimensions": "intruders"})
    leading = ["task", "method", "seed", "module", "relative_update", "effective_rank", "intruders"]
    _write_table(study, "weights.csv", table[leading + [c for c in table.columns if c not in leading]], fp)


# ---------------------------------------------------------------- deploy


def deploy(study: Study, config: StudyConfig) -> None:
    """Serving cost of one seed's runs: full FT and the first task's adapter merged / separate,
    and every task's adapter on one base (switch / mixed), on each task's eval examples."""
    from lorascope import deployment

    if not config.deploy.enabled:
        return
    seed = config.deploy.seed if config.deploy.seed is not None else config.seeds[0]
    runs = {(t, m): metrics for t in config.tasks for m, s, metrics in _finished_runs(study, config, t) if s == seed}
    adapters = {t: str(study.run_dir(t, "lora", seed)) for t in config.tasks if (t, "lora") in runs}
    if not adapters:
        tqdm.write(f"deploy: skipped, no finished LoRA run with seed {seed}")
        return
    first = next(iter(adapters))
    full = str(study.run_dir(first, "full", seed)) if (first, "full") in runs else None
    device = modeling.pick_device(config.runtime)
    fp = fingerprint(RESULTS_VERSION, config.deploy, config.runtime.bf16, device.type, sorted(m["fingerprint"] for m in runs.values()))
    if _table_current(study, "deployment.csv", fp):
        return
    examples = {t: deployment.examples_from_dataset(load_prepared(study, t)[1]["eval"]) for t in adapters}
    deployment.benchmark(
        modeling.resolve_model_path(config.model.name), adapters, full, examples,
        modeling.load_tokenizer(config.model.name), config.deploy, study.tables, figures_dir=study.root / "figures",
        device=device, bf16=config.runtime.bf16, check_examples=config.deploy.check_examples,
    )  # fmt: skip
    _mark_table(study, "deployment.csv", fp)


def analyze(study: Study, config: StudyConfig) -> None:
    from lorascope.analysis import analyze as analyze_tables

    analyze_tables(study, config)


def report(study: Study, config: StudyConfig) -> None:
    from lorascope.report import write_report

    write_report(study.root)


STAGES = {
    "prepare": prepare, "baselines": baselines, "tune": tune, "train": train, "represent": represent, "drift": drift,
    "weights": weights, "deploy": deploy, "analyze": analyze, "report": report,
}  # fmt: skip
