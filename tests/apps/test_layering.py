"""The library never imports its tools: no module of ``squeeze`` outside ``squeeze/apps`` imports
``squeeze.apps`` (``squeeze/__main__.py``, the ``python -m squeeze`` entry point, excepted)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "squeeze"


def _module(path: Path) -> list[str]:
    """``squeeze/patches/hf/cache.py`` → ``["squeeze", "patches", "hf", "cache"]``."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported(path: Path) -> set[str]:
    """Every module name ``path`` imports, relative imports made absolute."""
    package = _module(path) if path.name == "__init__.py" else _module(path)[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def test_the_core_never_imports_the_apps():
    core = [
        p
        for p in ROOT.rglob("*.py")
        if "apps" not in p.relative_to(ROOT).parts[:1] and p.name != "__main__.py"
    ]
    assert len(core) > 10
    offenders = {
        str(p.relative_to(ROOT.parent)): sorted(
            n for n in imported(p) if n == "squeeze.apps" or n.startswith("squeeze.apps.")
        )
        for p in core
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_relative_imports_resolve():
    """The walk above sees relative imports (the check would pass vacuously otherwise)."""
    names = imported(ROOT / "apps" / "eval" / "longbench" / "runner.py")
    assert "squeeze.apps.eval.longbench.metrics" in names
    assert "squeeze.patches.hf" in imported(ROOT / "__init__.py")
