"""RULER end to end: a tiny random model with a byte tokenizer (fast), and SmolLM2 (slow).

Checks: dense + squeezed configurations in one run; budget 1.0 gives the dense answers token for
token; a haystack asked several questions is compiled once; resumption recomputes nothing; the
summary; bad input (unknown task, length above the model's limit, a haystack file too short, a
model that is not a causal LM) is one line and exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from test_hf_common import tiny_model
from test_longbench_common import byte_tokenizer

from squeeze.apps.eval.ruler import main
from squeeze.apps.eval.summary import task_score

TASKS = ["niah_single_2", "niah_multikey_2", "vt"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=259).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _args(model, out, *extra, tasks=TASKS, budgets=("1.0", "0.3"), lengths=("2048",)):
    return [
        *("--model", str(model), "--tasks", *tasks, "--lengths", *lengths),
        *("--samples", "1", "--questions", "2", "--budgets", *budgets, "--modes", "topk"),
        *("--window", "16", "--chunk-size", "512", "--no-progress", "--out-dir", str(out)),
        *extra,
    ]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ruler-out")
    assert main(_args(model_dir, out)) == 0
    return out


def test_budget_one_equals_dense(run):
    for task in TASKS:
        dense = _lines(run / "dense" / "2048" / f"{task}.jsonl")
        full = _lines(run / "squeeze-b1-topk" / "2048" / f"{task}.jsonl")
        assert [x["key"] for x in dense] == [x["key"] for x in full]
        assert len(dense) == 2  # 1 sample x 2 questions
        for d, f in zip(dense, full, strict=True):
            assert f["pred"] == d["pred"] and f["new_tokens"] == d["new_tokens"], (task, d["key"])
            assert f["score"] == d["score"]
            assert f["kv_fraction"] == pytest.approx(1.0)
            assert f["fixed_tokens"] == d["fixed_tokens"]
            assert (
                d["fixed_tokens"] + d["question_tokens"] + (128 if "niah" in task else 30) <= 2048
            )


def test_one_compile_per_haystack(run):
    full = _lines(run / "squeeze-b1-topk" / "2048" / "niah_multikey_2.jsonl")
    low = _lines(run / "squeeze-b0.3-topk" / "2048" / "niah_multikey_2.jsonl")
    # the first question compiles the haystack, the second reuses it, and so does the second
    # configuration
    assert [x["compile_s"] > 0 for x in full] == [True, False]
    assert all(x["compile_s"] == 0 for x in low)
    assert all(x["kv_fraction"] < 0.8 for x in low)
    data = _lines(run / "data" / "2048" / "niah_multikey_2.jsonl")
    assert [r["sample"] for r in data] == [0, 0]
    assert data[0]["context"] == data[1]["context"] and data[0]["answers"] != data[1]["answers"]
    assert data[0]["length"] == 2048 and data[0]["all_classes"] is None


def test_summary(run):
    summary = json.loads((run / "results.json").read_text())
    assert list(summary["configs"]) == ["dense", "squeeze-b1-topk", "squeeze-b0.3-topk"]
    assert summary["lengths"] == [2048] and summary["tasks"] == TASKS
    dense = summary["configs"]["dense"]
    scores = {}
    for task in TASKS:
        lines = _lines(run / "dense" / "2048" / f"{task}.jsonl")
        scores[task] = dense["lengths"]["2048"]["tasks"][task]["score"]
        assert scores[task] == task_score(x["score"] for x in lines)
    assert dense["lengths"]["2048"]["score"] == round(sum(scores.values()) / 3, 2)
    assert dense["score"] == dense["lengths"]["2048"]["score"]
    assert dense["records"] == 6 and dense["kv_fraction"] == 1.0
    assert (run / "score_vs_budget.png").stat().st_size > 0


def test_resume_recomputes_nothing(run, model_dir, capsys, monkeypatch):
    from squeeze.apps.eval import runner
    from squeeze.apps.eval.ruler import data

    path = run / "squeeze-b0.3-topk" / "2048" / "vt.jsonl"
    before = _lines(path)
    path.write_text("".join(json.dumps(x) + "\n" for x in before[:-1]), encoding="utf-8")
    calls = []
    real = runner.Evaluation.run_record
    monkeypatch.setattr(
        runner.Evaluation,
        "run_record",
        lambda self, *a: calls.append(a[2]["_id"]) or real(self, *a),
    )
    monkeypatch.setattr(data, "generate_sample", lambda *a, **k: pytest.fail("data regenerated"))
    assert main(_args(model_dir, run)) == 0
    assert calls == [before[-1]["key"]]  # only the line lost
    assert [x["pred"] for x in _lines(path)] == [x["pred"] for x in before]
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split() == ["length", "task", "dense", "squeeze-b1-topk", "squeeze-b0.3-topk"]
    assert any(r.startswith("  2048 mean of 3 tasks") for r in table)
    assert table[-1].startswith("records")


def test_other_settings_refuse_to_resume(run, model_dir, capsys):
    assert main(_args(model_dir, run, "--data-seed", "7")) == 2
    assert "other settings (data differ)" in capsys.readouterr().err


def test_bad_input(model_dir, tmp_path, capsys):
    from squeeze.apps.cli import main as squeeze_main

    def error(*extra, **kw) -> str:
        assert main(_args(model_dir, tmp_path / "out", *extra, **kw)) == 2
        assert not (tmp_path / "out" / "run.json").exists()  # a failed start leaves no run
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1  # one line (transformers may print its loading bar before)
        return lines[0]

    assert "unknown RULER task 'niah_single_9'" in error(tasks=["niah_single_9"])
    assert "above the model's limit of 32768" in error(lengths=["40000"])
    short = tmp_path / "short.txt"
    short.write_text("A few words. Not a haystack.", encoding="utf-8")
    assert "too short" in error("--haystack", str(short), tasks=["niah_single_2"])
    assert "haystack file" in error("--haystack", str(tmp_path / "none.txt"))
    assert "too short for vt" in error(tasks=["vt"], lengths=["512"])
    # the squeeze command routes to the same entry point
    args = _args(model_dir, tmp_path / "out", tasks=["nope"])
    assert squeeze_main(["eval", "ruler", *args]) == 2
    assert "unknown RULER task 'nope'" in capsys.readouterr().err


def test_not_a_causal_lm(tmp_path, capsys):
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=1, d_kv=8, d_ff=16).save_pretrained(tmp_path)
    assert main(_args(tmp_path, tmp_path / "out")) == 2
    assert "not a causal LM" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path):
    """The real model at 1K tokens: dense finds the needle, budget 1.0 answers as dense does
    token for token, a rerun recomputes nothing."""
    import squeeze

    try:
        squeeze.demo_model()
    except squeeze.DemoModelUnavailable as err:
        pytest.skip(str(err))
    args = [
        *("--model", "demo", "--tasks", "niah_single_1", "vt", "--lengths", "1024"),
        *("--samples", "1", "--budgets", "1.0", "0.1", "--no-progress", "--no-plot"),
        *("--dtype", "float32", "--device", "cpu", "--out-dir", str(tmp_path)),
    ]
    assert main(args) == 0
    for task in ("niah_single_1", "vt"):
        dense = _lines(tmp_path / "dense" / "1024" / f"{task}.jsonl")
        full = _lines(tmp_path / "squeeze-b1-threshold" / "1024" / f"{task}.jsonl")
        assert [x["pred"] for x in full] == [x["pred"] for x in dense]
        assert _lines(tmp_path / "squeeze-b0.1-threshold" / "1024" / f"{task}.jsonl")
    assert _lines(tmp_path / "dense" / "1024" / "niah_single_1.jsonl")[0]["score"] == 1.0
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jsonl")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jsonl")} == stamp
