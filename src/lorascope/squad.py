"""SQuAD v2 scoring, as the official evaluation script (evaluate-v2.0.py) scores.

Written here because the `evaluate` library's `squad_v2` metric downloads its script from the
Hugging Face Hub, which an offline study cannot reach; the whole scorer is a few dozen lines.

- An answer is normalised by lower-casing, removing ASCII punctuation (`string.punctuation`, as the
  official script: typographic quotes and dashes stay), replacing the articles a / an / the by a
  space and collapsing whitespace (`normalize_answer`).
- A prediction is a string, and `""` means "no answer": whoever produces predictions maps a
  model's way of abstaining (e.g. a generated "unanswerable") to `""` before scoring.
- Gold answers that normalise to nothing are dropped; a question left without one (an unanswerable
  question, `answers.text == []`) has the single gold answer `""`. Exact match and token F1 are
  the maximum over the gold answers; when either side is empty, F1 is 1 if both are, else 0.
- `HasAns` / `NoAns` split the questions by whether `answers.text` is non-empty. Scores are in
  percent, summed in the dataset's order, as the official script sums them.

One deliberate difference: the official script skips a question missing from the predictions,
dropping it from the overall total, and then fails with a KeyError on the HasAns / NoAns breakdown.
Here a missing question scores 0 (exact and F1) in every total, which is the total of the
dataset. With every question predicted, as on the leaderboard, the two agree (tests/test_squad.py
checks the official "BERT (single model)" predictions on the full dev set to 1e-9).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping

from datasets import Dataset

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)

# The per-question rows of `squad_v2_rows`, in order; `prediction` and `normalized_prediction`
# are None for a question missing from the predictions.
ROW_COLUMNS = ("id", "has_answer", "prediction", "normalized_prediction", "exact", "f1")

SCORE_KEYS = (
    "exact",
    "f1",
    "total",
    "HasAns_exact",
    "HasAns_f1",
    "HasAns_total",
    "NoAns_exact",
    "NoAns_f1",
    "NoAns_total",
)


def normalize_answer(text: str) -> str:
    """Lower case, ASCII punctuation removed, articles removed, whitespace collapsed (in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def token_f1(gold: str, prediction: str) -> float:
    """F1 of the normalised tokens' overlap (a multiset); 1 if both are empty, 0 if only one is."""
    gold_tokens, predicted_tokens = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not predicted_tokens:
        return float(gold_tokens == predicted_tokens)
    same = sum((Counter(gold_tokens) & Counter(predicted_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_v2_rows(predictions: Mapping[str, str], dataset: Dataset) -> list[dict]:
    """One row per question of `dataset`, in its order, with the columns of ROW_COLUMNS; exact is
    0 or 1, f1 in [0, 1]. Predictions for ids not in `dataset` are ignored."""
    rows = []
    for example in dataset.select_columns(["id", "answers"]):
        texts = example["answers"]["text"]
        golds = [text for text in texts if normalize_answer(text)] or [""]
        prediction = predictions.get(example["id"])
        if prediction is None:
            normalized, exact, f1 = None, 0, 0.0
        else:
            normalized = normalize_answer(prediction)
            exact = max(exact_match(gold, prediction) for gold in golds)
            f1 = max(token_f1(gold, prediction) for gold in golds)
        rows.append(dict(zip(ROW_COLUMNS, (example["id"], bool(texts), prediction, normalized, exact, f1))))
    return rows


def squad_v2_scores(predictions: Mapping[str, str], dataset: Dataset) -> dict[str, float | int]:
    """The official script's `exact`, `f1` and `total`, and the same for the HasAns_ and NoAns_
    questions, exact and f1 in percent. A group without questions is left out, as the official
    script leaves it out."""
    return scores_of_rows(squad_v2_rows(predictions, dataset))


def scores_of_rows(rows: list[dict]) -> dict[str, float | int]:
    """`squad_v2_scores` of rows `squad_v2_rows` made."""
    if not rows:
        raise ValueError("squad_v2_scores: the dataset has no questions")
    groups = {
        "": rows,
        "HasAns_": [row for row in rows if row["has_answer"]],
        "NoAns_": [row for row in rows if not row["has_answer"]],
    }
    scores: dict[str, float | int] = {}
    for prefix, group in groups.items():
        if group:
            scores[f"{prefix}exact"] = 100.0 * sum(row["exact"] for row in group) / len(group)
            scores[f"{prefix}f1"] = 100.0 * sum(row["f1"] for row in group) / len(group)
            scores[f"{prefix}total"] = len(group)
    return scores
