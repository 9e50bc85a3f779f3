"""RULER's score: the share of the expected strings found in the answer.

A record scores ``sum(answer.lower() in prediction.lower() for answer in answers) / len(answers)``
(RULER's ``string_match_all``, which all of its synthetic tasks use), after RULER's clean-up of
the prediction (stripped, control characters turned into newlines). A task's score is
``round(100 * mean, 2)`` over its records; the suite's score at a length is the plain mean of its
task scores, and over lengths the mean of those.
"""

from __future__ import annotations

import re

from ..results import ScoreDetails

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's clean-up: strip, control characters → ``\\n``, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers) -> float:
    """The share of ``answers`` (a non-empty list of strings) found in ``prediction``, ignoring case."""
    answers = list(answers)
    if not answers:
        raise ValueError("answers must not be empty")
    pred = postprocess(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def score(prediction: str, answers) -> ScoreDetails:
    """:func:`string_match_all` as the runner's :class:`ScoreDetails` (RULER's metric cannot fail)."""
    return ScoreDetails(string_match_all(prediction, answers))
