"""SqueezedContext: a compiled context that answers many questions, saved and loaded as one file."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ... import __version__
from ...config import SqueezeConfig
from ...index import ClusterIndex
from ...serialization import IndexFileError, load_indexes, read_header, save_indexes
from . import fingerprint as fp
from .cache import ATTN_NAME, SqueezedCache, SqueezedLayer
from .stats import StatsRecorder

logger = logging.getLogger("squeeze.hf")
FILE_FORMAT = "squeeze-hf-context"
FILE_VERSION = 1
#: contexts up to this many tokens keep their ids in the file header
MAX_IDS_IN_HEADER = 1 << 20


@dataclass(frozen=True)
class DenseLayer:
    """A layer squeeze does not cover: the model's own cache layer, prefilled with the context.

    Attributes:
        kind: ``"full"`` (all context tokens) or ``"sliding"`` (the last ``sliding_window - 1``).
        keys, values: ``[1, Hkv, n, D]`` post-RoPE context K/V, original order.
        sliding_window: the window of a sliding layer, else ``None``.
        reason: why squeeze does not cover the layer.
    """

    kind: str
    keys: torch.Tensor
    values: torch.Tensor
    sliding_window: int | None
    reason: str


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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
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
        return SqueezedCache(layers)

    def generate(self, question_ids, **generate_kwargs):
        """Answer one question (1-D ids) or a list of questions (batched with left padding).

        Returns the generated ids only (not the context or the question), cut after the first
        end-of-sequence token: a 1-D tensor for one question, a list of them for a list. With
        ``return_dict_in_generate=True`` the raw ``generate`` output is returned instead (its
        ``sequences`` hold context, padded questions and answers).
        """
        from .capture import as_ids

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
        from .capture import cache_kwarg

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
        if bool((mask == 0).any()):
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
    def save(self, path) -> None:
        """Write this context to ``path``: safetensors tensors, a JSON header, no pickle."""
        import transformers

        dense_entries, holders = [], []
        for i, d in self.dense.items():
            holders.append(_holder(d, self.n_context, self.config))
            dense_entries.append(
                {"layer": i, "kind": d.kind, "sliding_window": d.sliding_window, "reason": d.reason}
            )
        ids = self.context_ids
        meta = {
            "format": FILE_FORMAT,
            "format_version": FILE_VERSION,
            "squeeze_version": __version__,
            "transformers_version": transformers.__version__,
            "model_class": type(self.model).__name__,
            "config_fingerprint": fp.config_fingerprint(self.model),
            "config_fields": fp.config_fields(self.model),
            "weights_fingerprint": fp.weights_fingerprint(self.model),
            "num_layers": self.num_layers,
            "squeezed_layers": list(self.indexes),
            "dense_layers": dense_entries,
            "context_len": self.n_context,
            "context_sha256": None if ids is None else fp.context_digest(ids),
            "context_ids": ids.tolist()
            if ids is not None and ids.numel() <= MAX_IDS_IN_HEADER
            else None,
            "config": self.config.to_dict(),
        }
        meta = _json_safe(meta)
        meta["digest"] = fp.metadata_digest(meta)
        save_indexes(path, list(self.indexes.values()) + holders, meta)

    @classmethod
    def load(cls, path, model, *, context_ids=None, device=None) -> SqueezedContext:
        """Read a context saved by :meth:`save` for ``model`` (which gets patched).

        Raises:
            squeeze.serialization.IndexFileError: not such a file, truncated, or altered.
            ModelMismatchError: compiled for another model (other config or weights).
            ValueError: ``context_ids`` given and not the compiled context.
        """
        from .capture import as_ids
        from .patch import patch

        path = Path(path)
        meta = read_header(path).get("metadata") or {}
        if meta.get("format") != FILE_FORMAT:
            raise IndexFileError(
                f"{path} is a squeeze index but not a compiled transformers "
                f"context (format {meta.get('format')!r})"
            )
        if meta.get("format_version") != FILE_VERSION:
            raise IndexFileError(
                f"{path}: context format version {meta.get('format_version')} "
                f"is not supported (this squeeze reads {FILE_VERSION})"
            )
        if meta.get("digest") != fp.metadata_digest(meta):
            raise IndexFileError(f"{path}: the header was altered after it was written")
        fp.check_model(meta, model, path)
        if device is None:
            device = next(model.parameters()).device
        loaded, _ = load_indexes(path, device)
        squeezed, dense_entries = meta["squeezed_layers"], meta["dense_layers"]
        if len(loaded) != len(squeezed) + len(dense_entries):
            raise IndexFileError(
                f"{path}: {len(loaded)} layers stored, header lists "
                f"{len(squeezed) + len(dense_entries)}"
            )
        cfg = SqueezeConfig.from_dict(meta["config"])
        dtype = next(model.parameters()).dtype
        indexes = {}
        for i, ix in zip(squeezed, loaded[: len(squeezed)], strict=True):
            if ix.config != cfg:
                raise IndexFileError(f"{path}: layer {i} config differs from the header's")
            indexes[i] = _cast(ix, dtype)
        dense = {}
        for entry, holder in zip(dense_entries, loaded[len(squeezed) :], strict=True):
            dense[entry["layer"]] = DenseLayer(
                entry["kind"],
                holder.keys[None].to(dtype),
                holder.values[None].to(dtype),
                entry["sliding_window"],
                entry["reason"],
            )
        ids = meta.get("context_ids")
        ids = None if ids is None else torch.tensor(ids, dtype=torch.int64)
        if context_ids is not None:
            given = as_ids(context_ids, "context_ids")
            if fp.context_digest(given) != meta["context_sha256"]:
                raise ValueError(
                    f"context_ids are not the context {path} was compiled from (token hash differs)"
                )
            ids = given
        patch(model)
        return cls(model, indexes, dense, ids, cfg, n_context=meta["context_len"])


def _holder(d: DenseLayer, n_context: int, cfg: SqueezeConfig) -> ClusterIndex:
    """A dense layer's K/V as a one-empty-cluster ClusterIndex, so that it is stored and
    checksummed like every other layer."""
    _, hkv, n, dim = d.keys.shape
    dev = d.keys.device
    return ClusterIndex(
        keys=d.keys[0],
        values=d.values[0],
        positions=torch.arange(n_context - n, n_context, device=dev).expand(hkv, -1),
        centroids=torch.zeros(hkv, 1, dim, device=dev),
        offsets=torch.tensor([0, 0, n], device=dev).expand(hkv, -1),
        l1_centroids=None,
        l1_offsets=None,
        calibration=None,
        config=cfg.replace(window=n, l1_ratio=None, mode="topk"),
    )


def _cast(ix: ClusterIndex, dtype: torch.dtype) -> ClusterIndex:
    if ix.keys.dtype == dtype:
        return ix
    logger.info(
        "squeeze: casting the loaded context K/V from %s to the model's %s", ix.keys.dtype, dtype
    )
    return ClusterIndex(
        ix.keys.to(dtype),
        ix.values.to(dtype),
        ix.positions,
        ix.centroids,
        ix.offsets,
        ix.l1_centroids,
        ix.l1_offsets,
        ix.calibration,
        ix.config,
    )


def _json_safe(obj):
    """Round-trip through JSON, so that the digest is computed on what the reader will see."""
    import json

    return json.loads(json.dumps(obj, default=str))
