"""RULER as a task family of the shared runner (:mod:`squeeze.apps.eval.runner`), and the data of a
run: records generated for every (task, length), or read back from the run's data files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import runner
from ..chat import ChatWrapper, PromptIds, chat_wrapper
from ..results import MANIFEST, RunConfig, ScoreDetails, check_manifest
from .data import generate_sample, records, task_data
from .haystack import Haystack
from .prompts import build_prompt
from .report import summarize
from .scoring import score
from .tasks import Task


@dataclass
class Settings(runner.Settings):
    """The shared settings, plus ``data``: what the records depend on besides the model and the
    chat format (data seed, questions per haystack, haystack name and SHA-256, tokenizer),
    checked when a run is resumed."""

    data: dict = field(default_factory=dict, kw_only=True)

    def manifest(self, model_name: str) -> dict:
        return {**super().manifest(model_name), "data": self.data}


@dataclass(frozen=True)
class Ruler:
    """The RULER family: its prompts, score and summary (see :class:`runner.Family`)."""

    name: str = "ruler"

    def prompt(self, tokenizer, wrapper: ChatWrapper, task: Task, record: dict) -> PromptIds:
        return build_prompt(tokenizer, wrapper, record)

    def score(self, task: Task, prediction: str, record: dict) -> ScoreDetails:
        return score(prediction, record["answers"])

    def summarize(self, out_dir, configs: list[RunConfig], keys: dict) -> dict:
        return summarize(out_dir, configs, keys)


def make_data(
    tasks: list[Task],
    tokenizer,
    settings: Settings,
    out_dir,
    samples: int,
    haystack: Haystack | None,
    model_name: str = "",
) -> dict[Task, list[dict]]:
    """Every task's records: samples ``0..samples-1``, from the run's data files where they are
    there, generated (and written there) where not. ``settings.data`` gives the seed and the
    questions per haystack. Data files are read back only when the run's manifest is there and
    agrees (:func:`evaluate` writes it): another run's data, or those of a start that failed
    before it, are never read back."""
    check_manifest(Path(out_dir), settings.manifest(model_name), write=False)
    reuse = (Path(out_dir) / MANIFEST).is_file()
    wrapper = chat_wrapper(tokenizer, settings.chat_format)
    seed, questions = settings.data["seed"], settings.data["questions"]
    bar = None
    if settings.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks) * samples, desc="ruler: data", unit="sample")

    def make(task: Task, index: int) -> list[dict]:
        sample = generate_sample(task, index, tokenizer, wrapper, haystack, seed, questions)
        if bar is not None:
            bar.update(1)
        return records(task, index, sample)

    out = {}
    try:
        for k, task in enumerate(tasks, 1):
            out[task] = task_data(task, samples, out_dir, lambda i, t=task: make(t, i), reuse)
            if bar is not None:
                bar.update(k * samples - bar.n)  # the samples read back
    finally:
        if bar is not None:
            bar.close()
    return out


def evaluate(model, tokenizer, data, configs, settings: Settings, out_dir, model_name="") -> dict:
    """Run every configuration on every record of ``data`` (see :func:`runner.evaluate`)."""
    return runner.evaluate(Ruler(), model, tokenizer, data, configs, settings, out_dir, model_name)
