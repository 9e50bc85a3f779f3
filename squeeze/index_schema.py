"""What one layer's index holds, declared once: the table every loaded or built index is checked
against.

:data:`TABLE` has one :class:`Spec` per tensor: its dtypes, its shape in the layer's dimensions
(``Hkv`` KV heads, ``N`` stored rows, ``D`` head size, ``K`` level-2 clusters, ``K1`` level-1
clusters, ``P`` calibration points; ``"K+2"`` is K plus two), when it must be present, and the
rules its values follow. A dimension is bound by the first tensor of the table that names it
bare, and every later tensor must agree. Adding a tensor is one line of the table; a rule is a
function ``(tensor, dims, config) -> problem or None``.

:func:`check_layer` runs the table on a layer's fields (those of
:class:`~squeeze.index.ClusterIndex`) and raises naming the layer, the tensor and what was
expected: :class:`~squeeze.errors.IndexFileError` at load (:mod:`squeeze.files`), ``ValueError``
after :func:`squeeze.build_index`. Cost: one pass over every tensor (the K/V's min and max, a
scatter for the permutation), at load or build, never per call.

The layout rule (:mod:`squeeze.index`): rows ``[0, N - n_dense)`` hold the clusters, the last
``n_dense`` rows (:func:`n_dense`) the dense rows, so ``offsets[:, K] = N - n_dense`` and
``offsets[:, K + 1] = N``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import config
from .errors import IndexFileError

#: largest magnitude a stored K/V or centroid value may have: the fp16 range, so that a cast to
#: any model dtype stays finite and no score or weighted sum of them overflows fp32
MAX_ABS = 65504.0
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
F32, F64, I64 = (torch.float32,), (torch.float64,), (torch.int64,)
#: the stored dtype of each ``SqueezeConfig.centroid_dtype`` (both levels of centroids)
CENTROID_DTYPES = {name: getattr(torch, name) for name in config.CENTROID_DTYPES}
CENTROIDS = tuple(CENTROID_DTYPES.values())
#: the calibration curves, fields of :class:`~squeeze.calibration.Calibration`
CURVES = ("budgets", "log_thresholds", "l1_log_thresholds")


def n_dense(config, n: int) -> int:
    """Rows kept dense at the end of the cluster-ordered layout (never clustered, always read):
    the sinks and the window, capped by the ``n`` stored rows."""
    return min(config.sinks + config.window, n)


# ----------------------------------------------------------------------------- value rules


def bounded(t: torch.Tensor, dims: dict, cfg) -> str | None:
    """Finite, and within ``±MAX_ABS`` (two reductions, no copy)."""
    if t.numel() == 0:
        return None
    lo, hi = float(t.amin()), float(t.amax())
    if lo != lo or hi != hi:
        return "holds NaN"
    if not -MAX_ABS <= lo <= hi <= MAX_ABS:
        return f"must lie within ±{MAX_ABS:g} (the fp16 range), holds values in [{lo:g}, {hi:g}]"
    return None


def like_keys(t: torch.Tensor, dims: dict, cfg) -> str | None:
    """The keys' dtype (the attention kernels read K and V as one type)."""
    if dims.get("keys:dtype") not in (None, t.dtype):
        return f"must have the keys' dtype {dims['keys:dtype']}, got {t.dtype}"
    return None


def stored_dtype(t: torch.Tensor, dims: dict, cfg) -> str | None:
    """The dtype the config's ``centroid_dtype`` names: centroids stored in another dtype than
    the config says (a file's config or tensors edited after it was written) are refused."""
    want = CENTROID_DTYPES[cfg.centroid_dtype]
    if t.dtype != want:
        return (
            f"has dtype {t.dtype}, but the config's centroid_dtype is {cfg.centroid_dtype!r} "
            f"({want}): the stored centroids disagree with the config"
        )
    return None


def permutation(t: torch.Tensor, dims: dict, cfg) -> str | None:
    """Every head's row holds each of ``0 .. N-1`` exactly once."""
    n = dims["N"]
    if t.numel() == 0:
        return None
    lo, hi = int(t.amin()), int(t.amax())
    if lo < 0 or hi >= n:
        return f"must hold context positions in [0, {n}), holds values in [{lo}, {hi}]"
    seen = torch.zeros(t.shape, dtype=torch.bool, device=t.device).scatter_(1, t, True)
    if not bool(seen.all()):
        head = int((~seen).any(1).nonzero()[0, 0])
        return f"must be a permutation of 0..{n - 1} in every head; head {head} repeats positions"
    return None


def _csr(t: torch.Tensor, last: int, what: str) -> str | None:
    """Row ``h`` rises from 0 to ``last``."""
    if bool((t[:, 0] != 0).any()):
        return f"must start at 0 in every head, starts at {t[:, 0].tolist()}"
    steps = t[:, 1:] - t[:, :-1]
    if bool((steps < 0).any()):
        h, c = (int(x) for x in (steps < 0).nonzero()[0])
        return (
            f"must be non-decreasing; head {h} falls from {int(t[h, c])} to {int(t[h, c + 1])} "
            f"at {c + 1}"
        )
    if bool((t[:, -1] != last).any()):
        return f"must end at {what} = {last} in every head, ends at {t[:, -1].tolist()}"
    return None


