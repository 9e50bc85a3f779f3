"""Kernel operations, one folder each: ``__init__`` (input checks and dispatch), ``reference.py``
(PyTorch), ``native.py`` (C, CPU), ``triton.py`` (CUDA), as the operation has them.

``dispatch.py`` chooses the backend of every call from one capability table; ``native/`` builds
the C sources; ``scratch.py`` keeps reused buffers. The operations: ``sparse_attention``,
``centroid_scores``, ``segments``, ``assign``, ``centroid_update``, ``merge``, ``dense_attention``.
"""

#: the log of a zero weight: an empty cluster, a pruned region, a side without keys
NEG_INF = float("-inf")
