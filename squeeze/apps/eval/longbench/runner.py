"""LongBench as a task family of the shared runner (:mod:`squeeze.apps.eval.runner`).

Per record: the prompt is split and middle-truncated (:mod:`.prompts`), the prediction scored with
LongBench's metrics (:mod:`.metrics`), the run summarised by :mod:`.report`; the shared runner
does the rest (dense and squeezed configurations, one compile per context, resumable JSONL).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import runner
from ..chat import ChatWrapper, PromptIds
from ..results import RunConfig, ScoreDetails
from ..runner import ContextCache, Evaluation, dense_generate, generate_kwargs
from .metrics import score_details
from .prompts import build_prompt
from .report import summarize
from .tasks import Task

__all__ = [
    "ContextCache",
    "Evaluation",
    "LongBench",
    "Settings",
    "dense_generate",
    "evaluate",
    "generate_kwargs",
]


@dataclass
class Settings(runner.Settings):
    """The shared settings, plus ``max_length``: prompt tokens kept by the middle truncation
    (LongBench's model2maxlen)."""

    max_length: int = field(default=0, kw_only=True)

    def manifest(self, model_name: str) -> dict:
        return {**super().manifest(model_name), "max_length": self.max_length}


@dataclass(frozen=True)
class LongBench:
    """The LongBench family: its prompts, metrics and summary (see :class:`runner.Family`)."""

    max_length: int
    name: str = "longbench"

    def prompt(self, tokenizer, wrapper: ChatWrapper, task: Task, record: dict) -> PromptIds:
        return build_prompt(tokenizer, task, record, self.max_length, wrapper)

    def score(self, task: Task, prediction: str, record: dict) -> ScoreDetails:
        return score_details(
            task.data_name, prediction, record["answers"], record.get("all_classes")
        )

    def summarize(self, out_dir, configs: list[RunConfig], keys: dict) -> dict:
        return summarize(out_dir, configs, keys)


def evaluate(model, tokenizer, data, configs, settings: Settings, out_dir, model_name="") -> dict:
    """Run every configuration on every LongBench record of ``data`` (skipping those already
    written under ``out_dir``), then summarise (see :func:`.report.summarize`)."""
    family = LongBench(settings.max_length)
    return runner.evaluate(family, model, tokenizer, data, configs, settings, out_dir, model_name)
