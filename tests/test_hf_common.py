"""Tiny random transformers models for the HF integration tests (no downloads), and helpers.

Not a test module by itself: the other ``test_hf_*`` files import it.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

COMMON = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=256,
    max_position_embeddings=32768,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

#: name → (config class, model class, extra config fields)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    # global layers squeezed, local (sliding) layers fall back; softcapping off so the global
    # layers are covered (see gemma2-softcap)
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 48,
            "attn_logit_softcapping": None,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 48},
    ),
}
#: variants whose layers squeeze does not cover at all: they must still equal dense exactly
FALLBACK_ARCHS = {
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64}),
    "gemma2-softcap": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 48,
            "attn_logit_softcapping": 50.0,
            "attn_implementation": "eager",
        },
    ),
}


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A 2-layer fp32 random model of ``arch`` in eval mode."""
    cfg_name, model_name, extra = {**ARCHS, **FALLBACK_ARCHS}[arch]
    fields = {**COMMON, **extra, **overrides}
    impl = fields.pop("attn_implementation", None)
    config = getattr(transformers, cfg_name)(**fields)
    if impl is not None:
        config._attn_implementation = impl
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def random_ids(gen: torch.Generator, n: int, vocab: int = 256) -> torch.Tensor:
    """Token ids in [3, vocab): never the special ids 0-2."""
    return torch.randint(3, vocab, (n,), generator=gen)


def dense_generate(model, context, question, new_tokens: int):
    """Greedy tokens and per-step logits of plain ``model.generate`` on [context, question]."""
    ids = torch.cat([context, question])[None]
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out.sequences[0, ids.shape[1] :], torch.stack(out.logits)[:, 0]


def squeezed_generate(ctx, question, new_tokens: int):
    out = ctx.generate(
        question,
        max_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
    )
    start = ctx.n_context + question.numel()
    return out.sequences[0, start:], torch.stack(out.logits)[:, 0]
