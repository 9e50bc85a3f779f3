"""What the squeezed layers read while a compiled context answers questions."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...attention import SqueezeStats
from ...index import ClusterIndex

#: calls a layer holds unsummed before it sums them (see :meth:`LayerCounters.fold`)
FOLD_EVERY = 256


@dataclass
class LayerCounters:
    """Totals over every squeezed attention call of one layer.

    Recording a call only keeps its read-count tensors (:attr:`pending`); they are summed in
    batches, with one host transfer per device (:meth:`fold`): recording costs no tensor
    operation per call, and on an accelerator it synchronises with the host once per
    ``FOLD_EVERY`` calls of a layer (and when the stats are read), never per call."""

    calls: int = 0
    keys_read: int = 0  # context keys read, over calls, batch rows and KV heads
    keys_total: int = 0  # context keys that dense attention would have read
    dense_read: int = 0  # of keys_read, keys of the dense rows (sinks and window)
    clustered_total: int = 0
    centroids_scored: int = 0
    bytes_read: float = 0.0  # K/V bytes read plus centroid bytes scored (a float32 sum)
    bytes_total: int = 0  # K/V bytes dense attention would have read (once per call)
    #: ``(keys_read, centroids_scored_t, key_bytes, centroid_bytes)`` of calls not yet summed
    pending: list = field(default_factory=list)

    def fold(self) -> None:
        """Add the pending calls into the totals.

        ``bytes_read`` is summed in float32, call after call, exactly as the running tensor
        sum it replaces (``0.0 + int64`` tensors promote to float32): the same value."""
        if not self.pending:
            return
        keys, scored, key_bytes, centroid_bytes = zip(*self.pending, strict=True)
        self.pending = []
        values = _values([*keys, *scored])
        f32 = np.float32
        total = f32(self.bytes_read)
        for i, (kb, cb) in enumerate(zip(key_bytes, centroid_bytes, strict=True)):
            read, cents = sum(values[i]), sum(values[len(keys) + i])
            self.keys_read += read
            self.centroids_scored += cents
            total = f32(f32(total + f32(read * kb)) + f32(cents * cb))
        self.bytes_read = float(total)


def _values(tensors: list[torch.Tensor]) -> list[list]:
    """Each tensor's elements as Python numbers, read with one transfer per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out: list[list] = [[] for _ in tensors]
    for idx in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).tolist()
        pos = 0
        for i in idx:
            n = tensors[i].numel()
            out[i], pos = flat[pos : pos + n], pos + n
    return out


@dataclass
class StatsRecorder:
    """Per-layer read counters and wall-clock timings, shared by every cache of one context."""

    layers: dict[int, LayerCounters] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def record(self, layer_idx: int, stats: SqueezeStats, index: ClusterIndex) -> None:
        c = self.layers.get(layer_idx)
        if c is None:
            c = self.layers[layer_idx] = LayerCounters()
        rows_heads = stats.keys_read.numel()  # B * Hkv
        selected = rows_heads * stats.selections  # the fractions are per selection
        c.calls += 1
        c.keys_total += selected * index.n_context
        c.dense_read += selected * index.n_dense
        c.clustered_total += selected * index.n_clustered
        c.bytes_total += rows_heads * index.n_context * stats.key_bytes
        c.pending.append(
            (stats.keys_read, stats.centroids_scored_t, stats.key_bytes, stats.centroid_bytes)
        )
        if len(c.pending) >= FOLD_EVERY:
            c.fold()

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    def reset(self) -> None:
        self.layers.clear()
        self.timings = {k: v for k, v in self.timings.items() if k.startswith("compile_")}

    def summary(self) -> dict:
        per_layer = {}
        for idx in sorted(self.layers):
            c = self.layers[idx]
            c.fold()
            read = c.keys_read
            per_layer[idx] = {
                "kv_fraction": read / c.keys_total if c.keys_total else 0.0,
                "clustered_fraction": (read - c.dense_read) / c.clustered_total
                if c.clustered_total
                else 0.0,
                "centroids_scored": c.centroids_scored,
                "bytes_fraction": c.bytes_read / c.bytes_total if c.bytes_total else 0.0,
                "calls": c.calls,
            }
        mean = (
            (lambda key: sum(v[key] for v in per_layer.values()) / len(per_layer))
            if per_layer
            else None
        )
        return {
            "layers": per_layer,
            "kv_fraction": mean("kv_fraction") if mean else None,
            "clustered_fraction": mean("clustered_fraction") if mean else None,
            "bytes_fraction": mean("bytes_fraction") if mean else None,
            "centroids_scored": sum(v["centroids_scored"] for v in per_layer.values()),
            "timings": dict(self.timings),
        }
