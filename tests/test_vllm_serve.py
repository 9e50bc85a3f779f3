"""``vllm serve`` (the OpenAI-compatible server) with the plugin, driven by the ``openai`` client:
32 concurrent completions, half of them on a registered context, twice; all complete, the
server's memory does not grow between the two waves, and the keys-read metric is logged."""

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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model_dir = tmp / "tiny"
    model = save_tiny_llama(model_dir)
    ids = random_ids(torch.Generator().manual_seed(11), 512)
    ctx_path = tmp / "doc.sqz"
    cfg = squeeze.SqueezeConfig(window=32, budget=0.1)
    squeeze.compile(model, torch.tensor(ids), cfg, progress=False).save(ctx_path)
    port = free_port()
    extra = f'{{"squeeze": {{"contexts": ["{ctx_path}"], "log_interval_s": 1}}}}'
    cmd = [
        *("nice", "-n", "5", sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
        *("--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)),
        *("--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"),
        *("--additional-config", extra),
    ]
    log = open(tmp / "server.log", "w")  # noqa: SIM115 (closed in the finalizer)
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONPATH": str(Path(__file__).parent.parent),
    }
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=REQUEST_TIMEOUT_S
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {(tmp / 'server.log').read_text()[-3000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail("server did not start in time")
                time.sleep(1)
        yield dict(client=client, proc=proc, model=str(model_dir), ctx=ids, log=tmp / "server.log")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wave(srv, seed: int):
    gen = torch.Generator().manual_seed(seed)
    prompts = [
        to_text(srv["ctx"] + random_ids(gen, 5 + i))
        if i % 2 == 0
        else to_text(random_ids(gen, 30 + i))
        for i in range(CONCURRENCY)
    ]

    def one(prompt):
        r = srv["client"].completions.create(
            model=srv["model"], prompt=prompt, max_tokens=8, temperature=0
        )
        return r.choices[0].text, r.usage.completion_tokens

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, prompts))


def test_concurrent_requests_complete_without_leaking(server):
    t0 = time.monotonic()
    first = wave(server, 1)
    assert len(first) == CONCURRENCY and all(n > 0 for _, n in first)
    rss1 = tree_rss(server["proc"].pid)
    second = wave(server, 2)
    assert all(n > 0 for _, n in second)
    wave(server, 2)
    rss2 = tree_rss(server["proc"].pid)
    assert rss2 - rss1 < 64 << 20, f"server memory grew by {(rss2 - rss1) >> 20} MiB over a wave"
    assert time.monotonic() - t0 < 3 * REQUEST_TIMEOUT_S
    time.sleep(1.5)
    log = server["log"].read_text()
    assert "squeeze: serving 1 context(s)" in log
    lines = [ln for ln in log.splitlines() if "squeeze: read" in ln]
    assert lines, log[-3000:]
