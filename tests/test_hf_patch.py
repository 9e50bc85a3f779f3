"""squeeze.patch / unpatch: idempotent, dense outputs unchanged, original implementation restored."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch
from test_hf_common import random_ids, tiny_model
from transformers import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from squeeze import SqueezeConfig
from squeeze.patches.hf import (
    ATTN_NAME,
    compile,
    is_patched,
    observe,
    patch,
    squeeze_attention_forward,
    unpatch,
)


def _logits(model, context, question):
    """Logits of a prefill and of a multi-token question over the cached prefill."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        a = model(context[None], past_key_values=cache).logits
        b = model(question[None], past_key_values=cache).logits
    return a, b


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma2-softcap"])
def test_patch_unpatch_restores_dense(arch, gen):
    model = tiny_model(arch)
    context, question = random_ids(gen, 80), random_ids(gen, 7)
    impl = model.config._attn_implementation
    internal = dict(model.config.__dict__)
    before = _logits(model, context, question)

    assert patch(model) is model
    state = model.__dict__["_squeeze_patch_state"]
    patch(model)  # idempotent: nothing re-recorded
    assert model.__dict__["_squeeze_patch_state"] is state
    assert model.config._attn_implementation == ATTN_NAME and is_patched(model)
    patched = _logits(model, context, question)  # no compiled context: the model's own attention
    assert all(torch.equal(x, y) for x, y in zip(before, patched, strict=True))

    assert unpatch(model) is model
    assert model.config._attn_implementation == impl
    assert model.config.__dict__ == internal
    assert not is_patched(model)
    after = _logits(model, context, question)
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    unpatch(model)  # a second unpatch is a no-op
    assert model.config._attn_implementation == impl


def test_both_interfaces_registered():
    patch(tiny_model("llama"))
    assert ALL_ATTENTION_FUNCTIONS[ATTN_NAME] is squeeze_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[ATTN_NAME] is sdpa_mask


def test_context_refuses_unpatched_model(gen):
    model = tiny_model("llama")
    ctx = compile(model, random_ids(gen, 120), SqueezeConfig(window=16), progress=False)
    unpatch(model)
    with pytest.raises(RuntimeError, match="not patched"):
        ctx.generate(random_ids(gen, 4), max_new_tokens=2)
    with pytest.raises(RuntimeError, match=r"squeeze\.patch"), torch.no_grad():
        model(random_ids(gen, 4)[None], past_key_values=ctx.cache())
    patch(model)
    assert ctx.generate(random_ids(gen, 4), max_new_tokens=2, eos_token_id=None).shape == (2,)


def test_patch_rejects_non_models():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch(torch.nn.Linear(2, 2))


def test_observe_sees_every_attention_call_and_changes_nothing(gen):
    model = tiny_model("llama")
    ids = random_ids(gen, 30)[None]
    with torch.no_grad():
        want = model(ids).logits
    patch(model)
    seen = []

    def record(module, query, key, value, scaling):
        seen.append((module.layer_idx, query.shape, key.shape, scaling))

    with observe(record), torch.no_grad():
        got = model(ids).logits
    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    assert [x[0] for x in seen] == list(range(cfg.num_hidden_layers))
    assert all(x[1:3] == ((1, hq, 30, d), (1, hkv, 30, d)) for x in seen)
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        model(ids)
    assert len(seen) == cfg.num_hidden_layers  # the observer is gone after the block
    unpatch(model)


def test_top_level_names_and_light_import():
    import subprocess
    import sys

    import squeeze
    from squeeze.patches import hf

    for name in ("patch", "unpatch", "compile", "SqueezedContext"):
        assert getattr(squeeze, name) is getattr(hf, name)
        assert name in squeeze.__all__
    with pytest.raises(AttributeError, match="no attribute"):
        squeeze.not_a_name  # noqa: B018
    code = "import sys, squeeze; print('transformers' in sys.modules, 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_mask_padding_read_once_per_forward(monkeypatch):
    """Every layer of a forward gets the same mask tensor: its padding is read once, and again
    when the mask changes (another tensor, or the same one written in place)."""
    from squeeze.patches.hf import attention as hf_attention

    reads = []
    real = hf_attention.tail_padding
    monkeypatch.setattr(hf_attention, "tail_padding", lambda *a: reads.append(a) or real(*a))
    n_context, t = 5, 4
    mask = torch.ones(2, 1, 1, n_context + t, dtype=torch.bool)
    mask[1, ..., n_context : n_context + 2] = False  # row 1: two padding tokens
    for _ in range(3):  # three layers
        assert hf_attention.step_padding(mask, 2, 1, t, n_context) == [0, 2]
    assert len(reads) == 1
    mask[1, ..., n_context + 1] = True  # in place: one padding token now
    assert hf_attention.step_padding(mask, 2, 1, t, n_context) == [0, 1]
    assert hf_attention.step_padding(mask.clone(), 2, 1, t, n_context) == [0, 1]
    assert len(reads) == 3
    assert hf_attention.step_padding(None, 2, 1, t, n_context) is None
