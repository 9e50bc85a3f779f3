"""The demo's results as a Markdown table and as a plot of accuracy and speedup against budget."""

from __future__ import annotations


def table(result: dict) -> str:
    """The demo's results as a Markdown table (one row per setting)."""
    lines = [
        "| attention | accuracy | agrees with dense | keys read | attention ms/step | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mark = " ◀" if r["budget"] == result["budget"] and r["name"] != "dense" else ""
        lines.append(
            f"| {r['name']}{mark} | {r['accuracy']:.1%} | {r['agree_dense']:.1%} "
            f"| {r['kv_fraction']:.1%} | {r['attn_ms']:.3f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """Accuracy and speedup against budget, as a PNG at ``path`` (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["name"] != "dense"]
    dense = result["rows"][0]
    xs = [r["budget"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [100 * r["accuracy"] for r in rows], "o-", color="C0", label="squeezed")
    ax.axhline(100 * dense["accuracy"], color="C0", ls="--", label="dense")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:.0%}" for x in xs])
    ax.minorticks_off()
    ax.set_ylim(min(0.0, 100 * min(r["accuracy"] for r in rows) - 5), 102)
    ax.set_xlabel("budget (share of clustered keys read)")
    ax.set_ylabel("accuracy (%)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["speedup"] for r in rows], "s-", color="C1")
    ax2.set_ylabel("attention speedup over dense (x)", color="C1")
    ax2.set_ylim(0, 1.15 * max(1.0, *(r["speedup"] for r in rows)))
    ax.set_title(f"{result['task']} task, {result['n_context']} tokens, {result['n_questions']} q")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
