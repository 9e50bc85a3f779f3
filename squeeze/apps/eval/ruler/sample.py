"""What a generator makes: one haystack and the questions asked of it."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .words import ADJECTIVES, NOUNS

#: RULER's needle depths: 40 evenly spaced percentages, 0 to 100
DEPTHS = tuple(round(100 * i / 39) for i in range(40))


@dataclass(frozen=True)
class Question:
    """One question of a sample.

    Attributes:
        text: the question, put right after the haystack (``"\\nWhat are all ...?"``).
        prefix: RULER's answer prefix, put after the chat template's generation prompt.
        answers: the strings a correct answer holds (RULER's ``outputs``).
    """

    text: str
    prefix: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    """``fixed``: the few-shot example if the task has one, the instruction and the haystack
    (the part compiled once); ``questions``: what is asked of it."""

    fixed: str
    questions: tuple[Question, ...]


def draw(kind: str, rng: random.Random) -> str:
    """One random value: ``numbers`` (7 digits), ``words`` (``adjective-noun``) or ``uuids``."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "uuids":
        import uuid

        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown value type {kind!r} (numbers, words or uuids)")


def distinct(kind: str, rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """``count`` values of ``kind`` not in ``taken`` and not repeated (each is added to it)."""
    out: list[str] = []
    while len(out) < count:
        x = draw(kind, rng)
        if x not in taken:
            taken.add(x)
            out.append(x)
    return out


def insert_lines(lines: list[str], items: list[str], rng: random.Random) -> list[str]:
    """``lines`` with ``items`` put between them at distinct random places, in order (RULER's
    noise-haystack rule: needs ``len(lines) >= len(items)``)."""
    out = list(lines)
    for index, item in zip(
        sorted(rng.sample(range(len(lines)), len(items)), reverse=True), items, strict=True
    ):
        out.insert(index, item)
    return out
