"""One demo run: a task, one compiled context, dense answers, and squeezed answers, keys read and
speed at every budget.

Imports torch and transformers.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from squeeze.config import SqueezeConfig

from .answers import DenseReference, squeezed_batch, squeezed_generate
from .document import DOCUMENTS, DocumentTask, Question, is_correct, make_document_task
from .task import is_needle_tokenizer, make_task
from .timing import DecodeCapture, attention_times

#: the budgets the demo plots
BUDGETS = (0.05, 0.1, 0.2, 0.4)
#: context tokens by default: a real model / the needle model
TOKENS, NEEDLE_TOKENS = 8000, 4096
#: positions kept free for the question and the answer when the context is capped
RESERVE = 64


def demo_index() -> SqueezeConfig:
    """The needle model's index: 20% centroids, one level (needle keys are random codes: finer
    clusters find them, see the README's needle table)."""
    return SqueezeConfig(centroid_ratio=0.2, l1_ratio=None)


@dataclass(frozen=True)
class Settings:
    """What one run does (the defaults are ``squeeze demo``'s).

    Attributes:
        tokens: context tokens (``None``: 8,000, or 4,096 on the needle model; capped at the
            model's positions less room for the question and answer).
        questions: questions asked (fewer if the document offers fewer).
        needles: needles planted (``None``: 30% of the questions).
        index: how the context is compiled (``None``: ``SqueezeConfig()``, or
            :func:`demo_index` on the needle model); its ``budget`` is the highlighted one, its
            ``window`` is capped at a quarter of the context.
        budgets: the other budgets run (the plot's points).
        seed: seed of the document excerpt, the needles and the questions.
        timing_questions: questions also generated one at a time through every budget, right
            after their dense answer, for tokens/s; the first of them also gives the decode step
            whose attention is timed.
    """

    tokens: int | None = None
    questions: int = 20
    needles: int | None = None
    index: SqueezeConfig | None = None
    budgets: tuple[float, ...] = BUDGETS
    seed: int = 1234
    timing_questions: int = 3


