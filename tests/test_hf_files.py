"""SqueezedContext.save / load: identical round trip; wrong model, truncation, alteration refused."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from pathlib import Path

import torch
from test_hf_common import random_ids, squeezed_generate, tiny_model

from squeeze import IndexFileError, SqueezeConfig, files
from squeeze.patches.hf import ModelMismatchError, SqueezedContext, compile

FIXTURES = Path(__file__).parent / "fixtures" / "files"


@pytest.fixture
def saved(tmp_path, gen):
    model = tiny_model("gemma3")  # one squeezed layer, one sliding layer stored dense
    ctx = compile(
        model,
        random_ids(gen, 200),
        SqueezeConfig(window=32, budget=0.2),
        chunk_size=64,
        progress=False,
    )
    path = tmp_path / "doc.sqz"
    ctx.save(path)
    return model, ctx, path


def test_round_trip_identical(saved, gen):
    model, ctx, path = saved
    loaded = SqueezedContext.load(path, model)
    assert loaded.config == ctx.config and loaded.n_context == ctx.n_context
    assert torch.equal(loaded.context_ids, ctx.context_ids)
    assert list(loaded.indexes) == list(ctx.indexes) == [1] and list(loaded.dense) == [0]
    for a, b in zip(loaded.indexes.values(), ctx.indexes.values(), strict=True):
        for name in (
            "keys",
            "values",
            "positions",
            "centroids",
            "offsets",
            "l1_centroids",
            "l1_offsets",
            "spread",
            "l1_spread",
        ):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            assert x is None or torch.equal(x, y), name
        assert a.spread is not None  # the default estimator's per-cluster spread is saved
        assert torch.equal(a.calibration.log_thresholds, b.calibration.log_thresholds)
    assert torch.equal(loaded.dense[0].keys, ctx.dense[0].keys)
    for n in (6, 3):
        q = random_ids(gen, n)
        t1, l1 = squeezed_generate(ctx, q, 5)
        t2, l2 = squeezed_generate(loaded, q, 5)
        assert torch.equal(t1, t2) and torch.equal(l1, l2)


def test_other_model_refused(saved):
    _, _, path = saved
    with pytest.raises(ModelMismatchError, match="another model") as err:  # other config
        SqueezedContext.load(path, tiny_model("gemma3", hidden_size=64))
    assert not isinstance(err.value, IndexFileError)
    with pytest.raises(ModelMismatchError, match="other weights"):  # same config, other weights
        SqueezedContext.load(path, tiny_model("gemma3", seed=1))
    with pytest.raises(ModelMismatchError, match="another model"):
        SqueezedContext.load(path, tiny_model("llama"))


def test_truncated_file_refused(saved, tmp_path):
    model, _, path = saved
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 40):
        bad = tmp_path / f"cut{cut}.sqz"
        bad.write_bytes(data[:cut])
        with pytest.raises(IndexFileError):
            SqueezedContext.load(bad, model)


def test_flipped_byte_refused(saved, tmp_path, gen):
    model, _, path = saved
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    for where in torch.randint(header_end, len(data), (3,), generator=gen).tolist():
        bad = tmp_path / f"flip{where}.sqz"
        flipped = bytearray(data)
        flipped[where] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(IndexFileError, match="checksum"):
            SqueezedContext.load(bad, model)
    # inside the JSON header: change one hex digit of the context hash (still valid JSON)
    text = bytes(data[8:header_end]).decode()
    start = text.index("context_sha256") + len("context_sha256")
    at = next(i for i in range(start, len(text)) if text[i] in "0123456789abcdef")
    digit = "0" if text[at] != "0" else "1"
    bad = tmp_path / "header.sqz"
    bad.write_bytes(
        bytes(data[:8]) + (text[:at] + digit + text[at + 1 :]).encode() + bytes(data[header_end:])
    )
    with pytest.raises(IndexFileError, match="altered"):
        SqueezedContext.load(bad, model)


def test_context_ids_checked(saved, gen):
    model, ctx, path = saved
    loaded = SqueezedContext.load(path, model, context_ids=ctx.context_ids)
    assert torch.equal(loaded.context_ids, ctx.context_ids)
    with pytest.raises(ValueError, match="not the context"):
        SqueezedContext.load(path, model, context_ids=random_ids(gen, 200))


def test_not_an_index_refused(tmp_path, saved):
    model, _, _ = saved
    from safetensors.torch import save_file

    other = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(3)}, str(other))
    with pytest.raises(IndexFileError, match="not a squeeze index"):
        SqueezedContext.load(other, model)


def test_dense_layers_are_records_of_their_own(saved):
    """Format 2: a dense layer is stored as its K/V, not as an index layer."""
    _, ctx, path = saved
    header, tensors = files.read_tensors(path)
    meta = header["metadata"]
    assert meta["format_version"] == files.CONTEXT_VERSION == 2
    assert len(header["layers"]) == len(ctx.indexes) == 1
    assert torch.equal(tensors["dense.0.keys"], ctx.dense[0].keys[0])
    assert torch.equal(tensors["dense.0.values"], ctx.dense[0].values[0])
    assert not any(name.startswith("layers.1.") for name in tensors)


def test_format_1_files_still_load(gen):
    """A context saved by the previous format (dense layers stored as one-cluster index layers
    after the squeezed ones) loads, and answers as a fresh compile of the same context does."""
    model = tiny_model("gemma3")
    old = SqueezedContext.load(FIXTURES / "context_v1.safetensors", model)
    assert files.read_context_header(FIXTURES / "context_v1.safetensors")["format_version"] == 1
    assert list(old.indexes) == [1] and list(old.dense) == [0]
    # written before centroid_dtype: fp32 centroids, and the config that reproduces them
    assert old.config.centroid_dtype == "float32"
    assert old.indexes[1].centroids.dtype == torch.float32
    assert old.dense[0].kind == "sliding" and old.dense[0].keys.shape[0] == 1
    fresh = compile(model, old.context_ids, old.config, chunk_size=64, progress=False)
    assert torch.equal(fresh.dense[0].keys, old.dense[0].keys)
    for name in ("keys", "values", "positions", "centroids", "offsets"):
        assert torch.equal(getattr(fresh.indexes[1], name), getattr(old.indexes[1], name)), name
    q = random_ids(gen, 5)
    t1, l1 = squeezed_generate(fresh, q, 4)
    t2, l2 = squeezed_generate(old, q, 4)
    assert torch.equal(t1, t2) and torch.equal(l1, l2)
