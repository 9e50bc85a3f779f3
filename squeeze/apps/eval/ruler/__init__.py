"""RULER's synthetic long-context tasks, generated here, dense and squeezed.

``squeeze eval ruler --help`` (or ``python -m squeeze.apps.eval.ruler``) runs them; ``main(argv)``
is the same from Python. ``generate_sample(task, index, tokenizer, wrapper, haystack)`` makes one
sample at a token length, ``string_match_all(prediction, answers)`` is RULER's score of one
record. The prompt templates are RULER's (Apache-2.0, NVIDIA): see ``tasks.py`` and ``NOTICE``.
"""

from .cli import main
from .data import generate_sample, records
from .haystack import load_haystack
from .runner import Ruler, Settings, evaluate, make_data
from .scoring import string_match_all
from .tasks import SPECS, TASK_NAMES, Task, resolve_tasks

__all__ = [
    "SPECS",
    "TASK_NAMES",
    "Ruler",
    "Settings",
    "Task",
    "evaluate",
    "generate_sample",
    "load_haystack",
    "main",
    "make_data",
    "records",
    "resolve_tasks",
    "string_match_all",
]
