"""The measurements of ``benchmarks/fidelity_real.py``: real texts, continuation perplexity in the
decode and prefill regimes, passkey retrieval, greedy agreement, and the softmax mass on the keys
read, per layer and KV head.

Everything runs through the product's own path: ``squeeze.compile`` once per context, then
``ctx.cache()`` (teacher forcing, one token per forward, or one block) and ``ctx.generate``. The
dense reference is the same model, unpatched attention, over a prefilled ``DynamicCache``.
"""

from __future__ import annotations

import copy
import inspect
import math
import random
from dataclasses import dataclass

import torch

from squeeze.kernels.segments import segments
from squeeze.lookup import select

# ---------------------------------------------------------------------------------------- texts


def pydoc_text() -> str:
    """CPython's own documentation (``pydoc_data.topics``, about 465K characters), in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def stdlib_code() -> str:
    """Source files of the standard library (a code base as context), in a fixed order."""
    import importlib

    names = [
        "argparse",
        "typing",
        "dataclasses",
        "inspect",
        "difflib",
        "textwrap",
        "pathlib",
        "logging.__init__",
        "json.decoder",
        "ast",
        "collections.__init__",
        "functools",
    ]
    out = []
    for name in names:
        try:
            mod = importlib.import_module(name.removesuffix(".__init__"))
            out.append(f"# ---- {name}.py\n" + inspect.getsource(mod))
        except (ImportError, OSError, TypeError):
            continue
    return "\n\n".join(out)


SOURCES = {"docs": pydoc_text, "code": stdlib_code}


@dataclass(frozen=True)
class Sample:
    """A context and the text that follows it: ``ctx [N]`` and ``cont [C]`` int64 token ids."""

    label: str
    ctx: torch.Tensor
    cont: torch.Tensor


def text_samples(tok, text: str, label: str, n_ctx: int, n_cont: int, count: int, seed: int):
    """``count`` disjoint windows of ``n_ctx + n_cont`` tokens of ``text``, at seeded offsets."""
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.int64)
    span = n_ctx + n_cont
    slots = ids.numel() // span
    if slots < count:
        raise ValueError(
            f"{label}: {ids.numel()} tokens hold {slots} windows of {span}, not {count}"
        )
    picks = sorted(random.Random(seed).sample(range(slots), count))
    return [
        Sample(f"{label}@{s * span}", ids[s * span : s * span + n_ctx],
               ids[s * span + n_ctx : s * span + span])
        for s in picks
    ]  # fmt: skip


# ---------------------------------------------------------------------------------- perplexity


def cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def dense_prefix(model, ctx_ids: torch.Tensor):
    """A ``DynamicCache`` holding the context, computed with the model's own attention."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)  # a patched model is dense over a DynamicCache
    model(input_ids=ctx_ids[None], use_cache=True, **{cache_kwarg(model): cache})
    return cache


