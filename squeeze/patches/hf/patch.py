"""``squeeze.patch(model)`` / ``squeeze.unpatch(model)``: switch a model's attention implementation.

No ``forward`` is replaced: the model is switched to the registered ``"squeeze"`` implementation
with ``set_attn_implementation``. The original implementation of every config the switch touched
is recorded on the model and put back, as it was, by :func:`unpatch`. :func:`observe` lets a tool
see the inputs of every attention call of a patched model (the demo times attention with them).
"""

from __future__ import annotations

import contextlib
import logging

from ...logs import log_once
from .attention import _OBSERVERS, register, set_fallback
from .cache import ATTN_NAME

_STATE = "_squeeze_patch_state"
_FALLBACKS = ("sdpa", "eager")


def _configs(model) -> list:
    """Every config object ``set_attn_implementation`` may write to (deduplicated)."""
    found, seen = [], set()

    def add(cfg):
        if cfg is not None and id(cfg) not in seen:
            seen.add(id(cfg))
            found.append(cfg)

    add(model.config)
    for key in getattr(model.config, "sub_configs", {}) or {}:
        add(getattr(model.config, key, None))
    for module in model.modules():
        add(getattr(module, "config", None) if hasattr(module, "set_attn_implementation") else None)
    return found


def is_patched(model) -> bool:
    return (
        getattr(model, _STATE, None) is not None and model.config._attn_implementation == ATTN_NAME
    )


def patch(model):
    """Route ``model``'s attention through squeeze; idempotent; returns ``model``.

    A patched model without a compiled context computes exactly what it computed before: layers
    without a squeezed cache use the model's original implementation (``sdpa`` or ``eager``).
    """
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    register()
    if is_patched(model):
        return model
    if getattr(model, _STATE, None) is not None:  # switched away behind our back: start afresh
        unpatch(model)
    saved = [
        (
            cfg,
            cfg.__dict__.get("_attn_implementation_internal"),
            "_attn_was_changed" in cfg.__dict__,
        )
        for cfg in _configs(model)
    ]
    original = {id(cfg): cfg._attn_implementation for cfg, _, _ in saved}
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        _restore(saved)
        raise TypeError(
            f"{type(model).__name__} does not support switching its attention "
            "implementation (it does not use transformers' AttentionInterface)"
        )
    default = original[id(model.config)]
    for module in model.modules():
        cfg = getattr(module, "config", None)
        impl = original.get(id(cfg), default) if cfg is not None else default
        if impl not in _FALLBACKS:
            log_once(
                "squeeze.hf",
                ("hf", "fallback", impl),
                f"squeeze: {impl!r} is not a fallback squeeze can use "
                "with its sdpa mask; layers not squeezed use sdpa",
                level=logging.INFO,
            )
            impl = "sdpa"
        set_fallback(module, impl)
    model.__dict__[_STATE] = saved
    return model


def unpatch(model):
    """Undo :func:`patch`: every touched config gets back its exact original implementation."""
    saved = model.__dict__.pop(_STATE, None)
    if saved is None:
        return model
    _restore(saved)
    for module in model.modules():
        set_fallback(module, None)
    return model


def _restore(saved) -> None:
    for cfg, value, had_flag in saved:
        cfg._attn_implementation_internal = value
        if not had_flag:
            cfg.__dict__.pop("_attn_was_changed", None)


@contextlib.contextmanager
def observe(fn):
    """While the block runs, call ``fn(module, query, key, value, scaling)`` before every attention
    call of a patched model, in every thread.

    ``query [B, Hq, M, D]`` and ``key, value [B, Hkv, T, D]`` are what the attention function
    receives: post-RoPE, K/V as the cache returned them (for a squeezed layer: the tail only);
    ``scaling`` is the softmax scale or ``None`` (``D^-0.5``). ``fn`` must not change them.
    """
    _OBSERVERS.append(fn)
    try:
        yield fn
    finally:
        _OBSERVERS.remove(fn)
