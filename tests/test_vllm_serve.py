"""The OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``) with the
plugin, driven by the ``openai`` client: 32 concurrent completions, half of them on a registered
context, in three waves; all complete, the server's memory does not grow between the waves, and
the keys-read metric is logged. Once on the tiny random Llama (fast), once on the real
checkpoint, SmolLM2-135M-Instruct with a 1,024-token real-text context (prompts as token ids, so
that they start with exactly the context's ids).

Then under load (issue 14): 32 clients for 2 x 30 s of mixed requests (on the context and
not, every 4th abandoned mid-stream), with a restart of the server on the same context file
between the two halves: no errors but the abandoned requests, every answer its own prompt's,
memory flat.

``start_server`` / ``stop_server`` are shared with the tensor-parallel test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.slow

from vllm_tiny import random_ids, save_tiny_llama, to_text  # noqa: E402

import squeeze  # noqa: E402

START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 180
CONCURRENCY = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def start_server(tmp: Path, name: str, model: str, args: list[str], env: dict) -> dict:
    """A server on a free port, ready; ``RuntimeError`` with the log's error lines if it exits."""
    port = free_port()
    cmd = [
        *("nice", "-n", "5", sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
        *("--model", model, "--host", "127.0.0.1", "--port", str(port)),
        *("--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", *args),
    ]
    log_path = tmp / f"{name}.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed by stop_server)
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONPATH": str(Path(__file__).parent.parent),
        **env,
    }
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=REQUEST_TIMEOUT_S
    )
    srv = dict(client=client, proc=proc, model=model, log=log_path, _log=log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            stop_server(srv)
            text = log_path.read_text()
            errors = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln]
            raise RuntimeError("; ".join(errors[-4:]) or text[-2000:])
        try:
            client.models.list()
            return srv
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                stop_server(srv)
                raise RuntimeError(f"server did not start in {START_TIMEOUT_S} s") from None
            time.sleep(1)


def stop_server(srv: dict) -> None:
    proc = srv["proc"]
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    srv["_log"].close()


def tiny_setup(tmp: Path):
    model_dir = tmp / "tiny"
    model = save_tiny_llama(model_dir)
    gen = torch.Generator().manual_seed(11)
    ids = random_ids(gen, 512)
    cfg = squeeze.SqueezeConfig(window=32, budget=0.1)
    squeeze.compile(model, torch.tensor(ids), cfg, progress=False).save(tmp / "doc.sqz")

    def prompts(seed):
        g = torch.Generator().manual_seed(seed)
        return [
            to_text(ids + random_ids(g, 5 + i)) if i % 2 == 0 else to_text(random_ids(g, 30 + i))
            for i in range(CONCURRENCY)
        ]

    return str(model_dir), prompts


def real_setup(tmp: Path):
    from test_vllm_real import compile_quietly
    from vllm_real import excerpt, ids, load_hf, smollm2

    path, tok = smollm2()
    context = ids(tok, excerpt(tok, 5, 700) + "\n\n" + excerpt(tok, 6, 700))[:1024]
    compile_quietly(load_hf(path), context, tmp / "doc.sqz")

    def prompts(seed):
        out = []
        for i in range(CONCURRENCY):
            topic = excerpt(tok, (seed * 7 + i) % 50 + 60, 12)
            q = ids(tok, f"\n\nQuestion {i}: how does the text above relate to '{topic}'?")
            out.append(context + q if i % 2 == 0 else ids(tok, f"Tell me about {topic}."))
        return out

    return path, prompts


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def server(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"serve-{request.param}")
    model, prompts = (tiny_setup if request.param == "tiny" else real_setup)(tmp)
    extra = f'{{"squeeze": {{"contexts": ["{tmp / "doc.sqz"}"], "log_interval_s": 1}}}}'
    srv = start_server(tmp, "server", model, ["--additional-config", extra], {})
    srv["prompts"] = prompts
    yield srv
    stop_server(srv)


