import gc
import json

import numpy as np
import pandas as pd
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from lorascope import modeling, runs
from lorascope.evaluation import evaluate
from lorascope.prepared import load_prepared
from lorascope.stages import BY_NAME, with_inputs
from lorascope.study import run_stages
from lorascope.training import LorascopeTrainer

PREPARE_TRAIN = with_inputs("train")


def _one_task(config, **changes):
    return config.model_copy(update={"tasks": {"sst2": config.tasks["sst2"]}, **changes})


def _metrics(study, method, seed, task="sst2"):
    return json.loads((study.run_dir(task, method, seed) / "metrics.json").read_text())


def test_same_seed_pairs_lora_and_full_runs(tiny_config, tmp_path):
    """Same seed: identical classifier head at the start and the same batches in the same order."""
    study = run_stages(_one_task(tiny_config, seeds=[42, 1337]), tmp_path, PREPARE_TRAIN)
    lora42, full42 = _metrics(study, "lora", 42), _metrics(study, "full", 42)
    lora1337 = _metrics(study, "lora", 1337)
    assert lora42["head_init_digest"] == full42["head_init_digest"]
    assert lora42["data_order_digest"] == full42["data_order_digest"]
    assert lora42["head_init_digest"] != lora1337["head_init_digest"]
    assert lora42["data_order_digest"] != lora1337["data_order_digest"]
    assert lora42["status"] == full42["status"] == "ok"
    assert lora42["trainable_params"] < full42["trainable_params"] == full42["total_params"]


def test_batches_are_length_grouped_in_an_order_fixed_by_the_seed(tiny_config, tmp_path):
    study = run_stages(_one_task(tiny_config), tmp_path, [BY_NAME["prepare"]])
    _, splits = load_prepared(study, "sst2")
    train = splits["train"]

    def order(seed):
        trainer = LorascopeTrainer.__new__(LorascopeTrainer)
        trainer.order_seed, trainer.train_dataset = seed, train
        trainer.args = type("Args", (), {"train_batch_size": 4, "gradient_accumulation_steps": 1})()
        return list(trainer._get_train_sampler())

    assert order(42) == order(42) != order(7)
    assert sorted(order(42)) == list(range(len(train)))
    lengths = np.asarray(train["length"])[order(42)].reshape(-1, 4)
    random_batches = np.asarray(train["length"])[np.random.default_rng(0).permutation(len(train))].reshape(-1, 4)
    padded = lambda b: (b.max(1, keepdims=True) - b).sum()  # noqa: E731
    assert padded(lengths) < padded(random_batches)