@torch.no_grad()
def block_logp(model, cache, cont: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[C - 1, V]`` fp32 of ``cont[1:]``, ``cont`` fed as one block."""
    out = model(input_ids=cont[None], use_cache=True, **{cache_kwarg(model): cache})
    return torch.log_softmax(out.logits[0, :-1].float(), -1)


@torch.no_grad()
def stepwise_logp(model, cache, cont: torch.Tensor) -> torch.Tensor:
    """The same, teacher-forced one token per forward (the decode regime)."""
    rows = []
    for i in range(cont.numel() - 1):
        out = model(input_ids=cont[i : i + 1][None], use_cache=True, **{cache_kwarg(model): cache})
        rows.append(torch.log_softmax(out.logits[0, -1].float(), -1))
    return torch.stack(rows)


def compare(dense: torch.Tensor, other: torch.Tensor, targets: torch.Tensor) -> dict:
    """Perplexities, their ratio, the mean KL(dense ‖ other) and top-1 agreement."""
    nll_d = -dense.gather(1, targets[:, None]).mean()
    nll_o = -other.gather(1, targets[:, None]).mean()
    kl = (dense.exp() * (dense - other)).sum(-1).mean()
    return {
        "ppl_dense": math.exp(nll_d),
        "ppl": math.exp(nll_o),
        "ppl_ratio": math.exp(nll_o - nll_d),
        "kl": float(kl),
        "top1_agree": float((dense.argmax(-1) == other.argmax(-1)).float().mean()),
    }


def dense_copy(cache):
    """An independent copy of a dense prefix cache (generation appends to it)."""
    return copy.deepcopy(cache)


# --------------------------------------------------------------------------- mass on keys read


class MassProbe:
    """Observer for ``squeeze.patches.hf.observe``: for each squeezed attention call, the share of
    the dense softmax mass (over context and tail) that falls on the keys the lookup reads.

    ``per_layer[layer]`` accumulates ``[Hkv]`` sums over calls and query rows (``rows``)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.sums: dict[int, torch.Tensor] = {}
        self.rows: dict[int, int] = {}

    @torch.no_grad()
    def __call__(self, module, query, key, value, scaling):
        layer = getattr(module, "layer_idx", None)
        index = self.ctx.indexes.get(layer)
        if index is None or key.shape[2] < query.shape[2]:
            return
        b, hq, m, d = query.shape
        hkv = index.num_kv_heads
        g = hq // hkv
        scale = d**-0.5 if scaling is None else scaling
        qg = query.reshape(b, hkv, g, m, d)
        found = select(qg, index, scale)
        ptr, start, end = segments(found.mask, index.offsets)
        n = index.n_context
        read = torch.zeros(b * hkv, n, dtype=torch.bool)
        for bh in range(b * hkv):
            for s in range(int(ptr[bh]), int(ptr[bh + 1])):
                read[bh, int(start[s]) : int(end[s])] = True
        read = read.view(b, hkv, 1, 1, n)
        kc = index.keys.float()[None, :, None]  # [1, Hkv, 1, N, D]
        logits_c = torch.einsum("bhgmd,xhynd->bhgmn", qg.float(), kc) * scale
        t = key.shape[2]
        kt = key.float().reshape(b, hkv, 1, t, d)
        logits_t = torch.einsum("bhgmd,bhxtd->bhgmt", qg.float(), kt) * scale
        causal = torch.arange(t)[None, :] <= (torch.arange(m) + t - m)[:, None]
        logits_t = logits_t.masked_fill(~causal, float("-inf"))
        lse = torch.logsumexp(torch.cat([logits_c, logits_t], -1), -1, keepdim=True)
        kept = torch.logsumexp(
            torch.cat([logits_c.masked_fill(~read, float("-inf")), logits_t], -1), -1, keepdim=True
        )
        mass = (kept - lse).exp()[..., 0]  # [B, Hkv, G, M]
        self.sums[layer] = self.sums.get(layer, 0) + mass.sum((0, 2, 3))
        self.rows[layer] = self.rows.get(layer, 0) + b * g * m

    def table(self) -> dict[int, list[float]]:
        """``{layer: [mass per KV head]}``: mean share of the dense softmax mass on keys read."""
        return {i: (self.sums[i] / self.rows[i]).tolist() for i in sorted(self.sums)}


# ----------------------------------------------------------------------------- retrieval tasks

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
NAMES = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "kilo", "lima", "oscar", "tango"]


@dataclass(frozen=True)
class Needles:
    """A haystack with needles and one question: ``ctx``/``question`` int64 ids, the answer."""

    label: str
    ctx: torch.Tensor
    question: torch.Tensor
    answer: str


def needle_task(tok, n_tokens, rng: random.Random, keys: int = 1, haystack: str | None = None):
    """Passkey retrieval (Landmark-style; ``keys > 1``: several named keys, one asked for) in
    filler sentences or a real-text ``haystack``, needles at random depths."""
    hay = tok(haystack if haystack else FILLER * (n_tokens // 8), add_special_tokens=False)
    hay = hay.input_ids
    if haystack:
        start = rng.randrange(max(1, len(hay) - n_tokens))
        hay = hay[start:]
    names = rng.sample(NAMES, keys) if keys > 1 else [None]
    values = [str(rng.randint(10000, 99999)) for _ in names]
    texts = [
        f" The pass key is {v}. Remember it. {v} is the pass key. " if n is None
        else f" The pass key of {n} is {v}. Remember it. "
        for n, v in zip(names, values, strict=True)
    ]  # fmt: skip
    needles = [tok(t, add_special_tokens=False).input_ids for t in texts]
    intro = tok(INTRO, add_special_tokens=False).input_ids
    body = hay[: n_tokens - len(intro) - sum(map(len, needles))]
    cuts = sorted(rng.randrange(len(body) + 1) for _ in needles)
    ids, prev = list(intro), 0
    for cut, needle in zip(cuts, needles, strict=True):
        ids += body[prev:cut] + needle
        prev = cut
    ids += body[prev:]
    ask = rng.randrange(keys)
    who = "" if names[ask] is None else f" of {names[ask]}"
    question = tok(f"\nWhat is the pass key{who}? The pass key{who} is", add_special_tokens=False)
    kind = ("passkey" if keys == 1 else f"multikey{keys}") + ("_text" if haystack else "_filler")
    return Needles(
        f"{kind}@{cuts[ask] / max(1, len(body)):.2f}",
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(question.input_ids, dtype=torch.int64),
        values[ask],
    )


@torch.no_grad()
def dense_generate(model, cache, ctx_ids, prompt: torch.Tensor, max_new: int) -> list[int]:
    """Greedy tokens after ``ctx_ids + prompt``, over a dense ``cache`` holding ``ctx_ids``."""
    full = torch.cat([ctx_ids, prompt])[None]
    out = model.generate(
        input_ids=full, max_new_tokens=max_new, do_sample=False,
        pad_token_id=model.generation_config.eos_token_id, **{cache_kwarg(model): cache},
    )  # fmt: skip
    return out[0, full.shape[1] :].tolist()


def first_difference(a: list[int], b: list[int]) -> int:
    """Position of the first differing token (``len`` of the shorter when one prefixes the other)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))
