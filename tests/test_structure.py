"""The shape of the package, measured: no import cycle, one reader of ``$SQUEEZE_BACKEND``, short
modules and short functions.

Imports are read with ``ast`` from every module of ``squeeze/``, function-level imports
included; an edge is an explicit import (``import a.b``, ``from a import b`` naming a module or
a name of ``a``), not the parent packages Python initialises on the way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "squeeze"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``module → modules of squeeze it imports`` (function-level imports included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # a submodule, or a name of the module
                base = _resolve(module, path, node)
                subs = [f"{base}.{alias.name}" for alias in node.names]
                targets = [s if s in modules else base for s in subs]
            for target in targets:
                if target in modules and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_vllm_does_not_import_hf():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("squeeze.patches.vllm"):
            assert not {t for t in targets if t.startswith("squeeze.patches.hf")}, module


def test_the_core_does_not_import_the_tools():
    tools = ("squeeze.apps", "squeeze.__main__")
    for module, targets in import_graph().items():
        if module.startswith(tools):
            continue
        assert not {t for t in targets if t.startswith(tools)}, module


def test_squeeze_backend_is_read_in_one_place():
    readers = [
        str(path.relative_to(ROOT))
        for path in sorted(PACKAGE.rglob("*.py"))
        if "SQUEEZE_BACKEND" in path.read_text().replace('"$SQUEEZE_BACKEND"', "")
        and _reads_env(path)
    ]
    assert readers == ["squeeze/kernels/dispatch.py"], readers


def test_the_env_reader_finder_finds_readers(tmp_path):
    cases = {
        'import os\nos.environ.get("SQUEEZE_BACKEND")': True,
        'import os\nos.getenv("SQUEEZE_BACKEND", "")': True,
        'import os\nos.environ["SQUEEZE_BACKEND"]': True,
        'import os\nNAME = "SQUEEZE_BACKEND"\nos.environ.get(NAME)': True,
        '"""Set $SQUEEZE_BACKEND=torch to force the references."""': False,
    }
    for i, (text, reads) in enumerate(cases.items()):
        path = tmp_path / f"m{i}.py"
        path.write_text(text)
        assert _reads_env(path) is reads, text


def _reads_env(path: Path) -> bool:
    """Whether the module reads the environment variable (``os.environ`` / ``os.getenv``
    with the name, or through a constant holding it)."""
    tree = ast.parse(path.read_text())
    names = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and node.value.value == "SQUEEZE_BACKEND"
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_env_read(node.func):
            args = node.args[:1]
        elif isinstance(node, ast.Subscript) and _is_environ(node.value):
            args = [node.slice]
        else:
            continue
        for arg in args:
            if isinstance(arg, ast.Constant) and arg.value == "SQUEEZE_BACKEND":
                return True
            if isinstance(arg, ast.Name) and arg.id in names:
                return True
    return False


def _is_environ(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def _is_env_read(func) -> bool:
    if isinstance(func, ast.Attribute) and func.attr in ("get", "getenv", "pop"):
        return _is_environ(func.value) or func.attr == "getenv"
    return False


def _sized_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(ROOT)), path


@pytest.mark.parametrize("rel,path", list(_sized_files()), ids=lambda x: str(x))
def test_module_is_short(rel, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{rel} has {lines} lines (at most {MAX_MODULE_LINES})"


def test_functions_are_short():
    long = []
    for rel, path in _sized_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)
