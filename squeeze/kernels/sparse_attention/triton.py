"""Triton sparse flash attention over the selected segments of each KV head.

Reference: :func:`squeeze.kernels.sparse_attention.sparse_attention_reference`. For each (batch
row b, KV head h) the selected keys are the tokens of
``seg_start/seg_end[seg_ptr[bh] : seg_ptr[bh + 1]]`` of ``k[h]`` (any strides).

Work split (flash-decoding, balanced across heads): each (b, h)'s selected keys are cut into chunks
of ``chunk`` keys; the chunks of all heads form one flat grid axis, so a head that selected 10x
more keys gets 10x more programs. A program finds its head by binary search over the chunk
offsets, streams its chunk in ``BLOCK_N``-key tiles (the token → row map is a per-lane binary search
over the segment offsets) and keeps an online softmax over ``BLOCK_R`` packed
query rows: a KV head's whole GQA group (and, in prefill, the M question rows) shares each K/V
tile, so K/V are read once per KV head and row block. The second grid axis is the row block
(prefill). A reduction kernel merges each head's chunk partials by LSE.

No host synchronisation: the grid is sized from shapes only (an upper bound on the chunk count;
programs past the real count return at once), and every offset is computed on the device. The
kernels keep their reads in bounds whatever the segments say (on CUDA nothing checks them on the
host): segment indices are clamped into the segment arrays, rows outside ``[0, N)`` are masked
out, and the merge reads only the partials the grid wrote; bad segments give a wrong answer,
never an out-of-bounds read (index files are validated at load, so they never get here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting

#: keys per K/V tile and per work chunk (decode); prefill uses longer chunks (see _chunk_size)
BLOCK_N = 64
CHUNK = 512
#: largest fp32 scratch (bytes) for the per-chunk partial outputs
PARTIAL_BYTES = 256 << 20
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _chunk_kernel(
    q_ptr, k_ptr, v_ptr,
    seg_ptr, seg_start, seg_cum, tok_ptr, chunk_ptr,
    o_part, lse_part,
    R, D, BH, HKV, chunk, bh_steps, seg_steps, qk_scale, N, NSEG,
    sqb, sqh, sqr, sqd, skh, skn, skd, svh, svn, svd,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    w = tl.program_id(0)
    rb = tl.program_id(1)
    if w >= tl.load(chunk_ptr + BH):
        return
    # the (b, h) owning chunk w: the last bh with chunk_ptr[bh] <= w
    lo = w * 0
    hi = lo + BH
    for _ in range(bh_steps):
        mid = (lo + hi) // 2
        go = tl.load(chunk_ptr + mid) <= w
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    bh = lo
    b = bh // HKV
    h = bh % HKV
    t0 = tl.load(tok_ptr + bh) + (w - tl.load(chunk_ptr + bh)) * chunk
    t1 = tl.minimum(t0 + chunk, tl.load(tok_ptr + bh + 1))

    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < R
    dmask = offs_d < D
    q = tl.load(
        q_ptr + b * sqb + h * sqh + rows[:, None] * sqr + offs_d[None, :] * sqd,
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    )
    q = q.to(tl.float32) if DOT_F32 else q.to(k_ptr.dtype.element_ty)
    s_lo = tl.minimum(tl.maximum(tl.load(seg_ptr + bh), 0), NSEG)  # in bounds, whatever it says
    s_hi = tl.minimum(tl.maximum(tl.load(seg_ptr + bh + 1), s_lo), NSEG)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for p0 in range(t0, t1, BLOCK_N):
        p = p0 + tl.arange(0, BLOCK_N)
        pmask = p < t1
        row = _segment_rows(seg_start, seg_cum, s_lo, s_hi, p, pmask, seg_steps, NSEG, BLOCK_N)
        pmask = pmask & (row >= 0) & (row < N)  # a row outside k[h] is never read
        row = tl.where(pmask, row, 0)
        kvmask = pmask[:, None] & dmask[None, :]
        kt = tl.load(
            k_ptr + h * skh + row[:, None] * skn + offs_d[None, :] * skd, mask=kvmask, other=0.0
        )
        vt = tl.load(
            v_ptr + h * svh + row[:, None] * svn + offs_d[None, :] * svd, mask=kvmask, other=0.0
        )
        if DOT_F32:
            s = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = tl.where(pmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        pexp = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pexp, 1)
        if DOT_F32:
            pv = tl.dot(pexp, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(pexp.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    base = w * R + rows
    tl.store(
        o_part + base[:, None] * D + offs_d[None, :], out, mask=rmask[:, None] & dmask[None, :]
    )
    tl.store(lse_part + base, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)


@triton.jit
def _segment_rows(seg_start, seg_cum, s_lo, s_hi, p, pmask, seg_steps, NSEG, BLOCK_N: tl.constexpr):
    """The K/V row of each selected token ``p`` of one head: per lane, a binary search for the
    last of the head's segments ``[s_lo, s_hi)`` starting at or before ``p``."""
    lo_v = tl.zeros([BLOCK_N], tl.int64) + s_lo
    hi_v = tl.zeros([BLOCK_N], tl.int64) + s_hi
    for _ in range(seg_steps):
        mid_v = (lo_v + hi_v) // 2
        go_v = tl.load(seg_cum + mid_v, mask=pmask, other=0) <= p
        lo_v = tl.where(go_v, mid_v, lo_v)
        hi_v = tl.where(go_v, hi_v, mid_v)
    first = tl.load(seg_start + tl.maximum(tl.minimum(lo_v, NSEG - 1), 0), mask=pmask, other=0)
    return first + (p - tl.load(seg_cum + lo_v, mask=pmask, other=0))


