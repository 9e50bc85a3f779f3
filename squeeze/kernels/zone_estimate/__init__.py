"""The estimated zone: the best-scoring clusters a lookup skipped, attended through their
summaries and merged into the sparse attention (:attr:`squeeze.SqueezeConfig.estimate_zone`,
the policy in :mod:`squeeze.estimate`).

Backends (:mod:`squeeze.kernels.dispatch`): ``reference.py`` (PyTorch: a top-k, row gathers,
two batched matmuls and the merge; every device) and ``native.py`` (C, CPU: a partial selection,
the rows read in place, the merge in place).
"""

from __future__ import annotations

import torch

from .. import dispatch
from . import native
from .reference import zone_estimate_reference


def zone_estimate(
    q: torch.Tensor, centroids: torch.Tensor, spread: torch.Tensor | None,
    log_counts: torch.Tensor, value_means: torch.Tensor, key: torch.Tensor, mask: torch.Tensor,
    multiple: float, scale: float, out: torch.Tensor, lse: torch.Tensor,
    *, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Estimate the zone of every (batch row, KV head) and merge it into ``(out, lse)``.

    Per (b, h) the zone is the ``ceil(multiple · max(1, n))`` best clusters by ``key`` among
    those ``mask`` does not select (``n`` selected; ``-inf`` keys never join); each is attended
    as ``N`` keys of logit ``q·c·scale`` (plus ``scale²·|q|²·spread``) with its mean value.

    Args:
        q: ``[B, Hkv, G, M, D]`` queries.
        centroids, value_means: ``[Hkv, K, D]`` fp32 or bf16 (the same dtype).
        spread: ``[Hkv, K]`` ``σ²/2`` per cluster, or ``None`` (the centroid estimator).
        log_counts: ``[Hkv, K]`` log cluster sizes (``-inf``: empty).
        key: ``[B, Hkv, K]`` fp32 ranking scores (the lookup's; ``-inf``: not scored).
        mask: ``[B, Hkv, K]`` or ``[B, Hkv, K + 1]`` bool, the selection (a last window column
            is ignored).
        multiple: the zone's size per selected cluster, ``> 0``.
        scale: softmax scale.
        out, lse: ``[B, Hkv, G·M, D]`` and ``[B, Hkv, G·M]``: the sparse attention over the
            selected keys (``lse`` ``-inf`` for a row without keys).
        backend: ``None`` (automatic), ``"torch"`` or ``"native"``.
    Returns:
        ``(out, lse, counts)``: the merged attention (float32; the native kernel writes ``out``
        and ``lse`` in place when they are contiguous fp32) and ``counts [B, Hkv]`` int64, the
        clusters estimated.
    """
    b, hkv, g, m, d = q.shape
    k = centroids.shape[1]
    _check(centroids, value_means, spread, log_counts, key, mask, out, lse, (b, hkv, g * m, d, k))
    name = dispatch.choose("zone_estimate", q.device, dtype=centroids.dtype, backend=backend)
    run = native.zone_estimate_native if name == "native" else zone_estimate_reference
    return run(q, centroids, spread, log_counts, value_means, key, mask, multiple, scale, out, lse)


def _check(centroids, value_means, spread, log_counts, key, mask, out, lse, dims) -> None:
    b, hkv, r, d, k = dims
    want = {
        "centroids": (centroids, (hkv, k, d)), "value_means": (value_means, (hkv, k, d)),
        "log_counts": (log_counts, (hkv, k)), "key": (key, (b, hkv, k)),
        "out": (out, (b, hkv, r, d)), "lse": (lse, (b, hkv, r)),
    }  # fmt: skip
    if spread is not None:
        want["spread"] = (spread, (hkv, k))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    if value_means.dtype != centroids.dtype:
        raise ValueError(
            f"value_means must be in the centroids' dtype {centroids.dtype}, got {value_means.dtype}"
        )
    if mask.dtype != torch.bool or mask.shape[:2] != (b, hkv) or mask.shape[2] not in (k, k + 1):
        raise ValueError(f"mask must be bool [{b}, {hkv}, {k} or {k + 1}], got "
                         f"{mask.dtype} {list(mask.shape)}")  # fmt: skip
