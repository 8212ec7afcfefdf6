import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import GLUE
from lorascope.config import DataConfig, TaskConfig
from lorascope.errors import InputError
from lorascope.modeling import resolve_model_path
from lorascope.tasks import compute_metrics, load_raw, make_splits, resolve_task, tokenize

DATA = DataConfig(glue=str(GLUE), dev_fraction=0.1, dev_max=1000, probe_size=64)


def _glue(name, **sizes):
    return load_raw(resolve_task(name, TaskConfig(**sizes), DATA))


@pytest.mark.parametrize(
    "name, n_train, n_eval, pair, metric",
    [("sst2", 67349, 872, False, "accuracy"), ("mrpc", 3668, 408, True, "f1"), ("rte", 2490, 277, True, "accuracy")],
)
def test_glue_registry_loads_the_local_copy(name, n_train, n_eval, pair, metric):
    task, train, evaluation = _glue(name)
    assert (len(train), len(evaluation)) == (n_train, n_eval)
    assert ("text_pair" in train.column_names) == pair
    assert task.metric == metric and task.num_labels == 2
    assert set(evaluation["label"]) == {0, 1}


def test_splits_are_stratified_deterministic_and_disjoint():
    task, train, evaluation = _glue("rte", train_max=500)
    splits = make_splits(task, train, evaluation, DATA)
    again = make_splits(task, train, evaluation, DATA)
    assert splits["dev"]["example_id"] == again["dev"]["example_id"]
    assert splits["train"]["example_id"] == again["train"]["example_id"]
    assert len(splits["dev"]) == 249 and len(splits["train"]) == 500  # 10 % of 2,490; then the cap
    assert not set(splits["dev"]["example_id"]) & set(splits["train"]["example_id"])
    full_rate = np.mean(train["label"])
    assert abs(np.mean(splits["dev"]["label"]) - full_rate) < 0.01  # stratified
    assert abs(np.mean(splits["train"]["label"]) - full_rate) < 0.01
    assert splits["eval"]["example_id"] == evaluation["example_id"]  # the whole validation split
    probe = splits["probe"]["example_id"]
    assert len(probe) == 64 and probe == sorted(probe) and set(probe) <= set(evaluation["example_id"])


def test_dev_is_capped():
    task, train, evaluation = _glue("sst2")
    splits = make_splits(task, train, evaluation, DATA)
    assert len(splits["dev"]) == 1000
    assert len(splits["train"]) == 67349 - 1000


def test_a_task_caps_its_own_dev_split():
    task, train, evaluation = _glue("rte", train_max=200, dev_max=100)
    splits = make_splits(task, train, evaluation, DATA)
    assert len(splits["dev"]) == 100 and len(splits["train"]) == 200
    assert abs(np.mean(splits["dev"]["label"]) - np.mean(train["label"])) < 0.02  # still stratified


def test_pairs_use_the_tokenizers_pair_encoding():
    task, train, evaluation = _glue("mrpc")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6"))
    splits = tokenize(make_splits(task, train.select(range(200)), evaluation, DATA), tokenizer, max_length=32)
    row = splits["eval"][0]
    expected = tokenizer(evaluation[0]["text"], evaluation[0]["text_pair"], truncation=True, max_length=32)
    assert row["input_ids"] == expected["input_ids"]
    assert set(row["token_type_ids"]) == {0, 1}  # two segments
    assert row["length"] == len(row["input_ids"]) <= 32


