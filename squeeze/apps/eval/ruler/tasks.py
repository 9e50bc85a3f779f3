"""The RULER tasks: their configurations, prompt templates and answer lengths.

The eleven synthetic tasks of RULER (Hsieh et al., 2024, arXiv 2404.06654) with the configurations
of its ``synthetic.yaml``; RULER's two QA tasks need SQuAD / HotpotQA data and are left out. The
prompt templates and answer prefixes (``TEMPLATES``) and the answer lengths (``MAX_NEW_TOKENS``)
are RULER's own (https://github.com/NVIDIA/RULER, ``scripts/data/synthetic/constants.py``),
Apache License 2.0, Copyright (c) 2024 NVIDIA Corporation, reproduced verbatim because the
published scores depend on them; see the NOTICE file beside this module. Each template is split
where the question starts: (instruction and ``{context}``, question, answer prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- RULER configuration (Apache-2.0, NVIDIA), verbatim ---------------------------------------
TEMPLATES = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
        "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}",
        "\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided "
        "text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    ),
    "vt": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text."
        "\n\n{context}",
        "\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
        "variables are assigned the value {query}, they are: ",
    ),
    "cwe": (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n{context}",
        "\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
    ),
    "fwe": (
        "Read the following coded text and track the frequency of each coded word. Find the "
        "three most frequently appeared coded words. {context}",
        "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the "
        "three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
    ),
}
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}
#: the needle sentence of every NIAH haystack
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# ---- end of the RULER configuration -------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A RULER task's configuration (``synthetic.yaml``).

    Attributes:
        kind: ``niah``, ``vt`` (variable tracking), ``cwe`` (common words), ``fwe`` (frequent words).
        haystack: niah: ``noise`` (a repeated sentence group), ``essay`` (real text: see
            :mod:`.haystack`) or ``needle`` (distractor needles); vt: ``noise``.
        key_type, value_type: niah: ``words``, ``numbers`` or ``uuids``.
        keys, values, queries: niah: needle keys, values per key, keys asked per question.
        chains, hops: vt: assignment chains and hops per chain.
        freq_cw, freq_ucw, num_cw: cwe: repeats of common / uncommon words, common words.
        alpha: fwe: the Zipf exponent of the word counts.
    """

    kind: str
    haystack: str = "noise"
    key_type: str = "words"
    value_type: str = "numbers"
    keys: int = 1
    values: int = 1
    queries: int = 1
    chains: int = 1
    hops: int = 4
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    alpha: float = 2.0


def _niah(haystack: str, **kw) -> Spec:
    return Spec("niah", haystack=haystack, **kw)


#: RULER's synthetic tasks, in its table order
SPECS = {
    "niah_single_1": _niah("noise"),
    "niah_single_2": _niah("essay"),
    "niah_single_3": _niah("essay", value_type="uuids"),
    "niah_multikey_1": _niah("essay", keys=4),
    "niah_multikey_2": _niah("needle"),
    "niah_multikey_3": _niah("needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": _niah("essay", values=4),
    "niah_multiquery": _niah("essay", keys=4, queries=4),
    "vt": Spec("vt", chains=1, hops=4),
    "cwe": Spec("cwe", freq_cw=30, freq_ucw=3, num_cw=10),
    "fwe": Spec("fwe", alpha=2.0),
}
TASK_NAMES = tuple(SPECS)
#: names that stand for several tasks
GROUPS = {
    "all": TASK_NAMES,
    "niah": tuple(t for t in TASK_NAMES if t.startswith("niah")),
    "aggregation": ("cwe", "fwe"),
}
DEFAULT_LENGTHS = (2048, 4096, 8192)


@dataclass(frozen=True)
class Task:
    """One RULER task at one length (prompt tokens plus the answer budget, chat template included).

    ``data_name`` (``"4096/niah_single_1"``) names its results file; ``max_new_tokens`` is RULER's
    answer length; RULER stops at no newline.
    """

    name: str
    length: int

    @property
    def spec(self) -> Spec:
        return SPECS[self.name]

    @property
    def data_name(self) -> str:
        return f"{self.length}/{self.name}"

    @property
    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.spec.kind]

    @property
    def newline_stop(self) -> bool:
        return False


def resolve_tasks(names) -> list[str]:
    """Task names (``all``, ``niah`` and ``aggregation`` expand) → names, in table order, once each.

    Raises:
        ValueError: an unknown name (the message lists the tasks).
    """
    wanted = set()
    for name in names:
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in SPECS:
            wanted.add(name)
        else:
            raise ValueError(
                f"unknown RULER task {name!r}; tasks: {', '.join(TASK_NAMES)} "
                f"(or {', '.join(GROUPS)})"
            )
    return [t for t in TASK_NAMES if t in wanted]


def parse_length(text: str) -> int:
    """``"4096"``, ``"4k"`` or ``"4K"`` → 4096 tokens (``ValueError`` otherwise, or below 64)."""
    s = str(text).strip().lower()
    try:
        n = int(s[:-1]) * 1024 if s.endswith("k") else int(s)
    except ValueError:
        raise ValueError(f"a length must be an int or <int>k (4k = 4096), got {text!r}") from None
    if n < 64:
        raise ValueError(f"a length must be >= 64 tokens, got {text!r}")
    return n
