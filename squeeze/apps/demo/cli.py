"""``squeeze demo``: compile one long document, answer questions dense and squeezed, print the
table, say why squeezed is slower where it is, plot accuracy and speed against budget."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..options import Parser, UsageError, add_model_args, check_output, load, read_text
from .document import DOCUMENTS
from .report import by_kind, plot, speed_notes, table
from .run import BUDGETS, Settings, run
from .task import is_needle_tokenizer


def build_parser() -> Parser:
    d = Settings()
    p = Parser(
        prog="squeeze demo",
        description="Compile a real document (about 8K tokens of the standard library's source, "
        "a few needles planted) once; answer about 20 questions with dense attention and with squeezed "
        "attention; print accuracy, agreement with dense, keys and bytes read, attention ms per "
        "decode step and end-to-end tokens/s; plot accuracy and speed against the budget. "
        "Default model: SmolLM2-135M-Instruct (squeeze.demo_model()).",
    )
    p.add_argument(
        "--model",
        default="demo",
        help="an HF causal LM (directory or hub name), 'demo' (SmolLM2-135M-Instruct, the "
        "default) or 'needle' (the shipped 2-layer needle model: key-value records)",
    )
    p.add_argument("--context-file", help="UTF-8 text to use as the document (needles planted)")
    p.add_argument(
        "--document",
        choices=sorted(DOCUMENTS),
        default="source",
        help="the built-in document: the standard library's source (default) or the Python docs",
    )
    p.add_argument("--budget", type=float, default=0.1, help="the highlighted budget")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="budgets for the plot")
    p.add_argument("--tokens", type=int, help="context tokens (default 8000; needle model 4096)")
    p.add_argument("--questions", type=int, default=d.questions)
    p.add_argument("--needles", type=int, help="needles planted (default: 30%% of the questions)")
    p.add_argument("--mode", choices=("threshold", "topk"), default="threshold")
    p.add_argument("--centroid-ratio", type=float, help="level-2 clusters per clustered token")
    p.add_argument("--levels", type=int, choices=(1, 2), help="centroid levels")
    p.add_argument("--timing-questions", type=int, default=d.timing_questions,
                   help="questions generated one at a time for tokens/s")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the excerpt and questions")
    p.add_argument("--plot", default="squeeze-demo.png", help="PNG to write ('' for none)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    return p


def settings(a: argparse.Namespace) -> Settings:
    """The run's :class:`Settings` from the command line; a bad value is a :class:`UsageError`."""
    from squeeze.config import SqueezeConfig, l1_ratio_for

    from .run import demo_index

    try:
        budgets = tuple(float(x) for x in a.budgets.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--budgets {a.budgets!r}: expected numbers like 0.05,0.1") from None
    for b in [*budgets, a.budget]:
        if not 0 < b <= 1:
            raise UsageError(f"budget {b} must be in (0, 1]")
    if (a.tokens is not None and a.tokens < 256) or a.questions < 1 or a.timing_questions < 1:
        raise UsageError("--tokens must be >= 256, --questions and --timing-questions >= 1")
    if a.needles is not None and not 0 <= a.needles <= a.questions:
        raise UsageError("--needles must be between 0 and --questions")
    base = demo_index() if a.model == "needle" else SqueezeConfig()
    ratio = base.centroid_ratio if a.centroid_ratio is None else a.centroid_ratio
    levels = base.levels if a.levels is None else a.levels
    try:
        index = base.replace(
            centroid_ratio=ratio, l1_ratio=l1_ratio_for(ratio, levels), budget=a.budget,
            mode=a.mode,
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(str(err)) from None
    return Settings(
        tokens=a.tokens, questions=a.questions, needles=a.needles, index=index, budgets=budgets,
        seed=a.seed, timing_questions=a.timing_questions,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    """Run the demo; returns the exit status."""
    a = build_parser().parse_args(argv)
    # spinning OpenMP workers get preempted on a shared machine (set before torch loads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    s = settings(a)
    for out in (a.plot, a.json):
        if out:
            check_output(out)
    text = None if a.context_file is None else read_text(a.context_file, "context file")
    source = None if a.context_file is None else Path(a.context_file).name
    t_start = time.perf_counter()
    model, tok = load(a)
    print(f"model: {a.model} loaded in {time.perf_counter() - t_start:.1f}s")
    if text is None and not is_needle_tokenizer(tok):
        source, make = DOCUMENTS[a.document]
        text = make()
    res = run(model, tok, s, text=text, source=source, progress=not a.no_progress)
    res["model"] = a.model
    res["total_s"] = time.perf_counter() - t_start
    report(res, a, model)
    return 0


def report(res: dict, a: argparse.Namespace, model) -> None:
    """Print the table and its notes; write the plot and the JSON the command line asked for."""
    cfg = model.config.get_text_config(decoder=True)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = len(res["layers"])
    print()
    print(table(res))
    print()
    print(
        f"{res['n_questions']} questions over a {res['n_context']}-token context "
        f"({res['source']}), answers of {res['new_tokens']} tokens; keys read: share of the "
        "context's keys (window included), bytes read: K/V bytes read plus centroid bytes scored, "
        f"of dense; attention ms per decode step summed over {layers} layers, dense = the faster "
        "of GQA-packed matmul-softmax-matmul and SDPA; tokens/s: greedy generate, question "
        f"prefill included, {a.timing_questions} questions one at a time, dense and squeezed "
        f"interleaved; same process, {res['threads']} threads, load average "
        f"{res['load_avg'][0][0]:.1f} at the start, {res['load_avg'][1][0]:.1f} at the end."
    )
    print(by_kind(res))
    for line in speed_notes(res, layers, kv_heads, head_dim):
        print(line)
    if a.plot:
        try:
            plot(res, a.plot)
            print(f"plot: {a.plot}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"total {res['total_s']:.1f}s")
