"""Needle in a haystack (RULER's ``niah.py`` rules, our code): single, multi-key, multi-value and
multi-query, with words, numbers or uuids as keys and values.

A needle is ``One of the special magic <values> for <key> is: <value>.``; a key has ``values``
needles, shuffled among the others. The haystack is ``n`` noise sentence groups (needles at random
lines), ``n`` distractor needles with keys of their own (``needle``), or the first ``n`` words of
real text with the needles between sentences at depths drawn from RULER's 40 (``essay``). A
question asks ``queries`` keys and expects all their values. When a question expects a single
value, the template is put in the singular (RULER's replacements). Beyond RULER: keys and values
never repeat within a sample, and with ``questions`` > 1 one haystack holds the needles of that
many questions, each asking keys of its own.
"""

from __future__ import annotations

import random

from .haystack import NOISE, Haystack, split_sentences
from .sample import DEPTHS, Question, Sample, distinct, insert_lines
from .tasks import NEEDLE, TEMPLATES, Spec


def templates(spec: Spec) -> tuple[str, str, str]:
    """(instruction, question, answer prefix) with ``{type_needle_v}`` filled in, in the singular
    when a question expects one value."""
    parts, kind = TEMPLATES["niah"], spec.value_type
    if spec.queries * spec.values == 1:
        parts = tuple(_singular(t) for t in parts)
        kind = kind[:-1]
    return tuple(t.replace("{type_needle_v}", kind) for t in parts)


def _singular(text: str) -> str:
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


def planted_keys(spec: Spec, questions: int) -> int:
    """Keys a haystack holds: the task's, or enough for ``questions`` questions of its own."""
    return max(spec.keys, spec.queries * questions)


def min_size(spec: Spec, questions: int) -> int:
    """The smallest haystack size ``n`` that takes the needles."""
    return 1 if spec.haystack == "essay" else planted_keys(spec, questions) * spec.values


def niah(spec: Spec, rng: random.Random, n: int, haystack: Haystack | None, questions: int = 1):
    """One sample: a haystack of size ``n`` (see the module docstring) and ``questions`` questions.

    Args:
        spec: a ``niah`` task's configuration.
        rng: the sample's generator (a fresh one per call: the keys do not depend on ``n``).
        n: noise sentence groups, distractor needles, or words of ``haystack`` (``essay``).
        haystack: the real text of ``essay`` tasks (else unused).
    Returns:
        :class:`Sample`.
    """
    k = planted_keys(spec, questions)
    taken: set[str] = set()
    keys = distinct(spec.key_type, rng, k, taken)
    values = [distinct(spec.value_type, rng, spec.values, taken) for _ in keys]
    needles = [
        NEEDLE.format(type_needle_v=spec.value_type, key=key, value=v)
        for key, vs in zip(keys, values, strict=True)
        for v in vs
    ]
    rng.shuffle(needles)
    order = rng.sample(range(k), k)
    asked = [order[j * spec.queries : (j + 1) * spec.queries] for j in range(questions)]
    context = _haystack(spec, rng, n, needles, haystack, taken)
    instruction, question, prefix = templates(spec)
    out = []
    for idx in asked:
        names = [keys[i] for i in idx]
        query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
        answers = tuple(v for i in idx for v in values[i])
        out.append(Question(question.format(query=query), prefix.format(query=query), answers))
    return Sample(instruction.format(context=context), tuple(out))


def _haystack(spec, rng, n: int, needles: list[str], haystack, taken: set[str]) -> str:
    if spec.haystack == "noise":
        return "\n".join(insert_lines([NOISE] * n, needles, rng))
    if spec.haystack == "needle":
        lines = [
            NEEDLE.format(
                type_needle_v=spec.value_type,
                key=distinct(spec.key_type, rng, 1, taken)[0],
                value=distinct(spec.value_type, rng, 1, taken)[0],
            )
            for _ in range(n)
        ]
        return "\n".join(insert_lines(lines, needles, rng))
    if spec.haystack != "essay":
        raise ValueError(f"unknown NIAH haystack {spec.haystack!r} (noise, needle or essay)")
    if haystack is None:
        raise ValueError("an essay haystack needs its text (docs, source or a file)")
    if len(needles) > len(DEPTHS):
        raise ValueError(
            f"{len(needles)} needles in an essay haystack, which takes at most {len(DEPTHS)} "
            "(one per depth): ask fewer questions per haystack"
        )
    sentences = split_sentences(haystack.text(n))
    cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
    pieces, last = [], 0
    for cut, needle in zip(cuts, needles, strict=True):
        pieces += [" ".join(sentences[last:cut]), needle]
        last = cut
    pieces.append(" ".join(sentences[last:]))
    return " ".join(p for p in pieces if p)
