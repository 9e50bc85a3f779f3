"""The one model loader of the tools: a causal LM and its tokenizer, ready to compile a context.

Imports torch and transformers when called.
"""

from __future__ import annotations

from pathlib import Path

#: model names that stand for :func:`squeeze.demo_model`'s models: SmolLM2-135M-Instruct, the real
#: pretrained model (converted from its GGUF on first use), and the shipped 2-layer needle model
DEMO_MODELS = {"demo": (), "needle": ("needle",)}


def resolve(name: str) -> str:
    """The directory or hub id ``name`` stands for: ``demo`` is ``squeeze.demo_model()``, ``needle``
    is ``squeeze.demo_model("needle")``, ``~`` expands.

    ``FileNotFoundError`` for a local path that does not exist (``org/model`` is a hub id);
    ``squeeze.DemoModelUnavailable`` when ``demo``'s weights are not installed.
    """
    if name in DEMO_MODELS:
        from squeeze import demo_model

        return demo_model(*DEMO_MODELS[name])
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model {name} not found")
    return str(Path(name).expanduser()) if looks_local else name


def load_model(
    name, dtype: str = "float32", device: str | None = "cpu", tokenizer: str | None = None
):
    """``(model, tokenizer)``: the causal LM ``name`` in eval mode on ``device``, and its tokenizer.

    Args:
        name: a local directory, a hub id, ``"demo"`` (SmolLM2-135M-Instruct) or ``"needle"``
            (the shipped needle model): see :func:`resolve`. No remote code runs.
        dtype: ``"auto"`` (the checkpoint's) or a torch dtype name: float32, bfloat16, float16.
        device: ``cpu``, ``cuda``, ``cuda:1``...; ``None``: CUDA when available, else CPU.
        tokenizer: where the tokenizer is (default: ``name``).

    Raises ``FileNotFoundError`` for a missing local path and a one-line ``ValueError`` for a
    bad dtype or device, a config that cannot be read, or a model that is not a causal LM.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, str(dtype), None)
    if torch_dtype != "auto" and not (
        isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point
    ):
        raise ValueError(
            f"dtype {dtype!r} is not a floating-point torch dtype (float32, bfloat16, float16, auto)"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA device is available")
    path = resolve(str(name))
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"model {str(name)!r}: cannot load its config ({_first_line(err)})"
        ) from err
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"model {str(name)!r} is a {config.model_type!r} model ({type(config).__name__}), "
            "not a causal LM (AutoModelForCausalLM has no class for it)"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    tok = AutoTokenizer.from_pretrained(resolve(tokenizer) if tokenizer else path)
    return model.to(device).eval(), tok


def _first_line(err: BaseException) -> str:
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    return lines[0] if lines else type(err).__name__
