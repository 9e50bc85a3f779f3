"""The plugin serving the real checkpoint: SmolLM2-135M-Instruct (``squeeze.demo_model()``) in
vLLM, with three compiled real-text contexts registered at once.

One job runs on three engines (stock vLLM, the plugin at budget 1.0 and at 0.1), in three waves
of one ``generate`` call each, on a KV cache shrunk to ``BLOCKS`` blocks:

1. every context's questions and plain requests, mixed in the same batches: the demo's quote
   questions on ``doc`` (1,024 tokens, block-aligned: its question prefill is squeezed too), and
   on every context the question of its own planted access code (distinct answers per context;
   ``doc`` and ``second`` share their first two KV blocks through the prefix cache), plus a plain
   request that shares those blocks without being a context, and an unrelated one;
2. long filler prompts that fill the whole KV cache: the contexts' blocks are evicted;
3. wave 1 again: the contexts are recomputed into reused blocks, the copies are taken again.

Engines run with one OpenMP thread (``OMP_NUM_THREADS=1``): on a busy 2-core machine every
multi-threaded op waits for the second core; the tokens do not depend on it.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from vllm_real import CODE_QUESTION, code_contexts, excerpt, ids, load_hf, smollm2  # noqa: E402
from vllm_run import run_engine  # noqa: E402

import squeeze  # noqa: E402

BLOCKS = 48  # 128-token CPU blocks: about wave 1's working set
NEW_TOKENS = 8
QUOTES = 12
ENV = {"OMP_NUM_THREADS": "1"}


def compile_quietly(model, ids_, path):
    """``squeeze.compile`` on one thread (fast on a busy machine too), then save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = squeeze.SqueezeConfig(budget=0.1)
        squeeze.compile(model, torch.tensor(ids_), cfg, progress=False).save(path)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from squeeze.apps.demo.task import make_task

    tmp = tmp_path_factory.mktemp("vllm-real")
    path, tok = smollm2()
    model = load_hf(path)
    ctxs = code_contexts(tok)
    # doc: the first context cut to 1,024 tokens (its code sits in its first 600), with quotes
    text = tok.decode(ctxs[0].ids) + "\n\n" + excerpt(tok, 60, 600)
    task = make_task(tok, 1024, QUOTES, seed=0, text=text)
    ctxs[0].ids = task.context_ids.tolist()
    assert len(ctxs[0].ids) == 1024 and ctxs[0].ids[:256] == ctxs[1].ids[:256]
    files = []
    for k, c in enumerate(ctxs):
        files.append(str(tmp / f"ctx{k}.sqz"))
        compile_quietly(model, c.ids, files[-1])
    del model
    code_q = ids(tok, CODE_QUESTION)
    summary = ids(
        tok, "\n\nSummarize the document in one sentence.<|im_end|>\n<|im_start|>assistant\n"
    )
    wave = [ctxs[0].ids + q.tolist() for q in task.questions]
    wave += [c.ids + code_q for c in ctxs] + [c.ids + summary for c in ctxs[1:]]
    wave += [ctxs[0].ids[:300] + code_q, ids(tok, "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n")]
    fillers = [ids(tok, excerpt(tok, 80 + k, 1500))[:1500] for k in range(4)]
    job = dict(
        model=path,
        warm=[c.ids + ids(tok, " Hi") for c in ctxs],
        waves=[wave, fillers, wave],
        max_tokens=NEW_TOKENS,
        engine={"num_gpu_blocks_override": BLOCKS},
    )

    def plugin(budget):
        return {"squeeze": {"contexts": files, "budget": budget, "log_interval_s": 0}}

    runs = {"stock": run_engine(tmp, "stock", job, plugin=False, timeout=600, env=ENV)}
    for name, budget in (("b1", 1.0), ("b01", 0.1)):
        job_b = {**job, "additional_config": plugin(budget)}
        runs[name] = run_engine(tmp, name, job_b, timeout=600, env=ENV)
    return dict(tok=tok, task=task, ctxs=ctxs, runs=runs, n_quotes=len(task.questions), tmp=tmp)


def answers(real, run: str, wave: int) -> list[str]:
    """The decoded answers of the three code questions."""
    n = real["n_quotes"]
    toks = real["runs"][run]["waves"][wave]["tokens"][n : n + 3]
    return [real["tok"].decode(t) for t in toks]


def test_subprocesses_import_this_squeeze(real):
    assert real["runs"]["b1"]["squeeze_file"] == squeeze.__file__