def test_a_diverged_run_is_recorded_and_the_study_goes_on(tiny_config, tmp_path, monkeypatch):
    original = LorascopeTrainer.compute_loss

    def nan_at_step_3_for_full(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        is_full = not isinstance(model, PeftModel)
        return loss * float("nan") if is_full and self.state.global_step == 2 else loss

    monkeypatch.setattr(LorascopeTrainer, "compute_loss", nan_at_step_3_for_full)
    study = run_stages(_one_task(tiny_config), tmp_path, PREPARE_TRAIN)
    full, lora = _metrics(study, "full", 42), _metrics(study, "lora", 42)
    assert full["status"] == "diverged" and full["diverged_step"] == 3 and full["primary_value"] is None
    assert lora["status"] == "ok"
    assert gc.get_freeze_count() == 0  # objects frozen out of gc during training are released, divergence or not
    table = pd.read_csv(study.tables / "performance.csv")
    assert sorted(zip(table["method"], table["status"])) == [("full", "diverged"), ("lora", "ok")]


def test_the_best_dev_checkpoint_is_what_gets_saved(tiny_config, tmp_path):
    """Reloading the saved adapter (with its head) reproduces the best dev score it was picked
    for, and its eval predictions."""
    config = _one_task(tiny_config, methods=["lora"])
    config.training.lora = config.training.lora.model_copy(update={"eval_every": 1, "epochs": 2.0, "lr": 3e-2})
    study = run_stages(config, tmp_path, PREPARE_TRAIN)
    run = study.run_dir("sst2", "lora", 42)
    metrics = _metrics(study, "lora", 42)
    history = pd.read_csv(run / "history.csv").dropna(subset=["dev_accuracy"])
    assert metrics["dev_accuracy"] == history["dev_accuracy"].max()
    assert metrics["best_step"] == history.loc[history["dev_accuracy"].idxmax(), "step"]

    task, splits = load_prepared(study, "sst2")
    tokenizer = modeling.load_tokenizer(config.model.name)
    base = modeling.load_model(
        config.model.name, task.label_names, seed=999, pad_token_id=tokenizer.pad_token_id
    )  # another head
    model = PeftModel.from_pretrained(base, run)

    def score(split):
        return evaluate(
            model,
            splits[split],
            tokenizer=tokenizer,
            num_labels=2,
            batch_size=8,
            device=torch.device("cpu"),
            bf16=False,
        )

    assert score("dev").metrics["accuracy"] == pytest.approx(metrics["dev_accuracy"])
    saved = pd.read_csv(run / "predictions.csv")
    again = score("eval").predictions
    assert saved["example_id"].tolist() == splits["eval"]["example_id"]
    assert saved["prediction"].tolist() == again["prediction"].tolist()
    np.testing.assert_allclose(saved["prob_1"], again["prob_1"], atol=1e-5)
    assert metrics["accuracy"] == pytest.approx((saved["label"] == saved["prediction"]).mean())


def test_full_runs_save_a_loadable_model(tiny_config, tmp_path):
    from transformers import AutoModelForSequenceClassification

    study = run_stages(_one_task(tiny_config, methods=["full"]), tmp_path, PREPARE_TRAIN)
    run = study.run_dir("sst2", "full", 42)
    assert (run / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(run)
    _task, splits = load_prepared(study, "sst2")
    tokenizer = modeling.load_tokenizer(str(tiny_config.model.name))
    result = evaluate(
        model, splits["eval"], tokenizer=tokenizer, num_labels=2, batch_size=8, device=torch.device("cpu"), bf16=False
    )
    assert result.metrics["accuracy"] == pytest.approx(_metrics(study, "full", 42)["accuracy"])


def test_a_run_records_what_it_cost(tiny_config, tmp_path):
    """Optimizer state: AdamW's two fp32 moments per trained weight plus a 4-byte step counter
    per trained tensor, the tensors the saved weights hold; artifact size: those files' bytes;
    peak memory: the process's resident set, CUDA fields empty on CPU; all of it in performance.csv."""
    study = run_stages(_one_task(tiny_config), tmp_path, PREPARE_TRAIN)
    table = runs.PERFORMANCE.read(study.tables).set_index("method")
    weights_file = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}
    for method, name in weights_file.items():
        run, metrics = study.run_dir("sst2", method, 42), _metrics(study, method, 42)
        assert sorted(p.name for p in run.glob("*.safetensors")) == [name]
        assert metrics["artifact_bytes"] == (run / name).stat().st_size
        with safe_open(run / name, "pt") as saved:
            names = saved.keys()
            tensors, weights = len(names), sum(saved.get_tensor(k).numel() for k in names)
        assert weights == metrics["trainable_params"]  # the file holds exactly the trained tensors
        assert metrics["optimizer_state_bytes"] == 2 * 4 * metrics["trainable_params"] + 4 * tensors
        assert 0 <= metrics["peak_rss_added_bytes"] < metrics["peak_rss_bytes"]
        assert metrics["cuda_max_allocated_bytes"] is None and metrics["cuda_max_reserved_bytes"] is None
        assert metrics["train_tokens_per_second"] == pytest.approx(
            metrics["tokens_seen"] / metrics["train_seconds"], rel=1e-2
        )
        row = table.loc[method]
        for column in (
            "artifact_bytes",
            "optimizer_state_bytes",
            "peak_rss_bytes",
            "peak_rss_added_bytes",
            "train_tokens_per_second",
        ):
            assert row[column] == pytest.approx(metrics[column])
        assert np.isnan(row["cuda_max_allocated_bytes"]) and np.isnan(row["cuda_max_reserved_bytes"])
    assert _metrics(study, "lora", 42)["optimizer_state_bytes"] < _metrics(study, "full", 42)["optimizer_state_bytes"]
