"""The files of a run: one JSONL file per (configuration, task), one line per scored record, and
the run's manifest (its settings, checked when a run is resumed). The runner writes them, the
reports read them. A task is any object with a ``data_name`` (the file's name, ``/`` making
folders): LongBench's tasks and RULER's (task, length) pairs alike."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from squeeze.config import SqueezeConfig

logger = logging.getLogger("squeeze.eval")
MANIFEST = "run.json"


@dataclass
class ScoreDetails:
    """One record's score in [0, 1] and the metric failures scored 0 on the way (LongBench:
    ``"recursion"``, ``"empty"`` or the exception's type name, one per failing answer)."""

    score: float
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunConfig:
    """The dense baseline (``budget is None``) or one squeezed configuration."""

    budget: float | None = None
    mode: str | None = None

    @property
    def dense(self) -> bool:
        return self.budget is None

    @property
    def name(self) -> str:
        return "dense" if self.dense else f"squeeze-b{self.budget:g}-{self.mode}"


def run_configs(budgets, modes=("threshold",), dense: bool = True) -> list[RunConfig]:
    """The dense baseline (first) and every (mode, budget) pair, budgets in the given order."""
    out = [RunConfig()] if dense else []
    for mode in modes:
        SqueezeConfig(mode=mode)  # validates the mode
        for b in budgets:
            SqueezeConfig(budget=b)  # validates the budget
            out.append(RunConfig(float(b), mode))
    if not out:
        raise ValueError("nothing to run: give at least one budget, or keep the dense baseline")
    if len({c.name for c in out}) != len(out):
        raise ValueError(f"configurations repeat: {[c.name for c in out]}")
    return out


def record_key(record: dict, index: int) -> str:
    return str(record["_id"]) if record.get("_id") is not None else f"#{index}"


def output_path(out_dir: Path, cfg: RunConfig, task) -> Path:
    """``<out_dir>/<config>/<task.data_name>.jsonl``."""
    return Path(out_dir) / cfg.name / f"{task.data_name}.jsonl"


def read_results(path: Path) -> dict[str, dict]:
    """The lines of a results file by record key. A torn last line (an interrupted write) is
    dropped from the file, with a warning, so that appending can go on."""
    if not path.is_file():
        return {}
    done, good, torn = {}, [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
            done[obj["key"]] = obj
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            torn = True
    if torn:
        logger.warning("squeeze.eval: dropping unreadable lines of %s", path)
        path.write_text("".join(x + "\n" for x in good), encoding="utf-8")
    return done


def check_manifest(out_dir: Path, manifest: dict, write: bool = True) -> None:
    """Check the run's settings against the run being resumed there, or (``write``, when there
    is none) write them."""
    path = Path(out_dir) / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(
                f"{out_dir} holds a run with other settings ({', '.join(diff)} differ); "
                "resume with the same settings or use another --out-dir"
            )
        return
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def append_result(path: Path, line: dict) -> None:
    """Append one record's line to a results file (created with its folder if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
