"""Report section on question answering (generative tasks): exact match and F1 of every scored
model, over all eval questions and split by whether a question has an answer, and questions
on which LoRA and full FT answer differently. Numbers come from answers.csv and
answer_examples.csv (the analyze stage); a study without a generative task has no section."""

from __future__ import annotations

import pandas as pd

from lorascope.report.document import Document
from lorascope.report.figures import finite, method_label
from lorascope.report.loader import ANALYZE, StudyView

BASELINE_LABELS = {"always_unanswerable": "always unanswerable", "zero_shot": "zero-shot base"}
SCORES = ("exact", "f1", "has_ans_exact", "has_ans_f1", "no_ans_exact", "no_ans_f1")
SCORE_HEADERS = ("EM", "F1", "HasAns EM", "HasAns F1", "NoAns EM", "NoAns F1")
POINTERS = {  # table -> the section that renders it, for the runs of a task it has rows of
    "drift_summary": "**Representational drift** shows how far they moved from the base model",
    "forgetting": "**Forgetting** shows what they lost on other tasks",
}


def missing(view: StudyView) -> str | None:
    """Why the section is not run: its table is missing while runs were scored by generation
    (they have an exact match); None when it is there or the study has no generative run."""
    performance = view.tables["performance"]
    generative = performance is not None and "exact" in performance and performance["exact"].notna().any()
    return f"{view.why['answers']}; {ANALYZE}" if generative and view.tables["answers"] is None else None


def points(value) -> str:
    """A fraction in points, one decimal."""
    return f"{100 * float(value):.1f}" if finite(value) else "—"


def model_label(row) -> str:
    return BASELINE_LABELS.get(row.method, row.method) if row.source == "baseline" else method_label(row.method)


def seed_text(seed) -> str:
    return str(int(seed)) if finite(seed) else ""


def count_text(values: pd.Series) -> str:
    """One count, or its range where the models were scored on different numbers of questions."""
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}–{high}"


def scores_table(doc: Document, rows: pd.DataFrame) -> None:
    """One line per model: the baselines first, then the runs by method and seed (the writer's order)."""
    doc.table(
        ["model", "seed", *SCORE_HEADERS],
        [[model_label(r), seed_text(r.seed), *(points(getattr(r, s)) for s in SCORES)] for r in rows.itertuples()],
    )


def counts_sentence(view: StudyView, rows: pd.DataFrame) -> str:
    """How many questions each score is over, and how many the prepare stage left out."""
    max_length = (view.config.get("model") or {}).get("max_length", "model.max_length")
    left_out = rows["left_out_eval"].iloc[0]
    left = (
        f"{int(left_out)} eval question(s) of the source were left out before the eval split was drawn, as "
        f"longer than model.max_length ({max_length} tokens) with their answer or the generated tokens"
        if finite(left_out)
        else "how many eval questions were left out as longer than model.max_length is not recorded"
    )
    return (
        f"{count_text(rows['n'])} eval questions scored: {count_text(rows['has_ans_n'])} with an answer (HasAns), "
        f"{count_text(rows['no_ans_n'])} without (NoAns); {left}."
    )


def examples_table(doc: Document, examples: pd.DataFrame | None) -> None:
    """Questions where the two methods' answers differ, per seed (F1 in points beside each answer)."""
    if examples is None or examples.empty:
        doc.para("No question where LoRA and full FT of one seed answer differently (or no seed ran both).")
        return
    doc.para(
        "Questions where LoRA and full FT of one seed answer differently (after SQuAD normalisation), those "
        "exactly one of them gets exactly right first, up to five per seed:"
    )
    doc.table(
        ["seed", "question", "gold", "LoRA", "LoRA F1", "full FT", "full FT F1", "zero-shot base"],
        [
            [
                seed_text(r.seed),
                str(r.question),
                str(r.gold),
                str(r.lora),
                points(r.lora_f1),
                str(r.full),
                points(r.full_f1),
                str(r.zero_shot) if isinstance(r.zero_shot, str) else "—",
            ]
            for r in examples.itertuples()
        ],
    )


def covers(view: StudyView, name: str, task: str) -> bool:
    table = view.tables[name]
    return table is not None and bool((table["task"] == task).any())


def pointers(view: StudyView, task: str) -> str:
    """Where the report shows what else these runs changed, naming only the sections that cover `task`."""
    found = [text for name, text in POINTERS.items() if covers(view, name, task)]
    if not found:
        return f"Neither drift nor forgetting has been measured for the runs on {task} yet."
    return f"For the runs on {task}, " + "; ".join(found) + "."


def answers_section(doc: Document, view: StudyView) -> None:
    answers, why = view.tables["answers"], missing(view)
    if answers is None and why is None:
        return  # no generative task: nothing to say
    doc.heading(2, "Question answering")
    if answers is None:
        doc.not_run(why)
        return
    doc.para(
        "SQuAD v2 scores of the generated answers on the eval split, in points: exact match (EM) and token F1 "
        "over all questions, and over the questions with an answer (HasAns) and without (NoAns, where only "
        "answering that there is none scores). The baselines train nothing: 'always unanswerable' scores the "
        "NoAns share; the zero-shot base is where fine-tuning starts."
    )
    examples = view.tables["answer_examples"]
    for task in view.tasks(answers):
        rows = answers[answers["task"] == task]
        doc.heading(3, f"{task} — answers")
        scores_table(doc, rows)
        doc.para(counts_sentence(view, rows))
        examples_table(doc, examples[examples["task"] == task] if examples is not None else None)
        doc.para(pointers(view, task), css="note")
    doc.para("Per question: each run's predictions.csv; tables/answers.csv, tables/answer_examples.csv.", css="note")
