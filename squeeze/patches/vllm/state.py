"""Per-process plugin state: the configuration and the contexts, loaded once at start-up."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from . import stats
from .config import PluginConfig, SqueezeVllmConfigError, plugin_config
from .contexts import ServedContext, check_distinct, kv_head_range, load_context
from .copies import Sources, check_copy_memory, copy_bytes
from .routing import Matcher, install_runner_hook

logger = logging.getLogger("vllm.squeeze")  # a child of vLLM's logger: its handlers, its format
_lock = threading.Lock()
_state: State | None = None
_failed: BaseException | None = None


@dataclass
class State:
    config: PluginConfig
    contexts: list[ServedContext]
    matcher: Matcher
    sources: Sources = field(default_factory=Sources)


def squeeze_state(vllm_config) -> State | None:
    """``None`` when squeeze is not configured for this engine; otherwise the loaded state.

    Loading checks every context file against the served model and raises
    :class:`SqueezeVllmConfigError` naming the problem, so a bad setup fails at start-up.
    """
    global _state, _failed
    cfg = plugin_config(getattr(vllm_config, "additional_config", None))
    if cfg is None:
        return None
    with _lock:
        if _state is not None:
            return _state
        if _failed is not None:
            raise _failed
        try:
            _state = _load(vllm_config, cfg)
        except BaseException as err:
            _failed = err
            raise
        return _state


def _load(vllm_config, cfg: PluginConfig) -> State:
    from transformers import AutoConfig

    from .checkpoint import model_dir_of

    model_config = vllm_config.model_config
    model_dir = model_dir_of(model_config.model)
    hf_config = AutoConfig.from_pretrained(
        str(model_dir), trust_remote_code=model_config.trust_remote_code
    )
    text = hf_config.get_text_config(decoder=True)
    total_kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    tp_size = vllm_config.parallel_config.tensor_parallel_size
    tp_rank = _tp_rank() if tp_size > 1 else 0
    heads = kv_head_range(total_kv, tp_size, tp_rank)
    contexts = [load_context(p, str(model_dir), hf_config, cfg.budget, heads) for p in cfg.contexts]
    check_distinct(contexts)
    lengths = sorted({c.n for c in contexts})
    max_len = model_config.max_model_len
    for c in contexts:
        if c.n >= max_len:
            raise SqueezeVllmConfigError(
                f"squeeze context {c.path} holds {c.n} tokens, not fewer than max_model_len="
                f"{max_len}: no question would fit"
            )
    _account_copies(vllm_config, cfg, contexts)
    install_runner_hook()
    stats.set_interval(cfg.log_interval_s)
    stats.set_rank(tp_rank, tp_size, heads, total_kv)
    logger.info(
        "squeeze: serving %d context(s) of %s tokens, budget %s, KV heads %s of %d",
        len(contexts),
        lengths,
        cfg.budget if cfg.budget is not None else "as compiled",
        heads,
        total_kv,
    )
    return State(cfg, contexts, Matcher(contexts))


def _account_copies(vllm_config, cfg: PluginConfig, contexts: list[ServedContext]) -> None:
    """Log each context's copy memory on this rank; refuse more than ``copy_memory_mib``."""
    import torch

    block_size = vllm_config.cache_config.block_size
    dtype = vllm_config.model_config.dtype
    if not block_size or not isinstance(dtype, torch.dtype):
        return  # not known yet: the copies are logged when taken
    sizes = {}
    for c in contexts:
        ix = next(iter(c.layers.values()))
        per_layer = copy_bytes(c.n, block_size, ix.num_kv_heads, ix.head_dim, dtype.itemsize)
        sizes[str(c.path)] = per_layer * len(c.layers)
        logger.info(
            "squeeze: context %s (%d tokens): its cluster-ordered K/V copies will take %.1f MiB "
            "on this rank (%.2f MiB per layer x %d layers), beside vLLM's KV cache",
            c.path, c.n, sizes[str(c.path)] / 2**20, per_layer / 2**20, len(c.layers),
        )  # fmt: skip
    check_copy_memory(sizes, cfg.copy_memory_mib)


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()
