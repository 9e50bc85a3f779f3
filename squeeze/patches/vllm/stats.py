"""The "fraction of context keys read" metric, per worker process, logged periodically.

One record per (layer, request, step) that took the squeezed path. ``snapshot()`` gives the
running totals (for tests and in-process engines); every ``interval`` seconds a line goes to the
``vllm.squeeze`` logger (a child of vLLM's logger, so in its log output), e.g. ``squeeze: read 10.4% of context keys ...``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ...attention import SqueezeStats

logger = logging.getLogger("vllm.squeeze")  # a child of vLLM's logger: its handlers, its format


@dataclass
class Totals:
    """Running sums. ``keys_read``/``keys_total``: context keys read / present, summed over
    (layer, request, step, KV head), window included; ``clustered_read``/``clustered_total``:
    the same over the clustered keys only (what ``budget`` targets); ``calls``: squeezed
    (layer, request, step) records; ``dense_calls``: requests with a context served by the stock
    path (the context's own prefill, or a question prefill whose start is inside the context);
    ``mixed_steps``: steps that served squeezed and stock requests together; ``copies``:
    per-layer cluster-ordered copies of a context taken from the paged cache (``recopies`` of
    them taken again after the context's blocks changed); ``invalidated``: times a context's
    copies were dropped because a step wrote into the blocks they were read from (eviction);
    ``gather_calls``: squeezed records read with the gather fallback instead of a copy."""

    keys_read: int = 0
    keys_total: int = 0
    clustered_read: int = 0
    clustered_total: int = 0
    calls: int = 0
    dense_calls: int = 0
    mixed_steps: int = 0
    copies: int = 0
    recopies: int = 0
    invalidated: int = 0
    gather_calls: int = 0

    @property
    def kv_fraction(self) -> float:
        return self.keys_read / self.keys_total if self.keys_total else float("nan")

    @property
    def clustered_fraction(self) -> float:
        return self.clustered_read / self.clustered_total if self.clustered_total else float("nan")


_lock = threading.Lock()
_totals = Totals()
_since_log = Totals()
_last_log = time.monotonic()
_interval = 10.0
_rank = "rank 0/1"


def set_interval(seconds: float) -> None:
    global _interval
    _interval = seconds


def set_rank(rank: int, size: int, heads: tuple[int, int], total_heads: int) -> None:
    """Name this worker's tensor-parallel rank and KV heads in its log lines."""
    global _rank
    _rank = f"rank {rank}/{size}, KV heads {heads[0]}-{heads[1] - 1} of {total_heads}"


def record(read: SqueezeStats, gathered: bool = False) -> None:
    """One record per request (batch row) of a squeezed call: ``read`` is the core's stats."""
    b, hkv = read.keys_read.shape
    keys = int(read.keys_read.sum())  # keys read by the call's requests, over this rank's heads
    # per selection: a request's rows may be cut into several blocks, each with its own lookup
    per_request = hkv * read.selections
    total, window = b * per_request * read.n_context, b * per_request * read.n_dense
    with _lock:
        for t in (_totals, _since_log):
            t.gather_calls += b * gathered
            t.keys_read += keys
            t.keys_total += total
            t.clustered_read += keys - window
            t.clustered_total += total - window
            t.calls += b
    maybe_log()


def record_dense(n: int = 1) -> None:
    with _lock:
        _totals.dense_calls += n
        _since_log.dense_calls += n


def record_copy(again: bool) -> None:
    with _lock:
        for t in (_totals, _since_log):
            t.copies += 1
            t.recopies += again


def record_invalidated() -> None:
    with _lock:
        _totals.invalidated += 1
        _since_log.invalidated += 1


def record_mixed() -> None:
    with _lock:
        _totals.mixed_steps += 1
        _since_log.mixed_steps += 1


def snapshot() -> Totals:
    """A copy of the totals since start (or :func:`reset`)."""
    with _lock:
        return Totals(**vars(_totals))


def reset() -> None:
    global _totals, _since_log
    with _lock:
        _totals, _since_log = Totals(), Totals()


def maybe_log() -> None:
    """Log the line if ``interval`` seconds passed since the last one and something was read
    (called on every record and at the start of every step, so that an idle engine logs its
    last totals at its next step)."""
    global _since_log, _last_log
    now = time.monotonic()
    if _interval <= 0 or now - _last_log < _interval:
        return
    with _lock:
        if not _since_log.calls and not _since_log.dense_calls:
            return
        s, t, _since_log, _last_log = _since_log, Totals(**vars(_totals)), Totals(), now
    read = (
        f"read {100 * s.kv_fraction:.1f}% of context keys ({100 * s.clustered_fraction:.1f}% of "
        "clustered keys)"
        if s.calls
        else "read no context keys"
    )
    logger.info(
        "squeeze: %s over %d squeezed layer-requests; %d context requests took the stock path "
        "[%s; since start: %d/%d context keys in %d layer-requests, %d copies, %d invalidated]",
        read,
        s.calls,
        s.dense_calls,
        _rank,
        t.keys_read,
        t.keys_total,
        t.calls,
        t.copies,
        t.invalidated,
    )
