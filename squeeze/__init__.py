"""squeeze: Squeezed Attention for long fixed contexts.

Cluster a fixed context's keys once (``build_index``), then let every query read only the
clusters it needs (``squeezed_attention``). The core import is light: torch, numpy, safetensors.
"""

from .attention import SqueezeStats, squeezed_attention
from .calibration import Calibration
from .config import SqueezeConfig
from .index import ClusterIndex, build_index, build_indexes
from .kmeans import KMeansResult, kmeans
from .serialization import IndexFileError, load_indexes, save_indexes

__version__ = "0.1.0.dev0"

__all__ = [
    "Calibration",
    "ClusterIndex",
    "IndexFileError",
    "KMeansResult",
    "SqueezeConfig",
    "SqueezeStats",
    "__version__",
    "build_index",
    "build_indexes",
    "kmeans",
    "load_indexes",
    "save_indexes",
    "squeezed_attention",
]
