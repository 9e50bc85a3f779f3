"""Greedy answers over one compiled context: dense (the model's own attention) and squeezed.

The dense reference needs no second prefill: :class:`DenseReference` puts the K/V that
``squeeze.compile`` captured back in context order, into the model's own cache layers, and the
model attends over them with its own attention (a patched model is dense over plain cache
layers). Those are the K/V the model's own prefill produced, so this is dense attention exactly.

Every answer is ``new_tokens`` tokens long (end-of-sequence is not honoured), so dense and
squeezed generate the same number of tokens and their token rates compare. The attention mask is
always given: without one, ``generate`` masks every context token that equals the pad token
(a document that holds ``<|im_end|>``, say). Imports torch and transformers.
"""

from __future__ import annotations

import time

import torch
from transformers.cache_utils import DynamicLayer

from squeeze.patches.hf.cache import cache_kwarg


def context_order(positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows [Hkv, N, D]`` stored in cluster order, put back in context order (``positions
    [Hkv, N]`` int64: the context position of every stored row)."""
    out = torch.empty_like(rows)
    out.scatter_(1, positions[..., None].expand_as(rows), rows)
    return out


def _pad_id(model) -> int:
    gen = model.generation_config
    eos = gen.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return gen.pad_token_id if gen.pad_token_id is not None else (eos or 0)


class DenseReference:
    """Dense greedy answers over a compiled context's own K/V.

    Attributes:
        sctx: the :class:`squeeze.SqueezedContext` whose K/V are used.
        kv: ``{layer: (keys, values)}``, ``[1, Hkv, N, D]`` each, in context order.
    """

    def __init__(self, sctx):
        self.sctx = sctx
        self.kv = {
            i: (
                context_order(ix.positions, ix.keys)[None],
                context_order(ix.positions, ix.values)[None],
            )
            for i, ix in sctx.indexes.items()
        }

    def cache(self):
        """A fresh cache of the context: the model's own layers, filled with the dense K/V."""
        cache = self.sctx.cache()  # the layers squeeze does not cover are dense already
        for i, (k, v) in self.kv.items():
            layer = DynamicLayer()
            layer.update(k, v)  # a copy: generation appends to it
            cache.layers[i] = layer
        return cache

    @torch.no_grad()
    def generate(self, question: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
        """``(answer ids, seconds)``: ``new_tokens`` greedy tokens after the context and
        ``question [T]`` int64; the seconds are the ``generate`` call's (question prefill
        included, the cache's filling not)."""
        model = self.sctx.model
        device = next(model.parameters()).device
        ids = torch.cat([self.sctx.context_ids, question])[None].to(device)
        kw = {cache_kwarg(model.forward): self.cache(), "attention_mask": torch.ones_like(ids)}
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=_pad_id(model),
            **kw,
        )
        _sync(device)
        return out[0, ids.shape[1] :].tolist(), time.perf_counter() - t0


def squeezed_generate(view, question: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """``(answer ids, seconds)`` of one question through a compiled context ``view``."""
    device = next(view.model.parameters()).device
    _sync(device)
    t0 = time.perf_counter()
    out = view.generate(question, **_fixed(view, 1, question.numel(), new_tokens))
    _sync(device)
    return out.tolist(), time.perf_counter() - t0


def squeezed_batch(view, questions, new_tokens: int, batch: int = 32) -> list[list[int]]:
    """Answers to every question through ``view``, batched: questions of one length share a
    ``generate`` call (no padding), at most ``batch`` at a time."""
    by_len: dict[int, list[int]] = {}
    for i, q in enumerate(questions):
        by_len.setdefault(q.numel(), []).append(i)
    out: list[list[int]] = [[] for _ in questions]
    for rows in by_len.values():
        for s in range(0, len(rows), batch):
            part = rows[s : s + batch]
            kw = _fixed(view, len(part), questions[part[0]].numel(), new_tokens)
            got = view.generate([questions[i] for i in part], **kw)
            for i, a in zip(part, got, strict=True):
                out[i] = a.tolist()
    return out


def _fixed(view, rows: int, length: int, new_tokens: int) -> dict:
    """``generate`` arguments: ``new_tokens`` greedy tokens for ``rows`` questions of
    ``length`` tokens (no padding), the all-ones attention mask given."""
    device = next(view.model.parameters()).device
    mask = torch.ones(rows, view.n_context + length, dtype=torch.int64, device=device)
    return dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=_pad_id(view.model),
        attention_mask=mask,
    )


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