def cluster_rows(t: torch.Tensor, dims: dict, cfg) -> str | None:
    """Level-2 row offsets: 0 .. ``N - n_dense`` over the clusters, then the dense rows to N."""
    n = dims["N"]
    clustered = n - n_dense(cfg, n)
    if clustered < 1:
        return f"leave no clustered rows: N = {n} rows, {n_dense(cfg, n)} of them dense"
    problem = _csr(t[:, :-1], clustered, f"N - n_dense = {n} - {n_dense(cfg, n)}")
    if problem is not None:
        return problem
    if bool((t[:, -1] != n).any()):
        return f"must end at N = {n} (the dense rows' end), ends at {t[:, -1].tolist()}"
    return None


def children(t: torch.Tensor, dims: dict, cfg) -> str | None:
    """Level-1 offsets into the level-2 clusters: 0 .. K."""
    return _csr(t, dims["K"], "K")


def non_negative(t: torch.Tensor, dims: dict, cfg) -> str | None:
    """No negative value (a spread is a mean squared distance)."""
    if t.numel() and float(t.amin()) < 0:
        return f"must be >= 0, holds {float(t.amin()):g}"
    return None


def budget_grid(t: torch.Tensor, dims: dict, cfg) -> str | None:
    """Strictly ascending budgets in (0, 1]."""
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()) or bool((t > 1).any()):
        return "must hold budgets in (0, 1]"
    if bool((t[1:] <= t[:-1]).any()):
        return "must be strictly ascending"
    return None


def threshold_curve(t: torch.Tensor, dims: dict, cfg) -> str | None:
    """Log-thresholds: no NaN or +inf (``-inf`` is a full budget's), non-increasing."""
    if bool(torch.isnan(t).any()) or bool((t == float("inf")).any()):
        return "holds NaN or +inf"
    if bool((t[1:] > t[:-1]).any()):
        return "must be non-increasing with the budget (a larger budget, a lower threshold)"
    return None


# ----------------------------------------------------------------------------- the table


def always(cfg, present: set) -> bool | None:
    return True


def optional(cfg, present: set) -> bool | None:
    return None


def two_levels(cfg, present: set) -> bool | None:
    return cfg.levels == 2


def calibrated(cfg, present: set) -> bool | None:
    return True if cfg.mode == "threshold" else None


def with_budgets(cfg, present: set) -> bool | None:
    return "budgets" in present


def with_budgets_two_levels(cfg, present: set) -> bool | None:
    return "budgets" in present and cfg.levels == 2


def estimated_zone(cfg, present: set) -> bool | None:
    return True if cfg.estimate_zone > 0 else None


def with_keys(cfg, present: set) -> bool | None:
    return "keys" in present


def spread_estimator(cfg, present: set) -> bool | None:
    return True if cfg.estimator == "spread" else None


def spread_two_levels(cfg, present: set) -> bool | None:
    if cfg.levels == 1:
        return False
    return True if cfg.estimator == "spread" or "spread" in present else None


@dataclass(frozen=True)
class Spec:
    """One tensor of a layer.

    Attributes:
        name: the field (calibration curves by their own names, see :data:`CURVES`).
        dtypes: the dtypes it may have.
        shape: its dimensions: a name of :data:`TABLE`'s dimensions, or ``"name+int"``.
        present: ``(config, names present) -> True`` (required), ``False`` (must be absent) or
            ``None`` (either).
        rules: value rules, run in order once dtype and shape hold.
    """

    name: str
    dtypes: tuple[torch.dtype, ...]
    shape: tuple[str, ...]
    present: Callable[..., bool | None]
    rules: tuple[Callable[..., str | None], ...] = ()


TABLE = (
    Spec("centroids", CENTROIDS, ("Hkv", "K", "D"), always, (stored_dtype, bounded)),
    Spec("positions", I64, ("Hkv", "N"), always, (permutation,)),
    Spec("offsets", I64, ("Hkv", "K+2"), always, (cluster_rows,)),
    Spec("keys", KV_DTYPES, ("Hkv", "N", "D"), optional, (bounded,)),
    Spec("values", KV_DTYPES, ("Hkv", "N", "D"), with_keys, (like_keys, bounded)),
    Spec("l1_centroids", CENTROIDS, ("Hkv", "K1", "D"), two_levels, (stored_dtype, bounded)),
    Spec("l1_offsets", I64, ("Hkv", "K1+1"), two_levels, (children,)),
    Spec("spread", F32, ("Hkv", "K"), spread_estimator, (bounded, non_negative)),
    Spec("l1_spread", F32, ("Hkv", "K1"), spread_two_levels, (bounded, non_negative)),
    Spec("value_means", CENTROIDS, ("Hkv", "K", "D"), estimated_zone, (stored_dtype, bounded)),
    Spec("budgets", F64, ("P",), calibrated, (budget_grid,)),
    Spec("log_thresholds", F64, ("P",), with_budgets, (threshold_curve,)),
    Spec("l1_log_thresholds", F64, ("P",), with_budgets_two_levels, (threshold_curve,)),
)


