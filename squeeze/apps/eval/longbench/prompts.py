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

from ..chat import CHAT_FORMATS, ChatWrapper, PromptIds, chat_wrapper, encode, special_prefix
from .tasks import Task

__all__ = [
    "CHAT_FORMATS",
    "ChatWrapper",
    "PromptIds",
    "build_prompt",
    "chat_wrapper",
    "special_prefix",
    "split_record",
    "split_template",
]


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
