"""``squeeze.compile``: prefill a fixed context in chunks, capture its K/V and window queries, cluster.

Peak memory: the context's K/V once (preallocated, filled chunk by chunk) plus one chunk's
activations while prefilling; while clustering, that K/V, the cluster-ordered copy
``build_indexes`` returns and k-means' fp32 working copy of the keys (see the README).
"""

from __future__ import annotations

import logging
import time

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ...build import build_indexes
from ...config import SqueezeConfig
from ...files import DenseLayer
from ...validation import check_int
from .cache import CaptureLayer, CaptureStore, cache_kwarg
from .context import SqueezedContext, as_ids
from .patch import patch

logger = logging.getLogger("squeeze.hf")


def compile(
    model,
    context_ids,
    cfg: SqueezeConfig | None = None,
    *,
    chunk_size: int = 1024,
    progress: bool = True,
) -> SqueezedContext:
    """Compile ``context_ids`` for ``model``: the returned context answers many questions.

    Args:
        model: a transformers causal LM (patched here with :func:`squeeze.patch`, and left patched).
        context_ids: the context's token ids, 1-D list or tensor.
        cfg: the :class:`SqueezeConfig`; ``cfg.sinks + cfg.window`` must be smaller than the
            context.
        chunk_size: tokens per prefill forward (memory grows with it).
        progress: show a tqdm progress bar over the prefill chunks.
    """
    cfg, ids = _checked(cfg, context_ids, chunk_size)
    n = ids.numel()
    patch(model)
    t_start = time.perf_counter()
    cache, store = _capture_cache(model, n, cfg.window)
    _prefill(model, cache, ids, chunk_size, progress)
    timings = {"compile_prefill_s": time.perf_counter() - t_start}
    squeezed, dense = _sort_layers(cache.layers, store, n)
    del cache
    indexes = _cluster(squeezed, store, cfg, timings) if squeezed else {}
    store.free()
    timings["compile_total_s"] = time.perf_counter() - t_start
    ctx = SqueezedContext(model, indexes, dense, ids, cfg, timings)
    _log_summary(ctx, n)
    return ctx


def _checked(cfg, context_ids, chunk_size) -> tuple[SqueezeConfig, torch.Tensor]:
    cfg = SqueezeConfig() if cfg is None else cfg
    if not isinstance(cfg, SqueezeConfig):
        raise TypeError(f"cfg must be a SqueezeConfig, got {type(cfg).__name__}")
    check_int("chunk_size", chunk_size, low=1)
    ids = as_ids(context_ids, "context_ids")
    n = ids.numel()
    if n <= cfg.dense_tokens:
        raise ValueError(
            f"context_ids hold {n} tokens, not more than cfg.sinks + cfg.window = "
            f"{cfg.sinks} + {cfg.window}"
        )
    if cfg.window == 0 and cfg.mode == "threshold":
        raise ValueError(
            "cfg.window=0 leaves no window queries to calibrate threshold mode; "
            "use window >= 1 or mode='topk'"
        )
    return cfg, ids


def _capture_cache(model, n: int, window: int) -> tuple[DynamicCache, CaptureStore]:
    """The model's own cache with a capture layer in place of every full-attention layer."""
    cache = DynamicCache(config=model.config)
    slots = [i for i, layer in enumerate(cache.layers) if type(layer) is DynamicLayer]
    store = CaptureStore(n, window, len(slots))
    for s, i in enumerate(slots):
        cache.layers[i] = CaptureLayer(i, store, s)
    return cache, store


def _prefill(model, cache, ids: torch.Tensor, chunk_size: int, progress: bool) -> None:
    """Run the context through the base model ``chunk_size`` tokens at a time."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    kw = {cache_kwarg(base.forward): cache}
    device = next(model.parameters()).device
    starts = range(0, ids.numel(), chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="squeeze: prefill", unit="chunk", total=len(starts))
    with torch.no_grad():
        for start in starts:
            chunk = ids[start : start + chunk_size][None].to(device)
            base(input_ids=chunk, use_cache=True, **kw)


def _sort_layers(layers, store: CaptureStore, n: int):
    """``(capture layers squeeze covers, {layer: DenseLayer} of the others)``."""
    squeezed = [
        layer for layer in layers if isinstance(layer, CaptureLayer) and layer.reason is None
    ]
    dense: dict[int, DenseLayer] = {}
    for i, layer in enumerate(layers):
        if isinstance(layer, CaptureLayer):
            if layer.filled != n:
                raise RuntimeError(f"layer {i} saw {layer.filled} of {n} context tokens")
            if layer.reason is not None:
                dense[i] = DenseLayer(
                    "full",
                    store.keys[layer.slot, None].clone(),
                    store.values[layer.slot, None].clone(),
                    None,
                    layer.reason,
                )
        elif isinstance(layer, DynamicSlidingWindowLayer):
            dense[i] = DenseLayer(
                "sliding",
                layer.keys.clone(),
                layer.values.clone(),
                layer.sliding_window,
                f"sliding window ({layer.sliding_window})",
            )
        else:
            raise TypeError(
                f"layer {i} uses a {type(layer).__name__} cache, which squeeze does not support"
            )
    return squeezed, dense


def _cluster(squeezed: list, store: CaptureStore, cfg: SqueezeConfig, timings: dict) -> dict:
    """``{layer: ClusterIndex}``: every squeezed layer clustered in one batch, then calibrated
    on its window queries (the store's K/V are freed as soon as they are clustered)."""
    count = store.compact([layer.slot for layer in squeezed])
    t0 = time.perf_counter()
    built = build_indexes(store.keys[:count], store.values[:count], cfg.replace(mode="topk"))
    queries = None if store.queries is None else store.queries[:count].clone()
    store.free()
    timings["compile_cluster_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if queries is not None:
        built = [ix.recalibrate(queries[j], mode=cfg.mode) for j, ix in enumerate(built)]
    timings["compile_calibrate_s"] = time.perf_counter() - t0
    return {layer.layer_idx: ix for layer, ix in zip(squeezed, built, strict=True)}


def _log_summary(ctx: SqueezedContext, n: int) -> None:
    t = ctx.recorder.timings
    reasons = sorted({d.reason for d in ctx.dense.values()})
    fallback = (
        f"; layers {sorted(ctx.dense)} use the model's own attention ({', '.join(reasons)})"
        if ctx.dense
        else ""
    )
    logger.info(
        "squeeze: compiled %d context tokens, %d layers squeezed%s; prefill %.2fs, "
        "clustering %.2fs, calibration %.2fs",
        n,
        len(ctx.indexes),
        fallback,
        t.get("compile_prefill_s", 0.0),
        t.get("compile_cluster_s", 0.0),
        t.get("compile_calibrate_s", 0.0),
    )
    if not ctx.indexes:
        logger.warning(
            "squeeze: no layer of this model is covered; the compiled context is a "
            "plain prefix cache"
        )
