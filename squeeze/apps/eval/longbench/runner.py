"""Run LongBench records through the dense baseline and squeezed configurations, one record at a
time, writing one JSONL line per (configuration, record) as soon as it is scored.

Per record: the prompt is split and tokenised once (:mod:`.prompts`); the dense baseline generates
from ``fixed + question`` with the model's own attention (unpatched); the fixed part is compiled
once with :func:`squeeze.compile` (cached by the hash of its ids, so records that share a context
reuse it) and every squeezed configuration answers the question through
``ctx.with_config(budget=..., mode=...)``. Decoding is greedy with the task's answer length;
samsum also stops at a newline. Records already in the output files are skipped (resumable).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from squeeze.config import SqueezeConfig

from .metrics import score_details
from .prompts import ChatWrapper, PromptIds, build_prompt, chat_wrapper
from .report import summarize
from .results import (
    RunConfig,
    append_result,
    check_manifest,
    output_path,
    read_results,
    record_key,
)
from .tasks import Task

logger = logging.getLogger("squeeze.eval")


@dataclass
class Settings:
    """How prompts are built and contexts compiled (one run keeps these fixed).

    Attributes:
        max_length: prompt tokens kept by the middle truncation (LongBench's model2maxlen).
        chat_format: see :func:`.prompts.chat_wrapper`.
        squeeze: the offline clustering knobs (its ``budget``/``mode`` are set per configuration).
        chunk_size: prefill chunk of :func:`squeeze.compile`.
        context_cache: compiled contexts kept in memory (each holds the context's K/V).
    """

    max_length: int
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
            "max_length": self.max_length,
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


def generate_kwargs(model, tokenizer, task: Task) -> dict:
    """Greedy decoding with the task's answer length; samsum: newline stop, >= 1 new token."""
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
    """One run: a model, its tokenizer, settings and configurations; :meth:`run_task` per task."""

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

    def pending(self, task: Task, records: list[dict]) -> list[tuple[int, dict, list[RunConfig]]]:
        """``(index, record, configurations still to run)`` for the records not done yet."""
        done = {c: read_results(output_path(self.out_dir, c, task)) for c in self.configs}
        out = []
        for i, rec in enumerate(records):
            key = record_key(rec, i)
            todo = [c for c in self.configs if key not in done[c]]
            if todo:
                out.append((i, rec, todo))
        return out

    def run_record(self, task: Task, index: int, record: dict, todo: list[RunConfig]) -> None:
        import squeeze

        prompt = build_prompt(self.tokenizer, task, record, self.settings.max_length, self.wrapper)
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
            details = score_details(
                task.data_name, pred, record["answers"], record.get("all_classes")
            )
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
    model,
    tokenizer,
    data: dict[Task, list[dict]],
    configs: list[RunConfig],
    settings: Settings,
    out_dir,
    model_name: str = "",
) -> dict:
    """Run every configuration on every record of ``data`` (skipping those already written under
    ``out_dir``), then summarise (see :func:`.report.summarize`) and return the summary."""
    out_dir = Path(out_dir)
    check_manifest(out_dir, settings.manifest(model_name))
    ev = Evaluation(model, tokenizer, configs, settings, out_dir)
    todo = {task: ev.pending(task, records) for task, records in data.items()}
    total = sum(len(v) for v in todo.values())
    skipped = sum(len(r) for r in data.values()) - total
    if skipped:
        logger.info("squeeze.eval: %d records already done under %s, skipped", skipped, out_dir)
    bar = None
    if settings.progress and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="longbench", unit="record")
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
    return summarize(out_dir, configs, keys)
