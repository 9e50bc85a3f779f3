"""Run a task family's records through the dense baseline and squeezed configurations, one record
at a time, writing one JSONL line per (configuration, record) as soon as it is scored.

A :class:`Family` (LongBench, RULER) turns a record into prompt ids, scores a prediction and
summarises a run; everything else is shared. Per record: the prompt is tokenised once; the dense
baseline generates from ``fixed + question`` with the model's own attention (unpatched); the fixed
part is compiled once with :func:`squeeze.compile` (cached by the hash of its ids, so records that
share a context reuse it) and every squeezed configuration answers the question through
``ctx.with_config(budget=..., mode=...)``. Decoding is greedy with the task's answer length
(``task.max_new_tokens``), stopping at a newline too where ``task.newline_stop``. Records already
in the output files are skipped (resumable).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from squeeze.config import SqueezeConfig

from .chat import ChatWrapper, PromptIds, chat_wrapper
from .results import (
    RunConfig,
    ScoreDetails,
    append_result,
    check_manifest,
    output_path,
    read_results,
    record_key,
)

logger = logging.getLogger("squeeze.eval")


@dataclass
class Settings:
    """How prompts are built and contexts compiled (one run keeps these fixed).

    Attributes:
        chat_format: see :func:`.chat.chat_wrapper`.
        squeeze: the offline clustering knobs (its ``budget``/``mode`` are set per configuration).
        chunk_size: prefill chunk of :func:`squeeze.compile`.
        context_cache: compiled contexts kept in memory (each holds the context's K/V).
    """

    chat_format: str = "auto"
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    chunk_size: int = 1024
    context_cache: int = 1
    progress: bool = True

    def manifest(self, model_name: str) -> dict:
        offline = self.squeeze.to_dict()
        for k in ("budget", "l1_budget", "mode"):
            offline.pop(k)
        return {
            "model": model_name,
            "chat_format": self.chat_format,
            "squeeze": offline,
        }


class ContextCache:
    """Compiled contexts by the SHA-256 of their token ids (least recently used dropped first)."""

    def __init__(self, model, cfg: SqueezeConfig, chunk_size: int, size: int = 1):
        self.model, self.cfg, self.chunk_size, self.size = model, cfg, chunk_size, max(size, 1)
        self.items: OrderedDict[str, object] = OrderedDict()
        self.compiles = 0

    def get(self, ids: list[int]):
        """``(ctx, compile seconds)``: 0 seconds when the context was cached."""
        import squeeze

        key = hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key], 0.0
        if len(ids) <= self.cfg.window:
            raise ValueError(
                f"the fixed part holds {len(ids)} tokens, not more than the window "
                f"({self.cfg.window}); lower --window"
            )
        t0 = time.perf_counter()
        ctx = squeeze.compile(
            self.model, torch.tensor(ids), self.cfg, chunk_size=self.chunk_size, progress=False
        )
        seconds = time.perf_counter() - t0
        self.compiles += 1
        self.items[key] = ctx
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return ctx, seconds


class Family(Protocol):
    """A task family: how its records become prompts, how a prediction scores, how a run reads.

    Its tasks have ``data_name`` (results file name), ``max_new_tokens`` and ``newline_stop``.
    """

    #: the progress bar's label
    name: str

    def prompt(self, tokenizer, wrapper: ChatWrapper, task, record: dict) -> PromptIds:
        """The record's token ids, split into the fixed part and the question."""

    def score(self, task, prediction: str, record: dict) -> ScoreDetails:
        """The prediction's score against the record's ``answers``."""

    def summarize(self, out_dir: Path, configs: list[RunConfig], keys: dict) -> dict:
        """The run's summary from its files; ``keys``: the record keys of each task."""


def generate_kwargs(model, tokenizer, task) -> dict:
    """Greedy decoding with the task's answer length; ``task.newline_stop``: also stop at a
    newline, after at least one new token (LongBench's samsum)."""
    kw = {"max_new_tokens": task.max_new_tokens, "do_sample": False, "num_beams": 1}
    if task.newline_stop:
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
        kw["eos_token_id"] = [*eos, newline]
        kw["min_new_tokens"] = 1
    return kw


def _cut_at_eos(ids: torch.Tensor, eos) -> torch.Tensor:
    eos = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
    for j, tok in enumerate(ids.tolist()):
        if tok in eos:
            return ids[: j + 1]
    return ids


def dense_generate(model, prompt: PromptIds, kw: dict) -> torch.Tensor:
    """The baseline: ``model.generate`` on ``fixed + question`` with the model's own attention."""
    import squeeze

    squeeze.unpatch(model)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.fixed + prompt.question], device=device)
    gen = model.generation_config
    eos = kw.get("eos_token_id", gen.eos_token_id)
    pad = gen.pad_token_id
    if pad is None:
        pad = eos if isinstance(eos, int) else (eos[0] if eos else 0)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kw
        )
    return _cut_at_eos(out[0, ids.shape[1] :].cpu(), eos)


