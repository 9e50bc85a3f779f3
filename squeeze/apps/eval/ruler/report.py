"""Summaries of a RULER run: per configuration and length, each task's score and their mean (see
:mod:`.scoring`), the mean over lengths, KV fraction read and wall times; a text table, a JSON
file and a plot of score against budget, one line per length."""

from __future__ import annotations

from pathlib import Path

from .. import summary as shared
from ..summary import write_results
from .tasks import TASK_NAMES, Task

__all__ = ["format_table", "plot", "summarize", "write_results"]


def summarize(out_dir, configs, keys: dict[Task, list[str]]) -> dict:
    """Read the files of ``configs`` for the records ``keys`` names (per task and length)."""
    lengths = sorted({t.length for t in keys})
    summary = {
        "lengths": lengths,
        "tasks": [n for n in TASK_NAMES if any(t.name == n for t in keys)],
        "configs": {},
    }
    for cfg in configs:
        by_length, every = {}, []
        for length in lengths:
            tasks, lines_here = {}, []
            for task, wanted in keys.items():
                if task.length == length:
                    lines = shared.task_lines(out_dir, cfg, task, wanted)
                    lines_here += lines
                    tasks[task.name] = shared.task_entry(lines, len(wanted))
            every += lines_here
            by_length[length] = {
                "tasks": tasks,
                "score": shared.r2(shared.mean(e["score"] for e in tasks.values())),
                "kv_fraction": shared.mean(x["kv_fraction"] for x in lines_here),
            }
        summary["configs"][cfg.name] = {
            "budget": cfg.budget,
            "mode": cfg.mode,
            "lengths": by_length,
            "score": shared.r2(shared.mean(v["score"] for v in by_length.values())),
            "kv_fraction": shared.mean(x["kv_fraction"] for x in every),
            "time_s": sum(x["time_s"] for x in every),
            "compile_s": sum(x["compile_s"] for x in every),
            "records": len(every),
        }
    return summary


def format_table(summary: dict) -> str:
    """One column per configuration; per length, a row per task and their mean; then the mean
    over lengths, KV fraction read, wall times and records."""
    names = list(summary["configs"])
    cfgs = [summary["configs"][n] for n in names]
    rows: list[tuple[str, list[str]]] = []
    for length in summary["lengths"]:
        for t in summary["tasks"]:
            cells = [c["lengths"][length]["tasks"].get(t, {}).get("score") for c in cfgs]
            rows.append((f"{length:>6} {t}", [shared.fmt(x) for x in cells]))
        n = len(summary["tasks"])
        rows.append(
            (
                f"{length:>6} mean of {n} tasks",
                [shared.fmt(c["lengths"][length]["score"]) for c in cfgs],
            )
        )
    rows.append(
        (f"mean over lengths ({len(summary['lengths'])})", [shared.fmt(c["score"]) for c in cfgs])
    )
    rows.append(("KV fraction read", [shared.fmt(c["kv_fraction"], 3) for c in cfgs]))
    rows.append(("generate wall time (s)", [shared.fmt(c["time_s"], 1) for c in cfgs]))
    rows.append(("compile wall time (s)", [shared.fmt(c["compile_s"], 1) for c in cfgs]))
    rows.append(("records", [str(c["records"]) for c in cfgs]))
    return shared.render_table(names, rows, first="length task")


def plot(summary: dict, out_dir) -> Path | None:
    """Mean score against budget: per length a line per mode, and the dense score as a dashed
    line of the same colour (PNG)."""
    plt = shared.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", ":", "-.")
    for i, length in enumerate(summary["lengths"]):
        color = colors[i % len(colors)]
        by_mode: dict[str, list[tuple[float, float]]] = {}
        for c in summary["configs"].values():
            score = c["lengths"][length]["score"]
            if c["budget"] is None:
                ax.axhline(
                    score, color=color, linestyle="--", linewidth=1, label=f"{length}: dense"
                )
            else:
                by_mode.setdefault(c["mode"], []).append((c["budget"], score))
        for j, (mode, points) in enumerate(sorted(by_mode.items())):
            points.sort()
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                color=color,
                linestyle=styles[j % len(styles)],
                label=f"{length}: squeeze ({mode})",
            )
    ax.set_xscale("log")
    ax.set_xlabel("budget (fraction of clustered keys read)")
    ax.set_ylabel(f"RULER mean of {len(summary['tasks'])} tasks")
    return shared.save_plot(plt, fig, ax, out_dir, fontsize=7)
