"""The demo's results: a Markdown table, the line that says why squeezed is slower where it is,
and a plot of accuracy and speed against budget."""

from __future__ import annotations

HEADER = (
    "| attention | accuracy | agrees with dense | keys read | bytes read | attention ms/step "
    "| attention speedup | tokens/s | end-to-end speedup |"
)


def table(result: dict) -> str:
    """The demo's results as a Markdown table (one row per setting; ◀ marks the chosen budget)."""
    lines = [HEADER, "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mark = " ◀" if r["budget"] == result["budget"] and r["name"] != "dense" else ""
        lines.append(
            f"| {r['name']}{mark} | {r['accuracy']:.1%} | {r['agree_dense']:.1%} "
            f"| {r['kv_fraction']:.1%} | {r['bytes_fraction']:.1%} | {r['attn_ms']:.2f} "
            f"| {r['attn_speedup']:.2f}x | {r['tokens_per_s']:.2f} | {r['e2e_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def by_kind(result: dict) -> str:
    """Right answers per kind of question, dense and at the chosen budget."""
    parts = []
    for r in result["rows"]:
        if r["name"] == "dense" or r["budget"] == result["budget"]:
            kinds = ", ".join(f"{k} {a}/{n}" for k, (a, n) in r["by_kind"].items())
            parts.append(f"{r['name']}: {kinds}")
    return "right answers by kind: " + "; ".join(parts)


def speed_notes(result: dict, n_layers: int, kv_heads: int, head_dim: int) -> list[str]:
    """Lines on the speed at the chosen budget: why squeezed is slower (attention, end to end),
    and what an end-to-end gain comes from when attention itself is slower."""
    rows = [r for r in result["rows"] if r["name"] != "dense" and r["budget"] == result["budget"]]
    if not rows:
        return []
    r, dense = rows[0], result["rows"][0]
    n = result["n_context"]
    mb = 2 * n * kv_heads * head_dim * 4 / 1e6  # fp32 K and V of one layer
    d_layer, s_layer = dense["attn_ms"] / n_layers, r["attn_ms"] / n_layers
    lines = []
    if r["attn_speedup"] < 1:
        lines.append(
            f"why slower: dense attention over {n} tokens x {kv_heads} KV heads x {head_dim} dims "
            f"reads only {mb:.1f} MB per layer ({d_layer:.2f} ms); a squeezed call takes "
            f"{s_layer:.2f} ms per layer though it reads {r['kv_fraction']:.0%} of the keys "
            f"(~{d_layer * r['kv_fraction']:.2f} ms at dense's rate): the rest is its fixed "
            "per-call work (lookup, segments, the tail and its merge), which more KV heads and "
            "longer contexts amortise (`squeeze bench attention`)"
        )
    if r["e2e_speedup"] < 1:
        lines.append(
            f"why slower end to end: a squeezed token costs {1e3 / r['tokens_per_s']:.0f} ms "
            f"against dense's {1e3 / dense['tokens_per_s']:.0f} ms (question prefill included); "
            f"attention saves {dense['attn_ms'] - r['attn_ms']:.1f} ms of it per step, less than "
            "the squeezed cache's per-step work costs"
        )
    elif r["attn_speedup"] < 1:
        lines.append(
            "why faster end to end although attention is slower: the dense row is transformers' "
            "own decode, which copies the context's K/V every step (its cache grows by "
            "concatenation, its attention repeats the KV heads for GQA); squeezed decode makes no "
            "such copies. Against packed dense attention (the ms column) squeezed is slower here."
        )
    return lines


def plot(result: dict, path) -> None:
    """Accuracy, agreement and speedups against budget, as a PNG at ``path`` (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["name"] != "dense"]
    dense = result["rows"][0]
    xs = [r["budget"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(xs, [100 * r["accuracy"] for r in rows], "o-", color="C0", label="accuracy")
    ax.plot(xs, [100 * r["agree_dense"] for r in rows], "^:", color="C0", label="agrees w/ dense")
    ax.axhline(100 * dense["accuracy"], color="C0", ls="--", lw=1, label="dense accuracy")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:.0%}" for x in xs])
    ax.minorticks_off()
    ax.set_ylim(0, 105)
    ax.set_xlabel("budget (share of clustered keys read)")
    ax.set_ylabel("% of questions", color="C0")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["attn_speedup"] for r in rows], "s-", color="C1", label="attention speedup")
    ax2.plot(xs, [r["e2e_speedup"] for r in rows], "d-", color="C3", label="end-to-end speedup")
    ax2.axhline(1.0, color="gray", lw=0.5)
    top = max(1.0, *(r["attn_speedup"] for r in rows), *(r["e2e_speedup"] for r in rows))
    ax2.set_ylim(0, 1.15 * top)
    ax2.set_ylabel("speedup over dense (x)", color="C1")
    ax.set_title(
        f"{result['source']}: {result['n_context']} tokens, {result['n_questions']} questions"
    )
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
