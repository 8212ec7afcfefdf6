"""Every configured hyperparameter reaches the Trainer, PEFT or lorascope's own callbacks.
The reference study silently ignored four of its tuned values; here a new config key without
a destination fails the first test, and a key whose value gets lost fails the others."""

import json

import pandas as pd
import pytest
import torch

from lorascope import modeling, runs
from lorascope.config import RuntimeConfig
from lorascope.hparams import LoraMethodConfig, MethodConfig
from lorascope.stages import with_inputs
from lorascope.study import run_stages
from lorascope.tasks import Task
from lorascope.training import CALLBACK_KEYS, PEFT_KEYS, TRAINER_KEYS, RunSetup, training_arguments

DISTINCT = dict(
    lr=3.7e-4,
    head_lr=2.2e-3,
    epochs=2.5,
    batch_size=7,
    grad_accum=3,
    scheduler="cosine",
    warmup_ratio=0.13,
    weight_decay=0.031,
    max_grad_norm=0.77,
    adam_beta2=0.987,
    eval_every=5,
    patience=4,
)
DISTINCT_LORA = dict(r=3, alpha=11.0, dropout=0.07, target_modules=["query", "key"], modules_to_save=["pooler"])


def test_every_key_has_a_destination():
    for key in MethodConfig.model_fields:
        assert key in TRAINER_KEYS or key in CALLBACK_KEYS, key
    adapter_keys = set(LoraMethodConfig.model_fields) - set(MethodConfig.model_fields) - {"type"}  # type: the PEFT class
    for key in adapter_keys:
        assert key in PEFT_KEYS, key
    assert set(DISTINCT) == set(MethodConfig.model_fields)
    assert set(DISTINCT_LORA) == adapter_keys


def test_trainer_keys_reach_training_arguments(tmp_path):
    hp = MethodConfig(**DISTINCT)
    setup = RunSetup(
        model_name="x", task=None, method="full", seed=5, hp=hp, runtime=RuntimeConfig(), eval_batch_size=8
    )
    args = training_arguments(setup, torch.device("cpu"), str(tmp_path))
    for key, arg in TRAINER_KEYS.items():
        value = getattr(args, arg)
        assert getattr(value, "value", value) == DISTINCT[key], key
    assert args.seed == 5


def test_peft_keys_reach_the_lora_config(tiny_bert_dir):
    tokenizer = modeling.load_tokenizer(str(tiny_bert_dir))
    model = modeling.load_model(str(tiny_bert_dir), ("a", "b"), 1, tokenizer.pad_token_id)
    lora = modeling.prepare_for_method(model, "lora", LoraMethodConfig(lr=1e-3, **DISTINCT_LORA))
    peft = lora.peft_config["default"]
    assert (peft.r, peft.lora_alpha, peft.lora_dropout) == (3, 11.0, 0.07)
    assert set(peft.target_modules) == {"query", "key"}
    assert {"pooler", "classifier"} <= set(peft.modules_to_save)


def test_callback_keys_shape_training_and_everything_is_saved(tiny_config, tmp_path):
    """eval_every sets when dev is scored; patience stops a run whose dev score cannot improve
    (lr ~ 0); head_lr reaches the optimizer; hparams.json records what the Trainer, its
    optimizer and PEFT actually held."""
    lora = dict(
        lr=1e-12,
        head_lr=1e-11,
        epochs=3.0,
        batch_size=4,
        grad_accum=1,
        scheduler="cosine",
        warmup_ratio=0.13,
        weight_decay=0.031,
        max_grad_norm=0.77,
        adam_beta2=0.987,
        eval_every=2,
        patience=3,
        r=3,
        alpha=11.0,
        dropout=0.07,
        target_modules=["query", "key"],
        modules_to_save=["pooler"],
    )
    config = tiny_config.model_copy(update={"tasks": {"sst2": tiny_config.tasks["sst2"]}, "methods": ["lora"]})
    config.training.lora = LoraMethodConfig(**lora)
    study = run_stages(config, tmp_path, with_inputs("train"))
    run = study.run_dir("sst2", "lora", 42)
    history = pd.read_csv(run / "history.csv")
    dev_steps = history.dropna(subset=["dev_accuracy"])["step"].tolist()
    assert dev_steps == [2, 4, 6, 8]  # every 2 steps; then 3 evaluations without gain stop it
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 8 < 3 * 12  # 48 examples / batch 4 = 12 steps per epoch
    saved = json.loads((run / "hparams.json").read_text())
    assert saved["configured"] == {**lora, "alpha": 11.0, "type": "lora"}
    for key, arg in TRAINER_KEYS.items():
        assert saved["trainer"][arg] == lora[key], key
    assert saved["peft"]["r"] == 3 and saved["peft"]["lora_alpha"] == 11.0 and saved["peft"]["lora_dropout"] == 0.07
    assert sorted(saved["peft"]["target_modules"]) == ["key", "query"]
    assert "pooler" in saved["peft"]["modules_to_save"]
    groups = {(g["lr"], g["weight_decay"]): g["params"] for g in saved["optimizer_groups"]}
    hidden, layers, r = 32, 2, 3
    assert groups[(1e-12, 0.031)] + groups.get((1e-12, 0.0), 0) == layers * 2 * 2 * hidden * r  # query and key adapters
    assert groups[(1e-11, 0.031)] + groups[(1e-11, 0.0)] == (2 * hidden + 2) + (hidden * hidden + hidden)  # head


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_different_value_changes_the_run_fingerprint(tiny_config, method):
    task = Task(
        name="sst2",
        source="",
        subset=None,
        text="t",
        text_pair=None,
        label="label",
        label_names=("a", "b"),
        metric="accuracy",
    )
    base = runs.run_setup(tiny_config, task, method, 42)
    fingerprints = set()
    for key, value in DISTINCT.items():
        setup = runs.run_setup(tiny_config, task, method, 42, hp=base.hp.model_copy(update={key: value}))
        fingerprints.add(runs.run_fingerprint(tiny_config, setup, "splits"))
    assert len(fingerprints) == len(DISTINCT)
