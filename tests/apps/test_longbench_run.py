"""LongBench end to end on a tiny random model and synthetic fixture records (no real data).

Checks: dense + squeezed configurations in one run; budget 1.0 gives exactly the dense answers and
scores; records that share a context compile it once; resumption; the summary's averages; bad
input (unknown task, missing data, malformed records, a model that is not a causal LM).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("rouge")
pytest.importorskip("jieba")

from test_hf_common import tiny_model
from test_longbench_common import byte_tokenizer

from squeeze.apps.eval.longbench import main, score
from squeeze.apps.eval.longbench.metrics import task_score

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"
TASKS = ["hotpotqa", "samsum", "lsht", "passage_retrieval_en_e"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", vocab_size=259)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _args(model_dir, out, *extra, tasks=TASKS, budgets=("1.0", "0.3")):
    return [
        "--model",
        str(model_dir),
        "--data-dir",
        str(FIXTURES),
        "--tasks",
        *tasks,
        "--budgets",
        *budgets,
        "--modes",
        "topk",
        "--max-length",
        "2000",
        "--window",
        "16",
        "--chunk-size",
        "512",
        "--no-progress",
        "--out-dir",
        str(out),
        *extra,
    ]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lb-out")
    assert main(_args(model_dir, out, "--no-plot")) == 0
    return out


def test_budget_one_equals_dense(run):
    for task in TASKS:
        dense = _lines(run / "dense" / f"{task}.jsonl")
        full = _lines(run / "squeeze-b1-topk" / f"{task}.jsonl")
        assert [x["key"] for x in dense] == [x["key"] for x in full]
        assert len(dense) == len(list((FIXTURES / f"{task}.jsonl").open()))
        for d, f in zip(dense, full, strict=True):
            assert f["pred"] == d["pred"], (task, d["key"])
            assert f["score"] == d["score"]
            assert f["kv_fraction"] == pytest.approx(1.0)
            assert d["fixed_tokens"] == f["fixed_tokens"]
            # the record's score is the official score of its prediction
            rec = d
            assert d["score"] == score(task, rec["pred"], rec["answers"], rec["all_classes"])


def test_squeezed_reads_less_and_shares_contexts(run):
    low = _lines(run / "squeeze-b0.3-topk" / "hotpotqa.jsonl")
    assert all(x["kv_fraction"] < 0.8 for x in low)
    full = _lines(run / "squeeze-b1-topk" / "hotpotqa.jsonl")
    # records 0 and 1 share their context: compiled once, for the first configuration that ran
    assert full[0]["compile_s"] > 0 and full[1]["compile_s"] == 0
    assert low[0]["compile_s"] == 0 and low[1]["compile_s"] == 0
    # record 2 is longer than --max-length: middle-truncated, the question kept whole
    assert full[2]["truncated_tokens"] > 0
    # 2000 kept, plus the chat header added after truncation: "<s><|user|>" is 9 ids, its BOS
    # already counted in the 2000
    assert full[2]["fixed_tokens"] + full[2]["question_tokens"] == 2000 + 9 - 1
    assert full[0]["truncated_tokens"] == 0
    # samsum stops at a newline: a prediction holds at most one, at its end
    for x in _lines(run / "dense" / "samsum.jsonl"):
        assert "\n" not in x["pred"][:-1]


def test_summary(run):
    summary = json.loads((run / "results.json").read_text())
    assert list(summary["configs"]) == ["dense", "squeeze-b1-topk", "squeeze-b0.3-topk"]
    dense = summary["configs"]["dense"]
    full = summary["configs"]["squeeze-b1-topk"]
    for task in TASKS:
        lines = _lines(run / "dense" / f"{task}.jsonl")
        assert dense["tasks"][task]["score"] == task_score(x["score"] for x in lines)
        assert full["tasks"][task]["score"] == dense["tasks"][task]["score"]
    buckets = dense["tasks"]["passage_retrieval_en_e"]["buckets"]
    assert set(buckets) == {"0-4k", "4-8k", "8k+"}  # one fixture record in each
    pr = _lines(run / "dense" / "passage_retrieval_en_e.jsonl")
    assert buckets["8k+"] == task_score([pr[2]["score"]])
    # averages over the v1 tasks of the run: English hotpotqa + samsum; Chinese lsht
    en = dense["averages"]["en"]
    h, s = dense["tasks"]["hotpotqa"]["score"], dense["tasks"]["samsum"]["score"]
    assert en["tasks"] == 2 and en["of_tasks"] == 16
    assert en["mean"] == round((h + s) / 2, 2)
    assert en["category_mean"] == round((h + s) / 2, 2)  # two categories of one task each
    assert dense["averages"]["zh"]["mean"] == dense["tasks"]["lsht"]["score"]
    assert dense["kv_fraction"] == 1.0
    assert 0 < summary["configs"]["squeeze-b0.3-topk"]["kv_fraction"] < 0.8


def test_resume_and_table(run, model_dir, capsys):
    path = run / "squeeze-b0.3-topk" / "lsht.jsonl"
    before = _lines(path)
    # lose the last record and tear the line before it, as an interrupted write would
    text = path.read_text(encoding="utf-8").splitlines()
    path.write_text(text[0][:-5] + "\n", encoding="utf-8")
    assert main(_args(model_dir, run, "--no-plot")) == 0
    after = _lines(path)
    assert [x["pred"] for x in after] == [x["pred"] for x in before]  # greedy: the same answers
    assert len(_lines(run / "dense" / "hotpotqa.jsonl")) == 3  # nothing else was redone
    out = capsys.readouterr().out
    table = out.strip().splitlines()
    assert table[0].split() == ["task", "dense", "squeeze-b1-topk", "squeeze-b0.3-topk"]
    assert any(r.startswith("English mean of tasks (2/16 tasks)") for r in table)
    assert any(r.startswith("English mean of category means") for r in table)
    assert any(r.startswith("KV fraction read") for r in table)
    assert table[-1].startswith("records")


def test_other_settings_refuse_to_resume(run, model_dir, capsys):
    assert main(_args(model_dir, run, "--no-plot", "--window", "8")) == 2
    assert "other settings" in capsys.readouterr().err


def test_plot_and_hf_chat(model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    args = _args(model_dir, out, "--chat-format", "hf", tasks=["hotpotqa"], budgets=["0.5"])
    assert main([*args, "--limit", "1", "--no-dense"]) == 0
    assert (out / "score_vs_budget.png").stat().st_size > 0
    line = _lines(out / "squeeze-b0.5-topk" / "hotpotqa.jsonl")[0]
    assert 0 < line["kv_fraction"] < 1


# ---- bad input ------------------------------------------------------------------------------------------
def test_bad_input(model_dir, tmp_path, capsys):
    assert main(_args(model_dir, tmp_path / "a", tasks=["hotpot"])) == 2
    assert "unknown LongBench task 'hotpot'" in capsys.readouterr().err
    assert main([*_args(model_dir, tmp_path / "b"), "--data-dir", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(_args(model_dir, tmp_path / "c", tasks=["qasper"])) == 2
    assert "qasper.jsonl not found" in capsys.readouterr().err


def test_record_missing_fields(model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURES / "hotpotqa.jsonl", data / "hotpotqa.jsonl")
    recs = _lines(FIXTURES / "lsht.jsonl")
    del recs[1]["all_classes"]
    (data / "lsht.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = _args(model_dir, tmp_path / "out", tasks=["hotpotqa", "lsht"])
    args[args.index("--data-dir") + 1] = str(data)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lsht.jsonl:2" in err and "all_classes" in err
    # checked before anything ran: no output at all
    assert not (tmp_path / "out" / "dense").exists()


def test_interrupted_run_keeps_its_output(model_dir, tmp_path, monkeypatch):
    from squeeze.apps.eval.longbench import runner

    calls = {"n": 0}
    real = runner.Evaluation.run_record

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(runner.Evaluation, "run_record", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(_args(model_dir, out, "--no-plot", tasks=["passage_retrieval_en_e"], budgets=[]))
    assert len(_lines(out / "dense" / "passage_retrieval_en_e.jsonl")) == 1


def test_not_a_causal_lm(tmp_path, capsys):
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=1, d_kv=8, d_ff=16).save_pretrained(tmp_path)
    assert main(_args(tmp_path, tmp_path / "out", tasks=["hotpotqa"])) == 2
    assert "not a causal LM" in capsys.readouterr().err


def test_datasets_loader_on_a_local_path(tmp_path):
    pytest.importorskip("datasets")
    from squeeze.apps.eval.longbench.data import load_task
    from squeeze.apps.eval.longbench.tasks import get_task

    root = tmp_path / "mirror"
    (root / "hotpotqa").mkdir(parents=True)
    shutil.copy(FIXTURES / "hotpotqa.jsonl", root / "hotpotqa" / "test.jsonl")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: hotpotqa\n  data_files:\n  - split: test\n"
        "    path: hotpotqa/test.jsonl\n---\n"
    )
    recs = load_task(get_task("hotpotqa"), None, str(root))
    assert [r["_id"] for r in recs] == [x["_id"] for x in _lines(FIXTURES / "hotpotqa.jsonl")]


def test_threshold_budget_one_equals_dense(model_dir, tmp_path):
    out = tmp_path / "out"
    args = _args(model_dir, out, "--no-plot", tasks=["hotpotqa", "lsht"], budgets=["1.0"])
    args[args.index("topk")] = "threshold"
    assert main([*args, "--limit", "1"]) == 0
    for task in ("hotpotqa", "lsht"):
        dense = _lines(out / "dense" / f"{task}.jsonl")
        full = _lines(out / "squeeze-b1-threshold" / f"{task}.jsonl")
        assert [x["pred"] for x in full] == [x["pred"] for x in dense]
        assert [x["score"] for x in full] == [x["score"] for x in dense]
        assert full[0]["kv_fraction"] == pytest.approx(1.0)
