"""The demo's task on a real model: a real document with planted needles, and questions about it.

The document is an excerpt of the standard library's source (:func:`stdlib_source`, the
default: SmolLM2-135M copies code more reliably than prose at 8K tokens), of CPython's own
documentation (:func:`python_docs`: the topics that ``help()`` shows) or of any UTF-8 text, cut
between lines or sentences, with a few needle sentences planted between them (``The pass key of tiger is 77013. Remember it.``). Two
kinds of question, each a greedy continuation whose expected answer is in the document:

- ``needle``: ``What is the pass key of tiger? The pass key of tiger is`` → ``77013``;
- ``quote``: ``Continue this quote from the text above: "`` and 16 tokens of the document →
  the 4 tokens that follow them there. The quoted span's last 12 tokens occur once in the
  document, so the continuation is unambiguous.

Needles and quotes lie before the context's last ``window`` tokens, which squeezed attention
always reads densely: every answer has to be found through the cluster lookup.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

#: needle names (one per planted needle): common words, one token each in most vocabularies, so
#: that the needle questions have one length and share a batch
NAMES = (
    "apple", "river", "tiger", "garden", "silver", "window", "orange", "summer", "castle", "forest",
)  # fmt: skip
NEEDLE = "The pass key of {name} is {value}. Remember it."
ASK = "\n\nWhat is the pass key of {name}? The pass key of {name} is"
QUOTE = '\n\nContinue this quote from the text above: "'
#: tokens of the document a quote question shows, and of the answer it expects
QUOTE_TOKENS, ANSWER_TOKENS = 16, 4
#: a quote's last UNIQUE tokens occur once in the document
UNIQUE = 12
_PIECE_END = re.compile(r"(?<=\n)|(?<=[.!?] )")
OVERSHOOT = 1.25
_WORD_END = re.compile(r"(?<=\s)")


@dataclass(frozen=True)
class Question:
    """One question: ``ids [T]`` int64 token ids (after the context), the ``expected`` answer
    text, and its ``kind`` (``needle``, ``quote``, or ``record`` on the needle model)."""

    ids: torch.Tensor
    expected: str
    kind: str


@dataclass(frozen=True)
class DocumentTask:
    """A context and its questions.

    Attributes:
        context_ids: ``[N]`` int64 token ids of the document.
        questions: the questions, needles first.
        new_tokens: tokens to generate per answer (enough for the longest expected answer).
        source: where the text came from (a :data:`DOCUMENTS` name or the file name).
    """

    context_ids: torch.Tensor
    questions: list[Question]
    new_tokens: int
    source: str


#: standard-library modules whose source makes :func:`stdlib_source`, in this order
STDLIB_MODULES = (
    "argparse", "typing", "dataclasses", "inspect", "difflib", "textwrap", "pathlib", "logging",
    "json.decoder", "ast", "collections", "functools",
)  # fmt: skip


def stdlib_source() -> str:
    """The source of the :data:`STDLIB_MODULES` of the running Python (about 1.2 MB), each
    headed by ``# ---- name.py``."""
    import importlib
    import inspect

    return "\n\n".join(
        f"# ---- {name}.py\n" + inspect.getsource(importlib.import_module(name))
        for name in STDLIB_MODULES
    )


#: the built-in documents, by name
DOCUMENTS = {"source": ("the standard library's source", stdlib_source)}


