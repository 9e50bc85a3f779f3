"""RULER records: generated per (task, length, sample) from a seed, sized with the model's tokenizer,
written in the LongBench record layout.

A record is ``{_id, dataset, language, length, context, input, answers, all_classes}`` (LongBench's
fields; ``context`` holds the few-shot example, the instruction and the haystack, ``input`` the
question) plus ``answer_prefix`` and ``sample``. Records of one sample share their ``context``, so
the runner compiles it once. Sample ``i`` of a task at a length is drawn from
``random.Random("<seed>/<task>/<length>/<i>")``: it does not depend on the other samples, tasks or
lengths of the run, so a run can grow. The records are kept in ``<out_dir>/data/<length>/<task>.jsonl``
and read back when a run is resumed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..chat import ChatWrapper
from .fit import TooLong, fit
from .haystack import Haystack
from .niah import min_size, niah
from .prompts import prompt_length
from .sample import Sample
from .synthetic import (
    VT_EXAMPLE_TOKENS,
    common_words,
    freq_words,
    fwe_min_size,
    variable_tracking,
    vt_example,
)
from .tasks import Task


def _builder(task: Task, key: str, haystack: Haystack | None, questions: int, measure_text):
    """``(build(n) -> Sample, lo, hi)`` for one sample of ``task``."""
    spec, length = task.spec, task.length
    if spec.kind == "niah":
        hi = len(haystack.words) if spec.haystack == "essay" and haystack else None
        return (
            lambda n: niah(spec, random.Random(key), n, haystack, questions),
            min_size(spec, questions),
            hi,
        )
    if spec.kind == "vt":
        _, example = fit(
            lambda n: vt_example(spec, random.Random(key + "/example"), n),
            measure_text,
            VT_EXAMPLE_TOKENS,
            spec.hops + 1,
            strict=False,  # a tokenizer with long tokens (bytes) gets the smallest example
        )
        build = lambda n: variable_tracking(spec, random.Random(key), n, questions, example)  # noqa: E731
        return build, spec.hops + 1, None
    if spec.kind == "cwe":
        return lambda n: common_words(spec, random.Random(key), n, length), spec.num_cw + 1, None
    gen = task.max_new_tokens
    return (
        lambda n: freq_words(spec, random.Random(key), n, length, gen),
        fwe_min_size(spec, length, gen),
        None,
    )


def generate_sample(
    task: Task,
    index: int,
    tokenizer,
    wrapper: ChatWrapper,
    haystack: Haystack | None,
    seed: int = 42,
    questions: int = 1,
) -> Sample:
    """Sample ``index`` of ``task``: its prompts (the longest question's) plus the answer budget
    hold at most ``task.length`` tokens, and one more haystack unit would pass it.

    Raises:
        ValueError: the length is too short for the task, or the haystack too short for it.
    """
    key = f"{seed}/{task.name}/{task.length}/{index}"

    def size(s: Sample) -> int:
        longest = max(
            prompt_length(tokenizer, wrapper, s.fixed, q.text, q.prefix) for q in s.questions
        )
        return longest + task.max_new_tokens

    def measure_text(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    build, lo, hi = _builder(task, key, haystack, questions, measure_text)
    try:
        n, sample = fit(build, size, task.length, lo, hi)
    except TooLong as err:
        raise ValueError(f"length {task.length} is too short for {task.name}: {err}") from None
    reached = size(sample)
    if n == hi and reached < task.length - max(16, task.length // 100):
        raise ValueError(
            f"the haystack {haystack.name} is too short for {task.name} at {task.length} "
            f"tokens: all its {len(haystack.words)} words make {reached}; give a longer file"
        )
    return sample


def records(task: Task, index: int, sample: Sample) -> list[dict]:
    """The sample's records, one per question (LongBench's layout, see the module docstring)."""
    return [
        {
            "_id": f"{task.name}-{task.length}-{index}-{j}",
            "dataset": task.name,
            "language": "en",
            "length": task.length,
            "sample": index,
            "context": sample.fixed,
            "input": q.text,
            "answer_prefix": q.prefix,
            "answers": list(q.answers),
            "all_classes": None,
        }
        for j, q in enumerate(sample.questions)
    ]


def data_path(out_dir, task: Task) -> Path:
    return Path(out_dir) / "data" / f"{task.data_name}.jsonl"


def read_records(path: Path) -> list[dict]:
    """The records of a data file (none if it is missing; a torn last line is dropped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def task_data(task: Task, samples: int, out_dir, make, reuse: bool = True) -> list[dict]:
    """The records of samples ``0..samples-1`` of ``task``: those in the run's data file (if
    ``reuse``), and the missing samples made by ``make(index) -> list[dict]`` (then written there
    too)."""
    path = data_path(out_dir, task)
    old = read_records(path) if reuse else []
    kept = [r for r in old if r.get("sample", samples) < samples]
    have = {r["sample"] for r in kept}
    new = [r for i in range(samples) if i not in have for r in make(i)]
    if new or not reuse:
        kept = sorted(kept + new, key=lambda r: (r["sample"], int(r["_id"].rsplit("-", 1)[1])))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8"
        )
        tmp.replace(path)
    return kept
