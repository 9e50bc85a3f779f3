"""LongBench's scoring, reproduced exactly (``LongBench/metrics.py`` and ``eval.py``, MIT).

``score(task, prediction, answers, all_classes)`` is one record's score in [0, 1]: the first-line
rule for trec / triviaqa / samsum / lsht, then the maximum of the task's metric over the answers.
A task's score is ``round(100 * mean, 2)`` (:func:`task_score`).

Packages: ``rouge`` 1.0.1 (pltrdy; not ``rouge-score``, which scores differently) for rouge and
rouge_zh, ``jieba`` for the Chinese metrics. ``code_sim`` is fuzzywuzzy 0.18's ``fuzz.ratio`` with
its pure-Python backend (``difflib.SequenceMatcher``, rounded half to even), computed here
without importing fuzzywuzzy: installing python-Levenshtein changes fuzzywuzzy's backend, and its
scores (``ratio("tide", "diet")`` is 25 with difflib, 50 with Levenshtein), so we pin difflib.

Rouge raises on empty predictions and, through its recursive LCS, on long sentence pairs; LongBench
scores those 0 (a bare ``except``). :func:`score_details` scores them 0 too but reports each failure,
so that the runner can count them.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from functools import cache

from ..results import ScoreDetails
from ..summary import task_score
from .tasks import FIRST_LINE_TASKS, get_task

_ASCII_PUNCT = frozenset(string.punctuation)
# LongBench's Chinese punctuation list, plus ASCII punctuation (normalize_zh_answer)
_ZH_PUNCT = _ASCII_PUNCT | frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_INTEGERS = re.compile(r"\d+")


# ---- normalisation ---------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """English: lower-case, drop ASCII punctuation, articles → spaces, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese: lower-case, drop ASCII and CJK punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCT).split())


def first_line(prediction: str) -> str:
    """The first line after leading newlines (only ``\\n`` counts, as in LongBench)."""
    return prediction.lstrip("\n").split("\n")[0]


@cache
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def _cut(text: str) -> list[str]:
    return list(_jieba().cut(text, cut_all=False))


# ---- metrics: (prediction, ground_truth, all_classes, failures) -> float -------------------------
def token_f1(pred_tokens: list[str], truth_tokens: list[str]) -> float:
    """F1 of the multiset overlap; 0 without overlap."""
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, truth: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(truth).split())


def qa_f1_zh(prediction: str, truth: str, **_) -> float:
    def tokens(text):
        return [t for t in (normalize_zh_answer(w) for w in _cut(text)) if t]

    return token_f1(tokens(prediction), tokens(truth))


def rouge(prediction: str, truth: str, failures: list | None = None, **_) -> float:
    """ROUGE-L F of pltrdy ``rouge`` (``get_scores(avg=True)``); a failure scores 0."""
    from rouge import Rouge

    try:
        return Rouge().get_scores([prediction], [truth], avg=True)["rouge-l"]["f"]
    except RecursionError:
        kind = "recursion"
    except ValueError:
        kind = "empty"
    except Exception as err:  # LongBench: bare except → 0; we count it as well
        kind = type(err).__name__
    if failures is not None:
        failures.append(kind)
    return 0.0


def rouge_zh(prediction: str, truth: str, failures: list | None = None, **_) -> float:
    return rouge(" ".join(_cut(prediction)), " ".join(_cut(truth)), failures)


def classification(prediction: str, truth: str, all_classes=None, **_) -> float:
    """1 / (labels found in the prediction) if the truth is among them, else 0.

    Labels that are proper substrings of the truth are dropped, but LongBench drops them while
    iterating over the same list, so the label right after a dropped one is never examined; that
    quirk is kept for parity.
    """
    if all_classes is None:
        raise ValueError("classification needs all_classes (the record's label list)")
    found = [label for label in all_classes if label in prediction]
    i = 0  # a list iterator's index: it advances past the slot a removal shifts into
    while i < len(found):
        label = found[i]
        i += 1
        if label in truth and label != truth:
            found.remove(label)
    return 1.0 / len(found) if truth in found else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = _INTEGERS.findall(prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count(prediction: str, truth: str, **_) -> float:
    return _fraction_equal(prediction, str(truth))


def _retrieval(pattern: str, prediction: str, truth: str) -> float:
    ids = re.findall(pattern, truth)
    if not ids:
        raise ValueError(f"answer {truth!r} holds no paragraph id matching {pattern!r}")
    return _fraction_equal(prediction, ids[0])


def retrieval(prediction: str, truth: str, **_) -> float:
    return _retrieval(r"Paragraph (\d+)", prediction, truth)


def retrieval_zh(prediction: str, truth: str, **_) -> float:
    return _retrieval(r"段落(\d+)", prediction, truth)


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18 ``fuzz.ratio`` with its difflib backend: 0-100, an int."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio())  # half to even


def code_sim(prediction: str, truth: str, **_) -> float:
    """fuzz.ratio / 100 of the first line without `` ` ``, ``#`` or ``//`` (empty if none)."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((s for s in lines if "`" not in s and "#" not in s and "//" not in s), "")
    return fuzz_ratio(line, truth) / 100


METRIC_FUNCTIONS = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge": rouge,
    "rouge_zh": rouge_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}


# ---- records and tasks -------------------------------------------------------------------------------
def score_details(task: str, prediction: str, answers, all_classes=None) -> ScoreDetails:
    """:func:`score` with the metric failures (rouge exceptions) that were scored 0."""
    t = get_task(task)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    if isinstance(answers, str) or not isinstance(answers, (list, tuple)):
        raise TypeError(f"answers must be a list of str, got {type(answers).__name__}")
    if t.name in FIRST_LINE_TASKS:
        prediction = first_line(prediction)
    fn = METRIC_FUNCTIONS[t.metric]
    failures: list[str] = []
    best = 0.0
    for truth in answers:
        best = max(best, float(fn(prediction, truth, all_classes=all_classes, failures=failures)))
    return ScoreDetails(best, failures)


def score(task: str, prediction: str, answers, all_classes=None) -> float:
    """One record's LongBench score in [0, 1] (before the ×100 and the rounding).

    Args:
        task: a v1 or LongBench-E task name (``"hotpotqa"``, ``"hotpotqa_e"``).
        prediction: the decoded answer, as generated.
        answers: the record's ``answers`` (the score is the maximum over them).
        all_classes: the record's ``all_classes`` (needed by trec and lsht).
    """
    return score_details(task, prediction, answers, all_classes).score


def length_bucket(length: int) -> str:
    """The LongBench-E bucket of a record's ``length``."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def bucket_scores(scores, lengths) -> dict[str, float]:
    """LongBench-E: the task score per length bucket (NaN for an empty bucket, like eval.py)."""
    groups: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for s, n in zip(scores, lengths, strict=True):
        groups[length_bucket(n)].append(s)
    return {k: task_score(v) for k, v in groups.items()}
