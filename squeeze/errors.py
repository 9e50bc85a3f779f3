"""The package's error types. One table for the whole package; tests assert the type.

=====================  =====================================================================
``TypeError``          an argument of the wrong type (a list where a tensor is expected, an int
                       tensor where a float one is, a float where an int is)
``ValueError``         an argument of the wrong value or shape; the message names the argument,
                       the shape or value it has and what was expected
``IndexFileError``     (a ``ValueError``) an index or compiled-context file that cannot be used,
                       however it is malformed: not such a file (a directory), truncated,
                       altered, inconsistent (tensors that disagree with each other, their
                       config or the header), a header outside its schema, unsigned or wrongly
                       signed when a key is given, of an unsupported version
``ModelMismatchError`` (a ``ValueError``) a sound compiled-context file made for another model
                       (other config or other weights): the file is fine, the pairing is not
``FileNotFoundError``  a file to read that does not exist
``BackendUnavailable`` (a ``RuntimeError``) a backend asked for explicitly (``backend=``) that
                       cannot run here: no C compiler, no Triton, tensors on the wrong device, a
                       dtype or head size the kernel was not built for
``MemoryError``        a native kernel that could not allocate its scratch memory (a native
                       kernel handed out-of-bounds segments or runs refuses them: ``ValueError``)
``RuntimeError``       any other failure of a native kernel, and a model whose attention does
                       not fit what was compiled (see :mod:`squeeze.patches.hf`)
=====================  =====================================================================

``$SQUEEZE_BACKEND`` naming a backend that cannot run is not an error: the automatic choice is
used and the reason is logged once.
"""

from __future__ import annotations


class IndexFileError(ValueError):
    """An index or context file that cannot be used: not such a file, truncated, altered,
    inconsistent, outside the header schema, unsigned or wrongly signed when a key is given, or
    of an unsupported format version. The message names the file and, where it applies, the
    layer, the tensor or header field, and what was expected."""


class ModelMismatchError(ValueError):
    """A compiled-context file made for another model (other config or other weights)."""


class BackendUnavailable(RuntimeError):
    """A backend asked for explicitly that cannot run on these tensors on this machine."""