def python_docs() -> str:
    """CPython's documentation topics (``pydoc_data.topics``, about 465K characters), in key
    order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


DOCUMENTS["docs"] = ("the Python docs", python_docs)


def normalize(text: str) -> str:
    """``text`` with whitespace runs made single spaces and its ends stripped."""
    return " ".join(text.split())


def is_correct(answer: str, expected: str) -> bool:
    """True when the answer starts with the expected text (whitespace normalised)."""
    want = normalize(expected)
    return bool(want) and normalize(answer).startswith(want)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def make_document_task(
    tokenizer,
    n_tokens: int,
    n_questions: int,
    seed: int,
    *,
    text: str | None = None,
    source: str = DOCUMENTS["source"][0],
    needles: int | None = None,
    window: int = 100,
) -> DocumentTask:
    """A :class:`DocumentTask` of at most ``n_tokens`` context tokens (fewer when ``text`` is
    shorter) and ``n_questions`` questions (fewer when the document offers fewer quotes).

    Args:
        tokenizer: the model's tokenizer.
        n_tokens: context length in tokens, needles included.
        n_questions: needle questions plus quote questions.
        seed: seeds the excerpt, the needles and the quotes.
        text: the document (default: :func:`stdlib_source`).
        source: a name for ``text`` in messages.
        needles: needles planted (default: 30% of the questions, at most ``len(NAMES)``).
        window: the context's last tokens that hold no needle and no quote.
    Raises:
        ValueError: the text is too short to hold the needles and a quote before the window.
    """
    rng = random.Random(seed)
    text = stdlib_source() if text is None else text
    k = round(0.3 * n_questions) if needles is None else needles
    k = max(0, min(k, len(NAMES), n_questions))
    names = rng.sample(NAMES, k)
    values = [str(rng.randint(10000, 99999)) for _ in names]
    planted = [NEEDLE.format(name=n, value=v) for n, v in zip(names, values, strict=True)]
    room = n_tokens - sum(len(_ids(tokenizer, p + "\n")) for p in planted) - 2
    # pieces counted one by one overstate the tokens of their join: take more, cut the ids
    pieces = _excerpt(tokenizer, text, int(OVERSHOOT * room), rng)
    if not pieces:
        raise ValueError(f"the {source} text is empty")
    # needles go between pieces of about the first 85% of the context, clear of the window
    for p in planted:
        at = rng.randint(1, max(1, int(0.85 / OVERSHOOT * len(pieces))))
        pieces.insert(at, p + ("\n" if pieces[at - 1].endswith("\n") else " "))
    ids = tokenizer("".join(pieces), return_tensors="pt").input_ids[0][:n_tokens]
    n = ids.numel()
    if n <= window + QUOTE_TOKENS + ANSWER_TOKENS:
        raise ValueError(
            f"the {source} text gives a {n}-token context: too short for a {window}-token window "
            "and a quote before it"
        )
    decoded = tokenizer.decode(ids)
    missing = [v for v in values if v not in decoded]
    if missing:
        raise ValueError(f"needles {missing} fell outside the {n}-token context (text too short)")
    questions = [
        Question(torch.tensor(_ids(tokenizer, ASK.format(name=nm)), dtype=torch.int64), v, "needle")
        for nm, v in zip(names, values, strict=True)
    ]
    questions += _quotes(tokenizer, ids, n_questions - k, rng, window)
    new_tokens = max([ANSWER_TOKENS, *(len(_ids(tokenizer, " " + v)) for v in values)])
    return DocumentTask(ids, questions, new_tokens, source)


def _excerpt(tokenizer, text: str, room: int, rng: random.Random) -> list[str]:
    """Consecutive pieces of ``text`` from a seeded piece on, about ``room`` tokens of them
    (all of the text when it is shorter). Pieces are lines and sentences (``text`` is cut after
    each newline and each ``. ``), and words within a piece of more than 64 tokens. Joined, the
    pieces are that stretch of ``text`` exactly."""
    pieces, sizes = [], []
    parts = [p for p in _PIECE_END.split(text) if p]
    for part, ids in zip(parts, tokenizer(parts, add_special_tokens=False).input_ids, strict=True):
        if len(ids) <= 64:
            pieces.append(part)
            sizes.append(len(ids))
            continue
        words = [w for w in _WORD_END.split(part) if w]
        pieces += words
        sizes += [len(i) for i in tokenizer(words, add_special_tokens=False).input_ids]
    total, last_start = 0, 0  # the last piece with ``room`` tokens from it to the end
    for i in range(len(sizes) - 1, -1, -1):
        total += sizes[i]
        if total >= room:
            last_start = i
            break
    start = rng.randint(0, last_start)
    out, used = [], 0
    for piece, size in zip(pieces[start:], sizes[start:], strict=True):
        if used >= room:
            break
        out.append(piece)
        used += size
    return out


def _quotes(tokenizer, ids: torch.Tensor, count: int, rng: random.Random, window: int):
    """Up to ``count`` quote questions on ``ids``, ending before the last ``window`` tokens."""
    if count <= 0:
        return []
    toks = ids.tolist()
    seen: dict[tuple, int] = {}
    for i in range(len(toks) - UNIQUE + 1):
        key = tuple(toks[i : i + UNIQUE])
        seen[key] = seen.get(key, 0) + 1
    prefix = _ids(tokenizer, QUOTE)
    ends = list(range(QUOTE_TOKENS + 1, len(toks) - window - ANSWER_TOKENS))
    rng.shuffle(ends)
    out: list[Question] = []
    used: list[int] = []
    for e in ends:
        if len(out) == count:
            break
        if seen[tuple(toks[e - UNIQUE : e])] != 1 or any(abs(e - u) < 64 for u in used):
            continue
        answer = tokenizer.decode(toks[e : e + ANSWER_TOKENS])
        shown = tokenizer.decode(toks[e - QUOTE_TOKENS : e + ANSWER_TOKENS])
        if sum(c.isalnum() for c in answer) < 3 or "pass key" in shown:
            continue
        q = torch.tensor(prefix + toks[e - QUOTE_TOKENS : e], dtype=torch.int64)
        out.append(Question(q, answer, "quote"))
        used.append(e)
    return out
