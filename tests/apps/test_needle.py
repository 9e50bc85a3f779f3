"""The needle task generator, its tokenizer, and the shipped model (a regression guard on the
committed weights: dense exact match and squeezed attention at a 10% budget)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import squeeze
from squeeze.apps import needle


def test_context_layout():
    rng = np.random.default_rng(0)
    ctx = needle.make_context(rng, 1000, density=0.3)
    assert ctx.ids.shape == (1000,) and ctx.ids[0] == needle.BOS
    assert len(ctx.records) == 150 == len(set(ctx.records))
    for k, pos in ctx.positions.items():
        assert ctx.ids[pos] == k
        assert ctx.ids[pos + 1] == ctx.records[k]
    keys = set(needle.KEY_IDS.tolist())
    assert sum(int(t) in keys for t in ctx.ids) == len(ctx.records)  # every key exactly once
    qs, ans = needle.make_questions(rng, ctx, 10)
    assert len(qs) == 10 and len({int(q[1]) for q in qs}) == 10
    assert all(ctx.records[int(q[1])] == a for q, a in zip(qs, ans, strict=True))


def test_training_example_targets():
    ids, tgt = needle.training_example(np.random.default_rng(1), 200, 5, density=0.3)
    assert ids.shape == tgt.shape == (200 + 5 * (needle.QUESTION_LEN + 1),)
    where = np.flatnonzero(tgt != -100)
    assert len(where) == 5
    keys = set(needle.KEY_IDS.tolist())
    assert all(int(ids[w]) in keys and ids[w - 1] == needle.QMARK for w in where)
    assert (ids[where + 1] == tgt[where]).all()


def test_seeds_reproduce():
    a = needle.make_context(np.random.default_rng(5), 500)
    b = needle.make_context(np.random.default_rng(5), 500)
    assert (a.ids == b.ids).all() and a.records == b.records


def test_tokenizer_is_word_level():
    pytest.importorskip("transformers")
    tok = needle.build_tokenizer()
    text = "the k017 v342 . ? k017"
    ids = tok(text).input_ids
    assert ids[0] == needle.BOS
    assert ids[1:] == [needle.WORD_ID[w] for w in text.split()]
    assert tok(text, add_special_tokens=False).input_ids == ids[1:]
    assert needle.decode(ids[1:]) == text


# ---- the shipped model ---------------------------------------------------------------------------
def _shipped():
    path = Path(squeeze.demo_model("needle"))
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"the shipped model is missing from {path}")
    return path


def test_demo_model_files_are_small():
    path = _shipped()
    total = sum(f.stat().st_size for f in path.iterdir())
    assert total <= 5 * 2**20
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file()


@pytest.fixture(scope="module")
def shipped_answers():
    """Dense and squeezed (10%) answers of the shipped model on a fixed small set: one
    2048-token context from a seed the training never drew, 60 questions."""
    pytest.importorskip("transformers")
    import torch

    from squeeze.apps import demo
    from squeeze.apps.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(_shipped())
    task = demo.make_task(tok, 2048, 60, seed=424242)
    dense = demo.dense_answers(model, task.context_ids, task.questions)
    ctx = squeeze.compile(
        model, task.context_ids, squeeze.SqueezeConfig(budget=0.1), progress=False
    )
    sq = demo.squeezed_answers(ctx, task.questions)
    squeeze.unpatch(model)
    return demo.accuracy(dense, task.answers), demo.accuracy(sq, task.answers)


def test_shipped_model_answers_dense(shipped_answers):
    dense, _ = shipped_answers
    assert dense >= 0.9


def test_shipped_model_squeezed_within_5_points(shipped_answers):
    dense, squeezed10 = shipped_answers
    assert squeezed10 >= dense - 0.05


def test_parse_context_finds_the_records():
    ctx = needle.make_context(np.random.default_rng(2), 400, density=0.3)
    parsed = needle.parse_context(ctx.ids)
    assert parsed.records == ctx.records and parsed.positions == ctx.positions
    key = next(iter(ctx.records))
    twice = np.concatenate([ctx.ids, [key, ctx.records[key]]])  # a key twice: not a record
    assert len(needle.parse_context(twice).records) == len(ctx.records) - 1
