"""Compiled-context files we did not write: the header is checked against the tensors (issue 14,
defect 5), and the vLLM loader refuses what it cannot serve at engine start (defect 3).

Each crafted file has its digests recomputed (``file_tools.rewrite``), so it passes every
checksum.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")

import torch
from file_tools import rewrite
from test_hf_common import random_ids, tiny_model
from vllm_tiny import save_tiny_llama

from squeeze import IndexFileError, SqueezeConfig
from squeeze.patches.hf import SqueezedContext, compile
from squeeze.patches.vllm.config import SqueezeVllmConfigError, plugin_config
from squeeze.patches.vllm.contexts import check_distinct, load_context

N = 301


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    model = tiny_model("gemma3")  # one squeezed layer, one sliding layer stored dense
    gen = torch.Generator().manual_seed(5)
    ctx = compile(
        model,
        random_ids(gen, N),
        SqueezeConfig(window=32, budget=0.2),
        chunk_size=64,
        progress=False,
    )
    path = tmp_path_factory.mktemp("hf") / "doc.sqz"
    ctx.save(path)
    return model, ctx, path


def _meta(fn):
    def edit(header):
        fn(header["metadata"])

    return edit


def _shorter_ids(meta):
    """Another context: the first 280 ids, its length and hash made consistent."""
    from squeeze.files import context_digest

    meta["context_ids"] = meta["context_ids"][:280]
    meta["context_len"] = 280
    meta["context_sha256"] = context_digest(torch.tensor(meta["context_ids"]))


def _ids_other_hash(meta):
    meta["context_ids"] = meta["context_ids"][::-1]


def _dup_layers(meta):
    meta["squeezed_layers"] = [1, 1]


def _layer_count(meta):
    meta["num_layers"] = 3


def _dense_kind(meta):
    meta["dense_layers"][0]["kind"] = "full"
    meta["dense_layers"][0]["sliding_window"] = None


def _ids_type(meta):
    meta["context_ids"][3] = 1.5


@pytest.mark.parametrize(
    "edit, words",
    [
        (_shorter_ids, "holds 301 context rows, context_len is 280"),  # defect 5
        (_ids_other_hash, "context_sha256 is not the hash"),
        (_dup_layers, "exactly once"),
        (_layer_count, "exactly once"),
        (_dense_kind, "holds 47 rows, the context has 301"),
        (_ids_type, "integer token ids"),
        (lambda m: m.update(config_fields=[]), "'config_fields' must be dict"),
        (lambda m: m.update(config={"window": 16}), "config differs"),
        (lambda m: m.pop("model_class"), "'model_class' is missing"),
        (lambda m: m["dense_layers"].append(5), "must be a JSON object"),
    ],
)
def test_hf_context_header_checked_against_tensors(hf_saved, tmp_path, edit, words):
    model, _, path = hf_saved
    bad = rewrite(path, tmp_path / "bad.sqz", header_fn=_meta(edit))
    with pytest.raises(IndexFileError, match=words):
        SqueezedContext.load(bad, model)


def test_hf_context_tensors_checked(hf_saved, tmp_path):
    model, _, path = hf_saved

    def nan_dense(tensors):
        tensors["dense.0.values"][0, 3, 1] = float("nan")

    bad = rewrite(path, tmp_path / "bad.sqz", tensors_fn=nan_dense)
    with pytest.raises(IndexFileError, match="dense layer 0: values holds NaN"):
        SqueezedContext.load(bad, model)

    def wide_dense(tensors):
        for n in ("keys", "values"):
            t = tensors[f"dense.0.{n}"]
            tensors[f"dense.0.{n}"] = torch.cat([t, t], 0)  # 4 KV heads: not the model's 2

    bad = rewrite(path, tmp_path / "bad2.sqz", tensors_fn=wide_dense)
    with pytest.raises(IndexFileError, match="4 KV heads"):
        SqueezedContext.load(bad, model)

    def bad_positions(tensors):
        tensors["layers.0.positions"][0, 0] = 10**9

    bad = rewrite(path, tmp_path / "bad3.sqz", tensors_fn=bad_positions)
    with pytest.raises(IndexFileError, match="layer 0: tensor 'positions'"):
        SqueezedContext.load(bad, model)


def test_hf_context_signature(hf_saved, tmp_path):
    model, ctx, _ = hf_saved
    path = tmp_path / "signed.sqz"
    ctx.save(path, key="k1")
    assert SqueezedContext.load(path, model, key="k1").n_context == N
    with pytest.raises(IndexFileError, match="signature"):
        SqueezedContext.load(path, model, key="k2")


# ----------------------------------------------------------------------------- vLLM loader


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Llama checkpoint directory and a context compiled for it."""
    root = tmp_path_factory.mktemp("vllm")
    model = save_tiny_llama(root / "model")
    gen = torch.Generator().manual_seed(7)
    ids = random_ids(gen, N)
    ctx = compile(model, ids, SqueezeConfig(window=20, budget=0.2), chunk_size=64, progress=False)
    ctx.save(root / "ctx.sqz")
    return root


