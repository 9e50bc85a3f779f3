"""Centroid lookup in Triton, fused with the threshold decision, emitting compact segments.

Reference: :mod:`squeeze.lookup` (``select`` and ``segments``); the same estimate
``S_c = exp(q·c·scale) / Σ_j N_j exp(q·c_j·scale)`` in log space, averaged over the M rows of a
query head, reduced (max / mean) over the G heads of a KV head's group. Three kernels, per (b, h):

1. ``_log_den_kernel``: the per-row log-denominator, an online log-sum-exp over centroid tiles
   (plus an optional extra term: the mass of pruned level-1 regions);
2. ``_score_kernel``: per centroid tile, the group-reduced log-score and, fused, the decision
   ``score >= threshold`` (threshold mode); top-k mode takes the scores to ``topk_mask`` (torch);
3. ``_segments_kernel``: the kept clusters (plus the always-kept window) → runs of adjacent kept
   (or empty) clusters → ``[start, end)`` rows, compacted per head with a prefix sum.

The segment lists are padded per head to ``ceil((K + 1) / 2)`` entries (the most runs K + 1
columns can hold) with empty segments, so ``seg_ptr`` is ``arange(B·Hkv + 1) · width``: a CSR the
sparse attention kernel reads as is, with no host synchronisation. Zero-length runs (only empty
clusters) are kept as empty segments; dropping them gives exactly the reference's segments.

Hierarchical index: level 1 is scored and decided first; at level 2 a centroid tile none of
whose clusters is a child of a kept level-1 cluster is skipped (level-2 clusters are stored grouped
by parent, so the children of kept parents fill few tiles); the other clusters are masked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_K = 64
BLOCK_R = 16
BLOCK_C = 128
NEG_INF = float("-inf")


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    return safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe))


@triton.jit
def _log_den_kernel(
    q_ptr, c_ptr, lc_ptr, extra_ptr, out_ptr, R, K, D, HKV, scale,
    sqb, sqh, sqr, sqd, sch, sck, scd, slb, slh, slk,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_EXTRA: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < R
    dmask = offs_d < D
    q = tl.load(
        q_ptr + b * sqb + h * sqh + rows[:, None] * sqr + offs_d[None, :] * sqd,
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        lc = tl.load(lc_ptr + b * slb + h * slh + ks * slk, mask=kmask, other=float("-inf"))
        if tl.max(lc, 0) > float("-inf"):  # a tile without scored clusters is skipped
            c = tl.load(
                c_ptr + h * sch + ks[:, None] * sck + offs_d[None, :] * scd,
                mask=kmask[:, None] & dmask[None, :],
                other=0.0,
            )
            t = tl.dot(q, tl.trans(c), input_precision="ieee") * scale + lc[None, :]
            m_new = tl.maximum(m, tl.max(t, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            total = total * tl.exp(m - safe) + tl.sum(tl.exp(t - safe[:, None]), 1)
            m = m_new
    safe = tl.where(m == float("-inf"), 0.0, m)
    lse = tl.where(total > 0, safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    if HAS_EXTRA:
        lse = _logaddexp(lse, tl.load(extra_ptr + bh * R + rows, mask=rmask, other=0.0))
    tl.store(out_ptr + bh * R + rows, lse, mask=rmask)


@triton.jit
def _score_kernel(
    q_ptr, c_ptr, lc_ptr, den_ptr, child_ptr, score_ptr, keep_ptr,
    G, M, K, D, HKV, scale, threshold, log_m, log_g,
    sqb, sqh, sqr, sqd, sch, sck, scd, slb, slh, slk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    REDUCE_MAX: tl.constexpr, DECIDE: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    lc = tl.load(lc_ptr + b * slb + h * slh + ks * slk, mask=kmask, other=float("-inf"))
    acc = tl.full([BLOCK_K], float("-inf"), tl.float32)
    if tl.max(lc, 0) > float("-inf"):
        c = tl.load(
            c_ptr + h * sch + ks[:, None] * sck + offs_d[None, :] * scd,
            mask=kmask[:, None] & dmask[None, :],
            other=0.0,
        )
        for g in range(G):  # mean over the M rows of head g (log space), then reduce over g
            gm = tl.full([BLOCK_K], float("-inf"), tl.float32)
            gs = tl.zeros([BLOCK_K], tl.float32)
            for m0 in range(0, M, BLOCK_M):
                mm = m0 + tl.arange(0, BLOCK_M)
                mmask = mm < M
                rows = g * M + mm
                q = tl.load(
                    q_ptr + b * sqb + h * sqh + rows[:, None] * sqr + offs_d[None, :] * sqd,
                    mask=mmask[:, None] & dmask[None, :],
                    other=0.0,
                ).to(tl.float32)
                den = tl.load(den_ptr + bh * G * M + rows, mask=mmask, other=0.0)
                s = tl.dot(q, tl.trans(c), input_precision="ieee") * scale - den[:, None]
                s = tl.where(mmask[:, None], s, float("-inf"))
                m_new = tl.maximum(gm, tl.max(s, 0))
                safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                gs = gs * tl.exp(gm - safe) + tl.sum(tl.exp(s - safe[None, :]), 0)
                gm = m_new
            safe = tl.where(gm == float("-inf"), 0.0, gm)
            sg = tl.where(gs > 0, safe + tl.log(tl.where(gs > 0, gs, 1.0)), float("-inf")) - log_m
            acc = tl.maximum(acc, sg) if REDUCE_MAX else _logaddexp(acc, sg)
        if not REDUCE_MAX:
            acc = acc - log_g
    acc = tl.where(lc == float("-inf"), float("-inf"), acc)
    tl.store(score_ptr + bh * K + ks, acc, mask=kmask)
    if DECIDE:
        keep = acc >= threshold
        keep = keep & (tl.load(child_ptr + bh * K + ks, mask=kmask, other=0) != 0)
        tl.store(keep_ptr + bh * (K + 1) + ks, keep.to(tl.int8), mask=kmask)


@triton.jit
def _segments_kernel(
    keep_ptr, off_ptr, start_ptr, end_ptr, C, HKV, WIDTH, soh, BLOCK_C: tl.constexpr
):
    bh = tl.program_id(0)
    h = bh % HKV
    n_start = bh * 0
    n_end = bh * 0
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        run = _run(keep_ptr, off_ptr, bh, h, cs, C, soh)
        prev = _run(keep_ptr, off_ptr, bh, h, cs - 1, C, soh)
        nxt = _run(keep_ptr, off_ptr, bh, h, cs + 1, C, soh)
        first = run & ~prev
        last = run & ~nxt
        pos_s = n_start + tl.cumsum(first.to(tl.int32), 0) - 1
        pos_e = n_end + tl.cumsum(last.to(tl.int32), 0) - 1
        cs_ok = tl.where(run, cs, 0)
        rows0 = tl.load(off_ptr + h * soh + cs_ok, mask=first, other=0)
        rows1 = tl.load(off_ptr + h * soh + cs_ok + 1, mask=last, other=0)
        tl.store(start_ptr + bh * WIDTH + pos_s, rows0, mask=first)
        tl.store(end_ptr + bh * WIDTH + pos_e, rows1, mask=last)
        n_start += tl.sum(first.to(tl.int32), 0)
        n_end += tl.sum(last.to(tl.int32), 0)


@triton.jit
def _run(keep_ptr, off_ptr, bh, h, cs, C, soh):
    """Column cs is in a run: kept, or an empty cluster (costs nothing, must not break a run)."""
    ok = (cs >= 0) & (cs < C)
    cs = tl.where(ok, cs, 0)
    keep = tl.load(keep_ptr + bh * C + cs, mask=ok, other=0) != 0
    o0 = tl.load(off_ptr + h * soh + cs, mask=ok, other=0)
    o1 = tl.load(off_ptr + h * soh + cs + 1, mask=ok, other=0)
    return ok & (keep | (o0 == o1))


def _blocks_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _log_den(q, c, lc, scale, extra=None):
    """``[B, Hkv, R]`` fp32 ``logsumexp_k(q·c_k·scale + lc_k)`` (``logaddexp`` with ``extra``) for
    ``q [B, Hkv, R, D]``, ``c [Hkv, K, D]`` fp32, ``lc [B, Hkv, K]`` (may be an expanded view)."""
    b, hkv, r, d = q.shape
    out = torch.empty(b, hkv, r, dtype=torch.float32, device=q.device)
    ex = extra.contiguous() if extra is not None else out
    grid = (b * hkv, triton.cdiv(r, BLOCK_R))
    _log_den_kernel[grid](
        q, c, lc, ex, out, r, c.shape[1], d, hkv, scale, *q.stride(), *c.stride(), *lc.stride(),
        BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=_blocks_d(d), HAS_EXTRA=extra is not None,
    )  # fmt: skip
    return out


def _scores(q, c, lc, den, scale, g, reduce, threshold=None, child=None):
    """Group log-scores ``[B, Hkv, K]`` and, with a threshold, the keep mask ``[B, Hkv, K + 1]``
    int8 (last column, the window, set to 1)."""
    b, hkv, r, d = q.shape
    k = c.shape[1]
    m = r // g
    score = torch.empty(b, hkv, k, dtype=torch.float32, device=q.device)
    keep = torch.ones(b, hkv, k + 1, dtype=torch.int8, device=q.device)
    if child is None:
        child = keep[..., :k]  # all ones
    child = child.to(torch.int8).contiguous()
    grid = (b * hkv, triton.cdiv(k, BLOCK_K))
    _score_kernel[grid](
        q, c, lc, den, child, score, keep, g, m, k, d, hkv, scale,
        NEG_INF if threshold is None else float(threshold), math.log(m), math.log(g),
        *q.stride(), *c.stride(), *lc.stride(),
        BLOCK_M=16, BLOCK_K=BLOCK_K, BLOCK_D=_blocks_d(d),
        REDUCE_MAX=reduce == "max", DECIDE=threshold is not None,
    )  # fmt: skip
    return score, keep


def segments_triton(mask: torch.Tensor, offsets: torch.Tensor):
    """Kept clusters → padded per-head segments; contract of :func:`squeeze.lookup.segments`
    except that each (b, h) owns ``width = ceil(C / 2)`` entries, the unused ones ``[0, 0)``.

    Args:
        mask: ``[B, Hkv, C]`` bool / int8 (C = K + 1 with the window column).
        offsets: ``[Hkv, C + 1]`` int64 row offsets.
    Returns:
        ``seg_ptr [B·Hkv + 1]``, ``seg_start``, ``seg_end [B·Hkv·width]`` int64.
    """
    b, hkv, c = mask.shape
    width = max(1, (c + 1) // 2)
    keep = mask.to(torch.int8).contiguous()
    offsets = offsets.contiguous()
    start = torch.zeros(b * hkv * width, dtype=torch.int64, device=mask.device)
    end = torch.zeros_like(start)
    _segments_kernel[(b * hkv,)](
        keep, offsets, start, end, c, hkv, width, offsets.stride(0), BLOCK_C=BLOCK_C
    )
    ptr = torch.arange(b * hkv + 1, dtype=torch.int64, device=mask.device) * width
    return ptr, start, end


def select_triton(q: torch.Tensor, index, scale: float):
    """:func:`squeeze.lookup.select` on the Triton kernels: ``q [B, Hkv, G, M, D]`` → ``Lookup``.

    No host synchronisation (the thresholds are host floats from the calibration)."""
    from squeeze.lookup import Lookup

    cfg = index.config
    b, hkv, g, m, d = q.shape
    k = index.num_clusters
    rows = q.reshape(b, hkv, g * m, d)
    counts = index.counts
    if cfg.budget >= 1.0:
        mask = torch.ones(b, hkv, k + 1, dtype=torch.bool, device=q.device)
        return Lookup(mask, torch.tensor(0, dtype=torch.int64))
    if index.levels == 1:
        lc = torch.log(counts.float())[None].expand(b, -1, -1)
        keep = _level(rows, index.centroids, lc, counts, scale, g, index, cfg.budget, 2)
        scored = torch.tensor(b * hkv * k, dtype=torch.int64)
        return Lookup(keep.bool(), scored)
    l1_counts = index.l1_counts
    log_l1 = torch.log(l1_counts.float())[None].expand(b, -1, -1)
    keep1 = _level(rows, index.l1_centroids, log_l1, l1_counts, scale, g, index,
                   cfg.effective_l1_budget, 1)[..., :-1].bool()  # fmt: skip
    children = torch.gather(keep1, 2, index.l1_parent.expand(b, -1, -1))  # [B, Hkv, K]
    # the pruned level-1 regions keep their softmax mass in the level-2 denominator
    extra = _log_den(rows, index.l1_centroids, log_l1.masked_fill(keep1, NEG_INF), scale)
    lc = torch.log(counts.float())[None].masked_fill(~children, NEG_INF)
    keep = _level(rows, index.centroids, lc, counts, scale, g, index, cfg.budget, 2,
                  extra=extra, child=children)  # fmt: skip
    scored = b * hkv * index.l1_centroids.shape[1] + children.sum()
    return Lookup(keep.bool(), scored.to(torch.int64))


def _level(rows, c, lc, counts, scale, g, index, budget, level, extra=None, child=None):
    """Keep mask ``[B, Hkv, K + 1]`` int8 of one level (window column 1)."""
    cfg = index.config
    den = _log_den(rows, c, lc, scale, extra)
    if budget >= 1.0:
        _, keep = _scores(rows, c, lc, den, scale, g, cfg.gqa_reduce, NEG_INF, child)
        return keep
    if cfg.mode == "topk":
        from squeeze.lookup import topk_mask

        score, keep = _scores(rows, c, lc, den, scale, g, cfg.gqa_reduce)
        n_clustered = _cached(index, ("n_clustered",), lambda: index.n_clustered)
        sel = topk_mask(score, counts, budget * n_clustered)
        if child is not None:
            sel = sel & child
        keep[..., :-1] = sel.to(torch.int8)
        return keep
    # a host float read from the device once per (calibration, budget, level), not every step;
    # the key holds the calibration object itself (indexes made by with_config share _derived)
    cal = index.calibration
    threshold = _cached(index, ("threshold", id(cal), budget, level),
                        lambda: (cal, cal.threshold(budget, level=level)))[1]  # fmt: skip
    return _scores(rows, c, lc, den, scale, g, cfg.gqa_reduce, threshold, child)[1]


def _cached(index, key, fn):
    """A host value derived from ``index`` once (a device read syncs: not in every decode step)."""
    store = index._derived.setdefault("lookup_triton", {})
    if key not in store:
        store[key] = fn()
    return store[key]
