"""The RULER generators: deterministic for a seed, each task's answer really in its haystack, lengths
on target, the context a true token prefix of every prompt, the haystack sources."""

from __future__ import annotations

import re
from collections import Counter

import pytest

pytest.importorskip("transformers")

from test_longbench_common import byte_tokenizer

from squeeze.apps.eval.chat import chat_wrapper
from squeeze.apps.eval.ruler import TASK_NAMES, Task, generate_sample, load_haystack, records
from squeeze.apps.eval.ruler.data import task_data
from squeeze.apps.eval.ruler.niah import templates
from squeeze.apps.eval.ruler.prompts import build_prompt
from squeeze.apps.eval.ruler.synthetic import zeta, zipf_counts
from squeeze.apps.eval.ruler.tasks import SPECS, parse_length, resolve_tasks


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2's tokenizer (the lengths the README table uses), or a skip."""
    from transformers import AutoTokenizer

    import squeeze

    try:
        path = squeeze.demo_model()
    except squeeze.DemoModelUnavailable as err:
        pytest.skip(str(err))
    tok = AutoTokenizer.from_pretrained(path)
    return tok, chat_wrapper(tok, "auto")


@pytest.fixture(scope="module")
def byte():
    tok = byte_tokenizer()
    return tok, chat_wrapper(tok, "auto")


@pytest.fixture(scope="module")
def docs():
    return load_haystack("docs")


def _sample(tok, task, index=0, seed=42, questions=1, haystack=None):
    tokenizer, wrapper = tok
    return generate_sample(task, index, tokenizer, wrapper, haystack, seed, questions)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_deterministic_for_a_seed(byte, docs, name):
    task = Task(name, 2048)
    a = _sample(byte, task, haystack=docs)
    assert a == _sample(byte, task, haystack=docs)
    assert a != _sample(byte, task, seed=7, haystack=docs)
    assert a != _sample(byte, task, index=1, haystack=docs)


def _check_niah(name: str, context: str, question: str, answers: list[str]) -> None:
    spec = SPECS[name]
    keys = re.findall(r"for (\S+(?:, \S+)*?(?:,? and \S+)?) mentioned", question)[0]
    keys = [k for k in re.split(r", and |, | and ", keys)]
    assert len(keys) == spec.queries and len(answers) == spec.queries * spec.values
    found = []
    for key in keys:
        values = re.findall(
            rf"special magic {spec.value_type} for {re.escape(key)} is: (\S+)\.", context
        )
        assert len(values) == spec.values, (key, values)  # the key's needles, no distractor
        found += values
    assert sorted(found) == sorted(answers)


def _check_vt(context: str, question: str, answers: list[str]) -> None:
    value = re.findall(r"assigned the value (\d+)", question)[0]
    names = re.findall(rf"VAR (\w+) = {value}\b", context)
    assert len(names) == 1
    while True:  # follow the chain
        nxt = re.findall(rf"VAR (\w+) = VAR {names[-1]}\b", context)
        if not nxt:
            break
        names += nxt
    assert names == answers


def _check_cwe(context: str, answers: list[str]) -> None:
    listed = context.rsplit("\n", 1)[1]  # the task's list (the few-shot example comes first)
    counts = Counter(re.findall(r"\d+\. (\w+)", listed))
    top = [w for w, _ in counts.most_common(len(answers))]
    assert sorted(top) == sorted(answers)
    assert min(counts[a] for a in answers) > max(c for w, c in counts.items() if w not in answers)


def _check_fwe(context: str, answers: list[str]) -> None:
    counts = Counter(context.split("words. ", 1)[1].split())
    ranked = [w for w, _ in counts.most_common(5)]
    assert ranked[0] == "..." and ranked[1:4] == answers
    assert counts[ranked[3]] > counts[ranked[4]]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_answer_is_in_the_haystack(byte, docs, name):
    task = Task(name, 8192)  # cwe's 4K list (30 repeats) is over 4K bytes
    for index in range(2):
        for r in records(task, index, _sample(byte, task, index, haystack=docs)):
            kind = SPECS[name].kind
            if kind == "niah":
                _check_niah(name, r["context"], r["input"], r["answers"])
            elif kind == "vt":
                _check_vt(r["context"].rsplit("\n\n", 1)[1], r["input"], r["answers"])
            elif kind == "cwe":
                _check_cwe(r["context"], r["answers"])
            else:
                _check_fwe(r["context"], r["answers"])


