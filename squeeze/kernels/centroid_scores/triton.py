"""Centroid log-scores in Triton, with the threshold cut fused, and the log-mass of a subset.

Reference: :mod:`squeeze.kernels.centroid_scores.reference`; the same estimate
``S_c = exp(q·c·scale) / Σ_j N_j exp(q·c_j·scale)`` in log space, averaged over the M rows of a
query head, reduced (max / mean) over the G heads of a KV head's group. Two kernels, per (b, h):

1. ``_log_den_kernel``: the per-row log-denominator, an online log-sum-exp over centroid tiles
   (plus an optional extra term); with the clusters outside a subset given log size ``-inf``, it
   is the log-mass of that subset (:func:`log_den`);
2. ``_score_kernel``: per centroid tile, the group-reduced log-score and, fused, the cut
   ``score >= threshold`` (:func:`scores`).

A centroid tile none of whose clusters is scored (all log sizes ``-inf``: empty, or outside the
subset) is skipped, so a subset that fills few tiles costs few tiles. The centroids are read in
their stored dtype (fp32 or bf16) and converted to fp32 in registers; with a spread (fp32,
``[Hkv, K]``) each logit gains ``scale²·|q|²·spread``, ``|q|²`` summed from the query tile.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import NEG_INF

BLOCK_K = 64
BLOCK_R = 16


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    return safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe))


@triton.jit
def _log_den_kernel(
    q_ptr, c_ptr, lc_ptr, extra_ptr, sp_ptr, out_ptr, R, K, D, HKV, scale,
    sqb, sqh, sqr, sqd, sch, sck, scd, slb, slh, slk, ssh, ssk,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_EXTRA: tl.constexpr,
    HAS_SPREAD: tl.constexpr,
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
    qn = tl.zeros([BLOCK_R], tl.float32)  # the spread's coefficient, scale²·|q|²
    if HAS_SPREAD:
        qn = tl.sum(q * q, 1) * scale * scale
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
            ).to(tl.float32)
            t = tl.dot(q, tl.trans(c), input_precision="ieee") * scale + lc[None, :]
            if HAS_SPREAD:
                sp = tl.load(sp_ptr + h * ssh + ks * ssk, mask=kmask, other=0.0)
                t += qn[:, None] * sp[None, :]
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
    q_ptr, c_ptr, lc_ptr, den_ptr, sp_ptr, score_ptr, keep_ptr,
    G, M, K, D, HKV, scale, threshold, log_m, log_g,
    sqb, sqh, sqr, sqd, sch, sck, scd, slb, slh, slk, ssh, ssk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    REDUCE_MAX: tl.constexpr, DECIDE: tl.constexpr, HAS_SPREAD: tl.constexpr,
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
        ).to(tl.float32)
        sp = tl.zeros([BLOCK_K], tl.float32)
        if HAS_SPREAD:
            sp = tl.load(sp_ptr + h * ssh + ks * ssk, mask=kmask, other=0.0)
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
                if HAS_SPREAD:
                    s += (tl.sum(q * q, 1) * scale * scale)[:, None] * sp[None, :]
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
        tl.store(keep_ptr + bh * K + ks, (acc >= threshold).to(tl.int8), mask=kmask)


def _blocks_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _spread_args(spread, lc):
    """The spread pointer and strides (``lc`` and zero strides without one: never read)."""
    if spread is None:
        return lc, 0, 0
    return spread, *spread.stride()


def log_den(q, c, lc, scale, extra=None, spread=None):
    """``[B, Hkv, R]`` fp32 ``logsumexp_k(q·c_k·scale + lc_k)`` (``logaddexp`` with ``extra``
    ``[B, Hkv, R]``) for rows ``q [B, Hkv, R, D]``, ``c [Hkv, K, D]`` fp32 or bf16,
    ``lc [B, Hkv, K]`` (may be an expanded view); with ``spread [Hkv, K]`` fp32 every logit
    gains ``scale²·|q|²·spread``."""
    b, hkv, r, d = q.shape
    out = torch.empty(b, hkv, r, dtype=torch.float32, device=q.device)
    ex = extra.contiguous() if extra is not None else out
    sp, ssh, ssk = _spread_args(spread, lc)
    grid = (b * hkv, triton.cdiv(r, BLOCK_R))
    _log_den_kernel[grid](
        q, c, lc, ex, sp, out, r, c.shape[1], d, hkv, scale, *q.stride(), *c.stride(),
        *lc.stride(), ssh, ssk,
        BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=_blocks_d(d), HAS_EXTRA=extra is not None,
        HAS_SPREAD=spread is not None,
    )  # fmt: skip
    return out


def scores(q, c, lc, den, scale, g, reduce, cut=None, spread=None):
    """Group log-scores ``[B, Hkv, K]`` fp32 of rows ``q [B, Hkv, G·M, D]`` with their
    denominators ``den [B, Hkv, G·M]`` (:func:`log_den`, with the same ``spread``), and with a
    ``cut`` the mask ``score >= cut`` ``[B, Hkv, K]`` bool (else ``None``)."""
    b, hkv, r, d = q.shape
    k = c.shape[1]
    m = r // g
    score = torch.empty(b, hkv, k, dtype=torch.float32, device=q.device)
    keep = torch.empty(b, hkv, k if cut is not None else 1, dtype=torch.int8, device=q.device)
    sp, ssh, ssk = _spread_args(spread, lc)
    grid = (b * hkv, triton.cdiv(k, BLOCK_K))
    _score_kernel[grid](
        q, c, lc, den, sp, score, keep, g, m, k, d, hkv, scale,
        NEG_INF if cut is None else float(cut), math.log(m), math.log(g),
        *q.stride(), *c.stride(), *lc.stride(), ssh, ssk,
        BLOCK_M=16, BLOCK_K=BLOCK_K, BLOCK_D=_blocks_d(d),
        REDUCE_MAX=reduce == "max", DECIDE=cut is not None, HAS_SPREAD=spread is not None,
    )  # fmt: skip
    return score, None if cut is None else keep.bool()
