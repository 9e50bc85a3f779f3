"""Real-model material for the vLLM tests: SmolLM2-135M-Instruct (``squeeze.demo_model()``) and
real text (the Python documentation's topics, ``pydoc_data``). Not a test module.

* ``quote_task``: the demo's questions on a real document (``squeeze.apps.demo.task``): a quoted
  span of the context, answered by the token that follows it there.
* ``code_contexts``: chat-formatted contexts that each plant their own access code, two of them
  sharing a long first part (so their first KV blocks are shared by the prefix cache), and a
  question whose answer is the code: distinct answers per context, for cross-talk tests.

Prompts are token ids (context ids + question ids), so a request starts with exactly the ids its
context was compiled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nRead the document below.\n\n"
)
CODE_QUESTION = (
    "\n\nWhat is the access code of this document?<|im_end|>\n<|im_start|>assistant\n"
    "The access code of this document is"
)
CODES = ("4721", "9306", "1858")


def smollm2():
    """``(model_dir, tokenizer)``; skips the test when the weights are not installed."""
    import transformers

    import squeeze
    from squeeze.demo_models import DemoModelUnavailable

    try:
        path = squeeze.demo_model()
    except DemoModelUnavailable as err:
        pytest.skip(f"SmolLM2 is not installed: {err}")
    return path, transformers.AutoTokenizer.from_pretrained(path)


_corpus: dict[int, list[int]] = {}


def corpus(tokenizer) -> list[int]:
    """The Python documentation's topics, one after the other, as token ids (~120K)."""
    import pydoc_data.topics as t

    if id(tokenizer) not in _corpus:
        text = "\n\n".join(t.topics[k] for k in sorted(t.topics))
        _corpus[id(tokenizer)] = tokenizer(text).input_ids
    return _corpus[id(tokenizer)]


def excerpt(tokenizer, i: int, n: int) -> str:
    """About ``n`` tokens of real text, the ``i``-th of distinct excerpts (``i < 100``)."""
    start = i * 1000
    return tokenizer.decode(corpus(tokenizer)[start : start + n])


def load_hf(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@dataclass
class CodeContext:
    ids: list[int]
    code: str


def code_contexts(tokenizer) -> list[CodeContext]:
    """Three contexts with their own access code: the first two start with the same ~330
    tokens (two full 128-token CPU blocks shared), the third with other text."""
    shared = SYSTEM + excerpt(tokenizer, 3, 300)
    heads = (shared, shared, SYSTEM + excerpt(tokenizer, 40, 300))
    out = []
    for k, (head, code) in enumerate(zip(heads, CODES, strict=True)):
        text = (
            f"{head}\n\n{excerpt(tokenizer, 10 + 10 * k, 200)}\n\nThe access code of this "
            f"document is {code}.\n\n{excerpt(tokenizer, 11 + 10 * k, 150)}"
        )
        out.append(CodeContext(tokenizer(text).input_ids, code))
    return out


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text).input_ids
