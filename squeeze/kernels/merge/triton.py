"""Log-sum-exp merge of two partial attentions in one Triton kernel (reference: reference.py).

One program per ``BLOCK_R`` rows: reads both sides' ``lse`` and ``out`` rows once, writes the merged
``out`` and ``lse`` (fp32). Same rules as :func:`squeeze.kernels.merge.merge_attention`: a side with
``lse = -inf`` weighs exactly 0 (its ``out`` is never used), both ``-inf`` gives ``out`` 0 and
``lse`` -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 16


@triton.jit
def _merge_kernel(
    oa_ptr, la_ptr, ob_ptr, lb_ptr, out_ptr, lse_ptr, ROWS, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < ROWS
    mask2 = rmask[:, None] & (offs_d[None, :] < D)
    la = tl.load(la_ptr + rows, mask=rmask, other=float("-inf")).to(tl.float32)
    lb = tl.load(lb_ptr + rows, mask=rmask, other=float("-inf")).to(tl.float32)
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    total = wa + wb
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    offs = rows[:, None] * D + offs_d[None, :]
    oa = tl.load(oa_ptr + offs, mask=mask2 & (wa > 0)[:, None], other=0.0).to(tl.float32)
    ob = tl.load(ob_ptr + offs, mask=mask2 & (wb > 0)[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None], mask=mask2)
    lse = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=rmask)


def merge_attention_triton(out_a, lse_a, out_b, lse_b):
    """``out_a, out_b [..., R, D]``, ``lse_a, lse_b [..., R]`` (validated by the caller) →
    merged ``out [..., R, D]`` fp32 and ``lse [..., R]`` fp32."""
    d = out_a.shape[-1]
    oa, ob = out_a.reshape(-1, d).contiguous(), out_b.reshape(-1, d).contiguous()
    la, lb = lse_a.reshape(-1).contiguous(), lse_b.reshape(-1).contiguous()
    rows = la.numel()
    out = torch.empty(rows, d, dtype=torch.float32, device=out_a.device)
    lse = torch.empty(rows, dtype=torch.float32, device=out_a.device)
    if rows:
        block_d = max(16, triton.next_power_of_2(d))
        _merge_kernel[(triton.cdiv(rows, BLOCK_R),)](
            oa, la, ob, lb, out, lse, rows, d, BLOCK_R=BLOCK_R, BLOCK_D=block_d
        )
    return out.view(out_a.shape), lse.view(lse_a.shape)
