"""The tools' one model loader: ``demo`` and ``needle`` name ``squeeze.demo_model``'s models; bad
input is one line."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import squeeze
from squeeze.apps.models import load_model, resolve


def test_demo_names(monkeypatch):
    calls = []
    monkeypatch.setattr(squeeze, "demo_model", lambda *a: calls.append(a) or "/x")
    assert resolve("demo") == "/x" and resolve("needle") == "/x"
    assert calls == [(), ("needle",)]  # demo: SmolLM2-135M-Instruct; needle: the 2-layer model


def test_needle_is_the_shipped_model():
    assert resolve("needle") == squeeze.demo_model("needle")
    model, tok = load_model("needle")
    assert not model.training and next(model.parameters()).dtype.is_floating_point
    assert tok("? k017").input_ids


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope"))
    assert resolve("org/model") == "org/model"  # a hub id is not checked locally


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "int3"}, "not a floating-point torch dtype"),
        ({"dtype": "nope"}, "not a floating-point"),
        ({"dtype": "auto", "device": "cuda:7"}, "CUDA"),
    ],
)
def test_bad_dtype_or_device(kwargs, match):
    if "device" in kwargs:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is available")
    with pytest.raises(ValueError, match=match):
        load_model("needle", **kwargs)


def test_not_a_causal_lm(tmp_path):
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=1, d_kv=8, d_ff=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a causal LM") as err:
        load_model(str(tmp_path))
    assert "\n" not in str(err.value)


def test_unreadable_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load its config") as err:
        load_model(str(tmp_path))
    assert "\n" not in str(err.value)
