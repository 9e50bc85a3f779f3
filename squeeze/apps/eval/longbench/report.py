"""Summaries of a run: per-task scores (LongBench's ``round(100 * mean, 2)``), LongBench-E length
buckets, the English and Chinese averages (plain and by category, both labelled), KV fraction
read, wall time, rouge failures; a text table, a JSON file and a score-against-budget plot."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from ..summary import (
    fmt,
    mean,
    pyplot,
    r2,
    render_table,
    save_plot,
    task_entry,
    task_lines,
    write_results,
)
from .metrics import bucket_scores
from .tasks import CATEGORIES, CHINESE_TASKS, ENGLISH_TASKS, Task

__all__ = ["averages", "format_table", "headline", "plot", "summarize", "write_results"]


def averages(task_scores: dict[str, float]) -> dict[str, dict]:
    """The English (16 tasks) and Chinese (LongBench's: 5 tasks + code) averages of the tasks
    present: the plain mean of task scores and the mean of category means, with their counts."""
    out = {}
    for label, group, full in (
        ("en", ENGLISH_TASKS, len(ENGLISH_TASKS)),
        ("zh", CHINESE_TASKS, len(CHINESE_TASKS)),
    ):
        present = {t: s for t, s in task_scores.items() if t in group and not math.isnan(s)}
        if not present:
            continue
        cats = {
            c: mean([present[t] for t in names if t in present])
            for c, names in CATEGORIES.items()
            if any(t in present for t in names)
        }
        n_cats = sum(1 for names in CATEGORIES.values() if any(t in group for t in names))
        out[label] = {
            "mean": r2(mean(present.values())),
            "category_mean": r2(mean(cats.values())),
            "categories": {c: r2(v) for c, v in cats.items()},
            "tasks": len(present),
            "of_tasks": full,
            "of_categories": n_cats,
        }
    return out


def summarize(out_dir, configs, keys: dict[Task, list[str]]) -> dict:
    """Read the per-record files of ``configs`` for the records ``keys`` names, and aggregate."""
    out_dir = Path(out_dir)
    summary = {"configs": {}}
    for cfg in configs:
        tasks, all_lines = {}, []
        for task, wanted in keys.items():
            lines = task_lines(out_dir, cfg, task, wanted)
            all_lines += lines
            failures = Counter(f for x in lines for f in x.get("metric_failures", []))
            entry = {**task_entry(lines, len(wanted)), "rouge_failures": dict(failures)}
            if task.longbench_e:
                scores = [x["score"] for x in lines]
                entry["buckets"] = bucket_scores(scores, [x["length"] for x in lines])
            tasks[task.data_name] = entry
        # averages over the v1 tasks run, or over the LongBench-E tasks if no v1 task ran
        v1 = [t for t in keys if not t.longbench_e]
        by_name = {t.name: tasks[t.data_name]["score"] for t in (v1 or list(keys))}
        summary["configs"][cfg.name] = {
            "budget": cfg.budget,
            "mode": cfg.mode,
            "tasks": tasks,
            "averages": averages(by_name),
            "averages_over": "v1" if v1 else "longbench-e",
            "kv_fraction": mean(x["kv_fraction"] for x in all_lines),
            "time_s": sum(x["time_s"] for x in all_lines),
            "compile_s": sum(x["compile_s"] for x in all_lines),
            "rouge_failures": dict(
                Counter(f for x in all_lines for f in x.get("metric_failures", []))
            ),
            "records": len(all_lines),
        }
    return summary


def format_table(summary: dict) -> str:
    """One column per configuration; one row per task, then averages, KV fraction, time."""
    names = list(summary["configs"])
    cfgs = [summary["configs"][n] for n in names]
    tasks = list(cfgs[0]["tasks"]) if cfgs else []
    rows: list[tuple[str, list[str]]] = []
    for t in tasks:
        rows.append((t, [fmt(c["tasks"][t]["score"]) for c in cfgs]))
        if "buckets" in cfgs[0]["tasks"][t]:
            for b in cfgs[0]["tasks"][t]["buckets"]:
                rows.append((f"  {t} {b}", [fmt(c["tasks"][t]["buckets"][b]) for c in cfgs]))
    suite = "LongBench-E " if cfgs and cfgs[0].get("averages_over") == "longbench-e" else ""
    for lang, title in (("en", f"{suite}English"), ("zh", f"{suite}Chinese")):
        avg = [c["averages"].get(lang) for c in cfgs]
        if not any(avg):
            continue
        a = next(x for x in avg if x)
        rows.append(
            (
                f"{title} mean of tasks ({a['tasks']}/{a['of_tasks']} tasks)",
                [fmt(x["mean"]) if x else "-" for x in avg],
            )
        )
        n_cats = len(a["categories"])
        rows.append(
            (
                f"{title} mean of category means ({n_cats}/{a['of_categories']} cat.)",
                [fmt(x["category_mean"]) if x else "-" for x in avg],
            )
        )
    rows.append(("KV fraction read", [fmt(c["kv_fraction"], 3) for c in cfgs]))
    rows.append(("generate wall time (s)", [fmt(c["time_s"], 1) for c in cfgs]))
    rows.append(("compile wall time (s)", [fmt(c["compile_s"], 1) for c in cfgs]))
    rows.append(
        (
            "rouge failures scored 0",
            [
                ",".join(f"{k}:{v}" for k, v in sorted(c["rouge_failures"].items())) or "0"
                for c in cfgs
            ],
        )
    )
    rows.append(("records", [str(c["records"]) for c in cfgs]))
    return render_table(names, rows)


def headline(cfg_summary: dict) -> tuple[float, str]:
    """The score a plot shows: the English plain mean, else the Chinese one, else the task mean."""
    for lang, label in (("en", "English mean of tasks"), ("zh", "Chinese mean of tasks")):
        a = cfg_summary["averages"].get(lang)
        if a:
            return a["mean"], f"{label} ({a['tasks']} tasks)"
    return mean(t["score"] for t in cfg_summary["tasks"].values()), "mean of tasks"


def plot(summary: dict, out_dir) -> Path | None:
    """Score against budget, one line per mode, the dense baseline as a horizontal line (PNG)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    label = "score"
    by_mode: dict[str, list[tuple[float, float]]] = {}
    for c in summary["configs"].values():
        value, label = headline(c)
        if c["budget"] is None:
            ax.axhline(value, color="black", linestyle="--", label="dense")
        else:
            by_mode.setdefault(c["mode"], []).append((c["budget"], value))
    for mode, points in by_mode.items():
        points.sort()
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], marker="o", label=f"squeeze ({mode})"
        )
    ax.set_xlabel("budget (fraction of clustered keys read)")
    ax.set_ylabel(f"LongBench {label}")
    return save_plot(plt, fig, ax, out_dir)