def _load(served, path):
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(served / "model"))
    return load_context(path, str(served / "model"), hf_config, None, (0, 2))


def test_vllm_loader_accepts_the_good_file(served):
    ctx = _load(served, served / "ctx.sqz")
    assert ctx.n == N and sorted(ctx.layers) == [0, 1]


@pytest.mark.parametrize(
    "header_fn, tensors_fn, words",
    [
        (_meta(_shorter_ids), None, "holds 301 context rows, context_len is 280"),
        (None, lambda t: t["layers.1.positions"].__setitem__((0, 4), 10**9), "'positions'"),
        (_meta(lambda m: m.update(squeezed_layers=[0, 0])), None, "exactly once"),
        (_meta(lambda m: m.update(squeezed_layers=[0, 7])), None, "exactly once"),
    ],
)
def test_vllm_loader_refuses(served, tmp_path, header_fn, tensors_fn, words):
    bad = rewrite(served / "ctx.sqz", tmp_path / "bad.sqz", header_fn, tensors_fn)
    with pytest.raises(SqueezeVllmConfigError, match=words):
        _load(served, bad)


def test_vllm_same_context_twice_refused(served, tmp_path):
    import shutil

    copy = tmp_path / "copy.sqz"
    shutil.copy(served / "ctx.sqz", copy)
    with pytest.raises(SqueezeVllmConfigError, match="same context token ids"):
        check_distinct([_load(served, served / "ctx.sqz"), _load(served, copy)])


def test_vllm_config_fields_checked(served):
    f = str(served / "ctx.sqz")
    bad = [
        ({"contexts": 5}, "non-empty list"),
        ({"contexts": []}, "non-empty list"),
        ({"contexts": [""]}, "non-empty list"),
        ({"contexts": {f: 1}}, "non-empty list"),
        ({"contexts": [f, 3]}, "non-empty list"),
        ({"contexts": [f, f]}, "listed twice"),
        ({"contexts": [f, str(served / "model" / ".." / "ctx.sqz")]}, "listed twice"),
        ({"contexts": [str(served)]}, "is not a file"),
        ({"contexts": [f], "log_interval_s": math.nan}, "log_interval_s"),
        ({"contexts": [f], "log_interval_s": math.inf}, "log_interval_s"),
        ({"contexts": [f], "log_interval_s": True}, "log_interval_s"),
        ({"contexts": [f], "log_interval_s": -1}, "log_interval_s"),
        ({"contexts": [f], "log_interval_s": "10"}, "log_interval_s"),
        ({"contexts": [f], "budget": "0.5"}, "budget"),
        ({"contexts": [f], "budgett": 0.5}, "unknown keys"),
        ({"contexts": [f], "budget": math.nan}, "budget"),
        ({"contexts": [f], "budget": True}, "budget"),
    ]
    for raw, words in bad:
        with pytest.raises(SqueezeVllmConfigError, match=words):
            plugin_config({"squeeze": raw})
    assert plugin_config({"squeeze": {"contexts": (f,), "log_interval_s": 0}}).log_interval_s == 0
