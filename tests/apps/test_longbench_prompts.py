"""Prompt split, middle truncation, chat wrappers and task tables of the LongBench runner."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from test_longbench_common import byte_tokenizer

from squeeze.apps.eval.longbench.prompts import (
    ChatWrapper,
    build_prompt,
    chat_wrapper,
    special_prefix,
    split_record,
    split_template,
)
from squeeze.apps.eval.longbench.tasks import (
    E_TASKS,
    ENGLISH_TASKS,
    MAX_NEW_TOKENS,
    METRICS,
    NO_CHAT_TASKS,
    V1_TASKS,
    get_task,
    resolve_tasks,
)


def test_task_tables():
    assert len(V1_TASKS) == 21 and len(E_TASKS) == 13 and len(ENGLISH_TASKS) == 16
    assert set(MAX_NEW_TOKENS) == set(METRICS) == set(V1_TASKS)
    assert set(E_TASKS) <= set(V1_TASKS)
    assert [t.data_name for t in resolve_tasks(["all"], longbench_e=True)] == [
        t + "_e" for t in E_TASKS
    ]
    assert resolve_tasks(["hotpotqa", "hotpotqa"]) == [get_task("hotpotqa")]
    assert get_task("lcc_e").longbench_e and not get_task("lcc").chat
    with pytest.raises(ValueError, match="unknown LongBench task 'dureader_e'"):
        get_task("dureader_e")  # not a LongBench-E task


@pytest.mark.parametrize("name", V1_TASKS)
def test_every_template_splits_before_the_question(name):
    task = get_task(name)
    fixed, question = split_template(task.template)
    assert fixed + question == task.template
    assert "{context}" in fixed and "{input}" not in fixed
    fixed_text, q_text = split_record(task, {"context": "CTX", "input": "QQQ"})
    assert fixed_text + q_text == task.template.format(context="CTX", input="QQQ")
    if "{input}" in task.template:
        assert q_text.startswith("QQQ")
    else:  # summarization, count, lcc: the question is the instruction after the context
        assert fixed_text.endswith("CTX")


def test_split_examples():
    fixed, q = split_record(get_task("qasper"), {"context": "C", "input": "Q"})
    assert fixed.endswith("Question: ") and q == "Q\n\nAnswer:"
    fixed, q = split_record(get_task("gov_report"), {"context": "C", "input": ""})
    assert (
        fixed.endswith("Report:\nC")
        and q == "\n\nNow, write a one-page summary of the report.\n\nSummary:"
    )
    fixed, q = split_record(get_task("repobench-p"), {"context": "C", "input": "def f("})
    assert q == "def f(Next line of code:\n"


def test_middle_truncation_keeps_the_question():
    tok = byte_tokenizer()
    assert special_prefix(tok) == [1]
    task = get_task("passage_count")  # no chat, no {input}
    record = {"context": "a" * 500 + "b" * 500, "input": ""}
    fixed_text, q_text = split_record(task, record)
    body = tok.encode(fixed_text, add_special_tokens=False)  # one token per byte
    p = build_prompt(tok, task, record, 10_000, ChatWrapper())
    assert p.truncated == 0 and p.fixed == [1, *body]
    assert tok.decode(p.question) == q_text
    # LongBench keeps the first and the last 300 prompt tokens (BOS counted); the question is
    # whole in the tail, the fixed part keeps its first 299 and its last 300 - len(question)
    p = build_prompt(tok, task, record, 600, ChatWrapper())
    n_q = len(p.question)
    assert tok.decode(p.question) == q_text and n_q < 300
    assert len(p.fixed) + n_q == 600
    assert p.fixed == [1, *body[:299], *body[len(body) - (300 - n_q) :]]
    assert p.truncated == len(body) - 299 - (300 - n_q)
    # a question longer than half the budget stays whole; the head gives way
    p = build_prompt(tok, task, record, 300, ChatWrapper())
    assert tok.decode(p.question) == q_text and len(p.fixed) + len(p.question) == 300
    with pytest.raises(ValueError, match="leaves no room"):
        build_prompt(tok, task, record, n_q, ChatWrapper())


def test_chat_rule_and_formats():
    tok = byte_tokenizer()
    hf = chat_wrapper(tok, "auto")
    assert hf == ChatWrapper("<s><|user|>", "<|assistant|>", header_has_specials=True)
    assert chat_wrapper(tok, "vicuna").footer == " ASSISTANT:"
    assert chat_wrapper(tok, "llama2") == ChatWrapper("[INST]", "[/INST]")
    record = {"context": "ctx", "input": "q?", "answers": ["a"]}
    chat = build_prompt(tok, get_task("hotpotqa"), record, 5000, hf)
    assert tok.decode(chat.fixed).startswith("<s><|user|>Answer the question")
    assert tok.decode(chat.question).endswith("Answer:<|assistant|>")
    assert chat.fixed.count(1) == 1  # one BOS
    for name in NO_CHAT_TASKS:  # few-shot and code tasks: no wrapper
        plain = build_prompt(tok, get_task(name), dict(record, all_classes=["x"]), 5000, hf)
        assert "<|user|>" not in tok.decode(plain.fixed)
        assert "<|assistant|>" not in tok.decode(plain.question)
    with pytest.raises(ValueError, match="chat_format"):
        chat_wrapper(tok, "chatml")
