"""LongBench scoring against values derived by hand from the official definitions."""

from __future__ import annotations

import math
import sys

import pytest

pytest.importorskip("rouge")
pytest.importorskip("jieba")

from squeeze.apps.eval.longbench import metrics as m
from squeeze.apps.eval.longbench import score, score_details, task_score
from squeeze.apps.eval.longbench.report import averages
from squeeze.apps.eval.longbench.tasks import ENGLISH_TASKS, V1_TASKS


# ---- qa_f1 ------------------------------------------------------------------------------------
def test_qa_f1_normalisation_and_f1():
    # "the eiffel tower, in paris!" → "eiffel tower in paris" (4 tokens) vs "eiffel tower" (2):
    # overlap 2, P = 1/2, R = 1, F1 = 2/3
    assert score("hotpotqa", "The Eiffel Tower, in Paris!", ["Eiffel tower"]) == pytest.approx(
        2 / 3
    )
    # punctuation goes before articles: "the-end" → "theend", not an article, no overlap
    assert score("hotpotqa", "the-end", ["end"]) == 0.0
    # "theater" keeps its "the" (word boundaries); "An"/"a" vanish
    assert m.normalize_answer("An apple, a theater") == "apple theater"
    # multiset overlap: [b, b, c] vs [b, c, c] → 2 common, P = R = 2/3
    assert score("musique", "b b c", ["b c c"]) == pytest.approx(2 / 3)


def test_max_over_answers():
    assert score("2wikimqa", "Eiffel Tower", ["Paris", "the Eiffel Tower"]) == 1.0
    assert score("narrativeqa", "nothing", ["Paris", "Tower"]) == 0.0


def test_first_line_rule():
    pred = "\n\nParis\nLondon"
    assert score("triviaqa", pred, ["Paris"]) == 1.0  # first line after leading newlines
    # hotpotqa has no first-line rule: [paris, london] vs [paris] → P = 1/2, R = 1
    assert score("hotpotqa", pred, ["Paris"]) == pytest.approx(2 / 3)
    # only "\n" is stripped: a line of spaces comes first, and holds no label
    assert score("trec", "  \nLocation", ["Location"], ["Location", "Entity"]) == 0.0
    assert score("trec", "\nLocation\nEntity", ["Location"], ["Location", "Entity"]) == 1.0


# ---- classification ----------------------------------------------------------------------------------
def test_classification():
    classes = ["Location", "Entity", "Human being"]
    assert score("trec", "Location", ["Location"], classes) == 1.0
    assert score("trec", "Location or Entity", ["Location"], classes) == 0.5
    assert score("trec", "Entity", ["Location"], classes) == 0.0
    with pytest.raises(ValueError, match="all_classes"):
        score("trec", "Location", ["Location"])


def test_classification_substring_quirk():
    # found = [a, b, abc]; "a" is a proper substring of the truth and is removed mid-iteration,
    # so "b" slides into its slot and is never examined: [b, abc] → 1/2 (not 1/1)
    assert m.classification("abc", "abc", all_classes=["a", "b", "abc"]) == 0.5
    # with the order changed, both substrings are examined and removed → 1
    assert m.classification("abc", "abc", all_classes=["abc", "a", "b"]) == 0.5
    assert m.classification("abc", "abc", all_classes=["abc", "a", "x"]) == 1.0


def test_classification_chinese():
    classes = ["体育", "财经", "娱乐"]
    assert score("lsht", "体育新闻", ["体育"], classes) == 1.0
    assert score("lsht", "体育还是财经", ["财经"], classes) == 0.5


# ---- retrieval and count -------------------------------------------------------------------------------
def test_retrieval_and_count():
    # integers 3 and 13; one equals the id → 1/2
    assert score("passage_retrieval_en", "Paragraph 3, not Paragraph 13", ["Paragraph 3"]) == 0.5
    assert score("passage_retrieval_en", "no idea", ["Paragraph 3"]) == 0.0
    assert score("passage_retrieval_zh", "段落5", ["段落5"]) == 1.0
    assert score("passage_retrieval_zh", "答案是段落 5 和 7", ["段落5"]) == 0.5
    assert score("passage_count", "There are 12 unique paragraphs out of 20", ["12"]) == 0.5
    assert score("passage_count", "twelve", ["12"]) == 0.0
    # the E version scores the same way
    assert score("passage_count_e", "12", ["12"]) == 1.0


# ---- code_sim ----------------------------------------------------------------------------------------------
def test_code_sim():
    # the first line without ` # // is "x = foo(1)"; difflib: 9 of 10 match → 2*9/20 = 90
    pred = "\n# comment\n```python\nx = foo(1)\nmore"
    assert score("lcc", pred, ["x = foo(2)"]) == 0.9
    # no usable line → "" → 0; but "" against an empty answer is equal → 100
    assert score("repobench-p", "# only a comment", ["x"]) == 0.0
    assert score("repobench-p", "# only a comment", [""]) == 1.0
    # difflib backend: ratio("tide", "diet") is 25 (python-Levenshtein would give 50)
    assert m.fuzz_ratio("tide", "diet") == 25
    # 1 match over 16 characters → 12.5, rounded half to even → 12
    assert m.fuzz_ratio("a", "bcdefghijklmnoa") == 12


