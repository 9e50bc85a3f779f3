"""The ``squeeze`` command.

    squeeze eval longbench --model PATH ...   # LongBench, dense and squeezed (squeeze.eval.longbench)

Each subcommand imports its own dependencies when it runs, so ``squeeze --help`` stays light.
"""

from __future__ import annotations

import argparse
import sys

#: subcommand path → (help, "module:function" taking argv and returning an exit status)
COMMANDS = {
    ("eval", "longbench"): (
        "LongBench v1 / LongBench-E, dense and squeezed in one run",
        "squeeze.eval.longbench.cli:main",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a subcommand; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for path, (_, target) in COMMANDS.items():
        if tuple(argv[: len(path)]) == path:
            import importlib

            module, func = target.split(":")
            return int(getattr(importlib.import_module(module), func)(argv[len(path) :]) or 0)
    parser = argparse.ArgumentParser(
        prog="squeeze",
        description="Squeezed Attention: long fixed contexts, read sparsely.",
        epilog="commands:\n"
        + "\n".join(f"  squeeze {' '.join(p)}  {h}" for p, (h, _) in COMMANDS.items())
        + "\n\n`squeeze <command> --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="*", help="a command listed below")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    parser.error(f"unknown command {' '.join(args.command)!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
