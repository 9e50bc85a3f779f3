"""What the ``squeeze`` subcommands share: a parser whose errors are one line, the model options,
the index-shape options, and reading a text file an option names."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .models import load_model


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, read by :func:`load`."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")


def load(a: argparse.Namespace):
    """(model, tokenizer) of ``a.model`` (``demo``: the shipped model); a bad value is a usage error."""
    try:
        return load_model(a.model, a.dtype, a.device)
    except ValueError as err:
        raise UsageError(str(err)) from err


def add_index_args(p: argparse.ArgumentParser, centroid_ratio: float, levels: int) -> None:
    """``--centroid-ratio`` and ``--levels``, read by :func:`index_config`."""
    p.add_argument("--centroid-ratio", type=float, default=centroid_ratio)
    p.add_argument("--levels", type=int, choices=(1, 2), default=levels, help="centroid levels")


def index_config(a: argparse.Namespace, **fields):
    """The :class:`squeeze.SqueezeConfig` of ``--centroid-ratio`` and ``--levels`` (two levels: one
    level-1 cluster per five level-2 clusters) and ``fields``."""
    from squeeze.config import SqueezeConfig, l1_ratio_for

    l1_ratio = l1_ratio_for(a.centroid_ratio, a.levels)
    return SqueezeConfig(centroid_ratio=a.centroid_ratio, l1_ratio=l1_ratio, **fields)


def check_input(path: str, what: str) -> Path:
    """``path`` as a file to read: ``FileNotFoundError`` when it does not exist,
    ``IsADirectoryError`` when it is a directory, each naming ``what`` and the path."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, not a file")
    if not p.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    return p


def check_output(path: str) -> Path:
    """``path`` as a file to write: its directory exists and is writable, and it is not a
    directory itself (checked before any work is done, naming the path)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise IsADirectoryError(f"output {path} is a directory; give a file name")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write output {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write output {path}: directory {parent} is not writable")
    return p


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of ``path`` (errors name ``what`` and the path)."""
    p = check_input(path, what)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err
