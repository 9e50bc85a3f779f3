"""The haystacks: RULER's noise sentences, and the real text of its ``essay`` tasks.

RULER's essay haystack is Paul Graham's essays, downloaded. Ours needs no download: ``docs`` is the
standard library's documentation (``pydoc_data.topics``, the text ``help()`` shows), ``source``
the standard library's own top-level ``.py`` files, and any other value a UTF-8 file of the
user's. As in RULER, whitespace runs become one space, the haystack is cut after its first ``n``
words and needles go between its sentences. ``docs`` and ``source`` change with the Python
version: the run's manifest records the haystack's SHA-256.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

#: RULER's noise haystack: this group of sentences, repeated
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
BUILTIN = ("docs", "source")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


@dataclass(frozen=True)
class Haystack:
    """Real text, as words.

    Attributes:
        name: ``docs``, ``source`` or the file's path.
        words: the text split at whitespace (no empty words).
        sha256: of the text the words came from.
    """

    name: str
    words: tuple[str, ...]
    sha256: str

    def text(self, n: int) -> str:
        """The first ``n`` words, joined by single spaces."""
        return " ".join(self.words[:n])


def split_sentences(text: str) -> list[str]:
    """``text`` cut after each ``.``, ``!`` or ``?`` that whitespace follows (RULER uses NLTK's
    sentence tokenizer; a rule this simple needs no model)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _docs() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _source() -> str:
    import os

    root = Path(os.__file__).parent
    return "\n\n".join(
        p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))
    )


@cache
def load_haystack(source: str) -> Haystack:
    """The haystack ``source`` names: ``docs``, ``source`` or a UTF-8 text file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not UTF-8 text, or holds no words.
    """
    if source == "docs":
        text = _docs()
    elif source == "source":
        text = _source()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"haystack file {source} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"haystack file {source} is not UTF-8 text ({err.reason})") from None
    words = tuple(text.split())
    if not words:
        raise ValueError(f"haystack {source} holds no words")
    return Haystack(source, words, hashlib.sha256(text.encode("utf-8")).hexdigest())
