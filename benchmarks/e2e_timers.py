"""Timers for the end-to-end benchmark: attention calls, their stages, and model forwards.

:class:`AttentionTimer` wraps the attention functions transformers dispatches to (``"sdpa"`` for
the plain model, ``"squeeze"`` for the patched one) and, inside squeezed attention, the pipeline
stages (lookup, segments, sparse attention, tail attention with the merge) and the bookkeeping
around them (input checks, the mask's padding check, the stats). Every wrapper adds two ``perf_counter``
calls (well under a microsecond); dense and squeezed attention are wrapped alike at the top.

:class:`StepTimer` times every forward of the model with hooks: ``generate``'s first forward
(the question over the cached context) and its decode steps (one token each).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

#: the pipeline's computation; the rest of a squeezed attention call is overhead
KERNELS = ("lookup", "segments", "sparse", "tail")
#: timed parts of the overhead (the remainder is "other": Python, dispatch, reshapes, copies)
BOOKKEEPING = ("checks", "mask", "stats")


@dataclass
class Call:
    """One attention call: its kind (``"sdpa"`` or ``"squeeze"``), query rows, wall seconds,
    and for squeezed calls the seconds of each stage."""

    kind: str
    rows: int
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def kernel_s(self) -> float:
        return sum(self.stages.get(k, 0.0) for k in KERNELS)

    @property
    def overhead_s(self) -> float:
        return self.seconds - self.kernel_s


class AttentionTimer:
    """Records a :class:`Call` per attention call while installed.

    ``install()`` must follow every ``squeeze.patch`` (which registers the untimed
    ``"squeeze"`` function again); ``uninstall()`` puts back every original.
    """

    def __init__(self):
        import squeeze.attention as sq_attention
        import squeeze.lookup as sq_lookup
        import squeeze.patches.hf.attention as hf_attention
        from squeeze.patches.hf.stats import StatsRecorder

        self.calls: list[Call] = []
        self._current: Call | None = None
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._top = {
            "sdpa": ALL_ATTENTION_FUNCTIONS["sdpa"],
            "squeeze": hf_attention.squeeze_attention_forward,
        }
        # (owner, attribute, stage): looked up at call time by the code that uses them
        self._stages = [
            (sq_lookup, "select", "lookup"),
            (sq_attention, "segments_with_lengths", "segments"),
            (sq_attention, "sparse_attention", "sparse"),
            (sq_attention, "dense_attention", "tail"),
            (sq_attention, "_check", "checks"),
            (StatsRecorder, "record", "stats"),
            (hf_attention, "tail_padding", "mask"),
        ]
        self._originals = [getattr(owner, name) for owner, name, _ in self._stages]

    def install(self) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

        for kind, fn in self._top.items():
            AttentionInterface.register(kind, self._timed_top(kind, fn))
            if getattr(ALL_ATTENTION_FUNCTIONS[kind], "__wrapped__", None) is not fn:
                raise RuntimeError(f"could not wrap the {kind!r} attention function")
        for (owner, name, stage), fn in zip(self._stages, self._originals, strict=True):
            setattr(owner, name, self._timed_stage(stage, fn))

    def uninstall(self) -> None:
        from transformers.modeling_utils import AttentionInterface

        for kind, fn in self._top.items():
            AttentionInterface.register(kind, fn)
        for (owner, name, _), fn in zip(self._stages, self._originals, strict=True):
            setattr(owner, name, fn)

    def take(self) -> list[Call]:
        """The calls recorded since the last ``take``."""
        calls, self.calls = self.calls, []
        return calls

    def _timed_top(self, kind, fn):
        @functools.wraps(fn)
        def timed(module, query, *args, **kwargs):
            call = Call(kind, query.shape[2], 0.0)
            outer, self._current = self._current, call
            t0 = time.perf_counter()
            try:
                return fn(module, query, *args, **kwargs)
            finally:
                call.seconds = time.perf_counter() - t0
                self._current = outer
                self.calls.append(call)

        return timed

    def _timed_stage(self, stage, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self._current is not None:
                    stages = self._current.stages
                    stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t0

        return timed


class StepTimer:
    """``(input tokens, seconds)`` of every forward of ``model`` while installed."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.forwards: list[tuple[int, float]] = []
        self._handles = []
        self._t0 = 0.0

    def install(self) -> None:
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> list[tuple[int, float]]:
        out, self.forwards = self.forwards, []
        return out

    def _pre(self, module, args, kwargs):
        self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        self.forwards.append((tokens, time.perf_counter() - self._t0))
