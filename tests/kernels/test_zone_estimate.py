"""zone_estimate: the estimated zone chosen, attended through its summaries and merged into the
sparse attention, on every backend, against a float64 reference written from the definition."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_params

from squeeze.kernels.zone_estimate import zone_estimate
from squeeze.kernels.zone_estimate.reference import zone

BACKENDS = backend_params("zone_estimate")
NEG_INF = float("-inf")


def _inputs(gen, *, b=2, hkv=2, g=4, m=1, d=64, k=50, dtype=torch.float32, spread=True):
    """Random centroids, mean values, sizes (some clusters empty), scores (some not scored), a
    selection, and a sparse attention (out, lse) to merge into (one row without keys)."""
    r = g * m
    t = {
        "q": torch.randn(b, hkv, g, m, d, generator=gen),
        "centroids": torch.randn(hkv, k, d, generator=gen).to(dtype),
        "spread": torch.rand(hkv, k, generator=gen) * 0.3 if spread else None,
        "log_counts": torch.log(torch.randint(0, 9, (hkv, k), generator=gen).float()),
        "value_means": torch.randn(hkv, k, d, generator=gen).to(dtype),
        "key": torch.randn(b, hkv, k, generator=gen),
        "mask": torch.rand(b, hkv, k + 1, generator=gen) < 0.15,
        "out": torch.randn(b, hkv, r, d, generator=gen),
        "lse": torch.randn(b, hkv, r, generator=gen) * 3,
    }
    t["key"][torch.rand(b, hkv, k, generator=gen) < 0.2] = NEG_INF
    t["lse"][0, 0, 0] = NEG_INF  # no keys read for this row: the zone alone
    return t


def _reference(t, multiple, scale):
    """Float64, row by row: the zone sorted out of the unselected scored clusters, each cluster
    N_j keys of its estimated logit with its mean value, merged with (out, lse)."""
    q, c, vm = t["q"].double(), t["centroids"].double(), t["value_means"].double()
    b, hkv, g, m, _ = q.shape
    k = c.shape[1]
    out, lse = t["out"].double().clone(), t["lse"].double().clone()
    counts = torch.zeros(b, hkv, dtype=torch.int64)
    for bi in range(b):
        for h in range(hkv):
            sel = t["mask"][bi, h, :k]
            cand = [j for j in range(k) if not sel[j] and t["key"][bi, h, j] > NEG_INF]
            cand.sort(key=lambda j: -float(t["key"][bi, h, j]))
            js = cand[: math.ceil(multiple * max(1, int(sel.sum())))]
            counts[bi, h] = len(js)
            if not js:
                continue
            logn = t["log_counts"][h, js].double()
            for r in range(g * m):
                x = q[bi, h, r // m, r % m]
                logit = (c[h, js] @ x) * scale + logn
                if t["spread"] is not None:
                    logit = logit + scale**2 * float(x @ x) * t["spread"][h, js].double()
                if not torch.isfinite(logit).any():
                    continue
                le = torch.logsumexp(logit, 0)
                oe = (torch.softmax(logit, 0)[:, None] * vm[h, js]).sum(0)
                total = torch.logaddexp(lse[bi, h, r], le)
                out[bi, h, r] = out[bi, h, r] * torch.exp(lse[bi, h, r] - total) + oe * torch.exp(
                    le - total
                )
                lse[bi, h, r] = total
    return out, lse, counts


def _run(t, multiple, scale, backend):
    args = {n: (v.clone() if n in ("out", "lse") else v) for n, v in t.items()}
    return zone_estimate(**args, multiple=multiple, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("g,m", [(1, 1), (4, 1), (8, 1), (4, 3)])
@pytest.mark.parametrize("d", [32, 64, 72, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spread", [True, False])
def test_matches_the_float64_reference(backend, g, m, d, dtype, spread):
    gen = torch.Generator().manual_seed(g * 1000 + m * 100 + d + (dtype == torch.bfloat16))
    t = _inputs(gen, g=g, m=m, d=d, dtype=dtype, spread=spread)
    multiple, scale = 1.5, d**-0.5
    out, lse, counts = _run(t, multiple, scale, backend)
    want_out, want_lse, want_counts = _reference(t, multiple, scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.equal(counts, want_counts) and int(counts.sum()) > 0
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    changed = (out - t["out"]).abs().amax(-1) > 1e-3
    assert changed.float().mean() > 0.5  # the zone moved most rows: a test that can fail


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("multiple", [0.5, 1.0, 3.0, 1e6])
def test_zone_size_follows_the_multiple(backend, multiple):
    gen = torch.Generator().manual_seed(int(multiple * 7) % 1000)
    t = _inputs(gen, b=3, k=80)
    _, _, counts = _run(t, multiple, 0.125, backend)
    k = t["key"].shape[-1]
    sel = t["mask"][..., :k]
    scored = ((~sel) & torch.isfinite(t["key"])).sum(-1)
    want = torch.ceil(multiple * sel.sum(-1).clamp(min=1).float()).long()
    assert torch.equal(counts, torch.minimum(want, scored))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_to_estimate_leaves_the_attention(backend):
    """Every cluster selected or unscored: out and lse come back unchanged, counts 0."""
    gen = torch.Generator().manual_seed(3)
    t = _inputs(gen)
    t["key"] = torch.where(t["mask"][..., :-1], t["key"], NEG_INF)
    out, lse, counts = _run(t, 2.0, 0.125, backend)
    assert int(counts.sum()) == 0
    assert torch.equal(lse, t["lse"])
    read = torch.isfinite(lse)  # a row without keys keeps lse -inf; its out is never used
    assert torch.equal(out[read], t["out"][read])


def test_the_reference_zone_is_the_best_unselected():
    gen = torch.Generator().manual_seed(4)
    t = _inputs(gen, b=2, k=60)
    ids, valid = zone(t["key"], t["mask"], 1.0)
    k = t["key"].shape[-1]
    for b in range(2):
        for h in range(2):
            sel = t["mask"][b, h, :k]
            chosen = ids[b, h][valid[b, h]]
            assert not sel[chosen].any()
            rest = (~sel) & torch.isfinite(t["key"][b, h])
            rest[chosen] = False
            if rest.any():
                assert float(t["key"][b, h, chosen].min()) >= float(t["key"][b, h][rest].max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_are_named(backend):
    gen = torch.Generator().manual_seed(5)
    t = _inputs(gen)
    for name, bad in (
        ("value_means", t["value_means"][:, :-1]),
        ("key", t["key"][..., :-1]),
        ("out", t["out"][..., :-1]),
        ("spread", t["spread"][:1]),
    ):
        with pytest.raises(ValueError, match=name):
            _run({**t, name: bad}, 1.0, 0.125, backend)
    with pytest.raises(ValueError, match="dtype"):
        _run({**t, "value_means": t["value_means"].bfloat16()}, 1.0, 0.125, backend)
    with pytest.raises(ValueError, match="mask"):
        _run({**t, "mask": t["mask"].float()}, 1.0, 0.125, backend)
