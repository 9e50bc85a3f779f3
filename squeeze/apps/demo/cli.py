"""``squeeze demo``: compile one long context, answer questions dense and squeezed, print the table."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..options import (
    Parser,
    UsageError,
    add_index_args,
    add_model_args,
    index_config,
    load,
    read_text,
)
from .report import plot, table
from .run import BUDGETS, Settings, run


def build_parser() -> Parser:
    d = Settings()
    p = Parser(
        prog="squeeze demo",
        description="Compile a long context once; answer questions with dense attention and with "
        "squeezed attention; print accuracy, keys read, attention time per decode step and speedup; "
        "plot accuracy and speedup against the budget. Default: the shipped needle model.",
    )
    p.add_argument(
        "--model",
        default="needle",
        help="model directory, hub name, 'demo' (SmolLM2-135M-Instruct) or 'needle' (default: the "
        "shipped needle model)",
    )
    p.add_argument("--context-file", help="UTF-8 text to use as the context (quote questions)")
    p.add_argument("--budget", type=float, default=d.index.budget, help="the highlighted budget")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="budgets for the plot")
    p.add_argument("--tokens", type=int, default=d.tokens, help="context tokens")
    p.add_argument("--questions", type=int, default=d.questions)
    p.add_argument("--mode", choices=("threshold", "topk"), default=d.index.mode)
    add_index_args(p, d.index.centroid_ratio, d.index.levels)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the context and questions")
    p.add_argument("--plot", default="squeeze-demo.png", help="PNG to write ('' for none)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    return p


def settings(a: argparse.Namespace) -> Settings:
    """The run's :class:`Settings` from the command line; a bad value is a :class:`UsageError`."""
    try:
        budgets = tuple(float(x) for x in a.budgets.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--budgets {a.budgets!r}: expected numbers like 0.05,0.1") from None
    for b in [*budgets, a.budget]:
        if not 0 < b <= 1:
            raise UsageError(f"budget {b} must be in (0, 1]")
    if a.tokens < 256 or a.questions < 1:
        raise UsageError("--tokens must be >= 256 and --questions >= 1")
    index = index_config(a, budget=a.budget, mode=a.mode)
    return Settings(
        tokens=a.tokens, questions=a.questions, index=index, budgets=budgets, seed=a.seed
    )


def main(argv: list[str]) -> int:
    """Run the demo; returns the exit status."""
    a = build_parser().parse_args(argv)
    # spinning OpenMP workers get preempted on a shared machine (set before torch loads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    s = settings(a)
    text = None if a.context_file is None else read_text(a.context_file, "context file")
    t_start = time.perf_counter()
    model, tok = load(a)
    print(f"model: {a.model} loaded in {time.perf_counter() - t_start:.1f}s")
    res = run(model, tok, s, text=text, progress=not a.no_progress)
    res["total_s"] = time.perf_counter() - t_start
    report(res, a)
    return 0


def report(res: dict, a: argparse.Namespace) -> None:
    """Print the table and its notes; write the plot and the JSON the command line asked for."""
    print()
    print(table(res))
    print()
    print(
        f"{res['n_questions']} questions over a {res['n_context']}-token context; attention ms per "
        "decode step summed over layers, dense = GQA-packed matmul-softmax-matmul, same process."
    )
    chosen = [r for r in res["rows"] if r["budget"] == a.budget and r["name"] != "dense"]
    if chosen and chosen[0]["speedup"] < 1:
        print(
            "note: at this size (a tiny model, few KV heads, a short context) the cluster lookup's "
            "fixed cost outweighs the keys it saves; `squeeze bench attention` measures the "
            "long-context regime the method is for."
        )
    if a.plot:
        try:
            plot(res, a.plot)
            print(f"plot: {a.plot}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"total {res['total_s']:.1f}s")
