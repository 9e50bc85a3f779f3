"""A RULER record → prompt ids, with the fixed part a true token prefix of the prompt.

The prompt is RULER's: the chat template's user turn holds the record's ``context`` (few-shot
example, instruction, haystack) and ``input`` (the question); the answer prefix follows the
template's generation prompt. The whole prompt is tokenised as one text, so the ids are those a
user of the model would feed; the fixed part is the longest common prefix of those ids and of the
ids of the chat header + ``context`` alone, which is all of the latter whenever the tokenizer does
not merge across the cut (checked: when it does, a warning says so once and the cut moves back).
"""

from __future__ import annotations

import logging

from ..chat import ChatWrapper, PromptIds, encode, special_prefix

logger = logging.getLogger("squeeze.eval")
_warned: set[str] = set()


def _specials(tokenizer, wrapper: ChatWrapper) -> list[int]:
    return [] if wrapper.header_has_specials else special_prefix(tokenizer)


def full_text(wrapper: ChatWrapper, context: str, question: str, prefix: str) -> str:
    """The prompt's text (without the tokenizer's special prefix)."""
    return wrapper.header + context + question + wrapper.footer + prefix


def prompt_length(tokenizer, wrapper: ChatWrapper, context: str, question: str, prefix: str) -> int:
    """Tokens of the prompt :func:`build_prompt` makes (one tokenisation)."""
    text = full_text(wrapper, context, question, prefix)
    return len(_specials(tokenizer, wrapper)) + len(encode(tokenizer, text))


def build_prompt(tokenizer, wrapper: ChatWrapper, record: dict) -> PromptIds:
    """The record's ids: ``fixed`` (special prefix, chat header, ``context``) and ``question``
    (``input``, chat footer, ``answer_prefix``); nothing is truncated."""
    specials = _specials(tokenizer, wrapper)
    text = full_text(wrapper, record["context"], record["input"], record["answer_prefix"])
    ids = specials + encode(tokenizer, text)
    fixed = specials + encode(tokenizer, wrapper.header + record["context"])
    k = 0
    for a, b in zip(ids, fixed, strict=False):
        if a != b:
            break
        k += 1
    if k < len(fixed) and record["dataset"] not in _warned:
        _warned.add(record["dataset"])
        logger.warning(
            "squeeze.eval: %s: the tokenizer merges the context's last %d token(s) with the "
            "question's; the compiled context stops before them",
            record["dataset"],
            len(fixed) - k,
        )
    return PromptIds(ids[:k], ids[k:], 0)
