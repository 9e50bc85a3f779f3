"""Answer questions over one long context with dense and with squeezed attention, side by side.

The building blocks of ``squeeze demo`` (:mod:`.cli`):

- :mod:`.document`: :func:`make_document_task`, a real document (the standard library's source, the
  Python docs, or any text)
  with planted needles, and questions whose answers are in it (needles and quotes);
- :mod:`.answers`: :class:`DenseReference` (the model's own attention over the compiled
  context's K/V), :func:`squeezed_generate` and :func:`squeezed_batch`;
- :mod:`.timing`: :class:`DecodeCapture`, a decode step's inputs, and :func:`attention_times`,
  dense against squeezed milliseconds of attention on them;
- :mod:`.run`: :func:`run`, all of it at every budget of a :class:`Settings`;
- :mod:`.report`: :func:`table`, :func:`speed_notes` and :func:`plot` of a run's result.

:mod:`.task` holds the first-token tools that ``benchmarks/needle_eval.py`` and the needle and
vLLM tests use: :func:`make_task` (needle records on the needle model, quotes elsewhere),
:func:`dense_answers`, :func:`squeezed_answers`, :func:`accuracy`, and :func:`decode_inputs`.
"""

from .answers import DenseReference, squeezed_batch, squeezed_generate
from .document import (
    DocumentTask,
    Question,
    is_correct,
    make_document_task,
    python_docs,
    stdlib_source,
)
from .report import plot, speed_notes, table
from .run import BUDGETS, Settings, run
from .task import Task, accuracy, dense_answers, is_needle_tokenizer, make_task, squeezed_answers
from .timing import DecodeCapture, attention_times, decode_inputs

__all__ = [
    "BUDGETS",
    "DecodeCapture",
    "DenseReference",
    "DocumentTask",
    "Question",
    "Settings",
    "Task",
    "accuracy",
    "attention_times",
    "decode_inputs",
    "dense_answers",
    "is_correct",
    "is_needle_tokenizer",
    "make_document_task",
    "make_task",
    "plot",
    "python_docs",
    "run",
    "speed_notes",
    "squeezed_answers",
    "squeezed_batch",
    "squeezed_generate",
    "stdlib_source",
    "table",
]
