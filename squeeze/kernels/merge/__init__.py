"""Log-sum-exp merge of two partial attentions over disjoint key sets (sparse context + dense
tail). Backends: ``reference.py`` (PyTorch) and ``triton.py`` (CUDA: one kernel)."""

from __future__ import annotations

import torch

from ...validation import check_same_device
from .. import dispatch
from .reference import merge_reference


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
    *, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Combine two softmax attentions of the same queries over disjoint key sets.

    Args:
        out_a, out_b: ``[..., R, D]`` normalised attention outputs over key sets A and B.
        lse_a, lse_b: ``[..., R]`` their log-sum-exps (natural log of the summed ``exp(scores)``);
            ``-inf`` marks a side without keys, whose ``out`` is then ignored.
        backend: ``None`` (automatic), ``"torch"`` or ``"triton"``.
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
    if dispatch.choose("merge", out_a.device, backend=backend) == "triton":
        from .triton import merge_attention_triton

        return merge_attention_triton(out_a, lse_a, out_b, lse_b)
    return merge_reference(out_a, lse_a, out_b, lse_b)
