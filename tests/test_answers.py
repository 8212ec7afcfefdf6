"""The question-answering tables and their report section, on a SQuAD v2 study whose splits the
prepare stage wrote (tiny Llama, MiniLM's tokenizer) and whose runs and zero-shot baseline are
scored by the evaluation path's own scorer from made-up answers: no model generates, so the
module takes seconds. The breakdown equals metrics.json's, the examples really disagree, the
report renders the tables' numbers, and a classification study has neither tables nor section."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lorascope import answers, report, runs
from lorascope.answers import ANSWER_EXAMPLES, ANSWERS
from lorascope.config_io import load_config
from lorascope.evaluation import score_answers
from lorascope.prepared import load_prepared, prepare_tasks
from lorascope.squad import normalize_answer
from lorascope.stages.analyze import STAGE as ANALYZE
from lorascope.stages.baselines import always_unanswerable
from lorascope.study import Study, current_dir

SCORES = ("exact", "f1", "has_ans_exact", "has_ans_f1", "no_ans_exact", "no_ans_f1")
FAILED = ("full", 2)  # a run that failed: in no table here


def section_of(md: str, heading: str) -> str:
    start = md.index(f"\n## {heading}\n")
    end = md.find("\n## ", start + 1)
    return md[start : end if end > 0 else None]


def pipe_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of `text` as rows of cells, the separator row left out."""
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
    return [[line[2:-2].split(" | ") for line in t if not line.startswith("|---")] for t in tables]


def made_up_answers(split, rng: np.random.Generator) -> list[str]:
    """Per question: its first gold answer, "unanswerable", a part of the gold answer or a wrong one."""
    out = []
    for answer in split["answers"]:
        gold = answer["text"][0] if answer["text"] else "nothing"
        out.append([gold, "Unanswerable.", gold.split()[0] + " extra words", "the wrong span"][rng.integers(4)])
    return out