@pytest.mark.parametrize("length", [2048, 8192])
def test_lengths_hit_the_target(smollm2, docs, length):
    """Prompt (chat template included) + answer budget: at most the target, within one haystack
    unit of it (a noise group, a needle, a few words); the context a true token prefix."""
    tokenizer, wrapper = smollm2
    for name in TASK_NAMES:
        task = Task(name, length)
        (r,) = records(task, 0, _sample(smollm2, task, haystack=docs))
        p = build_prompt(tokenizer, wrapper, r)
        total = len(p.fixed) + len(p.question) + task.max_new_tokens
        assert length - 80 <= total <= length, (name, total)
        # the compiled context is exactly the tokenisation of header + context
        head = tokenizer(wrapper.header + r["context"], add_special_tokens=False)["input_ids"]
        assert p.fixed == head, name


def test_chat_template_and_answer_prefix(smollm2):
    tokenizer, wrapper = smollm2
    task = Task("niah_single_1", 2048)
    (r,) = records(task, 0, _sample(smollm2, task))
    p = build_prompt(tokenizer, wrapper, r)
    text = tokenizer.decode(p.fixed + p.question)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nA special magic" in text
    assert text.endswith("<|im_start|>assistant\n" + r["answer_prefix"])
    assert r["answer_prefix"].startswith(" The special magic number for ")


def test_singular_and_plural_templates():
    one = templates(SPECS["niah_single_1"])
    assert one[0].startswith("A special magic number is hidden")
    assert one[1].startswith("\nWhat is the special magic number for")
    assert one[2].endswith("mentioned in the provided text is")
    many = templates(SPECS["niah_multivalue"])
    assert many[0].startswith("Some special magic numbers are hidden")
    assert many[1].startswith("\nWhat are all the special magic numbers for")


def test_questions_share_one_haystack(byte, docs):
    for name, n_keys in (("niah_multikey_2", 3), ("vt", 3), ("niah_multiquery", 3)):
        task = Task(name, 4096)
        sample = _sample(byte, task, questions=3, haystack=docs)
        assert len(sample.questions) == 3
        rs = records(task, 0, sample)
        assert len({r["context"] for r in rs}) == 1
        assert len({tuple(r["answers"]) for r in rs}) == n_keys
    # tasks with one question by nature keep one
    assert len(_sample(byte, Task("cwe", 8192), questions=3).questions) == 1


def test_data_file_grows_and_reads_back(byte, tmp_path):
    task = Task("niah_single_1", 2048)
    calls = []

    def make(i):
        calls.append(i)
        return records(task, i, _sample(byte, task, i))

    first = task_data(task, 2, tmp_path, make)
    assert calls == [0, 1]
    more = task_data(task, 3, tmp_path, make)
    assert calls == [0, 1, 2] and more[:2] == first
    assert task_data(task, 3, tmp_path, make) == more and calls == [0, 1, 2]
    # a start without a manifest does not trust the files: it makes its samples again
    assert task_data(task, 1, tmp_path, make, reuse=False) == more[:1] and calls == [0, 1, 2, 0]


def test_haystacks(tmp_path, byte):
    docs, source = load_haystack("docs"), load_haystack("source")
    assert len(docs.words) > 50_000 and len(source.words) > 200_000
    assert docs.sha256 != source.sha256
    with pytest.raises(FileNotFoundError, match="haystack file"):
        load_haystack(str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here. And a second sentence.", encoding="utf-8")
    with pytest.raises(ValueError, match="too short"):
        _sample(byte, Task("niah_single_2", 4096), haystack=load_haystack(str(short)))


def test_zipf_counts():
    assert zeta(2.0) == pytest.approx(3.14159265**2 / 6, rel=1e-6)
    counts = zipf_counts(1000, 40, 2.0)
    assert counts[:4] == [607, 151, 67, 37]


def test_task_names_and_lengths():
    assert len(TASK_NAMES) == 11
    assert resolve_tasks(["niah", "vt"])[-1] == "vt" and len(resolve_tasks(["niah"])) == 8
    with pytest.raises(ValueError, match="unknown RULER task 'qa_1'"):
        resolve_tasks(["qa_1"])
    assert parse_length("4k") == 4096 and parse_length("2048") == 2048
    with pytest.raises(ValueError, match="length"):
        parse_length("long")
    with pytest.raises(ValueError, match="too short for vt"):
        _sample((byte_tokenizer(), chat_wrapper(byte_tokenizer(), "auto")), Task("vt", 256))
