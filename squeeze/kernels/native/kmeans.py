"""The typed functions of ``kmeans.c``, shared by the assignment (:mod:`squeeze.kernels.assign`),
the centroid update (:mod:`squeeze.kernels.centroid_update`) and the k-means++ seeding
(:func:`pp_keys`). Every kernel accumulates in fp32 whatever the input dtype."""

from __future__ import annotations

import ctypes

import torch

from . import bind


class Kernels:
    """The loaded ``kmeans.c``: its typed ctypes functions."""

    def __init__(self, lib: ctypes.CDLL):
        p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        self.assign = lib.squeeze_kmeans_assign
        self.assign.argtypes = [p, i64, i64, i64, i64, p, p, i64, i64, p, p, i64, i32]
        self.assign.restype = i64
        self.sums = lib.squeeze_kmeans_sums
        self.sums.argtypes = [p, i32, i64, i64, i64, p, p, i64, p, p, p, i32]
        self.sums.restype = i64
        self.pp_keys = lib.squeeze_kmeans_pp_keys
        self.pp_keys.argtypes = [p, p, ctypes.c_float, p, i32, p, p, p, i64, i32]
        self.pp_keys.restype = None


def kernels() -> Kernels:
    """The bound library (the dispatcher has checked that it builds)."""
    return bind("kmeans", Kernels)


def pp_keys(
    best: torch.Tensor | None,
    x_sq: torch.Tensor,
    offset: float,
    d2: torch.Tensor,
    first: bool,
    u: torch.Tensor,
    logw: torch.Tensor | None,
    keys: torch.Tensor,
) -> None:
    """One k-means++ round's elementwise work in one pass, in place (all [G, N] fp32 contiguous).

    With ``best`` (best scores against the new centres): ``d2`` becomes (``first``: is set to)
    the squared distance ``max(x_sq + offset − 2·best, 0)`` where smaller. Then the Gumbel keys of
    the next draw: ``keys = log(d2) + logw − log(−log(u))`` (no ``log(d2)`` term without ``best``,
    no ``logw`` term without weights).
    """
    kernels().pp_keys(
        None if best is None else best.data_ptr(), x_sq.data_ptr(), offset, d2.data_ptr(),
        int(first), u.data_ptr(), None if logw is None else logw.data_ptr(), keys.data_ptr(),
        x_sq.numel(), torch.get_num_threads(),
    )  # fmt: skip
