"""compile + generate on tiny random models of every supported architecture (CPU, fp32)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch
from test_hf_common import (
    ARCHS,
    FALLBACK_ARCHS,
    dense_generate,
    random_ids,
    squeezed_generate,
    tiny_model,
)

from squeeze import SqueezeConfig
from squeeze.patches.hf import compile

N_CONTEXT, WINDOW, CHUNK = 300, 48, 128  # the window spans two prefill chunks


def _compile(model, context, **cfg):
    cfg = SqueezeConfig(**{"window": WINDOW, "budget": 1.0, **cfg})
    return compile(model, context, cfg, chunk_size=CHUNK, progress=False)


@pytest.mark.parametrize("arch", list(ARCHS) + list(FALLBACK_ARCHS))
def test_budget_one_matches_dense(arch, gen):
    model = tiny_model(arch)
    context, question = random_ids(gen, N_CONTEXT), random_ids(gen, 9)
    tokens, logits = dense_generate(model, context, question, 6)
    with torch.no_grad():
        dense_q = model(torch.cat([context, question])[None]).logits[0, -9:]

    ctx = _compile(model, context)
    got_tokens, got_logits = squeezed_generate(ctx, question, 6)
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, atol=1e-4, rtol=0)
    with torch.no_grad():  # the question block itself, through the cache
        q_logits = model(question[None], past_key_values=ctx.cache()).logits[0]
    torch.testing.assert_close(q_logits, dense_q, atol=1e-4, rtol=0)

    expected = {"gemma2": [1], "gemma3": [1]}.get(arch, [0, 1]) if arch in ARCHS else []
    assert list(ctx.indexes) == expected
    if expected:  # the squeezed layers really ran, and read every context key
        s = ctx.stats()
        assert s["kv_fraction"] == pytest.approx(1.0)
        assert all(layer["calls"] > 0 for layer in s["layers"].values())


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_budget_fraction(arch, mode, gen):
    model = tiny_model(arch)
    n, window = 2048, 64
    ctx = compile(
        model,
        random_ids(gen, n),
        SqueezeConfig(window=window, budget=0.1, mode=mode),
        chunk_size=512,
        progress=False,
    )
    for length in (9, 4):
        answer = ctx.generate(
            random_ids(gen, length), max_new_tokens=8, do_sample=False, eos_token_id=None
        )
        assert answer.shape == (8,)
    s = ctx.stats()
    for layer in s["layers"].values():
        frac = layer["clustered_fraction"]
        # a question's prefill block reads the union of its rows' selections
        if mode == "topk":  # each row's best clusters until budget: at least 10%
            assert 0.1 <= frac <= 0.5, frac
        else:  # one threshold per layer calibrated on the window queries
            assert 0.03 <= frac <= 0.2, frac
        # the dense rows (sinks and window) are read on top of the clustered keys
        dense = window + ctx.config.sinks
        n_clustered = n - dense
        assert layer["kv_fraction"] * n == pytest.approx(frac * n_clustered + dense, rel=1e-9)
        assert layer["centroids_scored"] > 0

    # decode steps alone: threshold mode reads about the budget (the calibration's target),
    # top-k mode at least 10% and at most one cluster more, in every layer
    ctx.reset_stats()
    cache = ctx.cache()
    with torch.no_grad():
        model(random_ids(gen, 5)[None], past_key_values=cache)
        ctx.reset_stats()
        for _ in range(16):
            model(random_ids(gen, 1)[None], past_key_values=cache)
    decode = ctx.stats()
    if mode == "threshold":
        assert 0.05 <= decode["clustered_fraction"] <= 0.2
    else:
        fracs = [layer["clustered_fraction"] for layer in decode["layers"].values()]
        assert all(0.1 <= f <= 0.14 for f in fracs), fracs


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("budget,mode", [(1.0, "threshold"), (0.1, "threshold"), (0.1, "topk")])
def test_batch_matches_one_by_one(arch, budget, mode, gen):
    model = tiny_model(arch)
    context = random_ids(gen, N_CONTEXT)
    questions = [random_ids(gen, n) for n in (5, 11, 8, 5)]  # gemma3 batches by length
    ctx = _compile(model, context, budget=budget, mode=mode)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    batch = ctx.generate(questions, **kw)
    assert isinstance(batch, list) and len(batch) == 4
    for q, got in zip(questions, batch, strict=True):
        assert torch.equal(got, ctx.generate(q, **kw))
        if budget == 1.0:
            assert torch.equal(got, dense_generate(model, context, q, 6)[0])


def test_model_generate_with_context_cache(gen):
    model = tiny_model("gemma3")  # a squeezed layer and a sliding layer
    context, question = random_ids(gen, N_CONTEXT), random_ids(gen, 7)
    ids = torch.cat([context, question])[None]
    dense = dense_generate(model, context, question, 6)[0]
    ctx = _compile(model, context)
    for c in (ctx, ctx.with_config(budget=0.1)):
        out = model.generate(
            input_ids=ids,
            past_key_values=c.cache(),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
        )
        assert torch.equal(out[0, : ids.shape[1]], ids[0])
        assert torch.equal(
            out[0, ids.shape[1] :],
            c.generate(question, max_new_tokens=6, do_sample=False, eos_token_id=None),
        )
        if c is ctx:
            assert torch.equal(out[0, ids.shape[1] :], dense)


def test_context_never_mutated(tmp_path, gen):
    """Many questions in a row give what fresh loads give; the context's tensors stay bitwise equal."""
    from squeeze.patches.hf import SqueezedContext

    model = tiny_model("llama")
    ctx = _compile(model, random_ids(gen, N_CONTEXT), budget=0.1)
    path = tmp_path / "ctx.sqz"
    ctx.save(path)
    before = {
        i: (ix.keys.clone(), ix.values.clone(), ix.offsets.clone()) for i, ix in ctx.indexes.items()
    }
    questions = [random_ids(gen, int(n)) for n in torch.randint(2, 12, (12,), generator=gen)]
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    in_a_row = [ctx.generate(q, **kw) for q in questions]
    fresh = [SqueezedContext.load(path, model).generate(q, **kw) for q in questions]
    assert all(torch.equal(a, b) for a, b in zip(in_a_row, fresh, strict=True))
    for i, ix in ctx.indexes.items():
        assert all(
            torch.equal(x, y)
            for x, y in zip(before[i], (ix.keys, ix.values, ix.offsets), strict=True)
        )


