"""What the squeezed layers read while a compiled context answers questions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...attention import SqueezeStats
from ...index import ClusterIndex


@dataclass
class LayerCounters:
    """Totals over every squeezed attention call of one layer. The read counts are summed as
    tensors on the device of the calls: recording never synchronises with the host."""

    calls: int = 0
    keys_read: torch.Tensor | int = 0  # context keys read, over calls, batch rows and KV heads
    keys_total: int = 0  # context keys that dense attention would have read
    dense_read: int = 0  # of keys_read, keys of the dense rows (sinks and window)
    clustered_total: int = 0
    centroids_scored: torch.Tensor | int = 0
    bytes_read: torch.Tensor | float = 0.0  # K/V bytes read plus centroid bytes scored
    bytes_total: int = 0  # K/V bytes dense attention would have read (once per call)


@dataclass
class StatsRecorder:
    """Per-layer read counters and wall-clock timings, shared by every cache of one context."""

    layers: dict[int, LayerCounters] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def record(self, layer_idx: int, stats: SqueezeStats, index: ClusterIndex) -> None:
        c = self.layers.setdefault(layer_idx, LayerCounters())
        rows_heads = stats.keys_read.numel()  # B * Hkv
        selected = rows_heads * stats.selections  # the fractions are per selection
        c.calls += 1
        c.keys_read = c.keys_read + stats.keys_read.sum()
        c.keys_total += selected * index.n_context
        c.dense_read += selected * index.n_dense
        c.clustered_total += selected * index.n_clustered
        c.centroids_scored = c.centroids_scored + stats.centroids_scored_t
        c.bytes_read = (
            c.bytes_read
            + stats.keys_read.sum() * stats.key_bytes
            + stats.centroids_scored_t * stats.centroid_bytes
        )
        c.bytes_total += rows_heads * index.n_context * stats.key_bytes

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    def reset(self) -> None:
        self.layers.clear()
        self.timings = {k: v for k, v in self.timings.items() if k.startswith("compile_")}

    def summary(self) -> dict:
        per_layer = {}
        for idx in sorted(self.layers):
            c = self.layers[idx]
            read = int(c.keys_read)
            per_layer[idx] = {
                "kv_fraction": read / c.keys_total if c.keys_total else 0.0,
                "clustered_fraction": (read - c.dense_read) / c.clustered_total
                if c.clustered_total
                else 0.0,
                "centroids_scored": int(c.centroids_scored),
                "bytes_fraction": float(c.bytes_read) / c.bytes_total if c.bytes_total else 0.0,
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
