"""Chat wrappers and prompt ids shared by the evaluations.

A prompt is ``fixed + question``: ``fixed`` (special prefix, chat header, instruction, context) is
compiled once with :func:`squeeze.compile`; ``question`` (question, answer cue, chat footer) is
what each configuration answers. :func:`chat_wrapper` gives the text a chat format puts around
the user turn.
"""

from __future__ import annotations

from dataclasses import dataclass

CHAT_FORMATS = ("auto", "none", "hf", "vicuna", "llama2")
#: FastChat's vicuna_v1.1 conversation (what LongBench's pred.py uses for LongChat and Vicuna)
_VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. USER: ",
    " ASSISTANT:",
)
_MARK = "\u0000SQUEEZE-PROMPT\u0000"


@dataclass(frozen=True)
class ChatWrapper:
    """Text put before the fixed part and after the question (empty for no chat wrapper)."""

    header: str = ""
    footer: str = ""
    #: the header already holds the tokenizer's special prefix (BOS) as text
    header_has_specials: bool = False


def chat_wrapper(tokenizer, chat_format: str) -> ChatWrapper:
    """The wrapper of ``chat_format``: ``"none"``, ``"hf"`` (the tokenizer's chat template, one
    user turn and the generation prompt), ``"vicuna"`` or ``"llama2"`` (LongBench's own strings),
    or ``"auto"`` (``"hf"`` when the tokenizer has a chat template, else ``"none"``)."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")
    if chat_format == "auto":
        chat_format = "hf" if getattr(tokenizer, "chat_template", None) else "none"
    if chat_format == "none":
        return ChatWrapper()
    if chat_format == "vicuna":
        return ChatWrapper(*_VICUNA)
    if chat_format == "llama2":
        return ChatWrapper("[INST]", "[/INST]")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_format='hf' needs a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True
    )
    if text.count(_MARK) != 1:
        raise ValueError("the tokenizer's chat template does not render the user message once")
    header, footer = text.split(_MARK)
    return ChatWrapper(header, footer, header_has_specials=True)


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text (usually ``[bos]``; ``[]`` for none)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


@dataclass(frozen=True)
class PromptIds:
    """``fixed`` (compiled once) + ``question`` (answered) = the prompt the benchmark feeds.

    Attributes:
        fixed: special prefix, chat header, instruction and context (middle-truncated).
        question: question, answer cue and chat footer.
        truncated: fixed-part tokens removed by a middle truncation (0 where none is made).
    """

    fixed: list[int]
    question: list[int]
    truncated: int


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