def test_cache_crop_and_copy(gen):
    import copy

    model = tiny_model("llama")
    ctx = _compile(model, random_ids(gen, N_CONTEXT))
    cache = ctx.cache()
    assert cache.get_seq_length() == N_CONTEXT
    with torch.no_grad():
        model(random_ids(gen, 6)[None], past_key_values=cache)
    assert cache.get_seq_length() == N_CONTEXT + 6
    clone = copy.deepcopy(cache)
    assert clone.layers[0].index is cache.layers[0].index  # the context is shared, not copied
    cache.crop(-2)
    assert cache.get_seq_length() == N_CONTEXT + 4
    assert clone.get_seq_length() == N_CONTEXT + 6
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-5)


def test_compile_rejects_bad_input(gen):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="window"):
        compile(model, random_ids(gen, 40), SqueezeConfig(window=48), progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        compile(model, random_ids(gen, 100), SqueezeConfig(window=8), chunk_size=0, progress=False)
    with pytest.raises(TypeError, match="chunk_size"):
        compile(model, random_ids(gen, 100), SqueezeConfig(window=8), chunk_size=64.0)
    with pytest.raises(ValueError, match="context_ids"):
        compile(
            model, torch.zeros(2, 50, dtype=torch.long), SqueezeConfig(window=8), progress=False
        )


def test_context_holding_the_pad_token(gen):
    """A context token equal to the pad token (eos_token_id=None: the pad falls back to the
    generation config's) is an ordinary token: generate must not mask it out."""
    model = tiny_model("llama")
    context, question = random_ids(gen, N_CONTEXT), random_ids(gen, 9)
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    pad = pad if isinstance(pad, int) else 0
    context[::7] = pad
    ids = torch.cat([context, question])[None]
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=pad,
    )  # fmt: skip
    tokens, logits = out.sequences[0, ids.shape[1] :], torch.stack(out.logits)[:, 0]
    got_tokens, got_logits = squeezed_generate(_compile(model, context), question, 6)
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, atol=1e-4, rtol=0)


def test_stats_summed_in_batches_as_running_sums(monkeypatch, gen):
    """The recorder sums its calls in batches; the totals are those of a running tensor sum
    (bytes in float32, as ``0.0 + int64`` tensors promote), whatever the batch size."""
    from squeeze.attention import SqueezeStats
    from squeeze.patches.hf import stats

    class Index:
        n_context, n_dense, n_clustered = 8192, 104, 8088

    monkeypatch.setattr(stats, "FOLD_EVERY", 7)
    recorder = stats.StatsRecorder()
    keys, scored, read = 0, 0, 0.0
    for call in range(200):
        rows = 1 + call % 2
        st = SqueezeStats(
            keys_read=torch.randint(100, 3000, (rows, 3), generator=gen),
            centroids_scored_t=torch.randint(0, 5000, (), generator=gen),
            n_context=8192, n_dense=104, key_bytes=512, centroid_bytes=130,
        )  # fmt: skip
        recorder.record(0, st, Index)
        keys = keys + st.keys_read.sum()
        scored = scored + st.centroids_scored_t
        read = read + st.keys_read.sum() * 512 + st.centroids_scored_t * 130
        if call % 31 == 0:
            recorder.summary()  # a summary folds what is pending
    layer = recorder.summary()["layers"][0]
    c = recorder.layers[0]
    assert (c.keys_read, c.centroids_scored, c.calls) == (int(keys), int(scored), 200)
    assert layer["bytes_fraction"] == float(read) / c.bytes_total
    assert layer["centroids_scored"] == int(scored)
