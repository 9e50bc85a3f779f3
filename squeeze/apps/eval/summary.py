"""What the families' reports share: task scores from a run's files, a text table, a JSON file,
and matplotlib for the plots."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .results import RunConfig, output_path, read_results

logger = logging.getLogger("squeeze.eval")
#: a run's summary and plot, in its output directory
RESULTS = "results.json"
PLOT = "score_vs_budget.png"


def mean(values) -> float:
    """The mean of the values that are not None or NaN; NaN when none is left."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def r2(x: float) -> float:
    """``x`` rounded to 2 decimals (NaN stays NaN)."""
    return round(x, 2) if not math.isnan(x) else x


def task_score(scores) -> float:
    """A task's score from its records' scores in [0, 1]: ``round(100 * mean, 2)``; NaN for no
    records (LongBench's and RULER's rule)."""
    scores = list(scores)
    return round(100 * sum(scores) / len(scores), 2) if scores else math.nan


def task_lines(out_dir, cfg: RunConfig, task, wanted: list[str]) -> list[dict]:
    """The result lines of ``cfg`` on ``task`` for the record keys ``wanted``, in their order."""
    done = read_results(output_path(Path(out_dir), cfg, task))
    return [done[k] for k in wanted if k in done]


def task_entry(lines: list[dict], wanted: int) -> dict:
    """One task's summary: score, records (and how many of ``wanted`` are missing), mean KV
    fraction read, generate and compile seconds."""
    return {
        "score": task_score(x["score"] for x in lines),
        "records": len(lines),
        "missing": wanted - len(lines),
        "kv_fraction": mean(x["kv_fraction"] for x in lines),
        "time_s": sum(x["time_s"] for x in lines),
        "compile_s": sum(x["compile_s"] for x in lines),
    }


def fmt(x, digits: int = 2) -> str:
    """A number for a table cell; ``-`` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def render_table(names: list[str], rows: list[tuple[str, list[str]]], first: str = "task") -> str:
    """A text table: a header row (``first`` and the column ``names``), a rule, then ``rows`` of
    (label, one cell per column); labels left-aligned, cells right-aligned."""
    width = max([len(r[0]) for r in rows] + [len(first), 4])
    cols = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]

    def line(label: str, cells: list[str]) -> str:
        return "  ".join(
            [label.ljust(width), *(c.rjust(w) for c, w in zip(cells, cols, strict=True))]
        )

    out = [line(first, names), "-" * (width + sum(cols) + 2 * len(cols))]
    return "\n".join(out + [line(label, cells) for label, cells in rows])


def nan_to_none(obj):
    """``obj`` with every NaN float, however nested in dicts and lists, replaced by None."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_none(v) for v in obj]
    return obj


def write_json(summary: dict, path) -> Path:
    """Write ``summary`` as indented JSON (NaN as null)."""
    path = Path(path)
    path.write_text(json.dumps(nan_to_none(summary), indent=2, ensure_ascii=False) + "\n")
    return path


def write_results(summary: dict, out_dir) -> Path:
    """Write ``summary`` to ``<out_dir>/results.json``."""
    return write_json(summary, Path(out_dir) / RESULTS)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (logged) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("squeeze.eval: matplotlib is not installed; no plot written")
        return None
    return plt


def save_plot(plt, fig, ax, out_dir, **legend) -> Path:
    """Add the legend (``legend``: its keyword arguments) and a light grid, save ``fig`` as a
    120-dpi PNG at ``<out_dir>/score_vs_budget.png`` and close it."""
    ax.legend(**legend)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / PLOT
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
