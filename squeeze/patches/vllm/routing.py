"""Which requests of a step take the squeezed path, and the stock metadata for the others.

vLLM's ``CommonAttentionMetadata`` carries no request ids or token ids, so the plugin wraps the
model runner's ``_build_attention_metadata`` to publish the runner while metadata is built; the
builder then reads each row's prompt tokens from ``runner.input_batch`` (rows there are the
metadata's rows). A request takes the squeezed path when its prompt starts with a registered
context's tokens and this step's queries all sit after the context (so the context's own
prefill, and a question prefill that recomputes the context's last partial block, go through
the stock backend).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .contexts import ServedContext
from .copies import Source, Sources, copy_positions

_local = threading.local()
_hooked = False


def install_runner_hook() -> None:
    """Wrap ``GPUModelRunner._build_attention_metadata`` (idempotent)."""
    global _hooked
    if _hooked:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._build_attention_metadata
    if getattr(original, "_squeeze_wrapped", False):
        _hooked = True
        return

    def wrapped(self, *args, **kwargs):
        _local.runner = self
        try:
            return original(self, *args, **kwargs)
        finally:
            _local.runner = None

    wrapped._squeeze_wrapped = True
    GPUModelRunner._build_attention_metadata = wrapped
    _hooked = True


def current_runner():
    return getattr(_local, "runner", None)


@dataclass
class SqueezedRow:
    """One request of the step on the squeezed path: its context, its query tokens
    ``[start, end)`` in the step's flattened token list, its length and block table row."""

    context: int
    start: int
    end: int
    seq_len: int
    block_row: torch.Tensor


@dataclass
class Group:
    """The squeezed requests of one step on one context with one query length ``m`` (all
    decodes, typically): one lookup, one sparse-attention call and one tail read per layer.
    Everything here is the same for every layer of the step, so it is computed once.

    Attributes:
        tokens: ``[B * m]`` int64 indices of the requests' query tokens in the step.
        span: ``(start, end)`` when those tokens are one contiguous range (then read as a slice).
        block_rows: ``[B, max_blocks]`` the requests' block table rows.
        seq_lens: tokens of each request so far, this step's included.
        source: where this context's copies are read from (``copies.Source``), or ``None``.
        fast: per request, whether it holds the source's blocks (served from the copies).
    """

    context: int
    m: int
    rows: list[SqueezedRow]
    tokens: torch.Tensor
    span: tuple[int, int] | None
    block_rows: torch.Tensor
    seq_lens: list[int]
    source: Source | None
    fast: list[bool]
    _tails: dict = field(default_factory=dict, repr=False)

    def tail(self, layout, start: int, sel: tuple[int, ...] | None = None):
        """The tail rows' indices (``paged.TailIndex``) of requests ``sel`` (all: ``None``) from
        context position ``start``, for ``layout``'s cache shape: computed by the first layer."""
        from .paged import tail_index

        key = (layout.geometry, start, sel)
        if key not in self._tails:
            rows = self.block_rows if sel is None else self.block_rows[list(sel)]
            lens = self.seq_lens if sel is None else [self.seq_lens[i] for i in sel]
            self._tails[key] = tail_index(layout, rows, start, lens)
        return self._tails[key]


@dataclass
class Plan:
    """``groups``: the squeezed requests; ``dense_tokens``: ``[T_dense]`` int64 token indices of
    the others (``None`` when there are none), served with ``dense_metadata`` (stock metadata
    over those requests only); ``dense_context_rows``: context requests sent to the stock path."""

    groups: list[Group]
    dense_tokens: torch.Tensor | None
    dense_metadata: object | None
    dense_context_rows: int


def make_groups(
    rows: list[SqueezedRow],
    contexts: list[ServedContext],
    sources: Sources,
    block_size: int,
    device: torch.device,
) -> list[Group]:
    """Group a step's squeezed rows per (context, query length), with each context's copy
    source chosen once over all of its rows (so that groups of one context agree)."""
    by_ctx: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_ctx.setdefault(r.context, []).append(i)
    fast, source = [False] * len(rows), {}
    for c, idx in by_ctx.items():
        ctx = contexts[c]
        nb = copy_positions(ctx.n, block_size) // block_size
        block_rows = torch.stack([rows[i].block_row for i in idx])
        source[c], use = sources.choose(c, block_rows, nb)
        for i, u in zip(idx, use, strict=True):
            fast[i] = u
    keyed: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(rows):
        keyed.setdefault((r.context, r.end - r.start), []).append(i)
    groups = []
    for (c, m), idx in keyed.items():
        rs = [rows[i] for i in idx]
        contiguous = all(a.end == b.start for a, b in itertools.pairwise(rs))
        tokens = torch.cat([torch.arange(r.start, r.end) for r in rs]).to(device)
        span = (rs[0].start, rs[-1].end) if contiguous else None
        block_rows = torch.stack([r.block_row for r in rs])
        lens = [r.seq_len for r in rs]
        groups.append(
            Group(c, m, rs, tokens, span, block_rows, lens, source[c], [fast[i] for i in idx])
        )
    return groups


