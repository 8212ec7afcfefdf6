"""The question-answering tables of a study's generative tasks (the analyze stage writes them,
the report's "Question answering" section renders them).

- answers.csv: every model scored on a task's eval split (the baselines that train nothing,
  then each finished run) with SQuAD v2 exact match and F1 over all questions and split by
  whether a question has an answer, as fractions. The numbers are means of the per-question
  scores each model's predictions.csv holds, so they are the scorer's own (metrics.json's, to
  rounding) and the counts behind each group come with them.
- answer_examples.csv: per seed, a few questions on which LoRA and full FT answer differently,
  with the gold answers and the zero-shot base's answer beside theirs: what the two numbers
  mean on real questions."""

from __future__ import annotations

import json
import re

import datasets
import pandas as pd

from lorascope.config import StudyConfig
from lorascope.evaluation import score_answers
from lorascope.prepared import load_prepared
from lorascope.runs import finished_runs
from lorascope.study import Study, Table, stamp_of
from lorascope.tasks import Task

ANSWERS = Table(
    "answers",
    (
        "task",
        "source",
        "method",
        "seed",
        "n",
        "exact",
        "f1",
        "has_ans_n",
        "has_ans_exact",
        "has_ans_f1",
        "no_ans_n",
        "no_ans_exact",
        "no_ans_f1",
        "left_out_eval",
    ),
)
ANSWER_EXAMPLES = Table(
    "answer_examples", ("task", "seed", "id", "question", "gold", "lora", "full", "zero_shot", "lora_f1", "full_f1")
)
ALWAYS_UNANSWERABLE, ZERO_SHOT = "always_unanswerable", "zero_shot"  # the baselines that train nothing
EXAMPLES_PER_SEED = 5
QUESTION_CHARS = 200
NO_ANSWER = "(no answer)"
QUESTION_LINE = re.compile(r"^Question: (.*)$", re.MULTILINE)
# read as written: the empty answer ("no answer") stays "", not NaN, and an id stays a string
PREDICTION_TYPES = {"id": str, "generated": str, "prediction": str, "normalized_prediction": str, "has_answer": bool}


def read_predictions(path) -> pd.DataFrame:
    """A generative predictions.csv (evaluation.GENERATION_COLUMNS) with its texts as written."""
    return pd.read_csv(path, keep_default_na=False, dtype=PREDICTION_TYPES)


def breakdown(predictions: pd.DataFrame) -> dict:
    """Question count, exact match and F1 over all questions, those with an answer (has_ans_)
    and those without (no_ans_); a group without questions has NaN scores, as the SQuAD v2
    scorer leaves it out."""
    has = predictions["has_answer"]
    row = {}
    for prefix, group in (("", predictions), ("has_ans_", predictions[has]), ("no_ans_", predictions[~has])):
        row |= {f"{prefix}n": len(group), f"{prefix}exact": group["exact"].mean(), f"{prefix}f1": group["f1"].mean()}
    return row


def generative_task(study: Study, name: str) -> tuple[Task, datasets.Dataset] | None:
    """(task, eval split) of a prepared generative task; None for a classification task or one
    not prepared yet (the analyze stage reads whatever exists)."""
    if not (study.prepared_dir(name) / "meta.json").is_file():
        return None
    task, splits = load_prepared(study, name)
    return (task, splits["eval"]) if task.generative else None


def left_out_eval(study: Study, name: str) -> int | None:
    """The eval questions the prepare stage left out as longer than model.max_length."""
    meta = json.loads((study.prepared_dir(name) / "meta.json").read_text())
    return meta.get("left_out", {}).get("eval")


def scored_models(study: Study, config: StudyConfig, name: str, task: Task, split: datasets.Dataset) -> dict:
    """{(method, seed): per-question predictions} of every model scored on the eval split:
    "always unanswerable" (SQuAD v2, scored here by the same scorer as every run), the zero-shot
    base when the baselines stage wrote it (seed None), then each finished run by method and seed."""
    scored = {}
    if task.squad:
        scored[ALWAYS_UNANSWERABLE, None] = score_answers(task, split, [""] * len(split)).predictions
    zero_shot = study.baseline_dir(name, ZERO_SHOT)
    if stamp_of(zero_shot) is not None:
        scored[ZERO_SHOT, None] = read_predictions(zero_shot / "predictions.csv")
    for method, seed, _ in finished_runs(study, config, name):
        scored[method, seed] = read_predictions(study.run_dir(name, method, seed) / "predictions.csv")
    return scored


