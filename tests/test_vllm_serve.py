"""The OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``) with the
plugin, driven by the ``openai`` client: 32 concurrent completions, half of them on a registered
context, in three waves; all complete, the server's memory does not grow between the waves, and
the keys-read metric is logged. Once on the tiny random Llama (fast), once on the real
checkpoint, SmolLM2-135M-Instruct with a 1,024-token real-text context (prompts as token ids, so
that they start with exactly the context's ids).

``start_server`` / ``stop_server`` are shared with the tensor-parallel test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
