"""SQuAD v2 scoring against the official script's numbers on the full dev set, and hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, Features, Sequence, Value

from lorascope.squad import (
    ROW_COLUMNS,
    SCORE_KEYS,
    exact_match,
    normalize_answer,
    squad_v2_rows,
    squad_v2_scores,
    token_f1,
)

SQUAD_V2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad_v2"
FEATURES = Features(  # Sequence, not List: List is datasets >= 4, the project allows >= 3
    {
        "id": Value("string"),
        "title": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": {"text": Sequence(Value("string")), "answer_start": Sequence(Value("int32"))},
    }
)


def squad(*questions: tuple[str, list[str]]) -> Dataset:
    """A dataset with SQuAD v2's columns: (id, gold answer texts) per question, [] = unanswerable."""
    return Dataset.from_dict(
        {
            "id": [qid for qid, _ in questions],
            "title": ["t"] * len(questions),
            "context": ["c"] * len(questions),
            "question": ["q"] * len(questions),
            "answers": [{"text": texts, "answer_start": [0] * len(texts)} for _, texts in questions],
        },
        features=FEATURES,
    )


@pytest.mark.skipif(not SQUAD_V2.is_dir(), reason=f"no SQuAD v2 copy at {SQUAD_V2} (the shared data beside the clone)")
def test_official_bert_predictions_score_as_the_official_script():
    from datasets import load_dataset

    validation = load_dataset(str(SQUAD_V2), split="validation")
    predictions = json.loads((SQUAD_V2 / "reference" / "bert_single_predictions.json").read_text())
    scores = squad_v2_scores(predictions, validation)
    # evaluate-v2.0.py on the same predictions (shared/data/squad_v2/README.md)
    official = {
        "exact": 78.75010528088941,
        "f1": 81.78370299490027,
        "HasAns_exact": 74.12280701754386,
        "HasAns_f1": 80.19870203415155,
        "NoAns_exact": 83.36417157275021,
        "NoAns_f1": 83.36417157275021,  # gold "" for every NoAns question: F1 is exact match
    }
    assert list(scores) == list(SCORE_KEYS)
    assert (scores["total"], scores["HasAns_total"], scores["NoAns_total"]) == (11873, 5928, 5945)
    for key, value in official.items():
        assert scores[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("a cat, an owl and the dog", "cat owl and dog"),
        ("Theatre anatomy", "theatre anatomy"),  # articles only as whole words
        ("  New\tYork \n City ", "new york city"),
        ("U.S.A.!", "usa"),
        ("the-the", "thethe"),  # punctuation goes first, so the joined word is no article
        ("(a) the", ""),
        ("Rock 'n' Roll", "rock n roll"),
        ("O’Neill", "o’neill"),  # typographic quote: not in string.punctuation, kept
        ("“The Answer”", "“ answer”"),  # kept quotes, article still removed (a word boundary)
        ("1990–1991 — ÉCOLE", "1990–1991 — école"),  # dashes kept, Unicode lower case
        ("Paris\u00a0France", "paris france"),  # non-breaking space is whitespace
        ("", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_compares_normalised_answers():
    assert exact_match("The Broncos", "broncos.") == 1
    assert exact_match("Denver Broncos", "Broncos") == 0
    assert exact_match("", "the") == 1  # "the" normalises to nothing: an abstention


def test_token_f1_hand_computed():
    # gold tokens [cat, sat, on, mat], predicted [cat, on, mat, today]: 3 shared, P = R = 3/4
    assert token_f1("The cat sat on the mat", "a cat on a mat today") == pytest.approx(0.75)
    # repeated tokens count as a multiset: gold [new, york, new, york], predicted [new, york]
    assert token_f1("New York New York", "new york") == pytest.approx(2 * 1 * 0.5 / 1.5)
    # predicted [new, new, new]: 2 shared; P = 2/3, R = 2/4, F1 = 4/7
    assert token_f1("New York New York", "new new new") == pytest.approx(4 / 7)
    assert token_f1("Denver Broncos", "Carolina Panthers") == 0.0
    assert token_f1("Denver Broncos", "") == 0.0
    assert token_f1("", "Denver") == 0.0
    assert token_f1("", "") == 1.0


def test_unanswerable_question():
    dataset = squad(("q1", []), ("q2", []))
    scores = squad_v2_scores({"q1": "", "q2": "Broncos"}, dataset)
    rows = squad_v2_rows({"q1": "", "q2": "Broncos"}, dataset)
    assert [(row["exact"], row["f1"]) for row in rows] == [(1, 1.0), (0, 0.0)]
    assert scores == {"exact": 50.0, "f1": 50.0, "total": 2, "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2}


def test_answerable_question_predicted_empty_scores_zero():
    rows = squad_v2_rows({"q": ""}, squad(("q", ["Denver Broncos"])))
    assert (rows[0]["exact"], rows[0]["f1"]) == (0, 0.0)


def test_several_gold_answers_take_the_maximum_of_each_measure():
    dataset = squad(("q1", ["Denver Broncos", "the Broncos"]), ("q2", ["Carolina Panthers", "Panthers of Carolina"]))
    rows = squad_v2_rows({"q1": "Broncos", "q2": "Panthers"}, dataset)
    assert (rows[0]["exact"], rows[0]["f1"]) == (1, 1.0)  # "the Broncos" normalises to "broncos"
    # q2: F1 2/3 against the first gold (P 1, R 1/2), 1/2 against the second; no exact match
    assert (rows[1]["exact"], rows[1]["f1"]) == (0, pytest.approx(2 / 3))


def test_gold_answers_that_normalise_to_nothing_are_dropped():
    rows = squad_v2_rows({"q1": "", "q2": "x"}, squad(("q1", ["The", "Paris"]), ("q2", ["!!", "?"])))
    assert (rows[0]["exact"], rows[0]["f1"], rows[0]["has_answer"]) == (0, 0.0, True)  # gold "the" is gone
    # every gold normalises to nothing: the gold is "", yet the question still counts as HasAns
    assert (rows[1]["exact"], rows[1]["f1"], rows[1]["has_answer"]) == (0, 0.0, True)
    assert squad_v2_scores({"q1": "", "q2": ""}, squad(("q2", ["!!", "?"])))["HasAns_exact"] == 100.0


def test_missing_predictions_score_zero_in_every_total():
    dataset = squad(("a1", ["Denver Broncos"]), ("a2", ["Santa Clara"]), ("n1", []), ("n2", []))
    predictions = {"a1": "Denver Broncos", "n1": "", "other": "ignored: not in the dataset"}
    assert squad_v2_scores(predictions, dataset) == {
        "exact": 50.0,
        "f1": 50.0,
        "total": 4,
        "HasAns_exact": 50.0,
        "HasAns_f1": 50.0,
        "HasAns_total": 2,
        "NoAns_exact": 50.0,
        "NoAns_f1": 50.0,
        "NoAns_total": 2,
    }
    missing = squad_v2_rows(predictions, dataset)[1]
    assert missing == {
        "id": "a2",
        "has_answer": True,
        "prediction": None,
        "normalized_prediction": None,
        "exact": 0,
        "f1": 0.0,
    }


def test_rows_follow_the_dataset_and_average_to_the_scores():
    dataset = squad(("q1", ["The Eiffel Tower"]), ("q2", []), ("q3", ["cat sat on the mat"]))
    predictions = {"q3": "a cat on a mat today", "q1": "Eiffel tower!", "q2": "Paris"}
    rows = squad_v2_rows(predictions, dataset)
    assert [list(row) for row in rows] == [list(ROW_COLUMNS)] * 3
    assert [(row["id"], row["prediction"], row["normalized_prediction"]) for row in rows] == [
        ("q1", "Eiffel tower!", "eiffel tower"),
        ("q2", "Paris", "paris"),
        ("q3", "a cat on a mat today", "cat on mat today"),
    ]
    scores = squad_v2_scores(predictions, dataset)
    assert scores["exact"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0 + 0.75) / 3)
    assert scores["HasAns_f1"] == pytest.approx(100 * 1.75 / 2)
    assert scores["NoAns_exact"] == 0.0


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="no questions"):
        squad_v2_scores({}, squad())