def write_scored(folder, task, split, generated: list[str], fields: dict) -> dict:
    """metrics.json and predictions.csv of one scored model, as train_run and the zero-shot
    baseline write them (the Evaluation of evaluation.score_answers), stamped."""
    evaluation = score_answers(task, split, generated)
    result = {
        **fields,
        "status": "ok",
        "primary_metric": "f1",
        "primary_value": evaluation.metrics["f1"],
        "accuracy": None,
        **evaluation.metrics,
    }
    with current_dir(folder, "synthetic") as scratch:
        evaluation.predictions.to_csv(scratch / "predictions.csv", index=False)
        (scratch / "metrics.json").write_text(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def qa_study(tiny_llama_dir, squad_sample, tmp_path_factory) -> Study:
    config = load_config(
        None,
        "smoke",
        [
            f"model.name={tiny_llama_dir}",
            "model.max_length=200",
            "tasks={squad_v2: {train_max: 16, eval_max: 40, unanswerable_share: 0.25}}",
            f"data.squad_v2={squad_sample}",
            "data.dev_max=4",
            "seeds=[1, 2]",
            "runtime.progress=false",
        ],
    )
    study = Study(tmp_path_factory.mktemp("qa") / "study")
    study.root.mkdir()
    study.write_config(config)
    prepare_tasks(study, config)
    task, splits = load_prepared(study, "squad_v2")
    split = splits["eval"]
    zero_shot = write_scored(
        study.baseline_dir("squad_v2", "zero_shot"),
        task,
        split,
        made_up_answers(split, np.random.default_rng(0)),
        {"task": "squad_v2", "method": "base"},
    )
    for method in config.methods:
        for seed in config.seeds:
            folder = study.run_dir("squad_v2", method, seed)
            fields = {"task": "squad_v2", "method": method, "seed": seed}
            if (method, seed) == FAILED:
                folder.mkdir(parents=True)
                (folder / "metrics.json").write_text(json.dumps({**fields, "status": "failed", "error": "boom"}))
                continue
            rng = np.random.default_rng([seed, config.methods.index(method) + 1])
            write_scored(folder, task, split, made_up_answers(split, rng), fields)
    runs.write_performance_table(study)
    rows = [always_unanswerable(task, splits), {"baseline": "zero_shot", **zero_shot}]
    rows = [row | {"passed": None} for row in rows]
    runs.BASELINES.write(study.tables, rows)
    ANALYZE.run(study, config)
    report.write_report(study.root)
    return study


def test_one_row_per_scored_model_with_the_scorers_numbers(qa_study):
    table = ANSWERS.read(qa_study.tables)
    assert list(zip(table["source"], table["method"], table["seed"].astype("Int64"))) == [
        ("baseline", "always_unanswerable", pd.NA),
        ("baseline", "zero_shot", pd.NA),
        ("run", "lora", 1),
        ("run", "lora", 2),
        ("run", "full", 1),
    ]
    _, splits = load_prepared(qa_study, "squad_v2")
    meta = json.loads((qa_study.prepared_dir("squad_v2") / "meta.json").read_text())
    assert meta["left_out"]["eval"] > 0  # contexts longer than model.max_length: counted, not scored
    assert (table["n"] == len(splits["eval"])).all() and (table["left_out_eval"] == meta["left_out"]["eval"]).all()
    for row in table[table["source"] == "run"].itertuples():
        folder = qa_study.run_dir("squad_v2", row.method, int(row.seed))
        metrics = json.loads((folder / "metrics.json").read_text())
        for score in SCORES:
            assert getattr(row, score) == pytest.approx(metrics[score], abs=1e-12, rel=0), (row.method, score)
        predictions = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
        has = predictions[predictions["has_answer"]]
        assert row.has_ans_n == len(has) and row.has_ans_f1 == pytest.approx(has["f1"].mean(), abs=1e-12)
        assert row.no_ans_n == len(predictions) - len(has)


def test_always_unanswerable_scores_the_share_without_answer(qa_study):
    row = ANSWERS.read(qa_study.tables).iloc[0]
    share = row.no_ans_n / row.n
    assert 0 < share < 1 and row.exact == pytest.approx(share) and row.f1 == pytest.approx(share)
    assert (row.has_ans_exact, row.has_ans_f1, row.no_ans_exact, row.no_ans_f1) == (0, 0, 1, 1)
    baselines = runs.BASELINES.read(qa_study.tables).set_index("baseline")
    assert baselines.loc["always_unanswerable", "exact"] == pytest.approx(row.exact, abs=1e-12)
    zero_shot = ANSWERS.read(qa_study.tables).iloc[1]
    assert baselines.loc["zero_shot", "f1"] == pytest.approx(zero_shot.f1, abs=1e-12)


def test_examples_are_questions_the_two_methods_answer_differently(qa_study):
    examples = ANSWER_EXAMPLES.read(qa_study.tables)
    assert set(examples["seed"]) == {1}  # seed 2's full FT failed: no pair
    assert len(examples) == answers.EXAMPLES_PER_SEED
    _, splits = load_prepared(qa_study, "squad_v2")
    eval_rows = {row["id"]: row for row in splits["eval"].to_list()}
    base = answers.read_predictions(qa_study.baseline_dir("squad_v2", "zero_shot") / "predictions.csv")
    base = dict(zip(base["id"], base["prediction"]))
    plain = {answers.NO_ANSWER: ""}
    for row in examples.itertuples():
        assert normalize_answer(plain.get(row.lora, row.lora)) != normalize_answer(plain.get(row.full, row.full))
        question = eval_rows[str(row.id)]
        assert f"Question: {row.question}\n" in question["prompt"]
        assert row.gold.split(" | ")[0] == (question["answers"]["text"] or [answers.NO_ANSWER])[0]
        assert plain.get(row.zero_shot, row.zero_shot) == base[str(row.id)]
    one_right = (examples["lora_f1"] == 1) != (examples["full_f1"] == 1)
    assert one_right.iloc[0] and list(one_right) == sorted(one_right, reverse=True)  # one right first
    before = ANSWER_EXAMPLES.path(qa_study.tables).read_text()
    answers.write_answer_tables(qa_study, qa_study.load_config())
    assert ANSWER_EXAMPLES.path(qa_study.tables).read_text() == before  # the same choice on a rerun


def test_question_text_is_one_short_line():
    assert answers.question_text("Context: a\nQuestion: Who  was\tit?\nAnswer:") == "Who was it?"
    long = answers.question_text("no question line " * 40)
    assert len(long) == answers.QUESTION_CHARS and long.endswith("…") and long.startswith("no question line")


def test_report_renders_the_tables_in_points(qa_study):
    md = (qa_study.root / "report.md").read_text()
    assert md.index("## Task performance") < md.index("## Question answering") < md.index("## Method comparison")
    section = section_of(md, "Question answering")
    scores, examples = pipe_tables(section)
    table = ANSWERS.read(qa_study.tables)
    assert [r[0] for r in scores[1:]] == ["always unanswerable", "zero-shot base", "LoRA", "LoRA", "full FT"]
    for line, row in zip(scores[1:], table.itertuples()):
        assert line[2:] == [f"{100 * getattr(row, s):.1f}" for s in SCORES]
    first = table.iloc[0]
    assert f"{first.n} eval questions scored: {first.has_ans_n} with an answer (HasAns), {first.no_ans_n}" in section
    assert f"{first.left_out_eval} eval question(s) of the source were left out" in section
    assert len(examples) == 1 + answers.EXAMPLES_PER_SEED and examples[0][3] == "LoRA"
    assert "Neither drift nor forgetting has been measured for the runs on squad_v2 yet." in section


def test_missing_tables_read_not_run_in_a_generative_study(qa_study, tmp_path):
    (tmp_path / "tables").mkdir()
    for name in ("performance", "baselines"):
        (tmp_path / "tables" / f"{name}.csv").write_text((qa_study.tables / f"{name}.csv").read_text())
    md = report.write_report(tmp_path)[0].read_text()
    assert "*not run: tables/answers.csv missing or empty; run `lorascope analyze STUDY`*" in md
    assert "question answering" in md.split("Not run: ")[1].split(".")[0]


def test_a_classification_study_has_neither_table_nor_section(tiny_study_config, tmp_path):
    config = tiny_study_config("seeds=[1]")
    study = Study(tmp_path / "classification")
    study.root.mkdir()
    study.write_config(config)
    prepare_tasks(study, config)
    for method in config.methods:
        folder = study.run_dir("sst2", method, 1)
        folder.mkdir(parents=True)
        metrics = {"task": "sst2", "method": method, "seed": 1, "status": "ok", "primary_metric": "accuracy"}
        (folder / "metrics.json").write_text(json.dumps(metrics | {"primary_value": 0.8, "accuracy": 0.8, "f1": 0.7}))
    runs.write_performance_table(study)
    ANSWERS.write(study.tables, [])  # left by an earlier config: dropped
    ANALYZE.run(study, config)
    assert not ANSWERS.path(study.tables).exists() and not ANSWER_EXAMPLES.path(study.tables).exists()
    md = report.write_report(study.root)[0].read_text()
    assert "## Task performance" in md and "question answering" not in md.lower()
