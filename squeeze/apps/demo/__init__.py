"""Answer questions over one long context with dense and with squeezed attention, side by side.

The building blocks of ``squeeze demo`` (:mod:`.cli`) and ``benchmarks/needle_eval.py``:

- :mod:`.task`: :func:`make_task`, a context and questions with known answers;
  :func:`dense_answers` (the model's own attention, the context prefilled once) and
  :func:`squeezed_answers` (through a compiled :class:`squeeze.SqueezedContext`);
- :mod:`.timing`: :func:`decode_inputs`, each layer's q/k/v of one decode step, and
  :func:`attention_times`, dense against squeezed milliseconds of attention on them;
- :mod:`.run`: :func:`run`, all of it at every budget of a :class:`Settings`;
- :mod:`.report`: :func:`table` and :func:`plot` of a run's result.
"""

from .report import plot, table
from .run import BUDGETS, Settings, run
from .task import Task, accuracy, dense_answers, is_needle_tokenizer, make_task, squeezed_answers
from .timing import attention_times, decode_inputs

__all__ = [
    "BUDGETS",
    "Settings",
    "Task",
    "accuracy",
    "attention_times",
    "decode_inputs",
    "dense_answers",
    "is_needle_tokenizer",
    "make_task",
    "plot",
    "run",
    "squeezed_answers",
    "table",
]
