"""SqueezedContext: a compiled context that answers many questions, saved and loaded as one file."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ... import files
from ...config import SqueezeConfig
from ...files import DenseLayer
from ...index import ClusterIndex
from ...validation import check_int
from ...version import __version__
from .cache import ATTN_NAME, SqueezedCache, SqueezedLayer, cache_kwarg
from .stats import StatsRecorder

logger = logging.getLogger("squeeze.hf")


def as_ids(ids, name: str) -> torch.Tensor:
    """A 1-D int64 CPU tensor of token ids from a list or a 1-D (or ``[1, N]``) tensor."""
    if isinstance(ids, torch.Tensor):
        t = ids.detach().to("cpu")
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
    else:
        try:
            t = torch.as_tensor(list(ids), dtype=torch.int64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a 1-D list or tensor of token ids") from err
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a 1-D sequence of integer token ids, got shape "
            f"{tuple(t.shape)} dtype {t.dtype}"
        )
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    return t.to(torch.int64)


class SqueezedContext:
    """A fixed context compiled for one model (see :func:`squeeze.compile`).

    Attributes:
        model: the model (patched).
        indexes: ``{layer: ClusterIndex}`` of the squeezed layers; shared, never written.
        dense: ``{layer: DenseLayer}`` of the layers that use the model's own attention.
        context_ids: ``[N]`` int64 context token ids (``None`` if loaded without them).
        config: the :class:`SqueezeConfig` in use.
    """

    def __init__(
        self,
        model,
        indexes: dict[int, ClusterIndex],
        dense: dict[int, DenseLayer],
        context_ids: torch.Tensor | None,
        cfg: SqueezeConfig,
        timings: dict | None = None,
        n_context: int | None = None,
    ):
        self.model = model
        self.indexes = dict(sorted(indexes.items()))
        self.dense = dict(sorted(dense.items()))
        self.context_ids = context_ids
        self.config = cfg
        self.n_context = int(n_context if n_context is not None else context_ids.numel())
        self.recorder = StatsRecorder(timings=dict(timings or {}))
        layers = sorted(set(self.indexes) | set(self.dense))
        if layers != list(range(len(layers))):
            raise ValueError(f"layers {layers} must be 0..L-1 exactly")
        self.num_layers = len(layers)

    # ---- settings ---------------------------------------------------------------------------
    def with_config(self, **changes) -> SqueezedContext:
        """The same compiled context under other online settings (``budget``, ``l1_budget``,
        ``mode``): clusters and K/V are shared, nothing is recomputed."""
        indexes = {i: ix.with_config(**changes) for i, ix in self.indexes.items()}
        new = SqueezedContext(
            self.model,
            indexes,
            self.dense,
            self.context_ids,
            self.config.replace(**changes),
            n_context=self.n_context,
        )
        new.recorder.timings.update(
            {k: v for k, v in self.recorder.timings.items() if k.startswith("compile_")}
        )
        return new

    # ---- caches and generation ----------------------------------------------------------------
    def cache(self, batch_size: int = 1) -> SqueezedCache:
        """A fresh cache holding the context, for ``model.generate(input_ids=context + question,
        past_key_values=ctx.cache())`` or ``model(question, past_key_values=ctx.cache())``.

        ``batch_size`` rows share the context (needed only when layers fall back to the model's
        own attention, whose context K/V are copied per row). Filling the cache never writes to
        this context.
        """
        check_int("batch_size", batch_size, low=1)
        text_config = self.model.config.get_text_config(decoder=True)
        layers = []
        for i in range(self.num_layers):
            if i in self.indexes:
                layers.append(SqueezedLayer(i, self.indexes[i], self.recorder, text_config))
                continue
            d = self.dense[i]
            k = d.keys.expand(batch_size, -1, -1, -1)
            v = d.values.expand(batch_size, -1, -1, -1)
            if d.kind == "sliding":
                layer = DynamicSlidingWindowLayer(sliding_window=d.sliding_window)
                layer.update(k, v)  # concatenation: a copy, the context's tensors stay untouched
                layer.cumulative_length = self.n_context
            else:
                layer = DynamicLayer()
                layer.update(k, v)
            layers.append(layer)
        return SqueezedCache(layers=layers)

    def generate(self, question_ids, **generate_kwargs):
        """Answer one question (1-D ids) or a list of questions (batched with left padding).

        Returns the generated ids only (not the context or the question), cut after the first
        end-of-sequence token: a 1-D tensor for one question, a list of them for a list. With
        ``return_dict_in_generate=True`` the raw ``generate`` output is returned instead (its
        ``sequences`` hold context, padded questions and answers).
        """
        if self.context_ids is None:
            raise ValueError(
                "this context was loaded without its token ids; pass context_ids= to "
                "SqueezedContext.load"
            )
        model = self.model
        if model.config._attn_implementation != ATTN_NAME:
            raise RuntimeError(
                "the model is not patched (squeeze.unpatch was called?); call "
                "squeeze.patch(model) to use this context"
            )
        single = (isinstance(question_ids, torch.Tensor) and question_ids.dim() == 1) or (
            isinstance(question_ids, (list, tuple))
            and question_ids
            and all(isinstance(x, int) for x in question_ids)
        )
        questions = (
            [as_ids(question_ids, "question_ids")]
            if single
            else [as_ids(q, f"question_ids[{i}]") for i, q in enumerate(question_ids)]
        )
        if not questions:
            raise ValueError("question_ids is empty")
        groups = [list(range(len(questions)))]
        if any(d.kind == "sliding" for d in self.dense.values()):
            # transformers' sliding windows count padding slots as positions: padding between the
            # context and a question would shift the window, so only equal lengths share a batch
            by_len: dict[int, list[int]] = {}
            for i, q in enumerate(questions):
                by_len.setdefault(q.numel(), []).append(i)
            groups = list(by_len.values())
            if len(groups) > 1 and generate_kwargs.get("return_dict_in_generate"):
                raise ValueError(
                    "return_dict_in_generate needs questions of one length on a "
                    "model with sliding-window layers (they are batched by length)"
                )
        answers: list = [None] * len(questions)
        for group in groups:
            out = self._generate_batch([questions[i] for i in group], dict(generate_kwargs))
            if generate_kwargs.get("return_dict_in_generate"):
                return out
            for i, a in zip(group, out, strict=True):
                answers[i] = a
        return answers[0] if single else answers

    def _generate_batch(self, questions: list[torch.Tensor], kw: dict):
        model = self.model
        gen = model.generation_config
        if "max_new_tokens" not in kw and "max_length" not in kw:
            kw["max_new_tokens"] = gen.max_new_tokens or 20
        pad = kw.pop("pad_token_id", None)
        eos = kw.get("eos_token_id", gen.eos_token_id)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if pad is None:
            pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)
        b, longest, n = len(questions), max(q.numel() for q in questions), self.n_context
        input_ids = torch.full((b, n + longest), pad, dtype=torch.int64)
        input_ids[:, :n] = self.context_ids
        mask = torch.ones_like(input_ids)
        for r, q in enumerate(questions):
            input_ids[r, n + longest - q.numel() :] = q
            mask[r, n : n + longest - q.numel()] = 0
        device = next(model.parameters()).device
        # always a mask: without one, transformers infers it from the pad token and masks every
        # context token that equals it (e.g. <|im_end|> in a chat-format context)
        kw["attention_mask"] = mask.to(device)
        kw[cache_kwarg(model.forward)] = self.cache(batch_size=b)
        t0 = time.perf_counter()
        out = model.generate(input_ids=input_ids.to(device), pad_token_id=pad, **kw)
        self.recorder.add_time("generate_s", time.perf_counter() - t0)
        if kw.get("return_dict_in_generate"):
            return out
        answers = []
        for row in out[:, n + longest :].cpu():
            hits = [j for j, tok in enumerate(row.tolist()) if tok in eos]
            answers.append(row[: hits[0] + 1] if hits else row)
        return answers

    # ---- statistics ---------------------------------------------------------------------------
    def stats(self) -> dict:
        """Reads since compile/load (or :meth:`reset_stats`): per squeezed layer the fraction of
        context keys read (``kv_fraction``, window included) and of clustered keys read
        (``clustered_fraction``, what ``budget`` targets), centroids scored, calls; plus the
        timings of compile stages and of :meth:`generate`."""
        s = self.recorder.summary()
        s.update(
            {
                "n_context": self.n_context,
                "window": self.config.window,
                "budget": self.config.budget,
                "mode": self.config.mode,
                "squeezed_layers": list(self.indexes),
                "dense_layers": {i: d.reason for i, d in self.dense.items()},
            }
        )
        return s

    def reset_stats(self) -> None:
        self.recorder.reset()

    # ---- files --------------------------------------------------------------------------------
    def save(self, path, *, key: bytes | str | None = None) -> None:
        """Write this context to ``path``: safetensors tensors, a JSON header, no pickle
        (the compiled-context format of :mod:`squeeze.files`), signed with ``key`` (else
        ``$SQUEEZE_INDEX_KEY``) when there is one."""
        import transformers

        header = files.context_header(
            self.model,
            indexes=self.indexes,
            dense=self.dense,
            context_ids=self.context_ids,
            n_context=self.n_context,
            config=self.config,
            versions={"squeeze": __version__, "transformers": transformers.__version__},
        )
        files.save_context(path, header, list(self.indexes.values()), self.dense, key=key)

    @classmethod
    def load(cls, path, model, *, context_ids=None, device=None, key=None) -> SqueezedContext:
        """Read a context saved by :meth:`save` for ``model`` (which gets patched), checked
        as :func:`squeeze.load_indexes` checks an index file, its header against its tensors;
        with a key (``key``, else ``$SQUEEZE_INDEX_KEY``) it must carry a valid signature.

        Raises:
            squeeze.IndexFileError: not such a file, truncated, altered, inconsistent, or
                unsigned (or wrongly signed) when a key is given.
            ModelMismatchError: compiled for another model (other config or weights).
            ValueError: ``context_ids`` given and not the compiled context.
        """
        from .patch import patch

        path = Path(path)
        files.check_model(files.read_context_header(path, key), model, path)
        if device is None:
            device = next(model.parameters()).device
        meta, layers, dense = files.read_context(path, device, key)
        cfg = SqueezeConfig.from_dict(meta["config"])
        dtype = next(model.parameters()).dtype
        indexes = {}
        for i, fields in layers.items():  # each layer's config is the header's (read_context)
            indexes[i] = _cast(ClusterIndex(**fields), dtype)
        dense = {
            i: dataclasses.replace(d, keys=d.keys.to(dtype), values=d.values.to(dtype))
            for i, d in dense.items()
        }
        ids = meta.get("context_ids")
        ids = None if ids is None else torch.tensor(ids, dtype=torch.int64)
        if context_ids is not None:
            given = as_ids(context_ids, "context_ids")
            if files.context_digest(given) != meta["context_sha256"]:
                raise ValueError(
                    f"context_ids are not the context {path} was compiled from (token hash differs)"
                )
            ids = given
        patch(model)
        return cls(model, indexes, dense, ids, cfg, n_context=meta["context_len"])


def _cast(ix: ClusterIndex, dtype: torch.dtype) -> ClusterIndex:
    if ix.keys.dtype == dtype:
        return ix
    logger.info(
        "squeeze: casting the loaded context K/V from %s to the model's %s", ix.keys.dtype, dtype
    )
    return dataclasses.replace(ix, keys=ix.keys.to(dtype), values=ix.values.to(dtype))
