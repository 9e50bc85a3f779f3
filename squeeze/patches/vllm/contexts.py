"""Compiled-context files loaded for a vLLM engine: checked against the served checkpoint,
reduced to what the paged-cache path needs, and sliced to this rank's KV heads.

The K/V stored in a file are not used: vLLM's own paged cache holds the context (prefix
caching keeps it resident), so each layer keeps its clusters, centroids, calibration and
``positions`` (the context position of every cluster-ordered row), and no ``keys``/``values``:
an index whose K/V the caller supplies (:mod:`squeeze.patches.vllm.paged`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ... import files
from ...errors import IndexFileError
from ...index import ClusterIndex
from .config import SqueezeVllmConfigError


@dataclass(frozen=True)
class ServedContext:
    """One registered context.

    Attributes:
        path: the file.
        ids: ``[N]`` int64 numpy context token ids (a prompt must start with them).
        layers: ``{layer: ClusterIndex}`` over this rank's KV heads (without K/V).
    """

    path: Path
    ids: np.ndarray
    layers: dict[int, ClusterIndex]

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])


def kv_head_range(total_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The KV heads ``[start, end)`` that tensor-parallel rank ``tp_rank`` of ``tp_size`` holds.

    vLLM splits KV heads evenly when there are at least as many as ranks, and otherwise
    replicates each KV head on ``tp_size // total_kv_heads`` consecutive ranks.
    """
    if total_kv_heads >= tp_size:
        if total_kv_heads % tp_size:
            raise ValueError(f"{total_kv_heads} KV heads do not split over {tp_size} ranks")
        per = total_kv_heads // tp_size
        return tp_rank * per, (tp_rank + 1) * per
    if tp_size % total_kv_heads:
        raise ValueError(f"{tp_size} ranks do not replicate {total_kv_heads} KV heads evenly")
    h = tp_rank // (tp_size // total_kv_heads)
    return h, h + 1


def slice_heads(ix: ClusterIndex, start: int, end: int) -> ClusterIndex:
    """The index over KV heads ``[start, end)``, without K/V (the paged cache holds them).

    Every per-head tensor field (``[Hkv, ...]``: positions, centroids, offsets, the level-1
    tensors and any per-cluster tensor the index gains) is cut; calibration thresholds are per
    layer (pooled over heads), so they carry over unchanged.
    """
    cut = {
        f.name: getattr(ix, f.name)[start:end].contiguous()
        for f in dataclasses.fields(ix)
        if f.name not in ("keys", "values") and isinstance(getattr(ix, f.name), torch.Tensor)
    }
    return dataclasses.replace(ix, keys=None, values=None, _derived={}, **cut)


def load_context(
    path: Path,
    model_dir: str,
    hf_config,
    budget: float | None,
    head_range: tuple[int, int],
) -> ServedContext:
    """Read, check and prepare one compiled-context file (raises naming the problem)."""
    from .checkpoint import check_model_files

    try:
        meta = files.read_header(path).get("metadata") or {}
    except (IndexFileError, FileNotFoundError) as err:
        raise SqueezeVllmConfigError(f"squeeze context {path}: {err}") from err
    if meta.get("format") != files.CONTEXT_FORMAT:
        raise SqueezeVllmConfigError(
            f"squeeze context {path} is not a compiled context (format {meta.get('format')!r}); "
            "make one with squeeze.compile(model, ids, cfg).save(path)"
        )
    check_model_files(meta, model_dir, hf_config, path)
    if meta.get("dense_layers"):
        layers = [e["layer"] for e in meta["dense_layers"]]
        raise SqueezeVllmConfigError(
            f"squeeze context {path} has layers {layers} that squeeze does not cover "
            "(sliding-window or soft-capped attention); the vLLM plugin serves only models "
            "whose every layer is squeezed"
        )
    if meta.get("context_ids") is None:
        raise SqueezeVllmConfigError(
            f"squeeze context {path} does not store its token ids (context over "
            "1M tokens); the vLLM plugin needs them to recognise requests"
        )
    try:
        _, loaded, _ = files.read_context(path, "cpu")
    except IndexFileError as err:
        raise SqueezeVllmConfigError(f"squeeze context {path}: {err}") from err
    layers = {}
    for i, fields in loaded.items():
        ix = ClusterIndex(**fields)
        if budget is not None:
            try:
                ix = ix.with_config(budget=budget)
            except ValueError as err:
                raise SqueezeVllmConfigError(
                    f"squeeze context {path}: budget {budget} is not usable: {err}"
                ) from err
        layers[int(i)] = slice_heads(ix, *head_range)
    ids = np.asarray(meta["context_ids"], dtype=np.int64)
    if ids.shape[0] != meta.get("context_len"):
        raise SqueezeVllmConfigError(f"squeeze context {path}: header context length mismatch")
    return ServedContext(Path(path), ids, layers)
