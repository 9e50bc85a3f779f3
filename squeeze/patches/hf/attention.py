"""The attention and mask functions registered with transformers under the name ``"squeeze"``.

The mask is transformers' own ``sdpa_mask`` (boolean, bottom-right aligned, padding-aware). Without
a registered mask, transformers passes ``None`` and a multi-token question over a cached context
would be masked top-left: silently wrong.

The attention function routes each call by the cache layer that produced its K/V:

- :class:`SqueezedLayer` → :func:`squeeze.squeezed_attention` over the context's index plus the tail;
- :class:`CaptureLayer` (compile) → the model's own attention, after capturing the window queries;
- anything else (no cache, a plain ``DynamicCache``, layers squeeze does not cover) → the model's
  own attention (``sdpa`` or ``eager``), so a patched model without a compiled context is dense.
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ...attention import squeezed_attention
from ...kernels.scratch import version
from ...logs import log_once
from .cache import ATTN_NAME, CaptureLayer, SqueezedLayer, take

logger = logging.getLogger("squeeze.hf")
_local = threading.local()  # the last mask read (step_padding)
_FALLBACK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module → original impl
#: callables ``fn(module, query, key, value, scaling)`` run before every call (see ``patch.observe``)
_OBSERVERS: list = []


def register() -> None:
    """Register ``"squeeze"`` in ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent).

    Call it before ``from_pretrained(..., attn_implementation="squeeze")``; :func:`squeeze.patch`
    calls it for you.
    """
    AttentionInterface.register(ATTN_NAME, squeeze_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def set_fallback(module: torch.nn.Module, impl: str | None) -> None:
    """The implementation ``module`` falls back to (``None`` forgets it)."""
    if impl is None:
        _FALLBACK.pop(module, None)
    else:
        _FALLBACK[module] = impl


def uncovered_reason(module, kwargs: dict, dropout: float) -> str | None:
    """Why squeezed attention cannot stand in for this layer's attention, or ``None``."""
    if kwargs.get("sliding_window") is not None:
        return f"sliding window ({kwargs['sliding_window']})"
    if kwargs.get("softcap") is not None:
        return f"attention logit softcapping ({kwargs['softcap']})"
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return "attention sinks"
    if dropout:
        return "attention dropout (training mode)"
    if not getattr(module, "is_causal", True):
        return "non-causal attention"
    return None


