"""A LongBench record → the fixed part's token ids and the question's token ids.

LongBench formats ``template.format(context=..., input=...)``, middle-truncates the whole prompt to
the model's maximum length (the first and last ``max_length // 2`` tokens), then wraps it in the
chat format. Here the prompt is split where the question starts (at ``{input}``; for templates
without one, right after ``{context}``): the fixed part is the instruction and the context, the
question part is the question and the answer cue. The two are tokenised separately and
concatenated, so that the dense baseline and the squeezed runs see the very same ids, and the
middle truncation removes tokens from the fixed part only: it keeps the first ``max_length // 2``
prompt tokens and as many of the last ones as the question leaves room for, the token count that
LongBench keeps. Truncation works on token ids (LongBench decodes and re-tokenises the text).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tasks import Task

CHAT_FORMATS = ("auto", "none", "hf", "vicuna", "llama2")
#: FastChat's vicuna_v1.1 conversation (what LongBench's pred.py uses for LongChat and Vicuna)
_VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. USER: ",
    " ASSISTANT:",
)
_MARK = "\u0000SQUEEZE-PROMPT\u0000"


def split_template(template: str) -> tuple[str, str]:
    """``template`` → (fixed template, question template), cut at ``{input}`` or after ``{context}``."""
    if "{context}" not in template:
        raise ValueError(f"template has no {{context}}: {template!r}")
    end_of_context = template.index("{context}") + len("{context}")
    cut = template.index("{input}") if "{input}" in template else end_of_context
    if cut < end_of_context:
        raise ValueError(f"template asks its question before the context: {template!r}")
    return template[:cut], template[cut:]


def split_record(task: Task, record: dict) -> tuple[str, str]:
    """The record's fixed text (instruction + context) and question text (question + cue)."""
    fixed, question = split_template(task.template)
    fields = {"context": record["context"], "input": record.get("input", "")}
    return fixed.format(**fields), question.format(**fields)


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
    """``fixed`` (compiled once) + ``question`` (answered) = the prompt LongBench would feed.

    Attributes:
        fixed: special prefix, chat header, instruction and context (middle-truncated).
        question: question, answer cue and chat footer.
        truncated: fixed-part tokens removed by the middle truncation.
    """

    fixed: list[int]
    question: list[int]
    truncated: int


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def build_prompt(
    tokenizer, task: Task, record: dict, max_length: int, wrapper: ChatWrapper
) -> PromptIds:
    """Tokenise one record (see the module docstring).

    The truncation counts what LongBench counts: special prefix + fixed text + question text (the
    chat header and footer are added after truncation, as in LongBench; the footer is tokenised
    with the question, and counted with it).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    fixed_text, question_text = split_record(task, record)
    use_chat = task.chat and (wrapper.header or wrapper.footer)
    header, footer = (wrapper.header, wrapper.footer) if use_chat else ("", "")
    prefix = special_prefix(tokenizer)  # counted as LongBench counts it, even when the header
    specials = [] if use_chat and wrapper.header_has_specials else prefix  # holds it as text
    body = encode(tokenizer, fixed_text)
    question = encode(tokenizer, question_text + footer)
    half = max_length // 2
    total = len(prefix) + len(body) + len(question)
    truncated = 0
    if total > max_length:
        head = max(half - len(prefix), 0)
        tail = half - len(question)
        if tail < 0:  # the question alone passes half the budget: keep it whole, shorten the head
            head, tail = max(2 * half - len(prefix) - len(question), 0), 0
        if head + tail == 0:
            raise ValueError(
                f"{task.data_name} record {record.get('_id', '?')}: the question alone holds "
                f"{len(question)} tokens, max_length={max_length} leaves no room for the context"
            )
        truncated = len(body) - head - tail
        body = body[:head] + (body[len(body) - tail :] if tail else [])
    fixed = specials + encode(tokenizer, header) + body
    return PromptIds(fixed, question, truncated)
