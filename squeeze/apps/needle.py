"""The needle task: key→value records scattered among filler words, and questions about one key.

A context is filler text with records ``k017 v342`` spread through it; every key appears at
most once. A question is ``? k017`` and its answer is the one token ``v342``. To answer, the
last question token must find the single record among thousands of tokens, so the model's
attention is concentrated on a few keys: that is what makes squeezed attention's accuracy
measurable. Everything here is plain Python and numpy (no torch, no transformers) except
:func:`build_tokenizer`, which needs ``tokenizers`` and ``transformers``.

The vocabulary is fixed (words listed here), so a tokenizer built anywhere maps them to the same
ids; :data:`WORDS` is the id order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_KEYS = 512
N_VALUES = 512
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
MARKS = [":", "?", ".", ";"]
_FILLER_TEXT = (
    "the of and a to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first water "
    "been call who oil its now find long down day did get come made may part over new sound take "
    "only little work know place year live me back give most very after thing our just name good "
    "sentence man think say great where help through much before line right too mean old any same "
    "tell boy follow came want show also around form three small set put end does another well "
    "large must big even such because turn here why ask went men read need land different home us "
    "move try kind hand picture again change off play spell air away animal house point page letter"
)
FILLER = _FILLER_TEXT.split()
KEYS = [f"k{i:03d}" for i in range(N_KEYS)]
VALUES = [f"v{i:03d}" for i in range(N_VALUES)]
WORDS = SPECIALS + MARKS + FILLER + KEYS + VALUES
WORD_ID = {w: i for i, w in enumerate(WORDS)}
PAD, BOS, EOS, UNK = 0, 1, 2, 3
COLON, QMARK, PERIOD = WORD_ID[":"], WORD_ID["?"], WORD_ID["."]
FILLER_IDS = np.array([WORD_ID[w] for w in FILLER])
KEY_IDS = np.array([WORD_ID[w] for w in KEYS])
VALUE_IDS = np.array([WORD_ID[w] for w in VALUES])
#: tokens in one record (key, value) and in one question (?, key)
RECORD_LEN = 2
QUESTION_LEN = 2


@dataclass
class Context:
    """One generated context.

    Attributes:
        ids: ``[N]`` int64 token ids, starting with ``<s>``.
        records: ``{key_id: value_id}`` of every record in the context.
        positions: ``{key_id: position of the key token in ids}``.
    """

    ids: np.ndarray
    records: dict[int, int]
    positions: dict[int, int]


def make_context(
    rng: np.random.Generator, n_tokens: int, n_records: int | None = None, density: float = 0.25
) -> Context:
    """A context of exactly ``n_tokens`` tokens (``<s>`` first) with ``n_records`` records.

    ``n_records`` defaults to ``density * n_tokens / RECORD_LEN``, capped at ``N_KEYS``. Records
    sit at random non-overlapping places; the rest is filler words, a ``.`` every ~12 words.
    """
    if n_records is None:
        n_records = int(density * n_tokens / RECORD_LEN)
    n_records = max(1, min(n_records, N_KEYS, (n_tokens - 1) // RECORD_LEN))
    n_filler = n_tokens - 1 - n_records * RECORD_LEN
    keys = rng.choice(KEY_IDS, size=n_records, replace=False)
    values = rng.choice(VALUE_IDS, size=n_records, replace=True)
    filler = rng.choice(FILLER_IDS, size=n_filler)
    filler[rng.random(n_filler) < 1 / 12] = PERIOD
    # records go into n_filler + 1 gaps of the filler, in order
    slots = np.sort(rng.choice(n_filler + n_records, size=n_records, replace=False))
    ids = np.empty(n_tokens, dtype=np.int64)
    ids[0] = BOS
    pos, f, positions = 1, 0, {}
    slot_set = {int(s): i for i, s in enumerate(slots)}
    for j in range(n_filler + n_records):
        i = slot_set.get(j)
        if i is None:
            ids[pos] = filler[f]
            f += 1
            pos += 1
        else:
            ids[pos : pos + RECORD_LEN] = record(keys[i], values[i])
            positions[int(keys[i])] = pos
            pos += RECORD_LEN
    records = {int(k): int(v) for k, v in zip(keys, values, strict=True)}
    return Context(ids=ids, records=records, positions=positions)


def parse_context(ids: np.ndarray) -> Context:
    """The :class:`Context` of token ids written elsewhere: every key that occurs once and is
    followed by a value is a record."""
    keys, values = set(KEY_IDS.tolist()), set(VALUE_IDS.tolist())
    seen: dict[int, int] = {}
    for i, t in enumerate(ids.tolist()):
        if t in keys:
            seen[t] = -1 if t in seen else i
    positions = {
        k: p for k, p in seen.items() if p >= 0 and p + 1 < len(ids) and int(ids[p + 1]) in values
    }
    records = {k: int(ids[p + 1]) for k, p in positions.items()}
    return Context(ids=np.asarray(ids, dtype=np.int64), records=records, positions=positions)


def record(key_id: int, value_id: int) -> tuple[int, ...]:
    """The ``RECORD_LEN`` ids of one record: ``key value``."""
    return (key_id, value_id)


def question(key_id: int) -> np.ndarray:
    """``[QUESTION_LEN]`` int64 ids of the question about ``key_id``: ``? key``."""
    return np.array([QMARK, key_id], dtype=np.int64)


def make_questions(
    rng: np.random.Generator, ctx: Context, n: int
) -> tuple[list[np.ndarray], list[int]]:
    """``n`` questions about distinct keys of ``ctx`` (fewer if it has fewer records).

    Returns (questions, answers): ``[QUESTION_LEN]`` int64 id arrays and the value ids.
    """
    keys = list(ctx.records)
    chosen = rng.choice(len(keys), size=min(n, len(keys)), replace=False)
    qs = [question(keys[i]) for i in chosen]
    return qs, [ctx.records[keys[i]] for i in chosen]


def training_example(
    rng: np.random.Generator, n_tokens: int, n_questions: int, density: float
) -> tuple[np.ndarray, np.ndarray]:
    """A context followed by ``n_questions`` answered questions, for training.

    Returns (ids, targets), both ``[n_tokens + (QUESTION_LEN + 1) * q]`` int64 (q = questions asked, at most one
    per record): ``targets[t]`` is the
    token to predict at ``t`` (the answer after each question's key), ``-100`` elsewhere.
    """
    ctx = make_context(rng, n_tokens, density=density)
    qs, answers = make_questions(rng, ctx, n_questions)
    parts, tgt = [ctx.ids], [np.full(len(ctx.ids), -100, dtype=np.int64)]
    for q, a in zip(qs, answers, strict=True):
        parts.append(np.concatenate([q, [a]]))
        t = np.full(QUESTION_LEN + 1, -100, dtype=np.int64)
        t[QUESTION_LEN - 1] = a
        tgt.append(t)
    return np.concatenate(parts), np.concatenate(tgt)


def decode(ids) -> str:
    """Space-joined words of ``ids`` (any int iterable)."""
    return " ".join(WORDS[int(i)] for i in ids)


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :data:`WORDS`: whitespace-split, ``<s>``
    prepended when special tokens are added (as every training context starts).

    Needs ``tokenizers`` and ``transformers``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=WORD_ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
