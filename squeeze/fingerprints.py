"""Fingerprints: what a compiled-context file must match before it is used.

The model's architecture-relevant config fields and the first values of every parameter
(:func:`check_model`), and the context's token ids (:func:`context_digest`);
:mod:`squeeze.files` stores them in the context header and re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from .errors import ModelMismatchError

#: config fields that change the keys/values a model computes for a given context
FINGERPRINT_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
    "partial_rotary_factor", "rms_norm_eps", "layer_norm_eps", "hidden_act",
    "hidden_activation", "attention_bias", "qkv_bias", "sliding_window", "layer_types",
    "query_pre_attn_scalar", "attn_logit_softcapping", "use_qk_norm",
)  # fmt: skip


def config_fields(model) -> dict[str, Any]:
    """The fingerprinted fields of the model's decoder config (absent ones are ``None``)."""
    cfg = model.config.get_text_config(decoder=True).to_dict()
    return {name: cfg.get(name) for name in FINGERPRINT_FIELDS}


def config_fingerprint(model) -> str:
    """SHA-256 (hex, 16 chars) of the architecture-relevant config fields."""
    blob = json.dumps(config_fields(model), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_fingerprint(model, per_tensor: int = 32) -> str:
    """SHA-256 (hex, 16 chars) of every parameter's name, shape and first ``per_tensor`` values.

    Values are rounded to bf16 first, so casting the model between fp32/bf16/fp16 keeps the
    fingerprint, while other weights (another checkpoint, a fine-tune) change it. Cheap: it
    reads ``per_tensor`` values per tensor. ``model`` is anything with ``named_parameters()``
    and ``config`` (the vLLM plugin passes a checkpoint directory's stand-in).
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        head = p.detach().reshape(-1)[:per_tensor].to(torch.bfloat16).to(torch.float32).cpu()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(head.numpy().tobytes())
    return h.hexdigest()[:16]


def context_digest(ids: torch.Tensor) -> str:
    """SHA-256 (hex) of the context token ids as little-endian int64."""
    return hashlib.sha256(
        ids.to(torch.int64).cpu().contiguous().numpy().astype("<i8").tobytes()
    ).hexdigest()


def metadata_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``meta`` (without its own ``"digest"`` key)."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_model(meta: dict[str, Any], model, path) -> None:
    """Raise :class:`~squeeze.errors.ModelMismatchError` when ``meta`` was compiled for
    another model."""
    mine = config_fingerprint(model)
    if meta.get("config_fingerprint") != mine:
        theirs = meta.get("config_fields") or {}
        ours = config_fields(model)
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ModelMismatchError(
            f"{path} was compiled for another model: file config fingerprint "
            f"{meta.get('config_fingerprint')}, this model's {mine} (fields differing: {diff})"
        )
    mine_w = weights_fingerprint(model)
    if meta.get("weights_fingerprint") != mine_w:
        raise ModelMismatchError(
            f"{path} was compiled for a model with the same config but other weights: file weights "
            f"fingerprint {meta.get('weights_fingerprint')}, this model's {mine_w}"
        )
