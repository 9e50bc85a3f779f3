"""The ``squeeze`` command.

    squeeze demo [--model PATH --context-file FILE --budget 0.1 --device cpu]   # dense vs squeezed
    squeeze compile MODEL CONTEXT_FILE -o ctx.sqz [--budget --levels --mode --window ...]
    squeeze generate MODEL --context ctx.sqz (--prompt TEXT | --prompts FILE) [--stats]
    squeeze info ctx.sqz [--verify]               # header, per-layer shapes; --verify: whole file
    squeeze bench {kmeans,attention,e2e,vllm,fidelity} ...  # the scripts in benchmarks/
    squeeze eval longbench --model PATH ...       # LongBench, dense and squeezed
    squeeze eval ruler --model demo ...           # RULER-style synthetic tasks, generated here

Each subcommand imports its own dependencies when it runs, so ``squeeze --help`` stays light.
Errors print one line (``squeeze: error: ...``) and exit non-zero; ``--verbose`` anywhere on the
command line shows the traceback instead. ``MODEL`` may be ``demo`` (SmolLM2-135M-Instruct,
``squeeze.demo_model()``) or ``needle`` (the shipped 2-layer needle model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import (
    Parser,
    UsageError,
    add_index_args,
    add_model_args,
    check_input,
    check_output,
    index_config,
    load,
    read_text,
)

#: subcommand path → (help, "module:function" taking argv and returning an exit status)
COMMANDS = {
    ("demo",): (
        "dense vs squeezed attention on a long context: accuracy, keys read, speed, plot",
        "squeeze.apps.demo.cli:main",
    ),
    ("compile",): ("cluster a context once and save it (ctx.sqz)", "squeeze.apps.cli:compile_main"),
    ("generate",): ("answer prompts over a compiled context", "squeeze.apps.cli:generate_main"),
    ("info",): ("what an index or compiled context file holds", "squeeze.apps.info:main"),
    ("bench", "kmeans"): ("flash k-means vs faiss", "squeeze.apps.cli:bench_kmeans"),
    ("bench", "attention"): (
        "squeezed vs dense attention, decode and prefill",
        "squeeze.apps.cli:bench_attention",
    ),
    ("bench", "e2e"): (
        "HF generate on a real model, dense vs squeezed: tokens/s, attention, overhead",
        "squeeze.apps.cli:bench_e2e",
    ),
    ("bench", "vllm"): (
        "the vLLM plugin against vLLM's own attention",
        "squeeze.apps.cli:bench_vllm",
    ),
    ("bench", "fidelity"): (
        "accuracy on a real model: perplexity, passkeys, agreement, bytes_fraction",
        "squeeze.apps.cli:bench_fidelity",
    ),
    ("eval", "longbench"): (
        "LongBench v1 / LongBench-E, dense and squeezed in one run",
        "squeeze.apps.eval.longbench.cli:main",
    ),
    ("eval", "ruler"): (
        "RULER's synthetic long-context tasks, generated here, dense and squeezed",
        "squeeze.apps.eval.ruler.cli:main",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a subcommand; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        print("squeeze: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if verbose:
            raise
        print(f"squeeze: error: {_one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1


def _one_line(err: BaseException) -> str:
    lines = [s.strip() for s in str(err).strip().splitlines() if s.strip()]
    text = lines[0] if lines else type(err).__name__
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text


def _dispatch(argv: list[str]) -> int:
    for path, (_, target) in COMMANDS.items():
        if tuple(argv[: len(path)]) == path:
            import importlib

            module, func = target.split(":")
            return int(getattr(importlib.import_module(module), func)(argv[len(path) :]) or 0)
    parser = argparse.ArgumentParser(
        prog="squeeze",
        description="Squeezed Attention: long fixed contexts, read sparsely.",
        epilog="commands:\n"
        + "\n".join(f"  squeeze {' '.join(p):<16} {h}" for p, (h, _) in COMMANDS.items())
        + "\n\n`squeeze <command> --help` for a command's options; --verbose for tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="*", help="a command listed below")
    if any(a in ("-h", "--help") for a in argv[:1]) or not argv:
        parser.print_help()
        return 0
    raise UsageError(f"unknown command {' '.join(argv)!r} (squeeze --help lists them)")


# ---- compile / generate / info -----------------------------------------------------------------
def compile_main(argv: list[str]) -> int:
    """``squeeze compile MODEL CONTEXT_FILE -o OUT``: tokenize, compile, save."""
    p = Parser(prog="squeeze compile", description="Cluster a context once and save it.")
    p.add_argument("model", help="model directory, hub name, 'demo' or 'needle'")
    p.add_argument("context_file", help="UTF-8 text file: the fixed context")
    p.add_argument("-o", "--output", required=True, help="the compiled context file to write")
    from squeeze.config import MODES, SqueezeConfig

    default = SqueezeConfig()
    p.add_argument(
        "--budget", type=float, default=default.budget, help="share of clustered keys read"
    )
    p.add_argument("--mode", choices=MODES, default=default.mode)
    p.add_argument("--window", type=int, default=default.window, help="last tokens kept dense")
    p.add_argument("--sinks", type=int, default=default.sinks, help="first tokens kept dense")
    add_index_args(p, centroid_ratio=default.centroid_ratio, levels=default.levels)
    p.add_argument("--chunk-size", type=int, default=1024, help="prefill tokens per forward")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    a = p.parse_args(argv)
    text = read_text(a.context_file, "context file")
    check_output(a.output)  # before the compile, not after it
    import time

    cfg = index_config(a, budget=a.budget, window=a.window, sinks=a.sinks, mode=a.mode)
    t0 = time.perf_counter()
    model, tok = load(a)
    print(f"model loaded in {time.perf_counter() - t0:.1f}s")
    ids = tok(text, return_tensors="pt").input_ids[0]
    from squeeze.patches.hf import compile as squeeze_compile

    ctx = squeeze_compile(model, ids, cfg, chunk_size=a.chunk_size, progress=not a.no_progress)
    ctx.save(a.output)
    t = ctx.stats()["timings"]
    stages = ", ".join(
        f"{k.removeprefix('compile_').removesuffix('_s')} {v:.2f}s" for k, v in t.items()
    )
    size = Path(a.output).stat().st_size / 2**20
    print(f"compiled {ids.numel()} tokens, {len(ctx.indexes)} squeezed layers: {stages}")
    print(f"wrote {a.output} ({size:.1f} MiB)")
    return 0


def generate_main(argv: list[str]) -> int:
    """``squeeze generate MODEL --context FILE (--prompt TEXT | --prompts FILE)``."""
    p = Parser(prog="squeeze generate", description="Answer prompts over a compiled context.")
    p.add_argument("model", help="the model the context was compiled with (or 'demo', 'needle')")
    p.add_argument("--context", required=True, help="compiled context file (squeeze compile)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one prompt")
    g.add_argument("--prompts", help="a file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--budget", type=float, help="override the compiled budget")
    p.add_argument("--mode", choices=("threshold", "topk"), help="override the compiled mode")
    p.add_argument("--stats", action="store_true", help="print keys read and timings")
    add_model_args(p)
    a = p.parse_args(argv)
    check_input(a.context, "context file")
    prompts = [a.prompt] if a.prompt is not None else read_text(a.prompts, "prompts file")
    if isinstance(prompts, str):
        prompts = [s for s in prompts.splitlines() if s.strip()]
    if not prompts:
        raise UsageError("no prompts given (the prompts file is empty)")
    model, tok = load(a)
    from squeeze.patches.hf import SqueezedContext

    ctx = SqueezedContext.load(a.context, model)
    changes = {k: v for k, v in (("budget", a.budget), ("mode", a.mode)) if v is not None}
    if changes:
        ctx = ctx.with_config(**changes)
    qs = [tok(s, add_special_tokens=False, return_tensors="pt").input_ids[0] for s in prompts]
    answers = ctx.generate(qs, max_new_tokens=a.max_new_tokens, do_sample=False)
    for ans in answers:
        print(tok.decode(ans, skip_special_tokens=True).strip())
    if a.stats:
        s = ctx.stats()
        print(
            f"# {len(prompts)} prompts, context {s['n_context']} tokens, budget {s['budget']}"
            f" ({s['mode']}): keys read {s['kv_fraction']:.1%} of the context,"
            f" {s['clustered_fraction']:.1%} of the clustered keys;"
            f" generate {s['timings'].get('generate_s', 0.0):.2f}s"
        )
        for i, layer in s["layers"].items():
            print(
                f"# layer {i}: keys read {layer['kv_fraction']:.1%},"
                f" clustered {layer['clustered_fraction']:.1%}, calls {layer['calls']}"
            )
    return 0


# ---- bench: delegate to the scripts in benchmarks/ ---------------------------------------------
def _bench(script: str, argv: list[str], prefix: tuple[str, ...] = ()) -> int:
    import subprocess

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    path = root / script
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: benchmarks ship with the source checkout, not the wheel"
        )
    return subprocess.call([sys.executable, str(path), *prefix, *argv])


def bench_kmeans(argv: list[str]) -> int:
    return _bench("bench_kmeans.py", argv)


def bench_attention(argv: list[str]) -> int:
    only = () if "--only" in argv else ("--only", "decode", "--only", "prefill")
    return _bench("bench_cpu.py", argv, only)


def bench_e2e(argv: list[str]) -> int:
    return _bench("bench_e2e.py", argv)


def bench_vllm(argv: list[str]) -> int:
    return _bench("bench_vllm.py", argv)


def bench_fidelity(argv: list[str]) -> int:
    return _bench("fidelity_real.py", argv)


if __name__ == "__main__":
    sys.exit(main())
