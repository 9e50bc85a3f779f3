"""The demo's task and its answers: a context with questions whose answers are known, answered
with the model's own attention and through a compiled squeezed context.

On the shipped needle model (``squeeze.demo_model("needle")``) the context holds key→value records
and a question is ``? key``; on any other model (or a ``--context-file``) a question quotes a span
of the context and the answer is the token that follows it there, a retrieval task every language
model can do. Imports torch (and transformers when answering).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import needle


@dataclass
class Task:
    """Context and questions.

    Attributes:
        context_ids: ``[N]`` int64 context token ids.
        questions: ``[Tq]`` int64 id tensors, one per question.
        answers: the expected first answer token of each question.
        kind: ``"needle"`` (key→value records) or ``"quote"`` (continue a quoted span).
        sources: per question, the context position whose key holds the answer (needle: the
            record's value token; quote: the answer token itself).
    """

    context_ids: torch.Tensor
    questions: list[torch.Tensor]
    answers: list[int]
    kind: str
    sources: list[int]


def is_needle_tokenizer(tokenizer) -> bool:
    """True when ``tokenizer`` maps every needle word to its own id (the shipped model's)."""
    vocab = tokenizer.get_vocab()
    return all(vocab.get(w) == i for i, w in enumerate(needle.WORDS))


def make_task(
    tokenizer, n_tokens: int, n_questions: int, seed: int, text: str | None = None
) -> Task:
    """A :class:`Task` of about ``n_tokens`` context tokens and ``n_questions`` questions.

    With the needle tokenizer: a fresh needle context of ``n_tokens`` tokens, or the records of
    ``text``. With any other tokenizer the context is ``text`` tokenized (cut to ``n_tokens``;
    default: a needle context written out as words) and the questions are quotes (see the
    module docstring).
    """
    rng = np.random.default_rng(seed)
    if is_needle_tokenizer(tokenizer):
        if text is None:
            ctx = needle.make_context(rng, n_tokens, density=0.25)
        else:  # the records written in the text (keys that occur once, followed by a value)
            ids = np.asarray(tokenizer(text).input_ids[:n_tokens], dtype=np.int64)
            ctx = needle.parse_context(ids)
            if not ctx.records:
                raise ValueError("the context file holds no 'key value' records (e.g. k017 v342)")
        qs, ans = needle.make_questions(rng, ctx, n_questions)
        src = [ctx.positions[int(q[1])] + 1 for q in qs]
        return Task(
            torch.from_numpy(ctx.ids), [torch.from_numpy(q) for q in qs], ans, "needle", src
        )
    if text is None:
        text = needle.decode(needle.make_context(rng, n_tokens, density=0.25).ids[1:])
    ids = tokenizer(text, add_special_tokens=True, return_tensors="pt").input_ids[0]
    ids = ids[:n_tokens]
    span = 8
    if ids.numel() < 4 * span:
        raise ValueError(f"the context has {ids.numel()} tokens, too few to quote from")
    # quotes end before the last 100 tokens (the window squeeze always reads densely)
    hi = max(span + 1, ids.numel() - 100)
    ends = rng.choice(np.arange(span, hi), size=min(n_questions, hi - span), replace=False)
    qs = [ids[e - span : e].clone() for e in ends]
    return Task(ids, qs, [int(ids[e]) for e in ends], "quote", [int(e) for e in ends])


@torch.no_grad()
def dense_answers(model, context_ids: torch.Tensor, questions, batch: int = 64) -> list[int]:
    """Greedy first answer token of every question, model's own attention (exact, no squeeze).

    Questions of one length share a batch: the context's cache is copied ``batch`` times.
    """
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    prefill = model(context_ids[None].to(device), use_cache=True).past_key_values
    out: list[int | None] = [None] * len(questions)
    by_len: dict[int, list[int]] = {}
    for i, q in enumerate(questions):
        by_len.setdefault(q.numel(), []).append(i)
    for idx in by_len.values():
        for s in range(0, len(idx), batch):
            rows = idx[s : s + batch]
            cache = DynamicCache()
            for li, layer in enumerate(prefill.layers):
                k = layer.keys.expand(len(rows), -1, -1, -1)
                cache.update(k, layer.values.expand(len(rows), -1, -1, -1), li)
            q = torch.stack([questions[i] for i in rows]).to(device)
            logits = model(q, past_key_values=cache).logits[:, -1]
            for r, tok in zip(rows, logits.argmax(-1).tolist(), strict=True):
                out[r] = tok
    return out  # type: ignore[return-value]


def squeezed_answers(sctx, questions, batch: int = 64) -> list[int]:
    """Greedy first answer token of every question through a compiled squeezed context."""
    out = []
    for s in range(0, len(questions), batch):
        got = sctx.generate(list(questions[s : s + batch]), max_new_tokens=1, do_sample=False)
        out += [int(a[0]) if a.numel() else -1 for a in got]
    return out


def accuracy(pred, answers) -> float:
    return sum(int(p == a) for p, a in zip(pred, answers, strict=True)) / max(len(answers), 1)
