"""squeeze: Squeezed Attention for long fixed contexts.

Cluster a fixed context's keys once (``build_index``), then let every query read only the
clusters it needs (``squeezed_attention``). The core import is light: torch, numpy,
safetensors. The Hugging Face entry points (``patch``, ``unpatch``, ``compile``,
``SqueezedContext``) import transformers on first use.

Errors, one table for the whole package (:mod:`squeeze.errors`): ``TypeError`` for an argument
of the wrong type; ``ValueError`` for a wrong value or shape (the message names the argument,
what it is and what was expected); :class:`IndexFileError` (a ``ValueError``) for any file that
cannot be used, however it is malformed; ``ModelMismatchError`` (a ``ValueError``) for a sound
context file made for another model; :class:`BackendUnavailable` (a ``RuntimeError``) when a
backend asked for with ``backend=`` cannot run; ``MemoryError`` only when a native kernel could
not allocate its scratch, ``RuntimeError`` for its other failures.
"""

from .attention import SqueezeStats, squeezed_attention
from .build import build_index, build_indexes
from .calibration import Calibration
from .config import SqueezeConfig
from .demo_models import DemoModelUnavailable, demo_model
from .errors import BackendUnavailable, IndexFileError
from .files import save_indexes
from .index import ClusterIndex, load_indexes
from .kmeans import KMeansResult, kmeans
from .version import __version__

#: public names served lazily from the transformers integration (imports transformers)
_HF_NAMES = ("SqueezedContext", "compile", "patch", "unpatch")

__all__ = [
    "BackendUnavailable",
    "Calibration",
    "ClusterIndex",
    "DemoModelUnavailable",
    "IndexFileError",
    "KMeansResult",
    "SqueezeConfig",
    "SqueezeStats",
    "SqueezedContext",
    "__version__",
    "build_index",
    "build_indexes",
    "compile",
    "demo_model",
    "kmeans",
    "load_indexes",
    "patch",
    "save_indexes",
    "squeezed_attention",
    "unpatch",
]


def __getattr__(name: str):
    if name in _HF_NAMES:
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise ImportError(
                f"squeeze.{name} needs transformers: pip install 'squeezed-attention[hf]'"
            )
        from .patches import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'squeeze' has no attribute {name!r}")
