"""Answer questions over one long context with dense and with squeezed attention, side by side.

The building blocks of ``squeeze demo`` and ``benchmarks/needle_eval.py``:

- :func:`make_task`: a context and questions with known answers. On the shipped needle model
  (:func:`squeeze.demo_model` ``("needle")``) these are key→value records and ``? key :`` questions; on any
  other model (or a ``--context-file``) a question quotes a span of the context and the answer
  is the token that follows it there, a retrieval task every language model can do.
- :func:`dense_answers`: first answer token with the model's own attention (context prefilled
  once, questions batched over copies of its cache).
- :func:`squeezed_answers`: the same through a compiled :class:`squeeze.SqueezedContext`.
- :func:`attention_times`: milliseconds of attention per decode step, summed over layers, dense
  (GQA-packed, the CPU baseline of DESIGN.md) against squeezed, on the real queries and K/V.

Imports torch and transformers.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import needle


@dataclass
class Task:
    """Context and questions.

    Attributes:
        context_ids: ``[N]`` int64 context token ids.
        questions: ``[Tq]`` int64 id tensors, one per question.
        answers: the expected first answer token of each question.
        kind: ``"needle"`` (key→value records) or ``"quote"`` (continue a quoted span).
        sources: per question, the context position whose key holds the answer (needle: the
            record's value token; quote: the answer token itself).
    """

    context_ids: torch.Tensor
    questions: list[torch.Tensor]
    answers: list[int]
    kind: str
    sources: list[int]


def is_needle_tokenizer(tokenizer) -> bool:
    """True when ``tokenizer`` maps every needle word to its own id (the shipped model's)."""
    vocab = tokenizer.get_vocab()
    return all(vocab.get(w) == i for i, w in enumerate(needle.WORDS))


def make_task(
    tokenizer, n_tokens: int, n_questions: int, seed: int, text: str | None = None
) -> Task:
    """A :class:`Task` of about ``n_tokens`` context tokens and ``n_questions`` questions.

    With the needle tokenizer: a fresh needle context of ``n_tokens`` tokens, or the records of
    ``text``. With any other tokenizer the context is ``text`` tokenized (cut to ``n_tokens``;
    default: a needle context written out as words) and the questions are quotes (see the
    module docstring).
    """
    rng = np.random.default_rng(seed)
    if is_needle_tokenizer(tokenizer):
        if text is None:
            ctx = needle.make_context(rng, n_tokens, density=0.25)
        else:  # the records written in the text (keys that occur once, followed by a value)
            ids = np.asarray(tokenizer(text).input_ids[:n_tokens], dtype=np.int64)
            ctx = needle.parse_context(ids)
            if not ctx.records:
                raise ValueError("the context file holds no 'key value' records (e.g. k017 v342)")
        qs, ans = needle.make_questions(rng, ctx, n_questions)
        src = [ctx.positions[int(q[1])] + 1 for q in qs]
        return Task(
            torch.from_numpy(ctx.ids), [torch.from_numpy(q) for q in qs], ans, "needle", src
        )
    if text is None:
        text = needle.decode(needle.make_context(rng, n_tokens, density=0.25).ids[1:])
    ids = tokenizer(text, add_special_tokens=True, return_tensors="pt").input_ids[0]
    ids = ids[:n_tokens]
    span = 8
    if ids.numel() < 4 * span:
        raise ValueError(f"the context has {ids.numel()} tokens, too few to quote from")
    # quotes end before the last 100 tokens (the window squeeze always reads densely)
    hi = max(span + 1, ids.numel() - 100)
    ends = rng.choice(np.arange(span, hi), size=min(n_questions, hi - span), replace=False)
    qs = [ids[e - span : e].clone() for e in ends]
    return Task(ids, qs, [int(ids[e]) for e in ends], "quote", [int(e) for e in ends])


@torch.no_grad()
def dense_answers(model, context_ids: torch.Tensor, questions, batch: int = 64) -> list[int]:
    """Greedy first answer token of every question, model's own attention (exact, no squeeze).

    Questions of one length share a batch: the context's cache is copied ``batch`` times.
    """
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    prefill = model(context_ids[None].to(device), use_cache=True).past_key_values
    out: list[int | None] = [None] * len(questions)
    by_len: dict[int, list[int]] = {}
    for i, q in enumerate(questions):
        by_len.setdefault(q.numel(), []).append(i)
    for idx in by_len.values():
        for s in range(0, len(idx), batch):
            rows = idx[s : s + batch]
            cache = DynamicCache()
            for li, layer in enumerate(prefill.layers):
                k = layer.keys.expand(len(rows), -1, -1, -1)
                cache.update(k, layer.values.expand(len(rows), -1, -1, -1), li)
            q = torch.stack([questions[i] for i in rows]).to(device)
            logits = model(q, past_key_values=cache).logits[:, -1]
            for r, tok in zip(rows, logits.argmax(-1).tolist(), strict=True):
                out[r] = tok
    return out  # type: ignore[return-value]


def squeezed_answers(sctx, questions, batch: int = 64) -> list[int]:
    """Greedy first answer token of every question through a compiled squeezed context."""
    out = []
    for s in range(0, len(questions), batch):
        got = sctx.generate(list(questions[s : s + batch]), max_new_tokens=1, do_sample=False)
        out += [int(a[0]) if a.numel() else -1 for a in got]
    return out


def accuracy(pred, answers) -> float:
    return sum(int(p == a) for p, a in zip(pred, answers, strict=True)) / max(len(answers), 1)


# ---- attention timing ------------------------------------------------------------------------
_probed: dict[int, tuple] = {}


def _probe(module, query, key, value, attention_mask, **kwargs):
    """sdpa that records every layer's post-RoPE q/k/v and scale."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _probed[module.layer_idx] = (query.detach(), key.detach(), value.detach(), kwargs["scaling"])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def decode_inputs(model, context_ids: torch.Tensor, question: torch.Tensor) -> dict:
    """Per layer, the decode step of the question's last token: ``q [1, Hq, 1, D]``, context
    ``k, v [1, Hkv, N, D]``, tail ``k, v [1, Hkv, Tq, D]`` and the softmax scale."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("squeeze_demo_probe", _probe)
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    saved = [(c, c._attn_implementation_internal) for c in configs]
    for c, _ in saved:
        c._attn_implementation_internal = "squeeze_demo_probe"
    try:
        _probed.clear()
        device = next(model.parameters()).device
        model(torch.cat([context_ids, question])[None].to(device))
    finally:
        for c, impl in saved:
            c._attn_implementation_internal = impl
    n = context_ids.numel()
    return {
        i: (q[:, :, -1:], k[:, :, :n], v[:, :, :n], k[:, :, n:], v[:, :, n:], s)
        for i, (q, k, v, s) in sorted(_probed.items())
    }


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


def attention_times(inputs: dict, indexes: dict, repeats: int = 30) -> tuple[float, float]:
    """(dense_ms, squeezed_ms): attention time of one decode step summed over the squeezed
    layers. Dense is GQA-packed matmul-softmax-matmul over [context, tail] (the K/V read once per
    KV head); squeezed is :func:`squeeze.squeezed_attention` with the layer's index (lookup,
    sparse read, tail, merge). One thread on CPU for both."""
    from .attention import squeezed_attention

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only wait on a second thread (a shared CPU)
    try:
        return _attention_times(inputs, indexes, repeats, squeezed_attention)
    finally:
        torch.set_num_threads(threads)


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

        def squeezed(q=q, index=index, kt=kt, vt=vt, scale=scale):
            squeezed_attention(q, index, kt, vt, scale)
            _sync(kt.device)

        dense_s += _median_s(dense, repeats)
        sq_s += _median_s(squeezed, repeats)
    return dense_s * 1e3, sq_s * 1e3


# ---- the demo --------------------------------------------------------------------------------
BUDGETS = (0.02, 0.05, 0.1, 0.2, 0.4)


def load_model(path, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a local directory or hub name, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return model.to(device).eval(), AutoTokenizer.from_pretrained(str(path))


def run(
    model,
    tokenizer,
    *,
    tokens: int = 4096,
    questions: int = 100,
    budget: float = 0.1,
    budgets=BUDGETS,
    seed: int = 1234,
    text: str | None = None,
    window: int = 100,
    mode: str = "threshold",
    centroid_ratio: float = 0.05,
    levels: int = 2,
    timing_questions: int = 3,
    progress: bool = True,
    log=print,
) -> dict:
    """Dense, then squeezed at every budget in ``budgets`` and ``budget``, on one task.

    Returns ``{"task", "n_context", "n_questions", "stages" (seconds), "rows"}``; a row is
    ``{"name", "budget", "accuracy", "kv_fraction", "attn_ms", "speedup", "agree_dense"}``
    (``kv_fraction``: share of the context's keys read, window included, mean over layers).
    """
    from .config import SqueezeConfig
    from .patches.hf import compile as squeeze_compile

    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    task = make_task(tokenizer, tokens, questions, seed, text=text)
    stages["task_s"] = time.perf_counter() - t0
    n = task.context_ids.numel()
    log(f"context: {n} tokens ({task.kind} task), {len(task.questions)} questions")

    t0 = time.perf_counter()
    dense_pred = dense_answers(model, task.context_ids, task.questions)
    stages["dense_answers_s"] = time.perf_counter() - t0
    log(f"dense answers: {stages['dense_answers_s']:.1f}s")

    cfg = SqueezeConfig(
        budget=budget,
        window=min(window, n // 4),
        mode=mode,
        centroid_ratio=centroid_ratio,
        l1_ratio=centroid_ratio / 5 if levels == 2 else None,
    )
    t0 = time.perf_counter()
    sctx = squeeze_compile(model, task.context_ids, cfg, progress=progress)
    stages["compile_s"] = time.perf_counter() - t0
    ct = sctx.stats()["timings"]
    log(
        "compile: "
        + ", ".join(
            f"{k.removeprefix('compile_').removesuffix('_s')} {v:.1f}s"
            for k, v in ct.items()
            if k.startswith("compile_")
        )
    )
    t0 = time.perf_counter()
    picks = np.random.default_rng(seed + 1).choice(
        len(task.questions), size=min(timing_questions, len(task.questions)), replace=False
    )
    inputs = [decode_inputs(model, task.context_ids, task.questions[i]) for i in picks]
    rows = [
        dict(
            name="dense",
            budget=1.0,
            accuracy=accuracy(dense_pred, task.answers),
            kv_fraction=1.0,
            attn_ms=None,
            speedup=1.0,
            agree_dense=1.0,
        )
    ]
    dense_ms_all = []
    for b in sorted({*budgets, budget}):
        view = sctx.with_config(budget=b)
        pred = squeezed_answers(view, task.questions)
        st = view.stats()
        times = [attention_times(x, view.indexes) for x in inputs]
        d_ms = statistics.mean(t[0] for t in times)
        s_ms = statistics.mean(t[1] for t in times)
        dense_ms_all.append(d_ms)
        rows.append(
            dict(
                name=f"squeezed {b:.0%}",
                budget=b,
                accuracy=accuracy(pred, task.answers),
                kv_fraction=st["kv_fraction"],
                attn_ms=s_ms,
                speedup=d_ms / s_ms,
                agree_dense=accuracy(pred, dense_pred),
            )
        )
    rows[0]["attn_ms"] = statistics.mean(dense_ms_all)
    stages["squeezed_s"] = time.perf_counter() - t0
    return dict(
        task=task.kind,
        n_context=n,
        n_questions=len(task.questions),
        budget=budget,
        config=cfg.to_dict(),
        stages=stages,
        compile_timings=ct,
        rows=rows,
    )


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