def test_code_sim_matches_fuzzywuzzy():
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    if "Levenshtein" in sys.modules or _has_levenshtein():
        pytest.skip("python-Levenshtein changes fuzzywuzzy's backend")
    pairs = [
        ("tide", "diet"),
        ("a", "bcdefghijklmnoa"),
        ("", ""),
        ("x", ""),
        ("def f(x):", "def g(y):"),
    ]
    pairs.append(("return self.foo(bar, baz) + 1" * 10, "return self.fo(bar, bz) - 1" * 9))
    for a, b in pairs:
        assert m.fuzz_ratio(a, b) == fuzz.ratio(a, b), (a, b)


def _has_levenshtein() -> bool:
    import importlib.util

    return importlib.util.find_spec("Levenshtein") is not None


# ---- rouge -------------------------------------------------------------------------------------------------
def test_rouge_l_counts_unique_words():
    # pltrdy rouge counts unique words: hyp {the, cat, sat, on, mat} = 5, ref 5; the LCS
    # "the cat on the mat" holds 4 unique words → R = P = 4/5 → F = 0.8
    got = score("gov_report", "the cat sat on the mat", ["the cat lay on the mat"])
    assert got == pytest.approx(0.8, abs=1e-7)
    assert score("qmsum", "a b c d", ["a c d e"]) == pytest.approx(0.75, abs=1e-7)


def test_rouge_failures_score_zero_and_are_reported():
    for pred in ("", "..."):  # nothing left once split on "."
        d = score_details("multi_news", pred, ["a summary."])
        assert d.score == 0.0 and d.failures == ["empty"]
    # rouge rebuilds the LCS recursively, one frame per hypothesis word when few words match:
    # 1100 words pass Python's default recursion limit (1000) → RecursionError, scored 0
    hyp = " ".join(f"a{i}" for i in range(1100))
    d = score_details("gov_report", hyp, ["b0 b1 b2", "a0 a1"])
    assert d.score == 0.0
    assert d.failures == ["recursion", "recursion"]
    # LongBench gets the same 0, silently
    assert score("gov_report", hyp, ["a0 a1"]) == 0.0


def test_samsum_first_line_then_rouge():
    # "\nx y z\nSummary: ..." → "x y z" vs "x y w": LCS {x, y} of 3 unique words → F = 2/3
    d = score_details("samsum", "\nx y z\nDialogue: a b", ["x y w"])
    assert d.score == pytest.approx(2 / 3, abs=1e-7)


# ---- Chinese ----------------------------------------------------------------------------------------------
def test_chinese_metrics():
    jieba = pytest.importorskip("jieba")
    assert list(jieba.cut("我爱北京天安门", cut_all=False)) == ["我", "爱", "北京", "天安门"]
    # 4 tokens vs 1, one common → P = 1/4, R = 1, F1 = 0.4
    assert score("multifieldqa_zh", "我爱北京天安门", ["北京"]) == pytest.approx(0.4)
    # "。" normalises to "" and is dropped
    assert score("multifieldqa_zh", "北京。", ["北京"]) == 1.0
    # rouge_zh: "我 爱 北京" vs "我 爱 上海": LCS {我, 爱} of 3 unique words → 2/3
    assert list(jieba.cut("我爱上海", cut_all=False)) == ["我", "爱", "上海"]
    got = score("dureader", "我爱北京", ["我爱上海"])
    assert got == pytest.approx(2 / 3, abs=1e-7)
    assert m.normalize_zh_answer("Ｈello， 世界！") == "ｈello世界"


# ---- task scores, buckets, averages ------------------------------------------------------------------------
def test_task_score_and_buckets():
    assert task_score([1.0, 0.0, 0.5]) == 50.0
    assert task_score([1 / 3]) == 33.33
    assert math.isnan(task_score([]))
    got = m.bucket_scores([1.0, 0.0, 0.5, 1.0], [3999, 4000, 7999, 100])
    assert got["0-4k"] == 100.0 and got["4-8k"] == 25.0 and math.isnan(got["8k+"])
    assert m.length_bucket(8000) == "8k+"


def test_averages_reproduce_longbench_readme():
    # Llama2-7B-chat-4k, LongBench README; category mean 31.0 (README), plain mean 31.52
    values = [18.7, 19.2, 36.8, 11.9, 25.4, 32.8, 9.4, 5.2, 27.3, 20.8, 25.8, 0.2, 61.5, 77.8]
    values += [40.7, 19.8, 2.1, 9.8, 0.5, 52.4, 43.8]
    scores = dict(zip(V1_TASKS, values, strict=True))
    avg = averages(scores)["en"]
    assert avg["tasks"] == len(ENGLISH_TASKS) == 16
    assert avg["mean"] == 31.52
    assert round(avg["category_mean"], 1) == 31.0
    assert avg["categories"]["Synthetic"] == 5.95


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown LongBench task"):
        score("hotpot", "a", ["a"])
    with pytest.raises(TypeError, match="answers"):
        score("hotpotqa", "a", "a")
