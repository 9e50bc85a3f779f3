"""Log-sum-exp merge of two partial attentions, in PyTorch."""

from __future__ import annotations

import torch

from .. import NEG_INF


def merge_reference(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`squeeze.kernels.merge.merge_attention` (arguments checked there)."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m = m.masked_fill_(m == NEG_INF, 0.0)  # both empty: avoid -inf - -inf
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)  # an empty side weighs exactly 0
    total = w_a + w_b
    lse = m + torch.log(total)  # log(0) = -inf where both sides are empty
    inv = torch.where(total > 0, total.reciprocal(), 0.0)
    # a weight-0 side contributes 0 even if its out holds garbage (inf / NaN)
    part_a = torch.where((w_a > 0)[..., None], out_a.float() * (w_a * inv)[..., None], 0.0)
    part_b = torch.where((w_b > 0)[..., None], out_b.float() * (w_b * inv)[..., None], 0.0)
    return part_a.add_(part_b), lse
