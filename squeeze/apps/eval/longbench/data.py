"""Loading LongBench records: official ``data.zip`` JSONL files, or ``datasets.load_dataset``.

We ship no LongBench data. ``--data-dir`` points at the unpacked official ``data.zip``
(``<task>.jsonl`` and ``<task>_e.jsonl``). Otherwise ``datasets.load_dataset(repo, <task>,
split="test")`` loads a Parquet mirror (default ``Xnhyacinth/LongBench``; the official
``THUDM/LongBench`` repo is a loading script, which ``datasets`` >= 4 refuses) or a local copy of
one; remote code is never enabled.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tasks import Task

DEFAULT_REPO = "Xnhyacinth/LongBench"


class DataError(ValueError):
    """Missing data, or a record without the fields a task needs."""


def required_fields(task: Task) -> tuple[str, ...]:
    fields = ["context", "answers"]
    if "{input}" in task.template:
        fields.append("input")
    if task.metric == "classification":
        fields.append("all_classes")
    if task.longbench_e:
        fields.append("length")
    return tuple(fields)


def check_record(task: Task, record, where: str) -> dict:
    """``record`` as a dict with the fields ``task`` needs, of the right types.

    Raises:
        DataError: naming ``where`` (file and line, or dataset and row) and the field.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [f for f in required_fields(task) if record.get(f) is None]
    if missing:
        raise DataError(
            f"{where}: record {record.get('_id', '?')!r} lacks {missing} "
            f"(a {task.data_name} record needs {list(required_fields(task))})"
        )
    for name in ("context", "input"):
        if name in record and record[name] is not None and not isinstance(record[name], str):
            raise DataError(f"{where}: field {name!r} must be a string")
    answers = record["answers"]
    if isinstance(answers, str) or not isinstance(answers, (list, tuple)) or not answers:
        raise DataError(f"{where}: field 'answers' must be a non-empty list of strings")
    if not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: field 'answers' must hold strings only")
    if task.longbench_e and (
        isinstance(record["length"], bool) or not isinstance(record["length"], int)
    ):
        raise DataError(f"{where}: field 'length' must be an int, got {record['length']!r}")
    return dict(record, answers=list(answers))


def load_jsonl(path: Path, task: Task) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from err
            records.append(check_record(task, obj, f"{path}:{n}"))
    return records


def load_task(task: Task, data_dir=None, repo: str = DEFAULT_REPO, limit: int | None = None):
    """The records of ``task``, checked.

    Args:
        data_dir: a directory of official JSONL files; ``None`` uses ``datasets``.
        repo: the ``datasets`` repo id or local path (when ``data_dir`` is ``None``).
        limit: keep the first ``limit`` records only.

    Raises:
        DataError: the directory or the task's file is missing, or a record is malformed.
    """
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"--data-dir {root} is not a directory (unpack LongBench's data.zip)")
        path = root / f"{task.data_name}.jsonl"
        if not path.is_file():
            raise DataError(f"{path} not found: --data-dir holds no {task.data_name} data")
        records = load_jsonl(path, task)
    else:
        records = _load_datasets(task, repo)
    if not records:
        raise DataError(f"{task.data_name}: no records")
    return records[:limit] if limit is not None else records


def _load_datasets(task: Task, repo: str) -> list[dict]:
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "loading LongBench without --data-dir needs `datasets`: pip install "
            "'squeezed-attention[eval]'"
        ) from err
    try:
        ds = datasets.load_dataset(repo, task.data_name, split="test")
    except Exception as err:  # datasets raises many types; keep the cause
        raise DataError(
            f"datasets.load_dataset({repo!r}, {task.data_name!r}, split='test') failed: {err}"
        ) from err
    return [check_record(task, row, f"{repo}/{task.data_name}[{i}]") for i, row in enumerate(ds)]