@triton.jit
def _reduce_kernel(
    o_part, lse_part, chunk_ptr, out, lse, R, D, NWORK,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask2 = rmask[:, None] & (offs_d[None, :] < D)
    c0 = tl.maximum(tl.load(chunk_ptr + bh), 0)
    c1 = tl.minimum(tl.load(chunk_ptr + bh + 1), NWORK)  # only partials the grid wrote
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for w in range(c0, c1):
        base = w * R + rows
        lse_c = tl.load(lse_part + base, mask=rmask, other=0.0)
        o_c = tl.load(o_part + base[:, None] * D + offs_d[None, :], mask=mask2, other=0.0)
        m_new = tl.maximum(m, lse_c)
        a = tl.exp(m - m_new)
        wc = tl.exp(lse_c - m_new)
        total = total * a + wc
        acc = acc * a[:, None] + wc[:, None] * o_c
        m = m_new
    has = total > 0
    o = acc / tl.where(has, total, 1.0)[:, None]
    res_lse = tl.where(has, m + tl.log(tl.where(has, total, 1.0)), float("-inf"))
    dst = bh * R + rows
    tl.store(out + dst[:, None] * D + offs_d[None, :], o, mask=mask2)
    tl.store(lse + dst, res_lse, mask=rmask)


def bf16_dot_broken(dtype: torch.dtype) -> bool:
    """Triton 3.9's interpreter returns garbage for ``tl.dot`` on bf16 tiles; there the kernels
    upcast bf16 to fp32 first (exact: a bf16 product is exact in fp32, as on tensor cores)."""
    return dtype == torch.bfloat16 and interpreting()


def _blocks(r: int, d: int) -> tuple[int, int]:
    block_r = min(64, max(16, triton.next_power_of_2(max(r, 1))))
    return block_r, max(16, triton.next_power_of_2(d))


def _chunk_size(bh: int, per_head_bound: int, r: int, d: int) -> int:
    """Keys per chunk: CHUNK, or longer when the partials of the bound would not fit PARTIAL_BYTES."""
    chunk = CHUNK
    while bh * (triton.cdiv(per_head_bound, chunk) + 1) * r * (d + 1) * 4 > PARTIAL_BYTES:
        chunk *= 2
    return chunk


def _launch(q, k, v, tok_ptr, seg_ptr, seg_start, seg_cum, per_head_bound, total_bound, scale):
    B, HKV, R, D = q.shape
    bh = B * HKV
    out = torch.empty(B, HKV, R, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, HKV, R, dtype=torch.float32, device=q.device)
    if R == 0:
        return out, lse
    chunk = _chunk_size(bh, per_head_bound, R, D)
    counts = tok_ptr[1:] - tok_ptr[:-1]
    chunk_ptr = torch.zeros(bh + 1, dtype=torch.int64, device=q.device)
    torch.cumsum((counts + chunk - 1) // chunk, 0, out=chunk_ptr[1:])
    n_work = max(
        1, min(bh * triton.cdiv(per_head_bound, chunk), triton.cdiv(total_bound, chunk) + bh)
    )
    o_part = torch.empty(n_work, R, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(n_work, R, dtype=torch.float32, device=q.device)
    block_r, block_d = _blocks(R, D)
    n_seg = seg_cum.numel() - 1
    dot_f32 = not (q.dtype == k.dtype and k.dtype != torch.float32) or bf16_dot_broken(k.dtype)
    grid = (n_work, triton.cdiv(R, block_r))
    _chunk_kernel[grid](
        q, k, v, seg_ptr, seg_start, seg_cum, tok_ptr, chunk_ptr, o_part, lse_part,
        R, D, bh, HKV, chunk, max(1, bh.bit_length()), max(1, n_seg.bit_length()),
        scale * LOG2E, k.shape[1], n_seg, *q.stride(), *k.stride(), *v.stride(),
        BLOCK_R=block_r, BLOCK_N=BLOCK_N, BLOCK_D=block_d, DOT_F32=dot_f32,
        num_warps=4,
    )  # fmt: skip
    _reduce_kernel[(bh, triton.cdiv(R, block_r))](
        o_part, lse_part, chunk_ptr, out, lse, R, D, n_work, BLOCK_R=block_r, BLOCK_D=block_d
    )
    return out, lse


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a one-element int64 stand-in when it is empty (never read: no chunk points at it)."""
    return t if t.numel() else torch.zeros(1, dtype=torch.int64, device=t.device)


def sparse_attention_triton(q, k, v, seg_ptr, seg_start, seg_end, scale: float):
    """Arguments as :func:`squeeze.kernels.sparse_attention.sparse_attention` (already
    checked). Returns ``out [B, Hkv, R, D]`` fp32 and ``lse [B, Hkv, R]`` fp32."""
    n_seg = seg_start.numel()
    cum = torch.zeros(n_seg + 1, dtype=torch.int64, device=q.device)
    torch.cumsum(seg_end - seg_start, 0, out=cum[1:])
    tok_ptr = cum[seg_ptr]  # first selected token (in the flat selection) of each (b, h)
    B, HKV = q.shape[:2]
    n = k.shape[1]
    return _launch(
        q, k, v, tok_ptr, _nonempty(seg_ptr), _nonempty(seg_start), cum, n, B * HKV * n, scale
    )
