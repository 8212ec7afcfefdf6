"""A run folder is a standalone Hugging Face artifact: loaded from the folder alone, with the
lines its model card gives, it reproduces the run's eval scores with the task's label names."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoTokenizer, pipeline

from lorascope import tasks
from lorascope.artifacts import CARD
from lorascope.stages import with_inputs
from lorascope.study import run_stages

PREPARE_TRAIN = with_inputs("train")


def _sst2_study(config, root, **changes):
    config = config.model_copy(update={"tasks": {"sst2": config.tasks["sst2"]}, **changes})
    return config, run_stages(config, root, PREPARE_TRAIN)


def _eval_texts(config, name="sst2") -> tuple[tasks.Task, list[str]]:
    """The eval split's raw text, in the order of the run's predictions.csv."""
    task, train, evaluation = tasks.load_raw(tasks.resolve_task(name, config.tasks[name], config.data))
    return task, tasks.make_splits(task, train, evaluation, config.data)["eval"]["text"][:]


def _card_model(run):
    """What the card's loading lines leave in `model` and `tokenizer`, run on the folder."""
    code = ModelCard.load(run / CARD).text.split("```python\n")[1].split("```")[0]
    names = {"run_dir": str(run)}
    exec(code, names)
    return names["model"], names["tokenizer"]


def _assert_reproduces(classifier, texts, task, run, batch_size=8):
    """Label names, eval accuracy (exactly) and probabilities of the run's own evaluation."""
    metrics = json.loads((run / "metrics.json").read_text())
    saved = pd.read_csv(run / "predictions.csv")
    scored = classifier(texts, truncation=True, batch_size=batch_size, top_k=None)
    probs = np.array(
        [[next(s["score"] for s in scores if s["label"] == name) for name in task.label_names] for scores in scored]
    )
    names = [task.label_names[i] for i in probs.argmax(1)]
    accuracy = float(np.mean([name == task.label_names[label] for name, label in zip(names, saved["label"])]))
    assert accuracy == metrics["eval_accuracy"]
    assert names == [task.label_names[p] for p in saved["prediction"]]
    np.testing.assert_allclose(probs, saved[[f"prob_{k}" for k in range(task.num_labels)]], atol=1e-5)


def test_full_and_lora_run_folders_load_alone(tiny_config, tmp_path):
    config, study = _sst2_study(tiny_config, tmp_path / "study")
    task, texts = _eval_texts(config)
    assert task.label_names == ("negative", "positive")

    full = study.run_dir("sst2", "full", 42)
    classifier = pipeline("text-classification", model=str(full))
    assert classifier.model.config.id2label == dict(enumerate(task.label_names))
    _assert_reproduces(classifier, texts, task, full)

    lora = study.run_dir("sst2", "lora", 42)
    model, tokenizer = _card_model(lora)
    assert type(model).__name__ == "PeftModelForSequenceClassification"
    assert model.config.id2label == dict(enumerate(task.label_names))
    assert tokenizer.model_max_length == config.model.max_length  # truncates where the run's splits did
    _assert_reproduces(pipeline("text-classification", model=model, tokenizer=tokenizer), texts, task, lora)

    for run, method in ((full, "full"), (lora, "lora")):
        card = ModelCard.load(run / CARD)
        metrics = json.loads((run / "metrics.json").read_text())
        assert card.data.base_model == str(Path(config.model.name).resolve())
        assert set(card.data.tags) == {"lorascope", method, "sst2"}
        assert f"| accuracy | {metrics['eval_accuracy']:.4f} |" in card.text and "seed 42" in card.text


def test_a_decoder_run_keeps_its_pad_token_and_padding_side(tiny_config, tiny_llama_dir, tmp_path):
    """The base decoder has no pad token: the run padded with eos on the right, and so does
    every loader of its folder, batched (padding reaches the classifier's last-token lookup)."""
    config, study = _sst2_study(
        tiny_config, tmp_path / "study", model=tiny_config.model.model_copy(update={"name": str(tiny_llama_dir)})
    )
    assert AutoTokenizer.from_pretrained(tiny_llama_dir).pad_token is None
    task, texts = _eval_texts(config)
    for method in ("full", "lora"):
        run = study.run_dir("sst2", method, 42)
        tokenizer = AutoTokenizer.from_pretrained(run)
        assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.padding_side) == ("[SEP]", "[SEP]", "right")
        if method == "full":
            assert AutoConfig.from_pretrained(run).pad_token_id == tokenizer.pad_token_id
            classifier = pipeline("text-classification", model=str(run))
        else:
            model, tokenizer = _card_model(run)
            assert model.config.pad_token_id == tokenizer.pad_token_id
            classifier = pipeline("text-classification", model=model, tokenizer=tokenizer)
        _assert_reproduces(classifier, texts, task, run, batch_size=16)
