"""Kernel operations, one folder each: ``__init__`` (input checks and dispatch), ``reference.py``
(PyTorch), ``native.py`` (C, CPU), ``triton.py`` (CUDA), as the operation has them.

``dispatch.py`` chooses the backend of every call from one capability table; ``native/`` builds
the C sources; ``scratch.py`` keeps reused buffers. The operations: ``sparse_attention``,
``centroid_scores``, ``segments``, ``assign``, ``centroid_update``, ``merge``, ``dense_attention``,
``zone_estimate``.
"""

import torch

#: the log of a zero weight: an empty cluster, a pruned region, a side without keys
NEG_INF = float("-inf")
#: torch's CPU flash-attention kernel, which returns the LSE (``None`` where torch lacks it):
#: the PyTorch backends' attention on CPU
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
