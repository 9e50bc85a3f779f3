"""The plugin's settings: ``additional_config["squeeze"]`` parsed and checked."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY = "squeeze"
KNOWN = ("contexts", "budget", "log_interval_s", "copy_memory_mib")


class SqueezeVllmConfigError(ValueError):
    """``additional_config["squeeze"]`` cannot be used (raised at engine start-up)."""


@dataclass(frozen=True)
class PluginConfig:
    """Attributes:
    contexts: paths of compiled-context files (``SqueezedContext.save``) for the served model.
    budget: fraction of each context's clustered keys a query reads, in (0, 1]; ``None`` keeps
        the budget each file was compiled with.
    log_interval_s: seconds between the "context keys read" log lines (0: never log).
    copy_memory_mib: the most memory (MiB, per rank) the contexts' cluster-ordered K/V copies
        may take together; more fails at start-up. ``None``: no limit.
    """

    contexts: tuple[Path, ...]
    budget: float | None = None
    log_interval_s: float = 10.0
    copy_memory_mib: float | None = None


def plugin_config(additional_config: dict[str, Any] | None) -> PluginConfig | None:
    """``None`` when squeeze is not configured, else the checked :class:`PluginConfig`."""
    if not additional_config or KEY not in additional_config:
        return None
    raw = additional_config[KEY]
    if not isinstance(raw, dict):
        raise SqueezeVllmConfigError(
            f'additional_config["squeeze"] must be a JSON object, got {type(raw).__name__}'
        )
    unknown = sorted(set(raw) - set(KNOWN))
    if unknown:
        raise SqueezeVllmConfigError(
            f'additional_config["squeeze"] has unknown keys {unknown}; known: {", ".join(KNOWN)}'
        )
    paths = _context_paths(raw.get("contexts"))
    budget = raw.get("budget")
    if budget is not None and (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not 0.0 < float(budget) <= 1.0
    ):
        raise SqueezeVllmConfigError(
            f'additional_config["squeeze"]["budget"] must be a number in (0, 1], got {budget!r}'
        )
    interval = raw.get("log_interval_s", 10.0)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, (int, float))
        or not math.isfinite(interval)
        or interval < 0
    ):
        raise SqueezeVllmConfigError(
            'additional_config["squeeze"]["log_interval_s"] must be a finite number >= 0, '
            f"got {interval!r}"
        )
    return PluginConfig(
        paths, None if budget is None else float(budget), float(interval), _memory_limit(raw)
    )


def _context_paths(contexts: Any) -> tuple[Path, ...]:
    """The ``contexts`` entry: a path or a non-empty list of paths, each an existing file,
    no file twice."""
    if isinstance(contexts, str):
        contexts = [contexts]
    if (
        not isinstance(contexts, (list, tuple))
        or not contexts
        or not all(isinstance(c, str) and c for c in contexts)
    ):
        raise SqueezeVllmConfigError(
            'additional_config["squeeze"]["contexts"] must be a non-empty list of '
            f"compiled-context file paths, got {contexts!r}"
        )
    paths = tuple(Path(c).expanduser() for c in contexts)
    seen: dict[Path, Path] = {}
    for p in paths:
        if not p.is_file():
            what = "is not a file" if p.exists() else "does not exist"
            raise SqueezeVllmConfigError(f"squeeze context file {str(p)!r} {what}")
        real = p.resolve()
        if real in seen:
            raise SqueezeVllmConfigError(
                f"squeeze context file {str(p)!r} is listed twice (as {str(seen[real])!r})"
            )
        seen[real] = p
    return paths


def _memory_limit(raw: dict) -> float | None:
    """``copy_memory_mib``: a number > 0, or absent / null (no limit)."""
    limit = raw.get("copy_memory_mib")
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise SqueezeVllmConfigError(
            f'additional_config["squeeze"]["copy_memory_mib"] must be a number > 0 (MiB per '
            f"rank), got {limit!r}"
        )
    return float(limit)
