"""``python -m squeeze.apps.eval.longbench``: the dense baseline and squeezed budgets on LongBench.

Example (the paper's setting, LongChat-7B-v1.5-32K at budgets 0.3 / 0.2 / 0.1)::

    python -m squeeze.apps.eval.longbench --model lmsys/longchat-7b-v1.5-32k --chat-format vicuna \\
        --max-length 31500 --tasks english --budgets 0.3 0.2 0.1 --out-dir runs/longchat

``main(argv)`` returns the exit status: 0 done, 2 bad input (the message says which).
"""

from __future__ import annotations

import argparse
import logging

from ..options import add_model_args, add_run_args, load, run, settings_fields
from ..results import run_configs
from .data import DEFAULT_REPO, load_task
from .tasks import MAX_LENGTH_BY_WINDOW, MODEL_MAX_LENGTHS, resolve_tasks

logger = logging.getLogger("squeeze.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m squeeze.apps.eval.longbench",
        description="LongBench (v1 / LongBench-E) with the official prompts and scoring: the dense "
        "baseline and squeezed attention at one or more budgets, on the same records.",
    )
    add_model_args(p)
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["all"],
        help="task names, or all / english / chinese (default all); '<task>_e' for LongBench-E",
    )
    p.add_argument("-e", "--longbench-e", action="store_true", help="the LongBench-E tasks")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-dir", help="directory of LongBench's data.zip JSONL files")
    src.add_argument(
        "--dataset",
        default=DEFAULT_REPO,
        help=f"datasets repo id or local path, Parquet (default {DEFAULT_REPO})",
    )
    p.add_argument("--limit", type=int, help="first N records of each task only")
    p.add_argument(
        "--max-length",
        help="prompt tokens kept (middle truncation): an int or a LongBench model name "
        f"({', '.join(MODEL_MAX_LENGTHS)}); default from the model's context window",
    )
    add_run_args(p, "longbench_results", [0.3, 0.2, 0.1])
    return p


def resolve_max_length(value, model) -> int:
    if value is None:
        cfg = model.config.get_text_config(decoder=True)
        window = getattr(cfg, "max_position_embeddings", None)
        if window in MAX_LENGTH_BY_WINDOW:
            return MAX_LENGTH_BY_WINDOW[window]
        if not window:
            raise ValueError("the model config has no max_position_embeddings: pass --max-length")
        chosen = max(window - 512, 2)
        logger.warning("squeeze.eval: --max-length not given; using %d (window - 512)", chosen)
        return chosen
    if value in MODEL_MAX_LENGTHS:
        return MODEL_MAX_LENGTHS[value]
    try:
        n = int(value)
    except ValueError:
        raise ValueError(
            f"--max-length must be an int or one of {', '.join(MODEL_MAX_LENGTHS)}, got {value!r}"
        ) from None
    if n < 2:
        raise ValueError(f"--max-length must be >= 2, got {n}")
    return n


def main(argv=None) -> int:
    """Run the evaluation; print the summary table last. Returns the exit status."""
    from . import report

    args = build_parser().parse_args(argv)
    return run(args, lambda: _evaluate(args), report)


def _evaluate(args) -> dict:
    from .runner import Settings, evaluate

    tasks = resolve_tasks(args.tasks, args.longbench_e)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    configs = run_configs(args.budgets, args.modes, dense=not args.no_dense)
    fields = settings_fields(args)
    # every task's data is loaded and checked before the model runs anything
    data = {t: load_task(t, args.data_dir, args.dataset, args.limit) for t in tasks}
    model, tokenizer = load(args)
    settings = Settings(max_length=resolve_max_length(args.max_length, model), **fields)
    import torch

    torch.manual_seed(42)  # LongBench's seed (decoding is greedy)
    return evaluate(model, tokenizer, data, configs, settings, args.out_dir, args.model)
