"""Nearest-centroid assignment on the native C kernel (``kernels/native/kmeans.c``, CPU): a
fused GEMM + argmax in registers, centroids packed in panels of the build's width."""

from __future__ import annotations

import torch

from .. import native
from ..native.kmeans import kernels


def assign_native(
    x: torch.Tensor, centroids: torch.Tensor, half_sq: torch.Tensor | None, chunk_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [G, N] int64 and best score [G, N] fp32 (:func:`squeeze.kernels.assign.assign`).

    Non-fp32 points are converted ``chunk_n`` rows at a time (fp32 points are read in place).
    Extra memory: the packed centroids ([G, K, D] fp32, K rounded up to the panel width) and,
    for non-fp32 x, one [G, chunk_n, D] fp32 chunk.
    """
    fn = kernels().assign
    g, n, d = x.shape
    k = centroids.shape[1]
    nc = native.build_info("kmeans").panel
    kb = -(-k // nc)
    cp = torch.zeros(g, kb * nc, d, dtype=torch.float32)
    cp[:, :k] = centroids
    cpack = cp.view(g, kb, nc, d).transpose(2, 3).contiguous()  # [G, KB, D, NC]
    del cp
    half = torch.full((g, kb * nc), float("inf"), dtype=torch.float32)
    if half_sq is None:
        half[:, :k] = 0.0
    else:
        half[:, :k] = half_sq
    labels = torch.empty(g, n, dtype=torch.int64)
    best = torch.empty(g, n, dtype=torch.float32)
    threads = torch.get_num_threads()
    fp32 = x.dtype == torch.float32 and x.stride(2) == 1 and x.stride(1) == d
    step = n if fp32 else max(1, chunk_n)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        part = x[:, n0:n1] if fp32 else x[:, n0:n1].to(torch.float32).contiguous()
        rc = fn(
            part.data_ptr(), g, n1 - n0, d, part.stride(0), cpack.data_ptr(), half.data_ptr(),
            kb, k - (kb - 1) * nc, labels[:, n0:].data_ptr(), best[:, n0:].data_ptr(), n, threads,
        )  # fmt: skip
        if rc == -1:  # the kernel's only failure: its per-thread scratch
            raise MemoryError("native k-means assign could not allocate its scratch memory")
        if rc != 0:
            raise RuntimeError(f"native k-means assign failed with code {rc}")
    return labels, best
