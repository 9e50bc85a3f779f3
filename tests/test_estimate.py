"""The estimated zone (``SqueezeConfig.estimate_zone``) against plain references."""

import math

import pytest
import torch
from reference import dense_reference, make_keys, rel_err

import squeeze
from squeeze import estimate, lookup
from squeeze.kernels.zone_estimate import reference

HKV, N, WINDOW = 2, 1200, 40


def _index(gen, *, g, d, dtype, levels=1, estimator="spread", mode="threshold", **cfg):
    keys = make_keys(HKV, N, d, generator=gen).to(dtype)
    values = (torch.randn(HKV, N, d, generator=gen) + 0.5).to(dtype)
    wq = make_keys(HKV * g, WINDOW, d, generator=gen).to(dtype)
    config = squeeze.SqueezeConfig(
        window=WINDOW, budget=0.1, kmeans_iters=5, l1_ratio=0.01 if levels == 2 else None,
        estimator=estimator, mode=mode, **cfg,
    )  # fmt: skip
    return keys, values, squeeze.build_index(keys, values, config, queries=wq)


def test_value_means_are_the_clusters_mean_values(gen):
    _, _, ix = _index(gen, g=2, d=32, dtype=torch.float32, centroid_dtype="float32")
    off = ix.offsets
    for h in range(HKV):
        for c in range(ix.num_clusters):
            rows = ix.values[h, off[h, c] : off[h, c + 1]]
            want = rows.mean(0) if len(rows) else torch.zeros(ix.head_dim)
            torch.testing.assert_close(ix.value_means[h, c], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_zone_is_the_best_skipped_clusters(gen, m, mode):
    """Per (batch row, KV head): ceil(multiple · selected) clusters (or every skipped one), none
    selected, none scored below a skipped cluster left out of it."""
    d, g, multiple = 64, 4, 1.5
    _, _, ix = _index(gen, g=g, d=d, dtype=torch.float32, mode=mode)
    q = torch.randn(3, HKV, g, m, d, generator=gen)
    found = lookup.select(q, ix, d**-0.5)
    key = estimate.ranking(found)
    ids, valid = reference.zone(key, found.mask, multiple)
    ranked = 0
    s = found.scores
    torch.testing.assert_close(key, s.block if s.rows is None else s.rows.amax(2))
    selected = found.mask[..., :-1]
    for b in range(3):
        for h in range(HKV):
            n_sel = int(selected[b, h].sum())
            chosen = ids[b, h][valid[b, h]]
            skipped = int((~selected[b, h] & torch.isfinite(key[b, h])).sum())
            assert len(chosen) == min(skipped, math.ceil(multiple * max(1, n_sel)))
            assert not selected[b, h, chosen].any()
            rest = ~selected[b, h].clone()
            rest[chosen] = False
            if rest.any():
                assert float(key[b, h, chosen].min()) >= float(key[b, h][rest].max())
                ranked += 1
    assert ranked  # some skipped clusters were left out of the zone, and ranked below it


def _estimate_reference(q, ix, ids, valid, scale):
    """Row by row: the zone's keys as N copies of their estimated logit, its values the means."""
    b, hkv, g, m, d = q.shape
    out = torch.zeros(b, hkv, g * m, d, dtype=torch.float64)
    lse = torch.full((b, hkv, g * m), float("-inf"), dtype=torch.float64)
    spread = ix.score_spread
    for bi in range(b):
        for h in range(hkv):
            js = ids[bi, h][valid[bi, h]].tolist()
            if not js:
                continue
            c = ix.centroids[h, js].double()
            n = ix.counts[h, js].double()
            v = ix.value_means[h, js].double()
            for r in range(g * m):
                x = q[bi, h, r // m, r % m].double()
                logit = (c @ x) * scale
                if spread is not None:
                    logit = logit + scale * scale * float(x @ x) * spread[h, js].double()
                w = n * torch.exp(logit)
                lse[bi, h, r] = torch.log(w.sum())
                out[bi, h, r] = (w[:, None] * v).sum(0) / w.sum()
    return out, lse


@pytest.mark.parametrize("g,d", [(1, 32), (4, 64), (8, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("levels,estimator", [(1, "spread"), (2, "spread"), (1, "centroid")])
def test_estimate_matches_the_reference(gen, g, d, dtype, levels, estimator):
    _, _, ix = _index(gen, g=g, d=d, dtype=dtype, levels=levels, estimator=estimator)
    q = torch.randn(2, HKV, g, 2, d, generator=gen).to(dtype)
    found = lookup.select(q, ix, d**-0.5)
    ids, valid = reference.zone(estimate.ranking(found), found.mask, 1.0)
    assert valid.any()
    out, lse = reference.estimate(
        q, ix.centroids, ix.score_spread, ix.log_counts, ix.value_means, ids, valid, d**-0.5
    )
    want_out, want_lse = _estimate_reference(q.float(), ix, ids, valid, d**-0.5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)


def test_exact_clusters_make_the_estimate_exact(gen):
    """Clusters of identical keys (zero spread, fp32 centroids): estimating every skipped
    cluster reproduces dense attention at a 10% budget, though 90% of the keys are not read."""
    d, g, k = 32, 2, 40
    distinct = torch.randn(HKV, k, d, generator=gen)
    which = torch.randint(0, k, (HKV, N), generator=gen)
    keys = torch.gather(distinct, 1, which[..., None].expand(-1, -1, d))
    values = torch.randn(HKV, N, d, generator=gen)
    wq = torch.randn(HKV * g, WINDOW, d, generator=gen)
    cfg = squeeze.SqueezeConfig(
        window=WINDOW, sinks=0, budget=0.1, centroid_ratio=k / (N - WINDOW),
        centroid_dtype="float32", estimate_zone=1e6,
    )  # fmt: skip
    ix = squeeze.build_index(keys, values, cfg, queries=wq)
    assert float(ix.spread.max()) < 1e-10  # one distinct key per cluster
    q = torch.randn(1, HKV * g, 1, d, generator=gen)
    kt = torch.randn(1, HKV, 3, d, generator=gen)
    vt = torch.randn(1, HKV, 3, d, generator=gen)
    want = dense_reference(q, keys, values, kt, vt)
    got, stats = squeeze.squeezed_attention(q, ix, kt, vt, return_stats=True)
    assert stats.clustered_fraction < 0.5
    assert rel_err(got, want) < 1e-5
    off = squeeze.squeezed_attention(q, ix.with_config(estimate_zone=0.0), kt, vt)
    assert rel_err(off, want) > 100 * rel_err(got, want)  # the zone is what made it exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
def test_full_budget_estimates_nothing(gen, dtype, m):
    """Budget 1.0 reads every cluster: the zone is empty and the output is dense attention."""
    d, g = 64, 4
    keys, values, ix = _index(gen, g=g, d=d, dtype=dtype, estimate_zone=2.0)
    ix = ix.with_config(budget=1.0)
    q = torch.randn(2, HKV * g, m, d, generator=gen).to(dtype)
    kt = torch.randn(2, HKV, m + 2, d, generator=gen).to(dtype)
    vt = torch.randn(2, HKV, m + 2, d, generator=gen).to(dtype)
    got, stats = squeeze.squeezed_attention(q, ix, kt, vt, return_stats=True)
    want = dense_reference(q, keys, values, kt, vt)
    assert rel_err(got, want) < (2e-6 if dtype == torch.float32 else 1e-2)
    assert stats.centroids_scored == 0


def test_zone_counts_its_mean_values_in_the_bytes(gen):
    d, g = 64, 4
    _, _, ix = _index(gen, g=g, d=d, dtype=torch.float32)
    q = torch.randn(1, HKV * g, 1, d, generator=gen)
    kt = torch.randn(1, HKV, 2, d, generator=gen)
    off_ix = ix.with_config(estimate_zone=0.0)
    _, off = squeeze.squeezed_attention(q, off_ix, kt, kt, return_stats=True)
    _, on = squeeze.squeezed_attention(
        q, ix.with_config(estimate_zone=1.0), kt, kt, return_stats=True
    )
    assert torch.equal(on.keys_read, off.keys_read)  # no K/V read for the zone
    found = lookup.select(q.reshape(1, HKV, g, 1, d), ix, d**-0.5)
    estimated = int(reference.zone(estimate.ranking(found), found.mask, 1.0)[1].sum())
    assert on.centroids_scored == off.centroids_scored + estimated > off.centroids_scored
    assert on.bytes_fraction > off.bytes_fraction
