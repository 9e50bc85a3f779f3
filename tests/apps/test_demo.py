"""``squeeze demo`` end to end on the shipped model (20 questions), and its table parses."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("transformers")

from squeeze.apps import cli

ROW = re.compile(
    r"^\| (dense|squeezed \d+%)( ◀)? \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+) \| ([\d.]+)x \|$"
)


def test_demo_runs_and_its_table_parses(tmp_path, capsys):
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    argv = ["demo", "--questions", "20", "--plot", str(png), "--json", str(js), "--no-progress"]
    pytest.importorskip("matplotlib")
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(1)] = [float(m.group(i)) for i in range(3, 8)]
            if m.group(2):
                marked = m.group(1)
    assert set(rows) == {
        "dense",
        "squeezed 2%",
        "squeezed 5%",
        "squeezed 10%",
        "squeezed 20%",
        "squeezed 40%",
    }
    assert marked == "squeezed 10%"
    acc, _agree, read, ms, speedup = rows["squeezed 10%"]
    assert 0 <= acc <= 100 and 0 < read < 100 and ms > 0 and speedup > 0
    assert rows["dense"][2] == 100.0  # dense reads every key
    assert rows["squeezed 2%"][2] <= rows["squeezed 40%"][2]
    assert "20 questions over a 4096-token context" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    res = json.loads(js.read_text())
    assert res["n_context"] == 4096 and res["n_questions"] == 20 and len(res["rows"]) == 6


def test_demo_reads_a_context_file(tmp_path, capsys):
    import numpy as np

    from squeeze.apps import needle

    ctx = needle.make_context(np.random.default_rng(3), 1200, density=0.25)
    path = tmp_path / "context.txt"
    path.write_text(needle.decode(ctx.ids[1:]))
    argv = ["demo", "--context-file", str(path), "--questions", "10", "--budgets", "0.1"]
    assert cli.main([*argv, "--plot", "", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "context: 1200 tokens (needle task), 10 questions" in out
    assert "10 questions over a 1200-token context" in out


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
