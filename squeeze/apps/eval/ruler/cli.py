"""``squeeze eval ruler`` (``python -m squeeze.apps.eval.ruler``): RULER's synthetic tasks, generated
here, for the dense baseline and squeezed budgets.

Example (SmolLM2-135M-Instruct, 2K/4K/8K, dense and budgets 0.05 / 0.1 / 0.2)::

    squeeze eval ruler --model demo --lengths 2k 4k 8k --budgets 0.05 0.1 0.2 --out-dir runs/ruler

``main(argv)`` returns the exit status: 0 done, 2 bad input (the message says which).
"""

from __future__ import annotations

import argparse

from ..options import add_model_args, add_run_args, load, run, settings_fields
from ..results import run_configs
from .haystack import load_haystack
from .tasks import DEFAULT_LENGTHS, GROUPS, TASK_NAMES, Task, parse_length, resolve_tasks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="squeeze eval ruler",
        description="RULER's synthetic long-context tasks (needle in a haystack, variable "
        "tracking, common / frequent words), generated from a seed at the model's token lengths: "
        "the dense baseline and squeezed attention at one or more budgets, on the same records.",
    )
    add_model_args(p)
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["all"],
        help=f"task names or groups ({', '.join(GROUPS)}); tasks: {', '.join(TASK_NAMES)}",
    )
    p.add_argument(
        "--lengths",
        nargs="+",
        default=[str(n) for n in DEFAULT_LENGTHS],
        help="prompt + answer tokens (the model's tokenizer and chat template), e.g. 2k 4k 8k; "
        "at most the model's max_position_embeddings (default 2048 4096 8192)",
    )
    p.add_argument(
        "--samples", type=int, default=10, help="haystacks per task and length (RULER: 500)"
    )
    p.add_argument(
        "--questions",
        type=int,
        default=1,
        help="questions per haystack for the NIAH and vt tasks (default 1, RULER's; more plant "
        "more needles / chains, and each haystack is compiled once for all its questions)",
    )
    p.add_argument("--data-seed", type=int, default=42, help="generator seed (RULER's default)")
    p.add_argument(
        "--haystack",
        default="docs",
        help="real text of the essay tasks: docs (the standard library's documentation), source "
        "(its .py files) or a UTF-8 file (default docs)",
    )
    add_run_args(p, "ruler_results", [0.05, 0.1, 0.2])
    return p


def check_lengths(lengths: list[int], model) -> None:
    """``ValueError`` for a length above the model's ``max_position_embeddings``."""
    cfg = model.config.get_text_config(decoder=True)
    limit = getattr(cfg, "max_position_embeddings", None)
    over = [n for n in lengths if limit and n > limit]
    if over:
        raise ValueError(
            f"length {over[0]} is above the model's limit of {limit} positions "
            "(max_position_embeddings)"
        )


def main(argv=None) -> int:
    """Generate (or read back) the records, run them, print the summary table last. Returns the
    exit status."""
    from . import report

    args = build_parser().parse_args(argv)
    return run(args, lambda: _evaluate(args), report)


def _evaluate(args) -> dict:
    from .runner import Settings, evaluate, make_data

    names = resolve_tasks(args.tasks)
    lengths = sorted({parse_length(x) for x in args.lengths})
    for flag, value in (("--samples", args.samples), ("--questions", args.questions)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    configs = run_configs(args.budgets, args.modes, dense=not args.no_dense)
    fields = settings_fields(args)
    haystack = load_haystack(args.haystack)
    model, tokenizer = load(args)
    check_lengths(lengths, model)
    data = {
        "seed": args.data_seed,
        "questions": args.questions,
        "haystack": haystack.name,
        "haystack_sha256": haystack.sha256,
        "tokenizer": args.tokenizer,
    }
    settings = Settings(**fields, data=data)
    tasks = [Task(name, n) for n in lengths for name in names]
    records = make_data(
        tasks, tokenizer, settings, args.out_dir, args.samples, haystack, args.model
    )
    return evaluate(model, tokenizer, records, configs, settings, args.out_dir, args.model)
