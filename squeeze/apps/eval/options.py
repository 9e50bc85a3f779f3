"""The command-line options every evaluation shares (model, configurations, clustering, output),
what they build, and the one-line error rule (exit status 2 on bad input)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from squeeze.config import SqueezeConfig
from squeeze.demo_models import DemoModelUnavailable

from .chat import CHAT_FORMATS

#: bad input (a ValueError covers the families' data errors): one line on stderr, exit status 2
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, DemoModelUnavailable)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--tokenizer``, ``--dtype``, ``--device``, ``--threads``."""
    p.add_argument(
        "--model", required=True, help="model path, hub id (from_pretrained), demo or needle"
    )
    p.add_argument("--tokenizer", help="tokenizer path or hub id (default: --model)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 on a busy machine)"
    )


def add_run_args(p: argparse.ArgumentParser, out_dir: str, budgets: list[float]) -> None:
    """The configurations (``--budgets``, ``--modes``, ``--no-dense``), the chat format, the
    clustering knobs, the output directory and the plot / progress switches."""
    p.add_argument("--out-dir", default=out_dir, help="output directory (resumable)")
    p.add_argument("--budgets", type=float, nargs="*", default=budgets)
    p.add_argument("--modes", nargs="+", default=["threshold"], choices=["threshold", "topk"])
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("--chat-format", default="auto", choices=CHAT_FORMATS)
    d = SqueezeConfig()  # the library's defaults
    p.add_argument("--centroid-ratio", type=float, default=d.centroid_ratio)
    p.add_argument(
        "--l1-ratio", default=str(d.l1_ratio).lower(), help="a float, or 'none' for one level"
    )
    p.add_argument("--window", type=int, default=d.window)
    p.add_argument("--sinks", type=int, default=d.sinks, help="first tokens kept dense")
    p.add_argument("--kmeans-iters", type=int, default=d.kmeans_iters)
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--chunk-size", type=int, default=1024, help="compile prefill chunk")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def squeeze_config(args: argparse.Namespace) -> SqueezeConfig:
    """The offline clustering knobs of ``args`` (budget and mode are set per configuration)."""
    l1 = None if str(args.l1_ratio).lower() == "none" else float(args.l1_ratio)
    return SqueezeConfig(
        centroid_ratio=args.centroid_ratio,
        l1_ratio=l1,
        window=args.window,
        sinks=args.sinks,
        kmeans_iters=args.kmeans_iters,
        seed=args.seed,
    )


def settings_fields(args: argparse.Namespace) -> dict:
    """The :class:`squeeze.apps.eval.runner.Settings` fields ``args`` sets."""
    return {
        "chat_format": args.chat_format,
        "squeeze": squeeze_config(args),
        "chunk_size": args.chunk_size,
        "progress": not args.no_progress,
    }


def load(args: argparse.Namespace):
    """``(model, tokenizer)`` of ``args``, with ``--threads`` applied (see
    :func:`squeeze.apps.models.load_model`)."""
    import torch

    from squeeze.apps.models import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load_model(args.model, args.dtype, args.device, args.tokenizer)


def run(args: argparse.Namespace, body: Callable[[], dict], report) -> int:
    """A command's main: ``body()`` runs the evaluation and returns its summary; bad input
    (:data:`INPUT_ERRORS`) prints one line on stderr and returns 2; otherwise the ``report``
    module writes the results (``write_results``), the plot (``plot``, unless ``--no-plot``) and
    prints the table (``format_table``), and 0 is returned."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = body()
    except INPUT_ERRORS as err:
        lines = [s.strip() for s in str(err).splitlines() if s.strip()]
        print(f"error: {lines[0] if lines else type(err).__name__}", file=sys.stderr)
        return 2
    report.write_results(summary, args.out_dir)
    if not args.no_plot:
        report.plot(summary, args.out_dir)
    print(report.format_table(summary))
    return 0
