"""A 16K-token context compiles on CPU within the memory bound: the context's K/V (held once while
prefilling; while clustering, twice, since build_indexes writes the cluster-ordered copy, plus
k-means' fp32 working copy of the keys) plus one chunk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = r"""
import gc, json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_hf_common import tiny_model
from squeeze import SqueezeConfig
from squeeze.patches.hf import compile

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

n, chunk = int(sys.argv[2]), int(sys.argv[3])
model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4, head_dim=64)
g = torch.Generator().manual_seed(int(sys.argv[4]))
# warm-up on a short context: libraries, kernels and allocator pools are in place afterwards
compile(model, torch.randint(3, 256, (600,), generator=g), SqueezeConfig(window=64),
        chunk_size=256, progress=False)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the RSS high-water mark (VmHWM)
base = status("VmRSS")
ctx = compile(model, torch.randint(3, 256, (n,), generator=g), SqueezeConfig(window=100),
              chunk_size=chunk, progress=False)
peak = status("VmHWM")
kv = sum(2 * ix.keys.numel() * ix.keys.element_size() for ix in ctx.indexes.values())
print(json.dumps({"peak": peak - base, "kv": kv, "layers": len(ctx.indexes),
                  "timings": ctx.stats()["timings"]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_16k_context_compiles_within_memory_bound(gen):
    n, chunk = 16384, 1024
    seed = int(__import__("torch").randint(0, 2**31 - 1, (1,), generator=gen))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(Path(__file__).parent), str(n), str(chunk), str(seed)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["layers"] == 2
    assert res["kv"] == 2 * 2 * 4 * n * 64 * 4  # 2 layers × K,V × 4 heads × N × 64 × fp32
    # one chunk: its sdpa mask (bool, and the fp32 copy sdpa makes) over the prefix, activations
    chunk_bytes = 6 * chunk * n
    kmeans_copy = res["kv"] // 2  # the keys, normalised, in fp32
    bound = 2 * res["kv"] + kmeans_copy + chunk_bytes + 32 * 2**20
    assert res["peak"] <= bound, (res, bound)
    # an unchunked prefill's N×N mask alone (bool + fp32) would exceed the bound
    assert 5 * n * n > bound
