"""LongBench (v1 and LongBench-E) with the official prompts and scoring, dense and squeezed.

``python -m squeeze.apps.eval.longbench --help`` runs it; ``main(argv)`` is the same from Python.
``score(task, prediction, answers, all_classes=None)`` is one record's official score in [0, 1],
reusable by other harnesses (it needs ``jieba`` for Chinese tasks and ``rouge`` for summaries).
Prompt templates, answer lengths and model maximum lengths are LongBench's (MIT, THU-KEG &
Zhipu AI): see ``tasks.py`` and ``NOTICE``. No LongBench data ships with this package.
"""

from ..results import RunConfig, run_configs
from .cli import main
from .metrics import score, score_details, task_score
from .runner import Settings, evaluate
from .tasks import E_TASKS, ENGLISH_TASKS, V1_TASKS, Task, get_task, resolve_tasks

__all__ = [
    "ENGLISH_TASKS",
    "E_TASKS",
    "V1_TASKS",
    "RunConfig",
    "Settings",
    "Task",
    "evaluate",
    "get_task",
    "main",
    "resolve_tasks",
    "run_configs",
    "score",
    "score_details",
    "task_score",
]
