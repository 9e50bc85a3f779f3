"""One demo run: a task, its dense answers, one compiled context, and its answers and attention
time at every budget.

Imports torch and transformers.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from squeeze.config import SqueezeConfig

from .task import Task, accuracy, dense_answers, make_task, squeezed_answers
from .timing import attention_times, decode_inputs

#: the budgets the demo plots
BUDGETS = (0.02, 0.05, 0.1, 0.2, 0.4)


def demo_index() -> SqueezeConfig:
    """The demo's index: 20% centroids, one level (needle keys are random codes: finer clusters
    find them, see the README's needle table)."""
    return SqueezeConfig(centroid_ratio=0.2, l1_ratio=None)


@dataclass(frozen=True)
class Settings:
    """What one run does (the defaults are ``squeeze demo``'s).

    Attributes:
        tokens: context tokens.
        questions: questions asked (fewer if the context holds fewer records).
        index: how the context is compiled; its ``budget`` is the highlighted one, its ``window``
            is capped at a quarter of the context.
        budgets: the other budgets run (the plot's points).
        seed: seed of the context and the questions.
        timing_questions: questions whose decode step is timed.
    """

    tokens: int = 4096
    questions: int = 100
    index: SqueezeConfig = field(default_factory=demo_index)
    budgets: tuple[float, ...] = BUDGETS
    seed: int = 1234
    timing_questions: int = 3


@contextlib.contextmanager
def _timed(stages: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    stages[name] = time.perf_counter() - t0


def run(
    model,
    tokenizer,
    settings: Settings | None = None,
    *,
    text: str | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Dense, then squeezed at every budget of ``settings`` on one task (from ``text`` if given).

    Returns ``{"task", "n_context", "n_questions", "budget", "config", "stages" (seconds),
    "compile_timings", "rows"}``; a row is ``{"name", "budget", "accuracy", "kv_fraction",
    "attn_ms", "speedup", "agree_dense"}`` (``kv_fraction``: share of the context's keys read,
    window included, mean over layers).
    """
    from squeeze.patches.hf import compile as squeeze_compile

    s = Settings() if settings is None else settings
    stages: dict[str, float] = {}
    with _timed(stages, "task_s"):
        task = make_task(tokenizer, s.tokens, s.questions, s.seed, text=text)
    n = task.context_ids.numel()
    log(f"context: {n} tokens ({task.kind} task), {len(task.questions)} questions")
    with _timed(stages, "dense_answers_s"):
        dense_pred = dense_answers(model, task.context_ids, task.questions)
    log(f"dense answers: {stages['dense_answers_s']:.1f}s")
    cfg = s.index.replace(window=min(s.index.window, n // 4))
    with _timed(stages, "compile_s"):
        sctx = squeeze_compile(model, task.context_ids, cfg, progress=progress)
    compile_timings = sctx.stats()["timings"]
    log("compile: " + _stages_line(compile_timings))
    with _timed(stages, "squeezed_s"):
        rows = _rows(model, task, sctx, dense_pred, s)
    return dict(
        task=task.kind,
        n_context=n,
        n_questions=len(task.questions),
        budget=cfg.budget,
        config=cfg.to_dict(),
        stages=stages,
        compile_timings=compile_timings,
        rows=rows,
    )


def _stages_line(timings: dict[str, float]) -> str:
    return ", ".join(
        f"{k.removeprefix('compile_').removesuffix('_s')} {v:.1f}s"
        for k, v in timings.items()
        if k.startswith("compile_")
    )


def _rows(model, task: Task, sctx, dense_pred: list[int], s: Settings) -> list[dict]:
    """The dense row, then one row per budget (ascending); attention timed on a few questions."""
    picks = np.random.default_rng(s.seed + 1).choice(
        len(task.questions), size=min(s.timing_questions, len(task.questions)), replace=False
    )
    inputs = [decode_inputs(model, task.context_ids, task.questions[i]) for i in picks]
    dense = dict(
        name="dense",
        budget=1.0,
        accuracy=accuracy(dense_pred, task.answers),
        kv_fraction=1.0,
        attn_ms=None,
        speedup=1.0,
        agree_dense=1.0,
    )
    rows, dense_ms = [dense], []
    for b in sorted({*s.budgets, s.index.budget}):
        view = sctx.with_config(budget=b)
        pred = squeezed_answers(view, task.questions)
        kv_fraction = view.stats()["kv_fraction"]
        times = [attention_times(x, view.indexes) for x in inputs]
        d_ms = statistics.mean(t[0] for t in times)
        s_ms = statistics.mean(t[1] for t in times)
        dense_ms.append(d_ms)
        rows.append(
            dict(
                name=f"squeezed {b:.0%}",
                budget=b,
                accuracy=accuracy(pred, task.answers),
                kv_fraction=kv_fraction,
                attn_ms=s_ms,
                speedup=d_ms / s_ms,
                agree_dense=accuracy(pred, dense_pred),
            )
        )
    dense["attn_ms"] = statistics.mean(dense_ms)
    return rows
