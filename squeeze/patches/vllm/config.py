"""The plugin's settings: ``additional_config["squeeze"]`` parsed and checked."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY = "squeeze"


class SqueezeVllmConfigError(ValueError):
    """``additional_config["squeeze"]`` cannot be used (raised at engine start-up)."""


@dataclass(frozen=True)
class PluginConfig:
    """Attributes:
    contexts: paths of compiled-context files (``SqueezedContext.save``) for the served model.
    budget: fraction of each context's clustered keys a query reads, in (0, 1]; ``None`` keeps
        the budget each file was compiled with.
    log_interval_s: seconds between the "context keys read" log lines (0: never log).
    """

    contexts: tuple[Path, ...]
    budget: float | None = None
    log_interval_s: float = 10.0


def plugin_config(additional_config: dict[str, Any] | None) -> PluginConfig | None:
    """``None`` when squeeze is not configured, else the checked :class:`PluginConfig`."""
    if not additional_config or KEY not in additional_config:
        return None
    raw = additional_config[KEY]
    if not isinstance(raw, dict):
        raise SqueezeVllmConfigError(
            f'additional_config["squeeze"] must be a JSON object, got {type(raw).__name__}'
        )
    unknown = sorted(set(raw) - {"contexts", "budget", "log_interval_s"})
    if unknown:
        raise SqueezeVllmConfigError(
            f'additional_config["squeeze"] has unknown keys {unknown}; '
            "known: contexts, budget, log_interval_s"
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
    return PluginConfig(paths, None if budget is None else float(budget), float(interval))


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
