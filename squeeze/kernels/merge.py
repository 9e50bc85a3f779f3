"""Log-sum-exp merge of two partial attentions over disjoint key sets (e.g. sparse context + dense tail)."""

from __future__ import annotations

import torch

from squeeze.kernels.backend import use_triton
from squeeze.validation import check_same_device


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax attentions of the same queries over disjoint key sets.

    Args:
        out_a, out_b: ``[..., R, D]`` normalised attention outputs over key sets A and B.
        lse_a, lse_b: ``[..., R]`` their log-sum-exps (natural log of the summed ``exp(scores)``);
            ``-inf`` marks a side without keys, whose ``out`` is then ignored.
    Returns:
        ``out [..., R, D]`` float32, the attention over A ∪ B, and ``lse [..., R]`` float32.
        Where both sides are ``-inf``: ``out`` 0 and ``lse`` -inf.
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if out_a.dim() < 2:
        raise ValueError(f"out_a must be [..., R, D], got shape {tuple(out_a.shape)}")
    if out_b.shape != out_a.shape:
        raise ValueError(
            f"out_b must have out_a's shape {tuple(out_a.shape)}, got {tuple(out_b.shape)}"
        )
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != out_a.shape[:-1]:
            raise ValueError(
                f"{name} must have shape {tuple(out_a.shape[:-1])} (out_a's without D), "
                f"got {tuple(t.shape)}"
            )
    check_same_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    if use_triton("merge_attention", out_a.device):  # CUDA: one kernel (merge_triton.py)
        from squeeze.kernels.merge_triton import merge_attention_triton

        return merge_attention_triton(out_a, lse_a, out_b, lse_b)

    lse_a, lse_b = lse_a.float(), lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # both empty: avoid -inf - -inf
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)  # an empty side weighs exactly 0
    total = w_a + w_b
    lse = m + torch.log(total)  # log(0) = -inf where both sides are empty
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    # a weight-0 side contributes 0 even if its out holds garbage (inf / NaN)
    part_a = torch.where((w_a > 0)[..., None], out_a.float() * (w_a * inv)[..., None], 0.0)
    part_b = torch.where((w_b > 0)[..., None], out_b.float() * (w_b * inv)[..., None], 0.0)
    return part_a + part_b, lse