@dataclass
class Evaluation:
    """One run: a task family, a model, its tokenizer, settings and configurations;
    :meth:`run_record` per record."""

    family: Family
    model: object
    tokenizer: object
    configs: list[RunConfig]
    settings: Settings
    out_dir: Path
    wrapper: ChatWrapper = field(init=False)
    contexts: ContextCache | None = field(init=False, default=None)

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.wrapper = chat_wrapper(self.tokenizer, self.settings.chat_format)
        squeezed = [c for c in self.configs if not c.dense]
        if squeezed:
            cfg = self.settings.squeeze.replace(budget=squeezed[0].budget, mode=squeezed[0].mode)
            self.contexts = ContextCache(
                self.model, cfg, self.settings.chunk_size, self.settings.context_cache
            )

    def pending(self, task, records: list[dict]) -> list[tuple[int, dict, list[RunConfig]]]:
        """``(index, record, configurations still to run)`` for the records not done yet."""
        done = {c: read_results(output_path(self.out_dir, c, task)) for c in self.configs}
        out = []
        for i, rec in enumerate(records):
            key = record_key(rec, i)
            todo = [c for c in self.configs if key not in done[c]]
            if todo:
                out.append((i, rec, todo))
        return out

    def run_record(self, task, index: int, record: dict, todo: list[RunConfig]) -> None:
        import squeeze

        prompt = self.family.prompt(self.tokenizer, self.wrapper, task, record)
        kw = generate_kwargs(self.model, self.tokenizer, task)
        key = record_key(record, index)
        for cfg in todo:
            compile_s, stats = 0.0, {}
            if cfg.dense:
                t0 = time.perf_counter()
                ids = dense_generate(self.model, prompt, kw)
                seconds = time.perf_counter() - t0
                kv, clustered = 1.0, 1.0
            else:
                ctx, compile_s = self.contexts.get(prompt.fixed)
                squeeze.patch(self.model)  # the dense baseline unpatched it
                sub = ctx.with_config(budget=cfg.budget, mode=cfg.mode)
                t0 = time.perf_counter()
                with torch.no_grad():
                    ids = sub.generate(torch.tensor(prompt.question), **kw)
                seconds = time.perf_counter() - t0
                stats = sub.stats()
                kv, clustered = stats["kv_fraction"], stats["clustered_fraction"]
            pred = self.tokenizer.decode(ids, skip_special_tokens=True)
            details = self.family.score(task, pred, record)
            line = {
                "key": key,
                "pred": pred,
                "answers": record["answers"],
                "all_classes": record.get("all_classes"),
                "length": record.get("length"),
                "score": details.score,
                "metric_failures": details.failures,
                "kv_fraction": kv,
                "clustered_fraction": clustered,
                "time_s": seconds,
                "compile_s": compile_s,
                "new_tokens": int(ids.numel()),
                "fixed_tokens": len(prompt.fixed),
                "question_tokens": len(prompt.question),
                "truncated_tokens": prompt.truncated,
            }
            append_result(output_path(self.out_dir, cfg, task), line)


def evaluate(
    family: Family,
    model,
    tokenizer,
    data: dict[object, list[dict]],
    configs: list[RunConfig],
    settings: Settings,
    out_dir,
    model_name: str = "",
) -> dict:
    """Run every configuration on every record of ``data`` (tasks → records; skipping those already
    written under ``out_dir``), then return ``family.summarize`` of the run."""
    out_dir = Path(out_dir)
    check_manifest(out_dir, settings.manifest(model_name))
    ev = Evaluation(family, model, tokenizer, configs, settings, out_dir)
    todo = {task: ev.pending(task, records) for task, records in data.items()}
    total = sum(len(v) for v in todo.values())
    skipped = sum(len(r) for r in data.values()) - total
    if skipped:
        logger.info("squeeze.eval: %d records already done under %s, skipped", skipped, out_dir)
    bar = None
    if settings.progress and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=family.name, unit="record")
    try:
        for task, items in todo.items():
            for index, record, cfgs in items:
                if bar is not None:
                    bar.set_postfix_str(task.data_name)
                ev.run_record(task, index, record, cfgs)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    keys = {task: [record_key(r, i) for i, r in enumerate(recs)] for task, recs in data.items()}
    return family.summarize(out_dir, configs, keys)