def squeeze_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """``AttentionInterface`` function: ``query [B, Hq, M, D]``, ``key/value [B, Hkv, T, D]`` →
    ``(out [B, M, Hq, D], None)``."""
    for observer in _OBSERVERS:
        observer(module, query, key, value, scaling)
    layer = take(getattr(module, "layer_idx", None), key)
    if isinstance(layer, SqueezedLayer):
        reason = uncovered_reason(module, kwargs, dropout)
        if reason is not None:
            raise RuntimeError(
                f"layer {layer.layer_idx} holds a squeezed context, but its "
                f"attention now uses {reason}"
            )
        out = squeezed_forward(layer, query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    if isinstance(layer, CaptureLayer):
        layer.observe(query, scaling, uncovered_reason(module, kwargs, dropout))
    return fallback_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def fallback_forward(module, query, key, value, attention_mask, **kwargs):
    """The model's own attention: its original ``sdpa`` or its module's ``eager_attention_forward``."""
    impl = _FALLBACK.get(module)
    if impl is None:
        log_once(
            logger,
            ("hf", "nofallback", type(module).__name__),
            f"squeeze: no original attention recorded for {type(module).__name__} (model not "
            "patched with squeeze.patch?); falling back to sdpa",
            level=logging.INFO,
        )
        impl = "sdpa"
    if impl == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager(
                module, query, key, value, additive_mask(attention_mask, query, key), **kwargs
            )
        log_once(
            logger,
            ("hf", "noeager", type(module).__name__),
            f"squeeze: {type(module).__module__} has no eager_attention_forward; using sdpa",
            level=logging.INFO,
        )
    elif impl != "sdpa" and impl in ALL_ATTENTION_FUNCTIONS:
        log_once(
            logger,
            ("hf", "impl", impl),
            f"squeeze: layers not squeezed use sdpa instead of {impl!r} "
            "(the registered mask is sdpa's)",
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor):
    """sdpa's boolean mask (``None``: plain causal) as the float mask eager attention adds."""
    q, k = query.shape[2], key.shape[2]
    if mask is None:
        if q == 1:
            return None
        rows = torch.arange(q, device=query.device)[:, None] + (k - q)
        mask = (torch.arange(k, device=query.device)[None, :] <= rows)[None, None]
    if mask.dtype != torch.bool:
        return mask
    out = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
    return out.masked_fill(~mask, torch.finfo(query.dtype).min)


def squeezed_forward(layer: SqueezedLayer, query, key, value, attention_mask, scaling):
    """Squeezed attention of ``query`` over [context index, tail ``key``/``value``] → ``[B, Hq, M, D]``.

    Rows with left padding in the tail (a batch of questions of different lengths) are run per
    padding amount on their unpadded tail, so a padded batch reads exactly what one-by-one calls
    read.
    """
    index = layer.index
    b, _, m, _ = query.shape
    t = key.shape[2]
    pads = step_padding(attention_mask, b, m, t, layer.n_context)
    if pads is None or not any(pads):
        out, stats = squeezed_attention(query, index, key, value, scaling, return_stats=True)
        layer.recorder.record(layer.layer_idx, stats, index)
        return out
    out = torch.zeros_like(query)
    for p in sorted(set(pads)):
        rows = torch.tensor([i for i, pi in enumerate(pads) if pi == p], device=query.device)
        m0 = max(0, p - (t - m))  # query rows before m0 are padding tokens: their output is unused
        o, stats = squeezed_attention(
            query[rows][:, :, m0:],
            index,
            key[rows][:, :, p:],
            value[rows][:, :, p:],
            scaling,
            return_stats=True,
        )
        out[rows, :, m0:] = o
        layer.recorder.record(layer.layer_idx, stats, index)
    return out


def step_padding(mask, b: int, m: int, t: int, n_context: int) -> list[int] | None:
    """:func:`tail_padding`, read once per forward: transformers hands every layer of a step
    the same mask tensor, so the last one read is kept (by identity, shape and version)."""
    if mask is None:
        return None
    key = (b, m, t, n_context, version(mask))
    last = getattr(_local, "padding", None)
    if last is not None and last[0]() is mask and last[1] == key:
        return last[2]
    pads = tail_padding(mask, b, m, t, n_context)
    _local.padding = (weakref.ref(mask), key, pads)
    return pads


def tail_padding(mask, b: int, m: int, t: int, n_context: int) -> list[int] | None:
    """Left-padding tokens at the start of each row's tail, read from the 4-D mask.

    ``None`` when there is no mask (no padding: transformers only skips the mask then). Any pattern
    other than "whole context visible, causal tail, a padded prefix of the tail" is refused.
    """
    if mask is None:
        return None
    if (
        mask.dim() != 4
        or mask.shape[1] != 1
        or mask.shape[-1] != n_context + t
        or mask.shape[-2] != m
    ):
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)} does not match the squeezed "
            f"cache: expected [B, 1, {m}, {n_context + t}]"
        )
    visible = (
        mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    )
    visible = visible.expand(b, m, n_context + t)
    tail = visible[..., n_context:]
    pads = (tail[:, -1].cumsum(-1) == 0).sum(-1)  # [B] masked tail columns before the first visible
    j = torch.arange(t, device=mask.device)
    pos = torch.arange(m, device=mask.device) + (t - m)  # tail position of each query row
    expected = (j[None, None, :] >= pads[:, None, None]) & (j[None, None, :] <= pos[None, :, None])
    real = pos[None, :] >= pads[:, None]  # [B, M] rows that are not padding tokens
    ok = ((tail == expected) | ~real[..., None]).all() and (
        visible[..., :n_context].all(-1) | ~real
    ).all()
    if not bool(ok):
        raise NotImplementedError(
            "squeeze supports masks that show the whole compiled context, are causal over the "
            "tokens after it, and pad only the start of each question (left padding); this mask "
            "is not of that form"
        )
    return pads.tolist()
