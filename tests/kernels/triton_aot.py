"""Compile every Triton kernel ahead of time for sm_90 (H100/H200) without a GPU.

The interpreter runs kernels as NumPy code, so it cannot catch what only the GPU compiler rejects
(types of loop-carried values, dot shapes, shared memory). ``triton.compile`` with a
``GPUTarget`` lowers to PTX and, with the ptxas shipped in the triton wheel, to a cubin.
Run with ``TRITON_INTERPRET`` unset: ``python tests/kernels/triton_aot.py [--all]``; prints one line per
kernel variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import inspect
import sys
import warnings

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from squeeze.kernels.assign import triton as at
from squeeze.kernels.centroid_scores import triton as cst
from squeeze.kernels.centroid_update import triton as ct
from squeeze.kernels.merge import triton as mt
from squeeze.kernels.segments import triton as st
from squeeze.kernels.sparse_attention import triton as sat

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(kernel, ptrs, consts, floats=()):
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=TARGET, options={"num_warps": 4})


def variants(full: bool):
    attn = ("bf16", "fp16", "fp32") if full else ("bf16", "fp32")
    for dt in attn:
        for d in (64, 128) if full else (128,):
            ptrs = dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, seg_ptr="i64", seg_start="i64",
                        seg_cum="i64", tok_ptr="i64", chunk_ptr="i64",
                        o_part="fp32", lse_part="fp32")  # fmt: skip
            consts = dict(BLOCK_R=16, BLOCK_N=64, BLOCK_D=d, DOT_F32=dt == "fp32")
            yield f"sparse chunk {dt} D={d}", sat._chunk_kernel, ptrs, consts, ("qk_scale",)
    yield (
        "sparse reduce",
        sat._reduce_kernel,
        dict(o_part="fp32", lse_part="fp32", chunk_ptr="i64", out="fp32", lse="fp32"),
        dict(BLOCK_R=64, BLOCK_D=128),
        (),
    )
    for half in (True, False):
        yield (
            f"assign half={half}",
            at._assign_kernel,
            dict(x_ptr="bf16", c_ptr="fp32", hs_ptr="fp32", lab_ptr="i64", best_ptr="fp32"),
            dict(BLOCK_N=64, BLOCK_K=64, BLOCK_D=128, HAS_HALF=half, PRECISION="ieee"),
            (),
        )
    for w in (True, False):
        yield (
            f"centroid update w={w}",
            ct._segment_mean_kernel,
            dict(
                x_ptr="fp32",
                order_ptr="i64",
                w_ptr="fp32",
                start_ptr="i64",
                total_ptr="fp32",
                out_ptr="fp32",
            ),
            dict(BLOCK_M=32, BLOCK_D=128, HAS_W=w),
            (),
        )
    # centroids stored in bf16 (the default centroid_dtype) or fp32, with or without spreads
    scored = (("bf16", True), ("fp32", False), ("bf16", False), ("fp32", True))
    for cdt, spread in scored if full else scored[:2]:
        yield (
            f"centroid scores log_den c={cdt} spread={spread}",
            cst._log_den_kernel,
            dict(q_ptr="bf16", c_ptr=cdt, lc_ptr="fp32", extra_ptr="fp32", sp_ptr="fp32",
                 out_ptr="fp32"),
            dict(BLOCK_R=16, BLOCK_K=64, BLOCK_D=128, HAS_EXTRA=True, HAS_SPREAD=spread),
            ("scale",),
        )  # fmt: skip
        for rmax in (True, False):
            yield (
                f"centroid scores max={rmax} c={cdt} spread={spread}",
                cst._score_kernel,
                dict(
                    q_ptr="bf16",
                    c_ptr=cdt,
                    lc_ptr="fp32",
                    den_ptr="fp32",
                    sp_ptr="fp32",
                    score_ptr="fp32",
                    keep_ptr="i8",
                ),
                dict(
                    BLOCK_M=16, BLOCK_K=64, BLOCK_D=128, REDUCE_MAX=rmax, DECIDE=True,
                    HAS_SPREAD=spread,
                ),
                ("scale", "threshold", "log_m", "log_g"),
            )  # fmt: skip
    yield (
        "segments",
        st._segments_kernel,
        dict(keep_ptr="i8", off_ptr="i64", start_ptr="i64", end_ptr="i64"),
        dict(BLOCK_C=128),
        (),
    )
    yield (
        "merge",
        mt._merge_kernel,
        dict(
            oa_ptr="fp32",
            la_ptr="fp32",
            ob_ptr="fp32",
            lb_ptr="fp32",
            out_ptr="fp32",
            lse_ptr="fp32",
        ),
        dict(BLOCK_R=16, BLOCK_D=128),
        (),
    )


def main(argv) -> int:
    warnings.filterwarnings("ignore")
    for name, kernel, ptrs, consts, floats in variants("--all" in argv):
        try:
            k = compile_kernel(kernel, ptrs, consts, floats)
        except Exception as exc:
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            return 1
        print(f"ok   {name}: shared={k.metadata.shared} B")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
