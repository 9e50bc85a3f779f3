"""Milliseconds of attention per decode step, dense against squeezed, on a model's real queries
and K/V (read through :func:`squeeze.patches.hf.observe`).

Dense is the faster of GQA-packed matmul-softmax-matmul and SDPA on the packed view (the K/V
read once per KV head), the CPU baseline of DESIGN.md; squeezed is
:func:`squeeze.squeezed_attention` with the layer's index. Imports torch and transformers.
"""

from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def decode_inputs(model, context_ids: torch.Tensor, question: torch.Tensor) -> dict:
    """Per layer, the decode step of the question's last token: ``q [1, Hq, 1, D]``, context
    ``k, v [1, Hkv, N, D]``, tail ``k, v [1, Hkv, Tq, D]`` and the softmax scale.

    One dense forward of ``context + question`` through :func:`squeeze.patch`, its inputs read with
    :func:`squeeze.patches.hf.observe`; the model is left patched or not, as it was.
    """
    from squeeze.patches.hf import is_patched, observe, patch, unpatch

    seen: dict[int, tuple] = {}

    def record(module, query, key, value, scaling):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        seen[module.layer_idx] = (query.detach(), key.detach(), value.detach(), scale)

    was_patched = is_patched(model)
    patch(model)
    try:
        with observe(record):
            device = next(model.parameters()).device
            model(torch.cat([context_ids, question])[None].to(device))
    finally:
        if not was_patched:
            unpatch(model)
    n = context_ids.numel()
    return {
        i: (q[:, :, -1:], k[:, :, :n], v[:, :, :n], k[:, :, n:], v[:, :, n:], s)
        for i, (q, k, v, s) in sorted(seen.items())
    }


class DecodeCapture:
    """Observer for :func:`squeeze.patches.hf.observe` over a squeezed context's generation:
    per layer, the inputs of its last one-token (decode) attention call.

    ``steps[layer] = (q [B, Hq, 1, D], k_tail, v_tail [B, Hkv, T, D], scale)``.
    """

    def __init__(self):
        self.steps: dict[int, tuple] = {}

    def __call__(self, module, query, key, value, scaling):
        if query.shape[2] == 1:
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            self.steps[module.layer_idx] = (query.detach(), key.detach(), value.detach(), scale)

    def inputs(self, indexes: dict) -> dict:
        """The captured steps of the ``indexes``' layers in :func:`attention_times`' form, the
        context K/V read from each layer's index (cluster order: dense attention is order-free)."""
        missing = sorted(set(indexes) - set(self.steps))
        if missing:
            raise ValueError(f"no decode step was captured for layers {missing}")
        out = {}
        for li, ix in indexes.items():
            q, kt, vt, scale = self.steps[li]
            b = q.shape[0]
            kc = ix.keys[None].expand(b, -1, -1, -1)
            vc = ix.values[None].expand(b, -1, -1, -1)
            out[li] = (q[:, :, -1:], kc, vc, kt, vt, scale)
        return out


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def attention_times(
    inputs: dict, indexes: dict, repeats: int = 30, threads: int | None = 1
) -> tuple[float, float]:
    """(dense_ms, squeezed_ms): attention time of one decode step summed over the squeezed
    layers. Dense is the faster of GQA-packed matmul-softmax-matmul and SDPA on the packed view
    over [context, tail] (the K/V read once per KV head); squeezed is
    :func:`squeeze.squeezed_attention` with the layer's index (lookup, sparse read, tail, merge).
    Both on ``threads`` CPU threads (``None``: as set)."""
    from squeeze.attention import squeezed_attention

    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _attention_times(inputs, indexes, repeats, squeezed_attention)
    finally:
        torch.set_num_threads(saved)


def _attention_times(inputs, indexes, repeats, squeezed_attention):
    dense_s = sq_s = 0.0
    for li, index in indexes.items():
        q, kc, vc, kt, vt, scale = inputs[li]
        b, hq, _, d = q.shape
        hkv = kc.shape[1]
        packed = q.reshape(b, hkv, hq // hkv, d)
        k_all = torch.cat([kc, kt], 2).contiguous()
        v_all = torch.cat([vc, vt], 2).contiguous()

        def dense(packed=packed, k_all=k_all, v_all=v_all, scale=scale):
            s = torch.matmul(packed, k_all.transpose(-1, -2)) * scale
            torch.matmul(torch.softmax(s, -1), v_all)
            _sync(k_all.device)

        def sdpa(packed=packed, k_all=k_all, v_all=v_all, scale=scale):
            torch.nn.functional.scaled_dot_product_attention(packed, k_all, v_all, scale=scale)
            _sync(k_all.device)

        def squeezed(q=q, index=index, kt=kt, vt=vt, scale=scale):
            squeezed_attention(q, index, kt, vt, scale)
            _sync(kt.device)

        dense_s += min(_median_s(dense, repeats), _median_s(sdpa, repeats))
        sq_s += _median_s(squeezed, repeats)
    return dense_s * 1e3, sq_s * 1e3
