"""Argument checks shared by the public functions: each error names the argument and what was expected."""

from __future__ import annotations

import math

import numpy as np
import torch

from .kernels.native import finite as native_finite

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    name: str,
    t: object,
    ndim: int,
    *,
    layout: str,
    floating: bool = True,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of rank ``ndim`` (``layout`` names its dims for the message).

    Raises ``TypeError`` for a non-tensor or a non-float dtype, ``ValueError`` for a wrong rank.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float tensor (fp32, fp16, bf16, fp64), got {t.dtype}")
    return t


def check_finite(**tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first tensor holding NaN or inf (one reduction each)."""
    for name, t in tensors.items():
        if t is not None and t.numel() and not all_finite(t):
            raise ValueError(f"{name} contains NaN or inf values")


#: the float dtypes numpy has no type for, read as integers of their width
_AS_INT = {torch.bfloat16: torch.int16}


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf. CPU tensors are read by a native loop over their bits
    (contiguous ones) or numpy: one pass instead of torch's five tiny ops, which cost more than
    the data on a decode step's tensors."""
    if not t.is_cpu or not t.is_floating_point():
        return bool(torch.isfinite(t).all())
    found = native_finite.all_finite(t)
    if found is not None:
        return found
    if t.requires_grad:
        t = t.detach()
    if t.dtype in _AS_INT:
        bits = native_finite.EXPONENT_BITS[t.dtype]  # all set: inf or NaN
        return not np.logical_or.reduce(
            (t.view(_AS_INT[t.dtype]).numpy() & bits) == bits, axis=None
        )
    return bool(np.logical_and.reduce(np.isfinite(t.numpy()), axis=None))


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Raise ``ValueError`` naming the tensors if they do not all live on one device."""
    first = None
    for t in tensors.values():
        if t is None:
            continue
        if first is None:
            first = t.device
        elif t.device != first:
            listing = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
            raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    """Check ``low <= value (<= high)`` for a plain int (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_scale(scale: object, d: int) -> float:
    """A softmax ``scale`` as a float (``D ** -0.5`` for ``None``): ``TypeError`` for a
    non-number, ``ValueError`` for a non-finite one."""
    if scale is None:
        return d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)