@contextlib.contextmanager
def _timed(stages: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    stages[name] = time.perf_counter() - t0


def make_demo_task(model, tokenizer, s: Settings, text=None, source=None, log=print):
    """The run's :class:`DocumentTask`: needle records on the needle model, else the document
    task (see :mod:`.document`), its length capped at the model's positions."""
    needle_model = is_needle_tokenizer(tokenizer)
    n = s.tokens or (NEEDLE_TOKENS if needle_model else TOKENS)
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit and n > limit - RESERVE:
        log(f"context capped at {limit - RESERVE} tokens: the model has {limit} positions")
        n = limit - RESERVE
    window = (s.index or SqueezeConfig()).window
    if not needle_model:
        return make_document_task(
            tokenizer, n, s.questions, s.seed, text=text, needles=s.needles,
            source=source or DOCUMENTS["source"][0],
            window=min(window, n // 4),
        )  # fmt: skip
    task = make_task(tokenizer, n, s.questions, s.seed, text=text)
    questions = [
        Question(q, tokenizer.decode([a]), "record")
        for q, a in zip(task.questions, task.answers, strict=True)
    ]
    # two tokens: the answer, then one decode step (the step whose attention is timed)
    return DocumentTask(task.context_ids, questions, 2, source if text else "needle records")


def run(
    model,
    tokenizer,
    settings: Settings | None = None,
    *,
    text: str | None = None,
    source: str | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Squeezed at every budget of ``settings``, then dense, on one compiled context: ``text``
    named ``source`` (default: :func:`.document.stdlib_source`; needle records on the needle
    model).

    Returns ``{"source", "n_context", "n_questions", "kinds", "new_tokens", "budget", "config",
    "layers" (the squeezed ones), "timed_questions", "questions", "threads", "load_avg",
    "stages" (seconds), "compile_timings", "rows"}``; a row is ``{"name", "budget", "accuracy",
    "by_kind", "agree_dense", "answers", "kv_fraction", "clustered_fraction", "bytes_fraction",
    "attn_ms", "attn_speedup", "tokens_per_s", "e2e_speedup"}`` (``kv_fraction``: share of the
    context's keys read, window included, mean over layers).
    """
    from squeeze.patches.hf import compile as squeeze_compile

    s = Settings() if settings is None else settings
    load_start = os.getloadavg()
    stages: dict[str, float] = {}
    with _timed(stages, "task_s"):
        task = make_demo_task(model, tokenizer, s, text, source, log)
    n, qs = task.context_ids.numel(), task.questions
    kinds = {k: sum(q.kind == k for q in qs) for k in dict.fromkeys(q.kind for q in qs)}
    log(
        f"context: {n} tokens of {task.source}; {len(qs)} questions "
        f"({', '.join(f'{v} {k}' for k, v in kinds.items())}), answers of {task.new_tokens} tokens"
    )
    needle_model = is_needle_tokenizer(tokenizer)
    base = s.index or (demo_index() if needle_model else SqueezeConfig())
    cfg = base.replace(window=min(base.window, n // 4))
    with _timed(stages, "compile_s"):
        sctx = squeeze_compile(model, task.context_ids, cfg, progress=progress)
    compile_timings = sctx.stats()["timings"]
    log("compile: " + _stages_line(compile_timings))
    budgets = sorted({*s.budgets, cfg.budget})
    views = {b: sctx.with_config(budget=b) for b in budgets}
    preds, stats = {}, {}
    with _timed(stages, "squeezed_s"):
        for b, view in views.items():
            preds[b] = squeezed_batch(view, [q.ids for q in qs], task.new_tokens)
            stats[b] = view.stats()
    log(f"squeezed answers at {len(budgets)} budgets: {stages['squeezed_s']:.1f}s")
    with _timed(stages, "dense_s"):
        dense_pred, spent, captures = _dense_and_timing(
            DenseReference(sctx), views, task, s.seed, s.timing_questions
        )
    log(f"dense answers and timing runs: {stages['dense_s']:.1f}s")
    rows = [_row("dense", 1.0, tokenizer, qs, dense_pred, dense_pred)]
    rows[0].update(kv_fraction=1.0, clustered_fraction=1.0, bytes_fraction=1.0)
    for b in budgets:
        rows.append(_row(f"squeezed {b:.0%}", b, tokenizer, qs, preds[b], dense_pred))
        rows[-1].update({k: stats[b][k] for k in ("kv_fraction", "clustered_fraction",
                                                  "bytes_fraction")})  # fmt: skip
    with _timed(stages, "attention_timing_s"):
        _speed(rows, views, spent, captures, len(spent["picks"]) * task.new_tokens)
    return dict(
        source=task.source, n_context=n, n_questions=len(qs), kinds=kinds,
        new_tokens=task.new_tokens, budget=cfg.budget, config=cfg.to_dict(),
        layers=list(sctx.indexes), timed_questions=spent["picks"],
        questions=[{"kind": q.kind, "expected": q.expected} for q in qs],
        threads=torch.get_num_threads(), load_avg=[load_start, os.getloadavg()],
        stages=stages, compile_timings=compile_timings, rows=rows,
    )  # fmt: skip


def _stages_line(timings: dict[str, float]) -> str:
    return ", ".join(
        f"{k.removeprefix('compile_').removesuffix('_s')} {v:.1f}s"
        for k, v in timings.items()
        if k.startswith("compile_")
    )


def _row(name, budget, tokenizer, qs: list[Question], pred, dense_pred) -> dict:
    right = [is_correct(tokenizer.decode(p), q.expected) for p, q in zip(pred, qs, strict=True)]
    by_kind: dict[str, list[int]] = {}
    for q, r in zip(qs, right, strict=True):
        got = by_kind.setdefault(q.kind, [0, 0])
        got[0] += r
        got[1] += 1
    agree = sum(p == d for p, d in zip(pred, dense_pred, strict=True))
    return dict(
        name=name, budget=budget, accuracy=sum(right) / len(qs), by_kind=by_kind,
        agree_dense=agree / len(qs), answers=[tokenizer.decode(p) for p in pred],
    )  # fmt: skip


def _dense_and_timing(dense: DenseReference, views: dict, task, seed: int, k: int):
    """Dense answers to every question, one at a time; after each of ``k`` seeded questions (not
    the first, whose run warms up), the same question through every view, timed alike (dense and
    squeezed interleaved: load changes hit all alike). The first timed question's squeezed runs
    also capture their last decode step. Returns ``(dense answers, seconds spent, captures)``."""
    from squeeze.patches.hf import observe

    qs = task.questions
    pool = np.arange(1, len(qs)) if len(qs) > 1 else np.arange(len(qs))
    picks = sorted(np.random.default_rng(seed + 1).choice(pool, min(k, len(pool)), replace=False))
    spent: dict = {"picks": [int(i) for i in picks], "dense": 0.0, **{b: 0.0 for b in views}}
    captures = {b: DecodeCapture() for b in views}
    answers = []
    for i, q in enumerate(qs):
        ids, seconds = dense.generate(q.ids, task.new_tokens)
        answers.append(ids)
        if i not in picks:
            continue
        spent["dense"] += seconds
        first = i == picks[0]
        for b, view in views.items():
            with observe(captures[b]) if first else contextlib.nullcontext():
                spent[b] += squeezed_generate(view, q.ids, task.new_tokens)[1]
    return answers, spent, captures


def _speed(rows, views: dict, spent: dict, captures: dict, tokens: int) -> None:
    """Tokens/s of every row from the timed runs, and the attention time of the captured decode
    step at every budget (dense timed on the same step's queries and K/V)."""
    dense_row, dense_ms = rows[0], []
    dense_row["tokens_per_s"] = tokens / spent["dense"]
    for row, (b, view) in zip(rows[1:], views.items(), strict=True):
        d_ms, s_ms = attention_times(
            captures[b].inputs(view.indexes), view.indexes, repeats=10, threads=None
        )
        dense_ms.append(d_ms)
        row.update(attn_ms=s_ms, attn_speedup=d_ms / s_ms, tokens_per_s=tokens / spent[b])
        row["e2e_speedup"] = row["tokens_per_s"] / dense_row["tokens_per_s"]
    dense_row.update(attn_ms=statistics.mean(dense_ms), attn_speedup=1.0, e2e_speedup=1.0)