def answer_rows(name: str, scored: dict, left_out: int | None) -> list[dict]:
    """One answers.csv row per scored model, in `scored`'s order (baselines first)."""
    return [
        {
            "task": name,
            "source": "baseline" if seed is None else "run",
            "method": method,
            "seed": seed,
            **breakdown(predictions),
            "left_out_eval": left_out,
        }
        for (method, seed), predictions in scored.items()
    ]


def question_text(prompt: str) -> str:
    """The prompt's "Question: ..." line (the whole prompt when it has none), one line, short."""
    found = QUESTION_LINE.search(prompt)
    text = " ".join((found.group(1) if found else prompt).split())
    return text if len(text) <= QUESTION_CHARS else text[: QUESTION_CHARS - 1] + "…"


def answer_text(answer: str) -> str:
    return answer or NO_ANSWER


def questions(split: datasets.Dataset) -> pd.DataFrame:
    """id, question and gold answers (distinct, in order, joined by " | ") of each eval question."""
    rows = split.select_columns(["id", "prompt", "answers"]).to_list()
    return pd.DataFrame(
        {
            "id": [row["id"] for row in rows],
            "question": [question_text(row["prompt"]) for row in rows],
            "gold": [answer_text(" | ".join(dict.fromkeys(row["answers"]["text"]))) for row in rows],
        }
    )


def disagreements(lora: pd.DataFrame, full: pd.DataFrame) -> pd.DataFrame:
    """Up to EXAMPLES_PER_SEED questions whose normalized answers differ between the two runs:
    first those exactly one of them gets exactly right (where the methods' scores part), then
    the others, each by id, so the choice is the same on every rerun."""
    columns = ["id", "prediction", "normalized_prediction", "exact", "f1"]
    pair = lora[columns].merge(full[columns], on="id", suffixes=("_lora", "_full"))
    differ = pair[pair["normalized_prediction_lora"] != pair["normalized_prediction_full"]]
    differ = differ.assign(one_right=differ["exact_lora"] != differ["exact_full"])
    return differ.sort_values(["one_right", "id"], ascending=[False, True]).head(EXAMPLES_PER_SEED)


def example_rows(name: str, scored: dict, split: datasets.Dataset) -> list[dict]:
    """answer_examples.csv's rows of one task: for each seed both methods finished, the
    questions `disagreements` picks, with the zero-shot base's answer when it was scored."""
    zero_shot = scored.get((ZERO_SHOT, None))
    base = dict(zip(zero_shot["id"], zero_shot["prediction"])) if zero_shot is not None else {}
    asked = questions(split).set_index("id")
    seeds = sorted({seed for method, seed in scored if method == "lora" and ("full", seed) in scored})
    rows = []
    for seed in seeds:
        for r in disagreements(scored["lora", seed], scored["full", seed]).itertuples():
            rows.append(
                {
                    "task": name,
                    "seed": seed,
                    "id": r.id,
                    "question": asked.loc[r.id, "question"],
                    "gold": asked.loc[r.id, "gold"],
                    "lora": answer_text(r.prediction_lora),
                    "full": answer_text(r.prediction_full),
                    "zero_shot": answer_text(base[r.id]) if r.id in base else None,
                    "lora_f1": r.f1_lora,
                    "full_f1": r.f1_full,
                }
            )
    return rows


def write_answer_tables(study: Study, config: StudyConfig) -> None:
    """answers.csv and answer_examples.csv of the study's generative tasks. A study without one
    writes neither, and drops those an earlier config left, so the report shows no stale task."""
    answers, examples = [], []
    for name in config.tasks:
        found = generative_task(study, name)
        if found is None:
            continue
        task, split = found
        scored = scored_models(study, config, name, task, split)
        answers += answer_rows(name, scored, left_out_eval(study, name))
        examples += example_rows(name, scored, split)
    if not answers:
        for table in (ANSWERS, ANSWER_EXAMPLES):
            table.path(study.tables).unlink(missing_ok=True)
        return
    ANSWERS.write(study.tables, pd.DataFrame(answers).astype({"seed": "Int64"}))
    ANSWER_EXAMPLES.write(study.tables, examples)
