"""Profile shares for ``bench_vllm.py --profile``: where one batch's CPU time goes, by part.

Timed with the process's CPU-time clock, so that waiting for a busy CPU (other work on a shared
machine) is not counted: the shares are meaningful under load, the absolute times less so.
A built-in (a torch op) is charged to the part of the Python function that called it.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from contextlib import contextmanager

#: (part, substrings of a function's file or name), first match wins
PARTS = (
    ("squeeze: centroid lookup", ("squeeze/lookup.py", "squeeze/kernels/centroid_scores")),
    ("squeeze: sparse attention", ("squeeze/kernels/sparse_attention", "squeeze/kernels/segments")),
    ("squeeze: tail gather", ("squeeze/patches/vllm/kv_layout.py", "paged.py:tail_index")),
    (
        "squeeze: tail attention + merge",
        ("squeeze/kernels/dense_attention", "squeeze/kernels/merge"),
    ),
    ("squeeze: plugin routing/python", ("squeeze/",)),
    ("vLLM attention kernel", ("cpu_attention_with_kv_cache", "v1/attention/")),
    ("vLLM weights (linear layers)", ("onednn_mm", "layers/linear.py", "vocab_parallel")),
    ("vLLM model other", ("model_executor/",)),
    ("vLLM engine/scheduler/runner", ("vllm/",)),
)


@contextmanager
def profiled(path: str):
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        prof.dump_stats(path)


def _part(func) -> str | None:
    filename, _line, name = func
    key = f"{filename}:{name}"
    if filename.endswith("paged.py"):
        key = f"paged.py:{name}"
    for part, needles in PARTS:
        if any(n in key for n in needles):
            return part
    return None


def shares(path: str) -> tuple[float, dict[str, float]]:
    """``(total seconds, {part: seconds})`` of a profile written by :func:`profiled`."""
    st = pstats.Stats(path).stats
    parts: dict[str, float] = {}
    for func, (_cc, _nc, tt, _ct, callers) in st.items():
        own = _part(func)
        if own is None and func[0] == "~" and callers:  # a built-in: charge its callers' parts
            # an op vLLM's own kernel wrapper calls keeps its name (e.g. onednn_mm)
            named = _part(("~", 0, func[2]))
            total = sum(c[2] for c in callers.values()) or 1.0
            for caller, c in callers.items():
                part = named or _part(caller) or "other"
                parts[part] = parts.get(part, 0.0) + tt * c[2] / total
            continue
        parts[own or "other"] = parts.get(own or "other", 0.0) + tt
    return sum(parts.values()), parts


def print_shares(path_k: str, path_1: str, title: str) -> dict:
    """Print and return the decode shares (the ``K``-token batch less the 1-token batch, which
    is the questions' prefill) and the prefill shares, by part."""
    total_k, parts_k = shares(path_k)
    total_1, parts_1 = shares(path_1)
    decode = {p: parts_k.get(p, 0.0) - parts_1.get(p, 0.0) for p in set(parts_k) | set(parts_1)}
    total_d = total_k - total_1
    print(f"\nprofile {title}: decode {total_d:.2f} s CPU, prefill {total_1:.2f} s CPU")
    for part, s in sorted(decode.items(), key=lambda kv: -kv[1]):
        pre = parts_1.get(part, 0.0)
        print(
            f"  {part:<34} decode {s:>6.2f} s {100 * s / total_d:>5.1f}%"
            f"   prefill {pre:>6.2f} s {100 * pre / max(total_1, 1e-9):>5.1f}%"
        )
    return {
        "decode_cpu_s": total_d,
        "prefill_cpu_s": total_1,
        "decode_shares": {p: s / total_d for p, s in decode.items()},
        "prefill_shares": {p: s / total_1 for p, s in parts_1.items()},
    }
