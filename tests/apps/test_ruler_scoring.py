"""RULER's score on hand-made cases: the share of the expected strings found in the answer."""

from __future__ import annotations

import math

import pytest

from squeeze.apps.eval.ruler.scoring import postprocess, score, string_match_all
from squeeze.apps.eval.summary import task_score


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        (" 1234567.", ["1234567"], 1.0),
        ("The number is 7654321", ["1234567"], 0.0),
        ("1234567 and 2345678", ["1234567", "2345678", "3456789", "4567890"], 0.5),
        ("ALPHA beta", ["alpha", "Beta"], 1.0),  # case is ignored
        ("12345678", ["1234567"], 1.0),  # a substring counts (RULER's rule)
        ("", ["x"], 0.0),
        ("VAR AAAAA\x00BBBBB", ["AAAAA", "BBBBB", "CCCCC"], 2 / 3),
        ("gentle-harbor", ["gentle harbor"], 0.0),  # no normalisation beyond case
    ],
)
def test_string_match_all(prediction, answers, expected):
    assert string_match_all(prediction, answers) == pytest.approx(expected)
    assert score(prediction, answers).score == pytest.approx(expected)
    assert score(prediction, answers).failures == []


def test_postprocess_and_empty_answers():
    assert postprocess("  a\tb\n\x1fc  ") == "a\nb\n\nc"
    with pytest.raises(ValueError, match="answers"):
        string_match_all("x", [])


def test_task_score():
    assert task_score([1.0, 0.5, 0.0, 0.25]) == 43.75
    assert task_score([1 / 3]) == 33.33
    assert math.isnan(task_score([]))
