"""The plugin in a real vLLM engine (CPU, tiny random GQA Llama, float32).

Each engine runs in its own subprocess (``vllm_run.py``) with a time limit; the module builds
the model and two compiled contexts once: ``doc512`` (a multiple of the CPU block size, so the
question prefill starts after the cached context and takes the squeezed path) and ``doc300``
(its last partial block is recomputed with the question: that prefill is stock, decode squeezed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from vllm_run import run_engine as _run  # noqa: E402
from vllm_tiny import random_ids, save_tiny_llama  # noqa: E402

import squeeze  # noqa: E402

ENGINE_TIMEOUT_S = 300
NEW_TOKENS = 12


def run_engine(tmp: Path, name: str, job: dict, expect_ok: bool = True, plugin: bool = True):
    return _run(tmp, name, job, expect_ok, plugin, timeout=ENGINE_TIMEOUT_S)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    model_dir = tmp / "tiny"
    model = save_tiny_llama(model_dir)
    gen = torch.Generator().manual_seed(7)
    cfg = squeeze.SqueezeConfig(window=32, budget=0.1, centroid_ratio=0.05)
    docs = {}
    for name, n in (("doc512", 512), ("doc300", 300)):
        ids = random_ids(gen, n)
        squeeze.compile(model, torch.tensor(ids), cfg, progress=False).save(tmp / f"{name}.sqz")
        docs[name] = ids
    a, b = docs["doc512"], docs["doc300"]
    with_ctx = [a + random_ids(gen, 4 + 5 * i) for i in range(4)] + [b + random_ids(gen, 9)]
    without = [random_ids(gen, 40), random_ids(gen, 700), a[:200] + random_ids(gen, 30)]
    job = dict(
        model=str(model_dir),
        warm=[a + random_ids(gen, 3), b + random_ids(gen, 3)],
        prompts=with_ctx + without,
        max_tokens=NEW_TOKENS,
    )
    contexts = [str(tmp / "doc512.sqz"), str(tmp / "doc300.sqz")]

    def plugin(budget):
        return {"squeeze": {"contexts": contexts, "budget": budget, "log_interval_s": 0}}

    results = {
        "stock": run_engine(tmp, "stock", job, plugin=False),
        "b1": run_engine(tmp, "b1", {**job, "additional_config": plugin(1.0)}),
        "b01": run_engine(tmp, "b01", {**job, "additional_config": plugin(0.1)}),
    }
    return dict(tmp=tmp, model_dir=model_dir, job=job, contexts=contexts, n_ctx=5, **results)


def test_prefix_cache_holds_the_contexts(setup):
    cached = setup["b1"]["cached"]
    assert cached[:4] == [512] * 4  # whole aligned context from the cache
    assert cached[4] == 256  # full blocks of doc300 only


def test_budget_one_token_identical(setup):
    n = setup["n_ctx"]
    assert setup["b1"]["tokens"][:n] == setup["stock"]["tokens"][:n]
    s = setup["b1"]["stats"]
    assert s["calls"] > 0 and s["kv_fraction"] == pytest.approx(1.0)
    # doc300's question prefill recomputes its partial block: stock for that step only
    assert s["dense_calls"] == 1
    # every squeezed read went through the per-layer copies taken during the warm-up requests
    # (the same prefix-cached blocks): no gather fallback, no copy taken again
    assert s["gather_calls"] == 0 and s["recopies"] == 0


def test_requests_without_context_identical(setup):
    n = setup["n_ctx"]
    for run in ("b1", "b01"):
        assert setup[run]["tokens"][n:] == setup["stock"]["tokens"][n:]
        assert setup[run]["stats"]["mixed_steps"] > 0  # they shared steps with squeezed ones


def test_budget_tenth_completes_and_reads_a_tenth(setup):
    out = setup["b01"]
    assert all(len(t) == NEW_TOKENS for t in out["tokens"])
    s = out["stats"]
    # 4 aligned requests x (1 prefill + 11 decodes) + doc300 x 11 decodes, x 2 layers
    assert s["calls"] == 2 * (4 * NEW_TOKENS + (NEW_TOKENS - 1))
    assert 0.04 < s["clustered"] < 0.2, s
    assert s["kv_fraction"] < 0.3


BAD = {
    "missing": ({"contexts": ["/nonexistent/doc.sqz"]}, "does not exist"),
    "budget": ({"budget": 1.5}, "budget"),
    "other_model": (None, "compiled for a model with the same config but other weights"),
    # issue 14, defect 3: a crafted file (280 ids for 300 rows, every digest recomputed)
    "crafted_ids": (None, "holds 300 context rows, context_len is 280"),
    # the two contexts' copies take 0.75 MiB on this engine (test_copy_memory_logged_at_start)
    "copy_memory": ({"copy_memory_mib": 0.5}, "over the limit copy_memory_mib=0.5"),
}


def _crafted_ids(src: Path, dst: Path) -> Path:
    from file_tools import rewrite

    from squeeze.files import context_digest

    def edit(header):
        meta = header["metadata"]
        meta["context_ids"] = meta["context_ids"][:280]
        meta["context_len"] = 280
        meta["context_sha256"] = context_digest(torch.tensor(meta["context_ids"]))

    return rewrite(src, dst, header_fn=edit)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_fails_at_start(setup, case):
    tmp = setup["tmp"]
    raw, words = BAD[case]
    if case == "other_model":
        other = save_tiny_llama(tmp / f"other-{case}", seed=1)
        ids = random_ids(torch.Generator().manual_seed(3), 200)
        path = tmp / "other.sqz"
        squeeze.compile(
            other, torch.tensor(ids), squeeze.SqueezeConfig(window=16), progress=False
        ).save(path)
        raw = {"contexts": [str(path)]}
    elif case == "crafted_ids":
        raw = {"contexts": [str(_crafted_ids(tmp / "doc300.sqz", tmp / "crafted.sqz"))]}
    cfg = {"squeeze": {"contexts": setup["contexts"], **raw}}
    job = {**setup["job"], "warm": [], "additional_config": cfg}
    proc = run_engine(tmp, f"bad-{case}", job, expect_ok=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert words in proc.stderr, proc.stderr[-3000:]


def test_copy_memory_logged_at_start(setup):
    """At start-up the worker logs, per context, the memory its cluster-ordered copies will
    take (2 layers x 2 KV heads x head dim 32, fp32, 128-token blocks: doc512 all 512
    positions, doc300 its 256 of full blocks); a limit below their sum refuses to start
    (``test_bad_config_fails_at_start[copy_memory]``)."""
    from squeeze.patches.vllm.copies import copy_bytes

    log = setup["b1"]["log"]
    total = 0
    for name, n in (("doc512", 512), ("doc300", 300)):
        per_layer = copy_bytes(n, 128, kv_heads=2, head_dim=32, itemsize=4)
        total += 2 * per_layer
        line = (
            f"squeeze: context {setup['tmp'] / name}.sqz ({n} tokens): its cluster-ordered K/V "
            f"copies will take {2 * per_layer / 2**20:.1f} MiB on this rank "
            f"({per_layer / 2**20:.2f} MiB per layer x 2 layers)"
        )
        assert line in log, log[-3000:]
    assert total == 0.75 * 2**20


def test_bf16_cache_layout(setup):
    """bf16 engine: the squeezed path reads vLLM's bf16 paged cache; at budget 1.0 the greedy
    tokens follow stock bf16 vLLM (a misread layout would give unrelated tokens). Exact identity is
    not required: the kernels round bf16 products differently. The stock run here has the plugin
    registered but not configured (the delegate-only path)."""
    tmp, n = setup["tmp"], setup["n_ctx"]
    job = {**setup["job"], "dtype": "bfloat16", "prompts": setup["job"]["prompts"][:n]}
    cfg = {"squeeze": {"contexts": setup["contexts"], "budget": 1.0, "log_interval_s": 0}}
    stock = run_engine(tmp, "stock-bf16", job)
    squeezed = run_engine(tmp, "b1-bf16", {**job, "additional_config": cfg})
    assert squeezed["stats"]["calls"] > 0
    first = [t[0] for t in squeezed["tokens"]] == [t[0] for t in stock["tokens"]]
    same = sum(
        a == b
        for x, y in zip(squeezed["tokens"], stock["tokens"], strict=True)
        for a, b in zip(x, y, strict=True)
    )
    assert first and same >= 0.8 * n * NEW_TOKENS, (squeezed["tokens"], stock["tokens"])