class Matcher:
    """Per request id, the registered context its prompt starts with (or -1), remembered."""

    def __init__(self, contexts: list[ServedContext]):
        self.contexts = contexts
        # longest first: a context that extends another one wins
        self._order = sorted(range(len(contexts)), key=lambda c: -contexts[c].n)
        self._seen: dict[str, int] = {}

    def match(self, runner, num_reqs: int) -> np.ndarray:
        batch = runner.input_batch
        req_ids = batch.req_ids[:num_reqs]
        out = np.full(num_reqs, -1, dtype=np.int64)
        for r, rid in enumerate(req_ids):
            hit = self._seen.get(rid)
            if hit is None:
                hit = self._find(batch, r)
                self._seen[rid] = hit
            out[r] = hit
        if len(self._seen) > 4 * max(num_reqs, 256):  # forget finished requests
            keep = set(req_ids)
            self._seen = {k: v for k, v in self._seen.items() if k in keep}
        return out

    def _find(self, batch, r: int) -> int:
        n_prompt = int(batch.num_prompt_tokens[r])
        tokens = batch.token_ids_cpu[r]
        for c in self._order:
            ctx = self.contexts[c]
            if n_prompt > ctx.n and np.array_equal(tokens[: ctx.n], ctx.ids):
                return c
        return -1


def plan_step(cm, routes: np.ndarray, contexts: list[ServedContext]):
    """Split a step's requests: ``(squeezed rows, dense request indices, context rows sent dense)``."""
    qsl = cm.query_start_loc_cpu.numpy()
    seq = cm.seq_lens.cpu().numpy() if cm.seq_lens.device.type != "cpu" else cm.seq_lens.numpy()
    rows, dense, dense_ctx = [], [], 0
    for r in range(cm.num_reqs):
        c = int(routes[r])
        start, end = int(qsl[r]), int(qsl[r + 1])
        seq_len = int(seq[r])
        if c >= 0 and seq_len - (end - start) >= contexts[c].n and end > start:
            rows.append(SqueezedRow(c, start, end, seq_len, cm.block_table_tensor[r]))
        else:
            dense.append(r)
            dense_ctx += c >= 0
    return rows, dense, dense_ctx


def subset_metadata(cm, reqs: list[int]):
    """``CommonAttentionMetadata`` restricted to requests ``reqs`` (compacted), and the token
    indices ``[T]`` int64 of their queries in the full step."""
    qsl = cm.query_start_loc_cpu
    idx = torch.tensor(reqs, dtype=torch.int64)
    lens = (qsl[1:] - qsl[:-1])[idx]
    new_qsl_cpu = torch.zeros(len(reqs) + 1, dtype=qsl.dtype)
    new_qsl_cpu[1:] = torch.cumsum(lens, 0)
    tokens = torch.cat([torch.arange(int(qsl[r]), int(qsl[r + 1])) for r in reqs])
    dev = cm.query_start_loc.device
    seq_lens = cm.seq_lens[idx.to(cm.seq_lens.device)]
    changes = dict(
        query_start_loc=new_qsl_cpu.to(dev),
        query_start_loc_cpu=new_qsl_cpu,
        seq_lens=seq_lens,
        num_reqs=len(reqs),
        num_actual_tokens=int(tokens.numel()),
        max_query_len=int(lens.max()),
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=cm.block_table_tensor[idx.to(cm.block_table_tensor.device)],
        slot_mapping=cm.slot_mapping[tokens.to(cm.slot_mapping.device)],
    )
    per_token = ("positions",)
    per_request = ("is_prefilling", "seq_lens_cpu_upper_bound", "encoder_seq_lens")
    for name in per_token:
        t = getattr(cm, name, None)
        if isinstance(t, torch.Tensor):
            changes[name] = t[tokens.to(t.device)]
    for name in per_request:
        t = getattr(cm, name, None)
        if isinstance(t, torch.Tensor):
            changes[name] = t[idx.to(t.device)]
    req_idx = getattr(cm, "req_idx", None)
    if isinstance(req_idx, np.ndarray):
        changes["req_idx"] = req_idx[np.asarray(reqs)]
    fields = {f.name for f in dataclasses.fields(cm)}
    return dataclasses.replace(cm, **{k: v for k, v in changes.items() if k in fields}), tokens
