"""Which backend runs a kernel operation: one declared capability table, one choice rule.

Every operation of :mod:`squeeze.kernels` has a PyTorch backend (``"torch"``) and may have a
native C kernel (``"native"``, CPU) and a Triton kernel (``"triton"``, CUDA). :data:`TABLE`
declares, per (operation, backend), the devices, the dtypes, the head sizes and the rows it
takes, and the optional outputs it computes; :func:`choose` picks one for a call:

* ``backend=`` given: that backend, or :class:`~squeeze.errors.BackendUnavailable` naming why it
  cannot run (``ValueError`` for a name the operation does not have);
* else ``$SQUEEZE_BACKEND`` (``torch``, ``native`` or ``triton``; read once per process, here
  only): that backend where the operation has it and it can run; the PyTorch backend where the
  operation does not have it; where it cannot run, the automatic choice, the reason logged once.
  ``triton`` also runs CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter: how CI
  tests the kernels);
* else automatic: Triton for CUDA tensors, native for CPU tensors, PyTorch otherwise, each
  where its declared capability takes the call. A backend that should run but cannot (no Triton
  on a CUDA machine, no C compiler, a dtype or head size the build lacks) is logged once on the
  ``"squeeze"`` logger; a call outside a backend's declared rows or outputs goes on quietly.
  The automatic choice is made once per kind of call (op, device, dtype, head size, rows,
  outputs), not on every layer of every decode step.

Facts only the build knows (which dtypes the C compiler supports, its SIMD width) are read from
the built library (:func:`squeeze.kernels.native.build_info`), never discovered by failure.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailable
from ..logs import log_once
from . import native

logger = logging.getLogger("squeeze")

#: every backend name, in the order the automatic choice prefers them
BACKENDS = ("triton", "native", "torch")
ENV = "SQUEEZE_BACKEND"

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
ATTENTION_DTYPES = (F32, BF16, F16)
#: the stored centroid dtypes (``SqueezeConfig.centroid_dtype``): read as such, fp32 math
CENTROID_DTYPES = (F32, BF16)


@dataclass(frozen=True)
class Capability:
    """What one backend of one operation takes.

    Attributes:
        devices: device types it runs on; ``None``: any. A Triton backend runs CUDA tensors, and
            CPU tensors under ``TRITON_INTERPRET=1`` when it is asked for.
        dtypes: the dtypes of the operation's keyed tensor it reads; ``None``: any. A dtype
            with a C element code (:data:`squeeze.kernels.native.DTYPE_CODES`) must also be in
            the build; the others are converted by the binding.
        head_dim: ``"vector"``: the head size must be a multiple of the native build's SIMD width.
        max_rows: most packed query rows per KV head it takes.
        auto_rows: the automatic choice takes this backend only up to these rows (per dtype):
            above them another backend is faster (measured crossovers).
        outputs: the optional outputs it computes; ``None``: all (see :func:`choose`).
        library: the native library that must build (:mod:`squeeze.kernels.native`).
    """

    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    head_dim: str | None = None
    max_rows: int | None = None
    auto_rows: Mapping[torch.dtype, int] | None = None
    outputs: frozenset[str] | None = None
    library: str | None = None


ANY = Capability()
TRITON = Capability(devices=("cuda",))
NATIVE_KMEANS = Capability(devices=("cpu",), dtypes=(F32, BF16, F16, F64), library="kmeans")

#: (operation, backend) → what it takes. Outputs of centroid_scores: ``per_row`` (each query
#: row's own scores) and ``log_mass`` (the log softmax mass of a subset of the clusters).
TABLE: dict[tuple[str, str], Capability] = {
    ("sparse_attention", "triton"): Capability(devices=("cuda",), dtypes=ATTENTION_DTYPES),
    ("sparse_attention", "native"): Capability(
        devices=("cpu",),
        dtypes=ATTENTION_DTYPES,
        head_dim="vector",
        # crossovers measured at Hkv=8, D=128, N=32K, 10% selected (2-core Sapphire Rapids,
        # where torch's bf16 flash kernel uses AMX): fp32 ~200 rows, bf16 ~32, fp16 ~48
        auto_rows={F32: 128, BF16: 24, F16: 32},
        library="sparse_attention",
    ),
    ("sparse_attention", "torch"): ANY,
    ("centroid_scores", "triton"): Capability(
        devices=("cuda",), dtypes=CENTROID_DTYPES, outputs=frozenset({"log_mass"})
    ),
    ("centroid_scores", "native"): Capability(
        devices=("cpu",),
        dtypes=CENTROID_DTYPES,
        max_rows=4096,  # scratch: rows × K floats per thread
        outputs=frozenset({"per_row"}),
        library="centroid_scores",
    ),
    ("centroid_scores", "torch"): ANY,
    ("segments", "triton"): TRITON,
    ("segments", "native"): Capability(devices=("cpu",), library="segments"),
    ("segments", "torch"): ANY,
    ("assign", "triton"): TRITON,
    ("assign", "native"): NATIVE_KMEANS,
    ("assign", "torch"): ANY,
    ("centroid_update", "triton"): TRITON,
    ("centroid_update", "native"): NATIVE_KMEANS,
    ("centroid_update", "torch"): ANY,
    ("merge", "triton"): TRITON,
    ("merge", "torch"): ANY,
    ("zone_estimate", "native"): Capability(
        devices=("cpu",), dtypes=CENTROID_DTYPES, library="zone_estimate"
    ),
    ("zone_estimate", "torch"): ANY,
}


def backends(op: str) -> tuple[str, ...]:
    """The backends ``op`` has, in the order the automatic choice prefers them."""
    found = tuple(b for b in BACKENDS if (op, b) in TABLE)
    if not found:
        raise ValueError(f"unknown kernel operation {op!r}")
    return found


@functools.cache
def env_backend() -> str | None:
    """``$SQUEEZE_BACKEND`` lower-cased, or ``None`` when unset; ``ValueError`` if unknown.

    Read once per process (a valid value is cached; tests call ``env_backend.cache_clear()``).
    """
    env = os.environ.get(ENV, "").strip().lower()
    if not env:
        return None
    if env not in BACKENDS:
        raise ValueError(f"${ENV} must be one of {BACKENDS}, got {env!r}")
    return env


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


#: automatic decisions, by call facts and what they depend on (see :func:`choose`)
_CHOICES: dict[tuple, str] = {}


@dataclass(frozen=True)
class Call:
    """The facts of one call that capabilities are checked against."""

    device: torch.device
    dtype: torch.dtype | None = None
    head_dim: int | None = None
    rows: int | None = None
    outputs: frozenset[str] = frozenset()


def choose(
    op: str,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    rows: int | None = None,
    outputs: tuple[str, ...] = (),
    backend: str | None = None,
) -> str:
    """The backend that runs ``op`` for this call (rules in the module docstring).

    Args:
        op: an operation of :data:`TABLE`.
        device: the device of its tensors.
        dtype: the dtype of its keyed tensor (K/V, centroids or points), if any.
        head_dim: the head size, where a backend constrains it.
        rows: packed query rows per KV head, where a backend limits them.
        outputs: optional outputs the call needs (see :class:`Capability`).
        backend: ``None`` (``$SQUEEZE_BACKEND``, then automatic) or a backend name.
    """
    if backend is None and env_backend() is None:
        return _automatic_choice(op, device, dtype, head_dim, rows, tuple(outputs))
    offered = backends(op)
    call = Call(torch.device(device), dtype, head_dim, rows, frozenset(outputs))
    if backend is not None:
        if backend not in offered:
            raise ValueError(
                f"{op}: backend must be None or one of {list(offered)}, got {backend!r}"
            )
        reason = unavailable(op, backend, call, asked=True)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend={backend!r} cannot run: {reason}")
        return backend
    forced = env_backend()
    if forced not in offered:
        return "torch"
    reason = unavailable(op, forced, call, asked=True)
    if reason is None:
        return forced
    choice, _ = _automatic(op, offered, call)
    if not _quiet(op, forced, call):
        log_once(
            logger, ("env", op, forced, reason),
            "squeeze: $%s=%s cannot run %s here (%s); it uses %s", ENV, forced, op, reason,
            choice,
        )  # fmt: skip
    return choice


def _automatic_choice(op: str, device, dtype, head_dim, rows, outputs: tuple) -> str:
    """The automatic choice, made once per kind of call (every decode step asks the same
    questions): kept by the call's facts and what else the choice reads (Triton's import, the
    native libraries loaded). A choice that logged a fallback is not kept: it is made again,
    so that its log goes through :func:`~squeeze.logs.log_once` as before."""
    key = (op, device, dtype, head_dim, rows, outputs, triton_import_error, native.state())
    choice = _CHOICES.get(key)
    if choice is None:
        call = Call(torch.device(device), dtype, head_dim, rows, frozenset(outputs))
        choice, logged = _automatic(op, backends(op), call)
        if not logged:
            if len(_CHOICES) >= 4096:
                _CHOICES.clear()
            _CHOICES[key] = choice
    return choice


def unavailable(op: str, backend: str, call: Call, asked: bool = False) -> str | None:
    """Why ``backend`` cannot run ``op`` for ``call``, or ``None`` when it can (``asked``: the
    backend was asked for, so Triton may take CPU tensors under its interpreter)."""
    cap = TABLE[op, backend]
    device = call.device
    if backend == "triton":
        err = triton_import_error()
        if err is not None:
            return f"triton is not importable ({err})"
        if not (device.type == "cuda" or (device.type == "cpu" and asked and interpreting())):
            return (
                f"triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
            )
    elif cap.devices is not None and device.type not in cap.devices:
        where = "/".join(d.upper() for d in cap.devices)
        return f"the {backend} kernel is {where}-only (tensors on {device})"
    missing = _missing_outputs(cap, call)
    if missing:
        return f"the {backend} kernel does not compute {', '.join(sorted(missing))}"
    if cap.dtypes is not None and call.dtype is not None and call.dtype not in cap.dtypes:
        return f"the {backend} kernel does not read {call.dtype}"
    if cap.max_rows is not None and call.rows is not None and call.rows > cap.max_rows:
        return f"more than {cap.max_rows} query rows per KV head for the {backend} kernel"
    if cap.library is not None:
        return _build_reason(cap, call)
    return None


def _build_reason(cap: Capability, call: Call) -> str | None:
    info = native.build_info(cap.library)
    if info is None:
        return (
            f"native kernel {cap.library!r} unavailable ({native.unavailable_reason(cap.library)})"
        )
    if call.dtype in native.DTYPE_CODES and call.dtype not in info.dtypes:
        return f"the native kernel was built without {call.dtype} support"
    width = info.vector_width
    if cap.head_dim == "vector" and call.head_dim is not None and call.head_dim % width:
        return f"the native kernel needs D % {width} == 0, got D={call.head_dim}"
    return None


def _missing_outputs(cap: Capability, call: Call) -> frozenset[str]:
    return frozenset() if cap.outputs is None else call.outputs - cap.outputs


def _quiet(op: str, backend: str, call: Call) -> bool:
    """A call outside the backend's declared outputs or automatic rows: routing, not a fallback."""
    cap = TABLE[op, backend]
    if _missing_outputs(cap, call):
        return True
    return bool(
        cap.auto_rows is not None
        and call.rows is not None
        and call.rows > cap.auto_rows.get(call.dtype, 0)
    )


def _automatic(op: str, offered: tuple[str, ...], call: Call) -> tuple[str, bool]:
    """Triton for CUDA, native for CPU, PyTorch otherwise, where each takes the call; and
    whether a backend that should have run could not (logged)."""
    skipped = []
    choice = "torch"
    for backend in offered:
        if backend == "torch":
            break
        cap = TABLE[op, backend]
        home = ("cuda",) if backend == "triton" else cap.devices
        if call.device.type not in home or _quiet(op, backend, call):
            continue
        reason = unavailable(op, backend, call)
        if reason is None:
            choice = backend
            break
        skipped.append(reason)
    for reason in skipped:
        log_once(logger, reason, "squeeze: %s uses the %s path: %s", op, choice, reason)
    return choice, bool(skipped)
