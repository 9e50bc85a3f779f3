"""Variable tracking, common-words and frequent-words extraction (RULER's rules, our code).

* **vt**: chains ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... (``hops`` links) put at
  random lines of ``n`` noise sentence groups; the question gives the value and expects every
  variable of its chain. One few-shot example (about 500 tokens, 3-letter names) comes first.
  With ``questions`` > 1 the haystack holds that many chains, one question each.
* **cwe**: a numbered list of ``n`` distinct words, the first ``num_cw`` repeated ``freq_cw``
  times, the others ``freq_ucw`` times, shuffled; the answer is the ``num_cw`` common words. Below
  4096 tokens RULER repeats 6 / 1 times. One few-shot example (20 or 40 words) comes first.
* **fwe**: ``n`` words of a coded vocabulary (6 random letters, ``(length - answer) // 50`` words)
  with Zipf counts ``int(n * k**-alpha / zeta(alpha))`` for rank ``k``; the top word is ``...``
  (noise), the answer the next three.

Few-shot examples sit inside the user turn, before the task (RULER's ``base`` template; for chat
models RULER wraps the example in the chat template a second time).
"""

from __future__ import annotations

import random
import string

from .haystack import NOISE
from .sample import Question, Sample
from .tasks import TEMPLATES, Spec
from .words import word_pool

#: RULER sizes the variable-tracking example to this many tokens
VT_EXAMPLE_TOKENS = 500


def _names(rng: random.Random, count: int, letters: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in out:
            out.append(name)
    return out


def _chains(rng: random.Random, chains: int, hops: int, letters: int):
    """``(variables, values, lines)`` of ``chains`` chains: ``hops + 1`` names and one 5-digit
    value each (values distinct), and their assignment lines."""
    names = _names(rng, chains * (hops + 1), letters)
    values = rng.sample(range(10000, 100000), chains)
    variables, lines = [], []
    for c in range(chains):
        v = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        variables.append(v)
        lines.append(
            [f"VAR {v[0]} = {values[c]}"] + [f"VAR {v[j + 1]} = VAR {v[j]} " for j in range(hops)]
        )
    return variables, [str(x) for x in values], lines


def _vt_text(rng: random.Random, n: int, lines: list[list[str]]) -> str:
    sentences = [NOISE] * n
    for chain in lines:
        at = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, (pos, line) in enumerate(zip(at, chain, strict=True)):
            sentences.insert(pos + j, line)
    return "\n".join(sentences).replace(". \n", ".\n")


def vt_example(spec: Spec, rng: random.Random, n: int) -> str:
    """The few-shot example: a variable-tracking prompt over ``n`` noise groups, 3-letter names
    and at most 10 hops, with its answer; it ends with a newline."""
    hops = min(10, spec.hops)
    variables, values, lines = _chains(rng, spec.chains, hops, 3)
    instruction, question, prefix = TEMPLATES["vt"]
    text = instruction.format(context=_vt_text(rng, n, lines)) + question.format(query=values[0])
    return (
        text + prefix.format(num_v=hops + 1, query=values[0]) + " " + " ".join(variables[0]) + "\n"
    )


def variable_tracking(spec: Spec, rng: random.Random, n: int, questions: int, example: str):
    """A vt :class:`Sample` over ``n`` noise groups (at least ``hops + 1``), ``example`` first."""
    chains = max(spec.chains, questions)
    variables, values, lines = _chains(rng, chains, spec.hops, 5)
    instruction, question, prefix = TEMPLATES["vt"]
    fixed = example + "\n" + instruction.format(context=_vt_text(rng, n, lines))
    qs = tuple(
        Question(
            question.format(query=values[c]),
            prefix.format(num_v=spec.hops + 1, query=values[c]),
            tuple(variables[c]),
        )
        for c in range(questions)
    )
    return Sample(fixed, qs)


def _numbered(words) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _word_list(rng: random.Random, n: int, common: int, repeats: tuple[int, int]):
    words = rng.sample(word_pool(n), n)
    listed = words[:common] * repeats[0] + words[common:] * repeats[1]
    rng.shuffle(listed)
    return _numbered(listed), tuple(words[:common])


def common_words(spec: Spec, rng: random.Random, n: int, length: int) -> Sample:
    """A cwe :class:`Sample` of ``n`` distinct words (more than ``num_cw``) for a ``length``-token
    prompt (which picks RULER's repeats)."""
    small = length < 4096
    example_size, example_repeats = (20, (3, 1)) if small else (40, (10, 3))
    repeats = (6, 1) if small else (spec.freq_cw, spec.freq_ucw)
    example_list, example_answer = _word_list(rng, example_size, spec.num_cw, example_repeats)
    listed, answer = _word_list(rng, n, spec.num_cw, repeats)
    instruction, question, prefix = TEMPLATES["cwe"]
    example = instruction.format(context=example_list) + question + prefix
    fixed = example + " " + _numbered(example_answer) + "\n" + instruction.format(context=listed)
    return Sample(fixed, (Question(question, prefix, answer),))


def zeta(alpha: float, terms: int = 1000) -> float:
    """The Riemann zeta function at ``alpha`` > 1 (partial sum and Euler-Maclaurin tail)."""
    head = sum(k**-alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + terms**-alpha / 2


def zipf_counts(n: int, size: int, alpha: float) -> list[int]:
    """Words of each rank ``k = 1..size`` among ``n``: ``int(n * k**-alpha / zeta(alpha))``."""
    z = zeta(alpha)
    return [int(n * k**-alpha / z) for k in range(1, size + 1)]


def fwe_vocab_size(length: int, max_new_tokens: int) -> int:
    """RULER's coded vocabulary size for a ``length``-token prompt (at least 5)."""
    return max((length - max_new_tokens) // 50, 5)


def fwe_min_size(spec: Spec, length: int, max_new_tokens: int) -> int:
    """The smallest ``n`` whose counts rank the answer strictly (ranks 2 > 3 > 4 > 5)."""
    size, n = fwe_vocab_size(length, max_new_tokens), 1
    while True:
        c = zipf_counts(n, size, spec.alpha)
        if c[1] > c[2] > c[3] > c[4]:
            return n
        n += 1


def freq_words(spec: Spec, rng: random.Random, n: int, length: int, max_new_tokens: int):
    """An fwe :class:`Sample` of ``n`` coded words (at least :func:`fwe_min_size`)."""
    size = fwe_vocab_size(length, max_new_tokens)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."
    words = [
        w for w, c in zip(ranked, zipf_counts(n, size, spec.alpha), strict=True) for _ in range(c)
    ]
    rng.shuffle(words)
    instruction, question, prefix = TEMPLATES["fwe"]
    return Sample(
        instruction.format(context=" ".join(words)),
        (Question(question, prefix, tuple(ranked[1:4])),),
    )
