"""``squeeze demo`` end to end (the needle model, fast; SmolLM2 on a short context, slow), its
table and JSON, and the document task it asks its questions on."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("transformers")

from squeeze.apps import cli

NUM = r"([\d.]+)"
ROW = re.compile(
    rf"^\| (dense|squeezed \d+%)( ◀)? \| {NUM}% \| {NUM}% \| {NUM}% \| {NUM}% \| {NUM} "
    rf"\| {NUM}x \| {NUM} \| {NUM}x \|$"
)
COLUMNS = ("accuracy", "agree", "keys", "bytes", "attn_ms", "attn_x", "tok_s", "e2e_x")


def _rows(out: str) -> tuple[dict, str | None]:
    rows, marked = {}, None
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(1)] = dict(zip(COLUMNS, map(float, m.groups()[2:]), strict=True))
            if m.group(2):
                marked = m.group(1)
    return rows, marked


@pytest.fixture
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    import squeeze
    from squeeze.demo_models import DemoModelUnavailable

    try:
        return AutoTokenizer.from_pretrained(squeeze.demo_model())
    except DemoModelUnavailable as err:
        pytest.skip(f"SmolLM2 is not installed: {err}")


def test_needle_model_demo_runs_and_its_table_parses(tmp_path, capsys, one_thread):
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    argv = ["demo", "--model", "needle", "--tokens", "1024", "--questions", "12"]
    argv += ["--budgets", "0.05,0.4", "--timing-questions", "2", "--no-progress"]
    assert cli.main([*argv, "--plot", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    rows, marked = _rows(out)
    assert list(rows) == ["dense", "squeezed 5%", "squeezed 10%", "squeezed 40%"]
    assert marked == "squeezed 10%"
    dense, sq = rows["dense"], rows["squeezed 10%"]
    assert dense["keys"] == dense["bytes"] == dense["agree"] == 100.0
    assert dense["accuracy"] >= 80  # the needle model reads its records
    assert 0 < sq["keys"] < 100 and sq["attn_ms"] > 0 and sq["tok_s"] > 0 and sq["e2e_x"] > 0
    assert rows["squeezed 5%"]["keys"] <= rows["squeezed 40%"]["keys"]
    assert "12 questions over a 1024-token context (needle records), answers of 2 tokens" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    res = json.loads(js.read_text())
    assert res["n_context"] == 1024 and res["n_questions"] == 12 and len(res["rows"]) == 4
    assert res["kinds"] == {"record": 12} and len(res["timed_questions"]) == 2
    assert 0 not in res["timed_questions"]  # the first generate warms up, untimed
    assert all(len(r["answers"]) == 12 for r in res["rows"])


def test_needle_model_reads_a_context_file(tmp_path, capsys, one_thread):
    import numpy as np

    from squeeze.apps import needle

    ctx = needle.make_context(np.random.default_rng(3), 1200, density=0.25)
    path = tmp_path / "context.txt"
    path.write_text(needle.decode(ctx.ids[1:]))
    argv = ["demo", "--model", "needle", "--context-file", str(path), "--questions", "6"]
    argv += ["--budgets", "0.1", "--timing-questions", "1", "--plot", "", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "context: 1200 tokens of context.txt; 6 questions (6 record)" in out
    assert "6 questions over a 1200-token context (context.txt)" in out


@pytest.mark.slow
def test_real_model_demo_on_a_short_context(tmp_path, capsys, smollm2_tokenizer):
    """SmolLM2, 1,024 tokens of the standard library's source: budget 1.0 answers as dense."""
    js = tmp_path / "demo.json"
    argv = ["demo", "--tokens", "1024", "--questions", "6", "--budgets", "1.0"]
    argv += ["--timing-questions", "1", "--plot", "", "--json", str(js), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows, marked = _rows(out)
    assert list(rows) == ["dense", "squeezed 10%", "squeezed 100%"] and marked == "squeezed 10%"
    assert rows["squeezed 100%"]["agree"] == 100.0 and rows["squeezed 100%"]["keys"] == 100.0
    assert rows["squeezed 10%"]["keys"] < 50 and rows["squeezed 10%"]["bytes"] < 60
    assert "of the standard library's source" in out and "right answers by kind" in out
    res = json.loads(js.read_text())
    assert res["kinds"] == {"needle": 2, "quote": 4} and res["new_tokens"] == 6
    assert len(res["layers"]) == 30


def test_document_task_is_seeded_and_its_answers_are_in_the_context(smollm2_tokenizer):
    from squeeze.apps.demo import document

    tok = smollm2_tokenizer
    a = document.make_document_task(tok, 2000, 10, seed=4, window=100)
    b = document.make_document_task(tok, 2000, 10, seed=4, window=100)
    assert a.context_ids.tolist() == b.context_ids.tolist()
    assert [q.ids.tolist() for q in a.questions] == [q.ids.tolist() for q in b.questions]
    assert (
        a.context_ids.numel() == 2000
        and [q.kind for q in a.questions] == ["needle"] * 3 + ["quote"] * 7
    )
    ids = a.context_ids.tolist()
    text = tok.decode(ids)
    for q in a.questions[:3]:
        assert document.NEEDLE.split("{")[0] in text and f" is {q.expected}." in text
        value = tok(" " + q.expected, add_special_tokens=False).input_ids
        at = next(i for i in range(len(ids)) if ids[i : i + len(value)] == value)
        assert at < 2000 - 100  # before the window
    prefix = len(tok(document.QUOTE, add_special_tokens=False).input_ids)
    for q in a.questions[3:]:
        span = q.ids[prefix:].tolist()
        assert len(span) == document.QUOTE_TOKENS
        ends = [e for e in range(len(span), len(ids)) if ids[e - len(span) : e] == span]
        assert len(ends) == 1 and ends[0] < 2000 - 100
        answer = tok.decode(ids[ends[0] : ends[0] + document.ANSWER_TOKENS])
        assert answer == q.expected and document.is_correct(answer + " more", q.expected)
    other = document.make_document_task(tok, 2000, 10, seed=5, window=100)
    assert other.context_ids.tolist() != ids


def test_document_task_on_any_text(smollm2_tokenizer):
    from squeeze.apps.demo import document

    words = " ".join(f"w{i}" for i in range(3000))  # no newline, no sentence end
    task = document.make_document_task(smollm2_tokenizer, 1000, 6, seed=1, text=words)
    assert task.context_ids.numel() == 1000 and len(task.questions) == 6
    with pytest.raises(ValueError, match="too short"):
        document.make_document_task(smollm2_tokenizer, 1000, 6, seed=1, text="a few words")


def test_is_correct_normalises_whitespace():
    from squeeze.apps.demo.document import is_correct

    assert is_correct(" 12345. Remember", "12345")
    assert is_correct("foo\n  bar baz", " foo bar")
    assert not is_correct("1234", "12345") and not is_correct("anything", "  ")


def test_bad_demo_options_are_usage_errors(capsys):
    for argv in (
        ["demo", "--needles", "9", "--questions", "4"],
        ["demo", "--tokens", "100"],
        ["demo", "--budgets", "0.1,2"],
    ):
        assert cli.main(argv) == 2
        assert capsys.readouterr().err.startswith("squeeze: error: ")


def test_decode_inputs_reads_every_layer_through_the_patch():
    import torch

    import squeeze
    from squeeze.apps import demo
    from squeeze.apps.models import load_model
    from squeeze.patches.hf import is_patched

    model, tok = load_model("needle")
    task = demo.make_task(tok, 300, 2, seed=5)
    inputs = demo.decode_inputs(model, task.context_ids, task.questions[0])
    assert not is_patched(model)  # left as it was found
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    hq, hkv, n, t = cfg.num_attention_heads, cfg.num_key_value_heads, 300, 2
    assert sorted(inputs) == list(range(cfg.num_hidden_layers))
    for q, kc, vc, kt, vt, scale in inputs.values():
        assert q.shape == (1, hq, 1, d) and kc.shape == vc.shape == (1, hkv, n, d)
        assert kt.shape == vt.shape == (1, hkv, t, d)
        assert scale == pytest.approx(d**-0.5)
    squeeze.patch(model)
    again = demo.decode_inputs(model, task.context_ids, task.questions[0])
    assert is_patched(model)
    torch.testing.assert_close(again[1][0], inputs[1][0])
    squeeze.unpatch(model)


def test_dense_reference_is_the_models_own_prefill():
    """The dense cache rebuilt from the compiled context's K/V gives the logits of a plain
    prefill of context + question (the K/V are the prefill's, put back in context order)."""
    import torch

    import squeeze
    from squeeze.apps.demo import DenseReference, make_task
    from squeeze.apps.models import load_model
    from squeeze.patches.hf.cache import cache_kwarg

    model, tok = load_model("needle")
    task = make_task(tok, 600, 3, seed=2)
    ctx = squeeze.compile(model, task.context_ids, squeeze.SqueezeConfig(), progress=False)
    ref = DenseReference(ctx)
    q = task.questions[0]
    with torch.no_grad():
        got = model(q[None], **{cache_kwarg(model.forward): ref.cache()}).logits[0, -1]
        squeeze.unpatch(model)
        want = model(torch.cat([task.context_ids, q])[None]).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    squeeze.patch(model)
    answer, seconds = ref.generate(q, 1)
    assert answer == [int(want.argmax())] and seconds > 0
    squeeze.unpatch(model)