def wave(srv, seed: int):
    def one(prompt):
        r = srv["client"].completions.create(
            model=srv["model"], prompt=prompt, max_tokens=8, temperature=0
        )
        return r.choices[0].text, r.usage.completion_tokens

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, srv["prompts"](seed)))


def test_concurrent_requests_complete_without_leaking(server):
    t0 = time.monotonic()
    first = wave(server, 1)
    assert len(first) == CONCURRENCY and all(n > 0 for _, n in first)
    rss1 = tree_rss(server["proc"].pid)
    second = wave(server, 2)
    assert all(n > 0 for _, n in second)
    third = wave(server, 3)
    assert all(n > 0 for _, n in third)
    rss2 = tree_rss(server["proc"].pid)
    assert rss2 - rss1 < 64 << 20, f"server memory grew by {(rss2 - rss1) >> 20} MiB over a wave"
    assert time.monotonic() - t0 < 3 * REQUEST_TIMEOUT_S
    time.sleep(1.5)
    wave(server, 4)  # the log line comes at the first step after the interval
    log = server["log"].read_text()
    assert "squeeze: serving 1 context(s)" in log
    lines = [ln for ln in log.splitlines() if "squeeze: read" in ln]
    assert lines, log[-3000:]
    assert "gather path" not in log  # every squeezed request was read through the copies


# ---- under load (issue 14): 32 clients for 60 s, some disconnecting, a restart midway --------

LOAD_S = 30.0  # per server: two phases around the restart, 60 s in all
MAX_REQUESTS_PER_CLIENT = 400
DISTINCT = 16  # prompts: half on the context, half not; each has one right answer
SAMPLE_S = 2.0
#: RSS growth per request allowed after the warm-up: stock vLLM measured at 8-17 KiB, the
#: plugin at 26-42 KiB (both levelling off); a request's own context-sized copy would be 512 KiB
MAX_GROWTH_PER_REQUEST = 128 << 10


def _prompts(ctx: list[int]) -> list[str]:
    gen = torch.Generator().manual_seed(21)
    return [
        to_text(ctx + random_ids(gen, 4 + i)) if i % 2 == 0 else to_text(random_ids(gen, 24 + i))
        for i in range(DISTINCT)
    ]


def _complete(srv, prompt: str) -> str:
    r = srv["client"].completions.create(
        model=srv["model"], prompt=prompt, max_tokens=6, temperature=0
    )
    return r.choices[0].text


def _warm(srv, ctx: list[int]) -> None:
    """One request on the context, so that its blocks are in the prefix cache: a prompt on the
    context prefilled after a cached context takes the squeezed path, a cold one the stock
    prefill, and the two may answer differently (that is the method, not a crossing)."""
    _complete(srv, to_text(ctx + random_ids(torch.Generator().manual_seed(5), 3)))


def _disconnect(srv, prompt: str) -> None:
    """A streamed completion abandoned after its first chunk (the client goes away)."""
    stream = srv["client"].completions.create(
        model=srv["model"], prompt=prompt, max_tokens=64, temperature=0, stream=True
    )
    for _ in stream:
        break
    stream.close()


def _load_phase(srv, prompts: list[str], seed: int) -> dict:
    """CONCURRENCY clients, each looping until LOAD_S passes (or its request cap): every 4th
    request disconnects mid-stream, the others must answer exactly as the prompt did alone."""
    deadline = time.monotonic() + LOAD_S
    answers: dict[int, set[str]] = {i: set() for i in range(len(prompts))}
    counts = {"done": 0, "disconnected": 0, "errors": []}
    lock = threading.Lock()

    def client(c: int) -> None:
        gen = torch.Generator().manual_seed(seed * 1000 + c)
        for n in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() > deadline:
                return
            i = int(torch.randint(len(prompts), (1,), generator=gen))
            try:
                if (c + n) % 4 == 0:
                    _disconnect(srv, prompts[i])
                    got, key = None, "disconnected"
                else:
                    got, key = _complete(srv, prompts[i]), "done"
                with lock:
                    counts[key] += 1
                    if got is not None:
                        answers[i].add(got)
            except Exception as err:  # every error is a failure: only disconnects are allowed
                with lock:
                    counts["errors"].append(f"{type(err).__name__}: {err}")

    samples = []  # (requests served, server RSS) every SAMPLE_S while the clients run
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(client, c) for c in range(CONCURRENCY)]
        give_up = deadline + 2 * REQUEST_TIMEOUT_S
        while not all(f.done() for f in futures) and time.monotonic() < give_up:
            with lock:
                served = counts["done"] + counts["disconnected"]
            samples.append((served, tree_rss(srv["proc"].pid)))
            time.sleep(SAMPLE_S)
        for f in futures:
            f.result(timeout=max(1.0, give_up - time.monotonic()))
    with lock:
        samples.append((counts["done"] + counts["disconnected"], tree_rss(srv["proc"].pid)))
    return {**counts, "answers": answers, "rss": samples}


