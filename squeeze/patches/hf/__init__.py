"""Hugging Face transformers integration (imports transformers).

ctx = compile(model, context_ids, cfg)      # prefill once, cluster, calibrate
ids = ctx.generate(question_ids)            # any number of questions; ctx never changes
ctx.save("doc.sqz"); ctx = SqueezedContext.load("doc.sqz", model)
patch(model) / unpatch(model)               # switch attention to "squeeze" and back
with observe(fn): model(...)                # see every attention call's q/k/v (timing, probes)
"""

from ...errors import ModelMismatchError
from ...files import DenseLayer
from .attention import register, squeeze_attention_forward
from .cache import ATTN_NAME, SqueezedCache, SqueezedLayer
from .capture import compile
from .context import SqueezedContext
from .patch import is_patched, observe, patch, unpatch

__all__ = [
    "ATTN_NAME",
    "DenseLayer",
    "ModelMismatchError",
    "SqueezedCache",
    "SqueezedContext",
    "SqueezedLayer",
    "compile",
    "is_patched",
    "observe",
    "patch",
    "register",
    "squeeze_attention_forward",
    "unpatch",
]