def test_custom_csv_tsv_and_json_tasks(tmp_path):
    rows = [("good film", "yes"), ("bad film", "no"), ("fine", "yes"), ("awful", "no")] * 10
    (tmp_path / "train.tsv").write_text("review\tsentiment\n" + "\n".join(f"{t}\t{l}" for t, l in rows) + "\n")
    (tmp_path / "eval.tsv").write_text("review\tsentiment\n" + "\n".join(f"{t}\t{l}" for t, l in rows[:8]) + "\n")
    cfg = TaskConfig(
        source=str(tmp_path / "train.tsv"),
        eval_source=str(tmp_path / "eval.tsv"),
        text="review",
        label="sentiment",
        label_names=["no", "yes"],
    )
    _task, train, evaluation = load_raw(resolve_task("reviews", cfg, DATA))
    assert len(train) == 40 and len(evaluation) == 8
    assert train["label"][:2] == [1, 0]  # strings mapped through label_names
    for suffix, write in (("csv", _write_csv), ("json", _write_jsonl)):
        write(tmp_path / f"t.{suffix}", rows)
        cfg = TaskConfig(
            source=str(tmp_path / f"t.{suffix}"),
            eval_source=str(tmp_path / f"t.{suffix}"),
            text="review",
            label="sentiment",
            label_names=["no", "yes"],
        )
        _, train, _ = load_raw(resolve_task("reviews", cfg, DATA))
        assert train["text"][0] == "good film" and train["label"][0] == 1


def test_custom_task_from_a_dataset_folder():
    cfg = TaskConfig(
        source=str(GLUE),
        subset="rte",
        text="sentence1",
        text_pair="sentence2",
        label_names=["entailment", "not_entailment"],
    )
    task, train, evaluation = load_raw(resolve_task("my_rte", cfg, DATA))
    assert len(train) == 2490 and len(evaluation) == 277 and task.num_labels == 2


def _write_csv(path, rows):
    path.write_text("review,sentiment\n" + "\n".join(f"{t},{l}" for t, l in rows) + "\n")


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps({"review": t, "sentiment": l}) for t, l in rows) + "\n")


@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            dict(source="MISSING/train.csv", eval_source="MISSING/e.csv", text="t", label_names=["a"]),
            "data file not found",
        ),
        (dict(source="./missing_folder", text="t", label_names=["a"]), "dataset folder not found"),
        (dict(source=str(GLUE), subset="rte", text="premise"), r"missing column\(s\) \['premise'\]"),
        (dict(source=str(GLUE), subset="rte", text="sentence1", label_names=["a"]), "labels outside the label set"),
        (
            dict(source=str(GLUE), subset="rte", text="sentence1", label_names=["a", "b"], eval_split="test"),
            "split 'test' not in",
        ),
        (dict(source=str(GLUE), subset="rte", text="sentence1"), "give `label_names`"),
        (dict(source=str(GLUE), subset="rte"), "needs `text`"),
    ],
)
def test_bad_custom_tasks_say_what_is_wrong(cfg, message):
    with pytest.raises(InputError, match=message):
        load_raw(resolve_task("custom", TaskConfig(**cfg), DATA))


def test_empty_split_and_unknown_task(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n")
    (tmp_path / "eval.csv").write_text("text,label\nok,0\n")
    cfg = TaskConfig(
        source=str(tmp_path / "train.csv"), eval_source=str(tmp_path / "eval.csv"), text="text", label_names=["a", "b"]
    )
    with pytest.raises(InputError, match="empty"):
        load_raw(resolve_task("custom", cfg, DATA))
    with pytest.raises(InputError, match="unknown task 'cola'"):
        resolve_task("cola", TaskConfig(), DATA)
    with pytest.raises(InputError, match="built-in task; remove text"):
        resolve_task("sst2", TaskConfig(text="x"), DATA)


def test_metrics_match_hand_values():
    labels, preds = [1, 1, 1, 0, 0], [1, 1, 0, 0, 1]
    metrics = compute_metrics(labels, preds, 2)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["f1"] == pytest.approx(2 / 3)  # precision 2/3, recall 2/3
    assert metrics["mcc"] == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 2 * 3 * 2))
    # MRPC's all-positive baseline F1 on the validation split (279 positives of 408): 0.812
    assert compute_metrics([1] * 279 + [0] * 129, [1] * 408, 2)["f1"] == pytest.approx(0.8122, abs=1e-4)