def _growth_per_request(samples: list[tuple[int, int]]) -> float:
    """Server RSS growth per request over the second half of a phase, in bytes.

    The first half is the warm-up: stock vLLM's engine grows by some 300 MiB over its first
    couple of thousand requests on this model (allocator pools, per-shape state), then levels
    off. A leak is a cost per request that does not level off."""
    (n0, r0), (n1, r1) = samples[len(samples) // 2], samples[-1]
    return (r1 - r0) / max(n1 - n0, 1)


def _start_tiny(tmp: Path, model_dir: Path, ctx_path: Path, name: str) -> dict:
    extra = f'{{"squeeze": {{"contexts": ["{ctx_path}"], "log_interval_s": 1}}}}'
    return start_server(tmp, name, str(model_dir), ["--additional-config", extra], {})


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    """The tiny random Llama served with one compiled 512-token context."""
    tmp = tmp_path_factory.mktemp("serve-load")
    model_dir = tmp / "tiny"
    model = save_tiny_llama(model_dir)
    ids = random_ids(torch.Generator().manual_seed(11), 512)
    ctx_path = tmp / "doc.sqz"
    cfg = squeeze.SqueezeConfig(window=32, budget=0.1)
    squeeze.compile(model, torch.tensor(ids), cfg, progress=False).save(ctx_path)
    srv = _start_tiny(tmp, model_dir, ctx_path, "server")
    try:
        yield {**srv, "ctx": ids, "ctx_path": ctx_path, "tmp": tmp, "model_dir": model_dir}
    finally:
        stop_server(srv)


def test_load_with_disconnects_and_a_restart(load_server):
    """No request errors but the disconnected ones, no answer crosses requests (every answer is
    its prompt's own, as computed alone before the load), memory flat; the server restarted
    midway on the same context file answers the same."""
    server = load_server
    prompts = _prompts(server["ctx"])
    _warm(server, server["ctx"])
    alone = [_complete(server, p) for p in prompts]  # one at a time: each prompt's own answer
    phases = [_load_phase(server, prompts, seed=1)]
    stop_server(server)
    restarted = _start_tiny(server["tmp"], server["model_dir"], server["ctx_path"], "restart")
    try:
        _warm(restarted, server["ctx"])
        assert [_complete(restarted, p) for p in prompts] == alone
        phases.append(_load_phase(restarted, prompts, seed=2))
        log = restarted["log"].read_text()
    finally:
        stop_server(restarted)
    for phase in phases:
        assert not phase["errors"], phase["errors"][:5]
        assert phase["done"] > CONCURRENCY and phase["disconnected"] > 0
        crossed = {i: got - {alone[i]} for i, got in phase["answers"].items() if got - {alone[i]}}
        assert not crossed, crossed
        per_request = _growth_per_request(phase["rss"])
        trace = [(n, r >> 20) for n, r in phase["rss"]]
        assert per_request < MAX_GROWTH_PER_REQUEST, (
            f"server memory grew by {per_request / 1024:.0f} KiB per request after the warm-up "
            f"(requests, MiB): {trace}"
        )
    assert "squeeze: serving 1 context(s)" in log
