"""Which implementation an operation runs: the Triton kernels or the PyTorch references.

Rules (one function, :func:`use_triton`, shared by every operation):
  * auto: CUDA tensors go to Triton, everything else to the PyTorch reference;
  * ``$SQUEEZE_BACKEND=torch`` forces the references (``native`` too: it names the C sparse
    attention kernel, which has its own selection, and means "reference" for the other ops);
  * ``$SQUEEZE_BACKEND=triton`` forces Triton, also for CPU tensors, which only runs under
    ``TRITON_INTERPRET=1`` (Triton's interpreter: how CI tests the kernels);
  * when Triton cannot run (not installed, no CUDA, CPU tensors without the interpreter) the
    reference is used and the reason is logged once on the ``"squeeze"`` logger.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger("squeeze")
BACKENDS = ("torch", "native", "triton")
_logged: set[str] = set()


@functools.cache
def triton_import_error() -> str | None:
    """Why ``import triton`` fails here, or ``None`` when it works."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"{type(exc).__name__}: {exc}"
    return None


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def env_backend() -> str | None:
    """``$SQUEEZE_BACKEND`` lower-cased, or ``None`` when unset; ``ValueError`` if unknown."""
    env = os.environ.get("SQUEEZE_BACKEND", "").strip().lower()
    if not env:
        return None
    if env not in BACKENDS:
        raise ValueError(f"$SQUEEZE_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


def triton_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors of ``device``, or ``None`` when they can."""
    err = triton_import_error()
    if err is not None:
        return f"triton is not importable ({err})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"


def use_triton(op: str, device: torch.device, backend: str | None = None) -> bool:
    """Whether ``op`` runs its Triton kernel for tensors on ``device``.

    ``backend`` (``None``, ``"torch"`` or ``"triton"``) overrides ``$SQUEEZE_BACKEND``; an explicit
    ``backend="triton"`` that cannot run raises ``RuntimeError``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    choice = backend or env_backend()
    if choice in ("torch", "native"):
        return False
    if choice is None and device.type != "cuda":
        return False
    reason = triton_reason(device)
    if reason is None:
        return True
    if backend == "triton":
        raise RuntimeError(f"{op}: backend='triton' cannot run: {reason}")
    log_once(f"{op}:{reason}", f"{op} uses the PyTorch reference: {reason}")
    return False


def log_once(key: str, message: str) -> None:
    """Log ``message`` on the ``"squeeze"`` logger the first time ``key`` is seen."""
    if key not in _logged:
        _logged.add(key)
        logger.warning("squeeze: %s", message)