def tensors_of(fields: dict) -> dict[str, torch.Tensor | None]:
    """The tensors of a layer's fields (a :class:`~squeeze.index.ClusterIndex`'s, as a dict),
    the calibration curves flattened to their own names."""
    out = {name: fields.get(name) for name in (s.name for s in TABLE) if name not in CURVES}
    cal = fields.get("calibration")
    for curve in CURVES:
        out[curve] = None if cal is None else getattr(cal, curve, None)
    return out


def check_layer(fields: dict, where: str, error: type[Exception] = IndexFileError) -> dict:
    """Check one layer's fields against :data:`TABLE` and its config; returns the dimensions
    (``{"Hkv": .., "N": .., ...}``; under ``"N@"`` the tensor that bound each, under
    ``"keys:dtype"`` each tensor's dtype). Raises ``error`` naming ``where``, the tensor and what was
    expected."""
    cfg = fields["config"]
    tensors = tensors_of(fields)
    present = {name for name, t in tensors.items() if t is not None}
    dims: dict[str, int] = {}
    for spec in TABLE:
        t = tensors[spec.name]
        need = spec.present(cfg, present)
        if t is None:
            if need:
                raise error(f"{where}: tensor {spec.name!r} is missing ({_why(spec, cfg)})")
            continue
        if need is False:
            raise error(f"{where}: tensor {spec.name!r} must be absent ({_why(spec, cfg)})")
        problem = _dtype_and_shape(spec, t, dims)
        for rule in () if problem else spec.rules:
            problem = rule(t, dims, cfg)
            if problem:
                break
        if problem:
            raise error(f"{where}: tensor {spec.name!r} {problem}")
    return dims


def check_dense(keys, values, n: int, sliding_window: int | None, where: str) -> None:
    """A dense layer's context K/V ``[Hkv, rows, D]``: all ``n`` context rows (a full layer),
    or 1 .. ``min(n, sliding_window)`` of them (a sliding one), finite and bounded."""
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise IndexFileError(f"{where}: has no {name} record")
        if t.dtype not in KV_DTYPES or t.dim() != 3 or 0 in t.shape:
            raise IndexFileError(
                f"{where}: {name} must be a float [Hkv, rows, D] tensor, got {t.dtype} "
                f"{tuple(t.shape)}"
            )
        problem = bounded(t, {}, None)
        if problem:
            raise IndexFileError(f"{where}: {name} {problem}")
    if values.shape != keys.shape or values.dtype != keys.dtype:
        raise IndexFileError(
            f"{where}: values {values.dtype} {tuple(values.shape)} must match keys "
            f"{keys.dtype} {tuple(keys.shape)}"
        )
    rows = keys.shape[1]
    if sliding_window is None and rows != n:
        raise IndexFileError(f"{where}: holds {rows} rows, the context has {n}")
    if sliding_window is not None and rows > min(n, sliding_window):
        raise IndexFileError(f"{where}: holds {rows} rows, over its window {sliding_window}")


def _why(spec: Spec, cfg) -> str:
    zone = f", estimate_zone={cfg.estimate_zone}" if spec.name == "value_means" else ""
    return f"config: levels={cfg.levels}, mode={cfg.mode!r}{zone}"


def _dtype_and_shape(spec: Spec, t, dims: dict) -> str | None:
    """Check ``t``'s dtype and shape, binding the dimensions it names first (``dims`` keeps,
    under ``"name@"``, which tensor bound each)."""
    if not isinstance(t, torch.Tensor):
        return f"must be a tensor, got {type(t).__name__}"
    if t.dtype not in spec.dtypes:
        return f"must have dtype {' or '.join(map(str, spec.dtypes))}, got {t.dtype}"
    dims[f"{spec.name}:dtype"] = t.dtype
    if t.dim() != len(spec.shape):
        return f"must be {len(spec.shape)}-D [{', '.join(spec.shape)}], got {tuple(t.shape)}"
    for axis, expr in enumerate(spec.shape):
        name, _, plus = expr.partition("+")
        size = int(t.shape[axis]) - int(plus or 0)
        if name not in dims and not plus:
            if size < 1:
                return f"must have {name} >= 1, got shape {tuple(t.shape)}"
            dims[name], dims[name + "@"] = size, spec.name
        elif dims.get(name) != size:
            want = ", ".join(_size(e, dims) for e in spec.shape)
            return (
                f"must have shape [{want}] ({name} as in {dims.get(name + '@')!r}), got "
                f"{tuple(t.shape)}"
            )
    return None


def _size(expr: str, dims: dict) -> str:
    name, _, plus = expr.partition("+")
    if name not in dims:
        return expr
    return f"{expr}={dims[name] + int(plus or 0)}"