def test_budget_one_token_identical_in_every_wave(real):
    for w in range(3):
        assert (
            real["runs"]["b1"]["waves"][w]["tokens"] == real["runs"]["stock"]["waves"][w]["tokens"]
        )
    s1, s3 = (real["runs"]["b1"]["waves"][w]["stats"] for w in (0, 2))
    assert s1["calls"] > 0 and s1["kv_fraction"] == pytest.approx(1.0)
    assert s1["gather_calls"] == 0 and s3["gather_calls"] == 0


def test_each_context_answers_its_own_code(real):
    """Stock vLLM reads each planted code back (the test's premise); the plugin serves each
    request by its own context: at budget 1.0 the same answers, at 0.1 never another context's
    code."""
    codes = [c.code for c in real["ctxs"]]
    for w in (0, 2):
        assert [codes[k] in a for k, a in enumerate(answers(real, "stock", w))] == [True] * 3
        assert answers(real, "b1", w) == answers(real, "stock", w)
        for k, a in enumerate(answers(real, "b01", w)):
            assert not any(c in a for j, c in enumerate(codes) if j != k), (k, a)


def test_copy_memory_of_each_context_logged(real):
    """Each context's copies are accounted on their own at start-up: SmolLM2's 30 layers x 3
    KV heads x head dim 64, fp32, over the positions of the context's full 128-token blocks."""
    from squeeze.patches.vllm.copies import copy_bytes

    log = real["runs"]["b1"]["log"]
    for k, c in enumerate(real["ctxs"]):
        per_layer = copy_bytes(len(c.ids), 128, kv_heads=3, head_dim=64, itemsize=4)
        line = (
            f"squeeze: context {real['tmp'] / f'ctx{k}.sqz'} ({len(c.ids)} tokens): its "
            f"cluster-ordered K/V copies will take {30 * per_layer / 2**20:.1f} MiB on this "
            f"rank ({per_layer / 2**20:.2f} MiB per layer x 30 layers)"
        )
        assert line in log, log[-3000:]


def test_eviction_is_detected_and_copies_are_taken_again(real):
    """Wave 2 fills the whole KV cache, so wave 3 recomputes the contexts: the plugin drops the
    copies whose blocks were written again and takes new ones, and stays identical to stock."""
    cached = real["runs"]["b1"]["waves"][2]["cached"]
    first = real["runs"]["b1"]["waves"][0]["cached"]
    assert cached[0] < 1024 <= first[0]  # doc was in the prefix cache in wave 1, not in wave 3
    assert real["runs"]["b1"]["waves"][1]["stats"]["invalidated"] >= 1  # the fillers' writes
    s = real["runs"]["b1"]["waves"][2]["stats"]
    assert s["recopies"] >= 30, s  # at least one context, in each of the 30 layers
    assert s["calls"] > 0 and s["kv_fraction"] == pytest.approx(1.0)


def test_budget_tenth_reads_less_and_reports(real):
    stock, b01 = real["runs"]["stock"], real["runs"]["b01"]
    w1, s = b01["waves"][0], b01["waves"][0]["stats"]
    assert s["calls"] > 0 and s["kv_fraction"] < 0.5 and 0.03 < s["clustered"] < 0.3, s
    n = real["n_quotes"]
    task = real["task"]
    acc = {
        run: sum(t[0] == a for t, a in zip(r["waves"][0]["tokens"][:n], task.answers, strict=True))
        / n
        for run, r in (("stock", stock), ("b01", b01))
    }
    pairs = [
        (a, b)
        for x, y in zip(w1["tokens"], stock["waves"][0]["tokens"], strict=True)
        for a, b in zip(x, y, strict=True)
    ]
    first = [x[0] == y[0] for x, y in zip(w1["tokens"], stock["waves"][0]["tokens"], strict=True)]
    report = {
        "quote_accuracy": acc,
        "token_agreement_with_stock": sum(a == b for a, b in pairs) / len(pairs),
        "first_token_agreement": sum(first) / len(first),
        "kv_fraction": s["kv_fraction"],
        "clustered_fraction": s["clustered"],
        "code_answers_b01": answers(real, "b01", 0),
    }
    (real["tmp"] / "report.json").write_text(json.dumps(report, indent=1))
    print("\nSmolLM2 in vLLM, budget 0.1:", json.dumps(report))
    assert acc["stock"] >= 0.5  # the quotes are answerable
