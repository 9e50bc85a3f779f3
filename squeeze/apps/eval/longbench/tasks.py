"""The LongBench v1 and LongBench-E tasks: prompt templates, answer lengths, metrics, categories.

The prompt templates (``TEMPLATES``), the answer lengths (``max_new_tokens``), the model maximum
lengths (``MODEL_MAX_LENGTHS``), the chat-template exceptions and the first-line rule are LongBench's
own (https://github.com/THUDM/LongBench, ``LongBench/config/*.json`` and ``pred.py``/``eval.py``),
MIT License, Copyright (c) 2023 THU-KEG & Zhipu AI. They are reproduced verbatim, typos included
(narrativeqa's "asconcisely"), because the published scores depend on them. See the NOTICE file
beside this module.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- LongBench configuration (MIT, THU-KEG & Zhipu AI), verbatim -----------------------------------
TEMPLATES = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    "passage_retrieval_zh": '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

#: dataset2maxlen: the answer length (max new tokens) of every task
MAX_NEW_TOKENS = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}

#: model2maxlen: prompt tokens kept (middle truncation) for the models LongBench reports
MODEL_MAX_LENGTHS = {
    "llama2-7b-chat-4k": 3500,
    "longchat-v1.5-7b-32k": 31500,
    "xgen-7b-8k": 7500,
    "internlm-7b-8k": 7500,
    "chatglm2-6b": 31500,
    "chatglm2-6b-32k": 31500,
    "chatglm3-6b-32k": 31500,
    "vicuna-v1.5-7b-16k": 15500,
}
#: the same, by context window: 4k → 3500, 8k → 7500, 16k → 15500, 32k → 31500
MAX_LENGTH_BY_WINDOW = {4096: 3500, 8192: 7500, 16384: 15500, 32768: 31500}

#: pred.py: no chat wrapper for these tasks
NO_CHAT_TASKS = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
#: eval.py: the prediction's first line only (after leading newlines) is scored
FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum", "lsht")
#: pred.py: stop at a newline too (and at least one new token)
NEWLINE_STOP_TASKS = ("samsum",)
# ---- end of the LongBench configuration ------------------------------------------------------

METRICS = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_zh",
    "gov_report": "rouge",
    "qmsum": "rouge",
    "multi_news": "rouge",
    "vcsum": "rouge_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge",
    "lsht": "classification",
    "passage_count": "count",
    "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}

CATEGORIES = {
    "Single-Document QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "Multi-Document QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "Summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "Few-shot Learning": ("trec", "triviaqa", "samsum", "lsht"),
    "Synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "Code": ("lcc", "repobench-p"),
}

ZH_TASKS = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
CODE_TASKS = ("lcc", "repobench-p")
#: the 21 LongBench v1 tasks, in the paper's table order
V1_TASKS = tuple(TEMPLATES)
#: the 16 English tasks whose plain mean compression papers report (code counts as English)
ENGLISH_TASKS = tuple(t for t in V1_TASKS if t not in ZH_TASKS)
#: LongBench's Chinese average: the Chinese tasks plus code
CHINESE_TASKS = tuple(t for t in V1_TASKS if t in ZH_TASKS or t in CODE_TASKS)
#: the 13 LongBench-E tasks (loaded as ``<task>_e``)
E_TASKS = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
#: LongBench-E length buckets (``length`` is words, or characters for Chinese)
E_BUCKETS = ("0-4k", "4-8k", "8k+")


@dataclass(frozen=True)
class Task:
    """One LongBench task.

    Attributes:
        name: the v1 name (``"hotpotqa"``); ``longbench_e`` selects the ``<name>_e`` data.
        longbench_e: a LongBench-E task (scored per length bucket too).
    """

    name: str
    longbench_e: bool = False

    @property
    def data_name(self) -> str:
        """The file / dataset config name: ``hotpotqa`` or ``hotpotqa_e``."""
        return f"{self.name}_e" if self.longbench_e else self.name

    @property
    def template(self) -> str:
        return TEMPLATES[self.name]

    @property
    def metric(self) -> str:
        return METRICS[self.name]

    @property
    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.name]

    @property
    def category(self) -> str:
        return next(c for c, names in CATEGORIES.items() if self.name in names)

    @property
    def language(self) -> str:
        return "zh" if self.name in ZH_TASKS else "code" if self.name in CODE_TASKS else "en"

    @property
    def chat(self) -> bool:
        """Whether the chat wrapper applies (LongBench skips it for few-shot and code tasks)."""
        return self.name not in NO_CHAT_TASKS

    @property
    def newline_stop(self) -> bool:
        return self.name in NEWLINE_STOP_TASKS


def get_task(name: str) -> Task:
    """``"hotpotqa"`` → the v1 task; ``"hotpotqa_e"`` → the LongBench-E task.

    Raises:
        ValueError: not a LongBench v1 or LongBench-E task (the message lists them).
    """
    if not isinstance(name, str):
        raise TypeError(f"task must be a str, got {type(name).__name__}")
    if name in TEMPLATES:
        return Task(name)
    if name.endswith("_e") and name[:-2] in E_TASKS:
        return Task(name[:-2], longbench_e=True)
    raise ValueError(
        f"unknown LongBench task {name!r}; v1 tasks: {', '.join(V1_TASKS)}; "
        f"LongBench-E tasks: {', '.join(t + '_e' for t in E_TASKS)}"
    )


def resolve_tasks(names, longbench_e: bool = False) -> list[Task]:
    """Task names (``"all"``, ``"english"`` and ``"chinese"`` expand) → tasks, in table order.

    With ``longbench_e`` a bare name selects its LongBench-E version (and ``all`` the 13 E tasks).
    """
    out: list[Task] = []
    for name in names:
        if name in ("all", "english", "chinese"):
            base = {"all": V1_TASKS, "english": ENGLISH_TASKS, "chinese": CHINESE_TASKS}[name]
            group = [t for t in base if not longbench_e or t in E_TASKS]
            out.extend(Task(t, longbench_e) for t in group)
            continue
        task = get_task(name)
        if longbench_e and not task.longbench_e:
            task = get_task(name + "_e")
        out.append(task)
    seen: set[Task] = set()
    return [t for t in out if not (t in seen or seen.add(t))]
