"""Check a compiled-context file against the served checkpoint, without building the model.

The file's fingerprints (:mod:`squeeze.files`) were taken from a transformers
model: its config fields, and every parameter's name, shape and first values. The same facts are
read here from the checkpoint directory vLLM serves (``config.json`` via transformers, the
``*.safetensors`` tensors), so a file compiled for another model fails at engine start-up.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ModelMismatchError
from ...files import check_model
from .config import SqueezeVllmConfigError


class _Head:
    """A stand-in for a parameter: its shape, and its first values as ``reshape(-1)``."""

    def __init__(self, shape, head: torch.Tensor):
        self.shape = torch.Size(shape)
        self._head = head

    def detach(self):
        return self

    def reshape(self, *_):
        return self._head


class _CheckpointModel:
    """Duck-types what ``files.config_fingerprint`` / ``files.weights_fingerprint`` read."""

    def __init__(self, model_dir: Path, hf_config, per_tensor: int = 32):
        self.config = hf_config
        self._dir = model_dir
        self._per = per_tensor

    def named_parameters(self):
        from safetensors import safe_open

        files = sorted(self._dir.glob("*.safetensors"))
        if not files:
            raise SqueezeVllmConfigError(
                f"no *.safetensors in {self._dir}: squeeze checks context files against "
                "safetensors checkpoints only"
            )
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in list(st.keys()):
                    sl = st.get_slice(name)
                    shape = sl.get_shape()
                    numel = 1
                    for s in shape:
                        numel *= s
                    head = _first_values(sl, shape, min(self._per, numel))
                    yield name, _Head(shape, head)


def _first_values(sl, shape, k: int) -> torch.Tensor:
    """The first ``k`` values (row-major) of a safetensors slice, read without the whole tensor."""
    if not shape:
        return sl[...].reshape(-1)[:k]
    rows = 1
    inner = 1
    for s in shape[1:]:
        inner *= s
    rows = max(1, -(-k // max(inner, 1)))
    return sl[:rows].reshape(-1)[:k]


def model_dir_of(model: str) -> Path:
    """The local directory of ``model`` (a path, or a Hugging Face id already downloaded)."""
    p = Path(model)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as err:
        raise SqueezeVllmConfigError(
            f"cannot find the files of model {model!r} locally to check squeeze contexts: {err}"
        ) from err


def check_model_files(meta: dict, model: str, hf_config, path) -> None:
    """Raise :class:`SqueezeVllmConfigError` if ``meta`` was compiled for another model."""
    stand_in = _CheckpointModel(model_dir_of(model), hf_config)
    try:
        check_model(meta, stand_in, path)
    except ModelMismatchError as err:
        raise SqueezeVllmConfigError(f"squeeze context {path}: {err}") from err
