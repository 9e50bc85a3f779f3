"""What the CPU benchmarks share: the machine record, interleaved timing, speedup summaries.

Every benchmark's JSON carries :func:`machine` taken before and after its run (load average,
threads, CPU model, versions), and every timed row the CPU time other processes took while it
ran (:class:`Interference`). Speedups are never one ratio: :func:`interleaved` times dense and
squeezed in alternating rounds so that machine noise hits both alike, and :func:`speedup` reports
the median of the per-round ratios with their spread.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: a row is flagged when other processes kept this many cores busy on average while it ran
BUSY_CORES = 0.25


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """torch, transformers (when installed), squeeze and Python versions."""
    import squeeze

    out = {"torch": torch.__version__, "squeeze": squeeze.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    out["python"] = platform.python_version()
    return out


def machine() -> dict:
    """The machine as a benchmark sees it now: CPU model, logical CPUs, torch threads,
    ``OMP_WAIT_POLICY``, the 1/5/15-minute load averages and the versions."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg": list(os.getloadavg()),
        **versions(),
    }


def load_warning(meta: dict, threads: int) -> str | None:
    """A warning when a 1-minute load average (before or after the run) exceeds ``threads``
    (the most threads the run used), ``None`` on a quiet machine."""
    loads = [meta[k]["load_avg"][0] for k in ("before", "after") if k in meta]
    if max(loads, default=0.0) <= threads:
        return None
    return (
        f"WARNING: load average {'/'.join(f'{x:.2f}' for x in loads)} (before/after) exceeds "
        f"{threads} thread(s): the machine was busy, these figures are not results"
    )


class Interference:
    """CPU time the rest of the machine used while a block ran, from ``/proc/stat`` minus this
    process's own CPU time (``os.times``). ``cores``: the average number of cores others kept
    busy (steal time included); ``None`` where ``/proc/stat`` is missing."""

    cores: float | None = None

    def start(self) -> Interference:
        self._start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        self.cores = None
        return self

    def stop(self) -> float | None:
        busy0, own0, t0 = self._start
        busy1, own1, t1 = _busy_seconds(), _own_seconds(), time.perf_counter()
        if busy0 is not None and busy1 is not None and t1 > t0:
            self.cores = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)
        return self.cores

    def __enter__(self) -> Interference:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _busy_seconds() -> float | None:
    """Seconds all CPUs spent not idle since boot (``/proc/stat``), ``None`` where missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (``None``: unchanged); restored after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def calls_for(fn: Callable[[], object], min_sample_s: float) -> int:
    """How many back-to-back calls of ``fn`` one timed sample needs to last ``min_sample_s``.

    Calls ``fn`` once as a warm-up; when that call alone lasts ``min_sample_s`` the answer is 1,
    otherwise one more call is timed to decide (so slow functions are not run twice here).
    """
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    if once < min_sample_s:
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
    return max(1, min(1000, int(min_sample_s / max(once, 1e-9)) + 1))


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    min_sample_s: float = 0.02,
    before: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each ``fn``, one sample per round: ``{name: [rounds floats]}``.

    Every round times each function once (a sample of as many calls as it needs to last
    ``min_sample_s``), in the listed order on even rounds and reversed on odd ones, so that a
    drift in the machine's speed falls on every function alike. Warm-up happens in
    :func:`calls_for`. ``before`` (untimed, e.g. flushing the caches) runs before every sample,
    and then a sample is one call.
    """
    calls = {name: 1 if before else calls_for(fn, min_sample_s) for name, fn in fns.items()}
    if before:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            fn, n = fns[name], calls[name]
            if before:
                before()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return times


def speedup(dense: list[float], squeezed: list[float]) -> dict:
    """The per-round ratios ``dense[i] / squeezed[i]``: median, min, max, quartiles, count."""
    ratios = [d / s for d, s in zip(dense, squeezed, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {
        "speedup": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "speedup_q1": q1,
        "speedup_q3": q3,
        "pairs": len(ratios),
    }


def best_of(times: dict[str, list[float]], names: list[str]) -> str:
    """The one of ``names`` with the lowest median time."""
    return min(names, key=lambda name: statistics.median(times[name]))


def spread_text(row: dict) -> str:
    """``"2.91x [2.80-3.02]"``: a row's median speedup and its min-max."""
    return f"{row['speedup']:.2f}x [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]"


def close(meta: dict, threads: int, t_start: float | None = None) -> dict:
    """``meta`` completed at the end of a run: the machine after it, its wall time (from
    ``t_start``, a ``time.perf_counter()``), and the load warning for ``threads``."""
    meta["after"] = machine()
    if t_start is not None:
        meta["wall_s"] = time.perf_counter() - t_start
    meta["load_warning"] = load_warning(meta, threads)
    return meta


def write_json(path, meta: dict, rows: list[dict]) -> None:
    """``{"meta": meta, "rows": rows}`` at ``path`` (parents created), with the command line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "argv": sys.argv[1:]}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
