"""Index files we did not write: every crafted file of issue 14 is refused with IndexFileError
naming the layer and the tensor, headers are parsed against a schema, signatures, saves.

Each crafted file has all its digests recomputed (``file_tools.rewrite``): it passes every
checksum, so only the structural checks can catch it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from file_tools import raw, resign, rewrite, write
from reference import make_keys

import squeeze
from squeeze import IndexFileError, SqueezeConfig, load_indexes
from squeeze.config import ADDED_FIELDS
from squeeze.files import read_header

HKV, N, D, W = 2, 400, 32, 40
ROOT = Path(__file__).resolve().parents[1]


def build(gen, levels=2, mode="threshold", window=W):
    keys = make_keys(HKV, N, D, generator=gen)
    values = torch.randn(HKV, N, D, generator=gen)
    queries = make_keys(2 * HKV, window, D, generator=gen)
    cfg = squeeze.SqueezeConfig(
        window=window, centroid_ratio=0.05, l1_ratio=0.01 if levels == 2 else None, mode=mode,
        kmeans_iters=4,
    )  # fmt: skip
    return squeeze.build_index(keys, values, cfg, queries=queries)


@pytest.fixture
def good(gen, tmp_path):
    path = tmp_path / "good.sqz"
    build(gen).save(path)
    return path


def _set(name, fn):
    """A tensors edit: ``layers.0.<name>`` replaced by ``fn(old)``."""

    def edit(tensors):
        key = f"layers.0.{name}"
        tensors[key] = fn(tensors[key].clone())

    return edit


def _poke(index, value):
    def fn(t):
        t[index] = value
        return t

    return fn


def _swap_offsets(t):
    t[0, 2], t[0, 3] = t[0, 3].clone(), t[0, 2].clone()
    return t


# (defect, tensors edit, words the error names)
CRAFTED = {
    # 1. crash and memory corruption
    "centroids D=1": (_set("centroids", lambda t: t[..., :1].contiguous()), "'centroids'"),
    "centroids D+1": (
        _set("centroids", lambda t: torch.cat([t, t[..., :1]], -1)),
        "'centroids'",
    ),
    "l1_offsets past K": (_set("l1_offsets", _poke((0, -1), 10**4)), "'l1_offsets'"),
    "l1_offsets one past K": (
        _set("l1_offsets", lambda t: torch.cat([t[:, :-1], t[:, -1:] + 1], 1)),
        "'l1_offsets'",
    ),
    # 2. silent wrong answers
    "offsets not monotonic": (_set("offsets", _swap_offsets), "'offsets'"),
    "offsets negative": (_set("offsets", _poke((1, 3), -5)), "'offsets'"),
    "offsets first not 0": (_set("offsets", _poke((0, 0), 1)), "'offsets'"),
    "offsets past N": (_set("offsets", _poke((0, -1), N + 7)), "'offsets'"),
    "window rows moved": (_set("offsets", _poke((1, -2), N - W - 3)), "'offsets'"),
    "centroid NaN": (_set("centroids", _poke((0, 1, 2), float("nan"))), "'centroids'"),
    "centroid inf": (_set("centroids", _poke((1, 0, 0), float("inf"))), "'centroids'"),
    "centroid huge": (_set("centroids", _poke((1, 0, 0), 1e30)), "'centroids'"),
    "l1 centroid NaN": (_set("l1_centroids", _poke((0, 0, 0), float("nan"))), "'l1_centroids'"),
    "keys NaN": (_set("keys", _poke((0, 5, 1), float("nan"))), "'keys'"),
    "spread NaN": (_set("spread", _poke((0, 1), float("nan"))), "'spread'"),
    "spread negative": (_set("spread", _poke((1, 0), -0.5)), "'spread'"),
    "spread other K": (_set("spread", lambda t: t[:, :-1].contiguous()), "'spread'"),
    "l1 spread inf": (_set("l1_spread", _poke((0, 0), float("inf"))), "'l1_spread'"),
    "values inf": (_set("values", _poke((1, 7, 3), float("-inf"))), "'values'"),
    "threshold NaN": (
        _set("calibration.log_thresholds", _poke(4, float("nan"))),
        "'log_thresholds'",
    ),
    "l1 threshold +inf": (
        _set("calibration.l1_log_thresholds", _poke(0, float("inf"))),
        "'l1_log_thresholds'",
    ),
    "value means NaN": (_set("value_means", _poke((0, 1, 2), float("nan"))), "'value_means'"),
    "value means other D": (
        _set("value_means", lambda t: t[..., :-1].contiguous()),
        "'value_means'",
    ),
    "value means fp32": (_set("value_means", lambda t: t.float()), "'value_means'"),
    "budget curve reversed": (
        _set("calibration.log_thresholds", lambda t: t.flip(0).contiguous()),
        "'log_thresholds'",
    ),
    "budgets reversed": (
        _set("calibration.budgets", lambda t: t.flip(0).contiguous()),
        "'budgets'",
    ),
    "budget NaN": (_set("calibration.budgets", _poke(3, float("nan"))), "'budgets'"),
    "positions repeat": (_set("positions", _poke((1, 0), 5)), "'positions'"),
    "positions huge": (_set("positions", _poke((0, 9), 10**9)), "'positions'"),
    "positions negative": (_set("positions", _poke((0, 9), -1)), "'positions'"),
    # shapes and dtypes that disagree
    "keys other N": (_set("keys", lambda t: t[:, :-1].contiguous()), "'keys'"),
    "values other D": (_set("values", lambda t: t[..., :16].contiguous()), "'values'"),
    "offsets one short": (_set("offsets", lambda t: t[:, :-1].contiguous()), "'offsets'"),
    "positions other heads": (_set("positions", lambda t: t[:1].contiguous()), "'positions'"),
    "offsets int32": (_set("offsets", lambda t: t.to(torch.int32)), "'offsets'"),
    "centroids fp64": (_set("centroids", lambda t: t.to(torch.float64)), "'centroids'"),
    # centroids stored in another dtype than the config's centroid_dtype (bfloat16 here)
    "centroids fp32, config bf16": (
        _set("centroids", lambda t: t.to(torch.float32)),
        "'centroids' has dtype torch.float32, but the config's centroid_dtype is 'bfloat16'",
    ),
    "l1 centroids fp32, config bf16": (
        _set("l1_centroids", lambda t: t.to(torch.float32)),
        "'l1_centroids' has dtype torch.float32, but the config's centroid_dtype is 'bfloat16'",
    ),
    "centroids fp16": (_set("centroids", lambda t: t.to(torch.float16)), "'centroids'"),
    "keys int": (_set("keys", lambda t: t.to(torch.int64)), "'keys'"),
    "values bf16, keys fp32": (_set("values", lambda t: t.to(torch.bfloat16)), "'values'"),
    "calibration fp32": (
        _set("calibration.budgets", lambda t: t.to(torch.float32)),
        "'budgets'",
    ),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_tensors_refused(good, tmp_path, case):
    edit, words = CRAFTED[case]
    bad = rewrite(good, tmp_path / "bad.sqz", tensors_fn=edit)
    with pytest.raises(IndexFileError, match=words) as err:
        load_indexes(bad)
    assert "layer 0" in str(err.value)
    with pytest.raises(IndexFileError):
        squeeze.ClusterIndex.load(bad)


def _drop(name):
    def edit(tensors):
        del tensors[f"layers.0.{name}"]

    return edit


def _config(**changes):
    def edit(header):
        header["layers"][0]["config"].update(changes)

    return edit


@pytest.mark.parametrize(
    "header_fn, tensors_fn, words",
    [
        (None, _drop("positions"), "'positions' is missing"),
        (None, _drop("spread"), "'spread' is missing"),  # the default estimator needs it
        (None, _drop("calibration.log_thresholds"), "'log_thresholds' is missing"),
        (None, _drop("calibration.budgets"), "'budgets'"),  # threshold mode: required
        (_config(estimate_zone=1.0), _drop("value_means"), "'value_means' is missing"),
        (None, _drop("values"), "'values' is missing"),
        (_config(window=W - 5), None, "'offsets'"),  # the config against the tensors: window
        (_config(l1_ratio=None), None, "'l1_centroids' must be absent"),  # ... and levels
        (_config(window=-1), None, "window"),
        (_config(budget="high"), None, "budget"),
        (_config(stride=4), None, "unknown SqueezeConfig fields"),
        # the config's centroid_dtype edited: the bf16 tensors disagree, or it is no choice
        (_config(centroid_dtype="float32"), None, "centroid_dtype is 'float32'"),
        (_config(centroid_dtype="float16"), None, "centroid_dtype must be one of"),
        (None, lambda t: t.update({"layers.0.spare": torch.ones(2)}), "unexpected tensor"),
        (None, lambda t: t.update({"layers.3.keys": torch.ones(2)}), "unexpected tensor"),
    ],
)
def test_config_and_tensor_list_checked(good, tmp_path, header_fn, tensors_fn, words):
    bad = rewrite(good, tmp_path / "bad.sqz", header_fn=header_fn, tensors_fn=tensors_fn)
    with pytest.raises(IndexFileError, match=words):
        load_indexes(bad)


def _forget_centroid_dtype(header):
    """The header as written before SqueezeConfig had ``centroid_dtype``."""
    del header["layers"][0]["config"]["centroid_dtype"]


def test_files_before_centroid_dtype_load_as_float32(gen, good, tmp_path):
    """An index file from before the field (fp32 centroids, no centroid_dtype in its config)
    loads as ``"float32"``, centroids bit for bit; a config without it cannot hold bf16."""
    keys = make_keys(HKV, N, D, generator=gen)
    cfg = squeeze.SqueezeConfig(window=W, l1_ratio=0.01, centroid_dtype="float32", kmeans_iters=3)
    ix = squeeze.build_index(
        keys, torch.randn(HKV, N, D, generator=gen), cfg,
        queries=make_keys(2 * HKV, W, D, generator=gen),
    )  # fmt: skip
    ix.save(tmp_path / "new.sqz")
    old = rewrite(tmp_path / "new.sqz", tmp_path / "old.sqz", header_fn=_forget_centroid_dtype)
    assert "centroid_dtype" not in raw(old)[0]["layers"][0]["config"]
    back = squeeze.ClusterIndex.load(old)
    assert back.config == cfg and back.config.centroid_dtype == "float32"
    assert back.centroids.dtype == back.l1_centroids.dtype == torch.float32
    assert torch.equal(back.centroids, ix.centroids)
    assert torch.equal(back.l1_centroids, ix.l1_centroids)
    bad = rewrite(good, tmp_path / "bad.sqz", header_fn=_forget_centroid_dtype)  # bf16 tensors
    with pytest.raises(IndexFileError, match=r"'centroids' has dtype torch\.bfloat16, but the"):
        load_indexes(bad)


def test_one_level_and_topk_files(gen, tmp_path):
    """What the table allows: one level (no level-1 tensors), top-k without calibration."""
    for levels, mode in ((1, "threshold"), (2, "topk"), (1, "topk")):
        ix = build(gen, levels=levels, mode=mode)
        path = tmp_path / f"{levels}{mode}.sqz"
        ix.save(path)
        back = squeeze.ClusterIndex.load(path)
        assert back.levels == levels and torch.equal(back.offsets, ix.offsets)
    topk = squeeze.build_index(
        torch.randn(HKV, N, D, generator=gen), torch.randn(HKV, N, D, generator=gen),
        squeeze.SqueezeConfig(window=W, mode="topk", kmeans_iters=2),
    )  # fmt: skip
    assert topk.calibration is None
    topk.save(tmp_path / "nocal.sqz")
    assert squeeze.ClusterIndex.load(tmp_path / "nocal.sqz").calibration is None
    # a top-k index with a partial calibration is still refused
    bad = rewrite(
        tmp_path / "2topk.sqz", tmp_path / "bad.sqz", tensors_fn=_drop("calibration.budgets")
    )
    with pytest.raises(IndexFileError, match="'log_thresholds' must be absent"):
        load_indexes(bad)


def test_build_index_is_checked_too(gen):
    """The same table runs after build_index: K/V it could not load again are refused."""
    keys = torch.randn(HKV, N, D, generator=gen)
    keys[0, 3, 0] = 1e6
    cfg = squeeze.SqueezeConfig(window=W, mode="topk", kmeans_iters=2)
    with pytest.raises(ValueError, match="build_index: layer 0: tensor 'keys'"):
        squeeze.build_index(keys, torch.randn(HKV, N, D, generator=gen), cfg)


# ----------------------------------------------------------------------------- 8. headers


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda h: h.pop("sha256"), "'sha256' is missing"),
        (lambda h: h.update(layers="layers"), "'layers' must be list"),
        (lambda h: h.update(layers=[]), "1..4096 layers"),
        (lambda h: h.update(layers=[[1]]), "JSON object"),
        (lambda h: h.update(layers=[{"config": 5}]), "'config' must be dict"),
        (lambda h: h.update(metadata=[1, 2]), "'metadata' must be dict"),
        (lambda h: h.update(format_version="2"), "'format_version' must be int"),
        (lambda h: h.update(format_version=True), "'format_version' must be int"),
        (lambda h: h.update(format_version=7), "format version 7"),
        (lambda h: h.update(extra=1), "unexpected header fields"),
        (lambda h: h.update(signature=5), "'signature' must be str"),
        (lambda h: h["sha256"].update({"layers.0.keys": 7}), "64 hex"),
    ],
)
def test_malformed_headers_are_index_file_errors(good, tmp_path, mutate, words):
    header, tensors = raw(good)
    mutate(header)
    bad = write(tmp_path / "bad.sqz", header, tensors)
    with pytest.raises(IndexFileError, match=words):
        load_indexes(bad)
    with pytest.raises(IndexFileError):
        read_header(bad)


@pytest.mark.parametrize(
    "text, words",
    [
        ("[1, 2, 3]", "JSON object"),
        ("null", "JSON object"),
        ('"squeeze"', "JSON object"),
        ("{" * 3, "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nests deeper"),
        ('{"a": ' * 50_000 + "1" + "}" * 50_000, "nests deeper"),
        ('{"format": NaN}', "not valid JSON"),
        ('{"format": 1, "format": 2}', "duplicate key"),
        ('{"format": ' + "9" * 5000 + "}", "not valid JSON"),
    ],
)
def test_hostile_json_is_an_index_file_error(good, tmp_path, text, words):
    _, tensors = raw(good)
    try:
        bad = write(tmp_path / "bad.sqz", text, tensors)
    except Exception:  # safetensors itself refuses to write it: nothing to read
        pytest.skip("not writable as safetensors metadata")
    with pytest.raises(IndexFileError, match=words):
        load_indexes(bad)


def test_deep_metadata_is_an_index_file_error(good, tmp_path):
    header, tensors = raw(good)
    text = json.dumps(header)
    deep = text.replace('"metadata": {}', '"metadata": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000)
    bad = write(tmp_path / "bad.sqz", deep, tensors)
    with pytest.raises(IndexFileError, match="nests deeper"):
        load_indexes(bad)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(IndexFileError, match="is a directory"):
        load_indexes(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_indexes(tmp_path / "missing.sqz")


# ----------------------------------------------------------------------------- format 2


def test_dtype_reinterpretation_changes_the_digest(good, tmp_path):
    """Format 2 digests cover dtype and shape: a header that re-reads a tensor's bytes under
    another dtype (the bytes, and a bytes-only digest, unchanged) is refused."""
    header, tensors = raw(good)
    assert header["format_version"] == 2
    k = tensors["layers.0.keys"]
    tensors["layers.0.keys"] = k.view(torch.int32)  # same bytes
    bad = write(tmp_path / "bad.sqz", header, tensors)
    with pytest.raises(IndexFileError, match=r"checksum mismatch in tensor 'layers\.0\.keys'"):
        load_indexes(bad)


def test_version_1_index_files_load(good, tmp_path):
    """An index file of format 1 (bytes-only digests) still loads, checked the same way."""
    old = rewrite(good, tmp_path / "v1.sqz", header_fn=lambda h: h.update(format_version=1))
    (ix,), _ = load_indexes(old)
    assert ix.num_clusters == squeeze.ClusterIndex.load(good).num_clusters
    bad = rewrite(old, tmp_path / "bad.sqz", tensors_fn=_set("positions", _poke((0, 0), 10**9)))
    with pytest.raises(IndexFileError, match="'positions'"):
        load_indexes(bad)


def test_files_from_before_a_config_field_keep_what_they_hold(good, tmp_path):
    """A file whose configs lack fields added since (``ADDED_FIELDS``) loads with the values
    that reproduce it, not today's defaults (the centroid estimator, no sink mass)."""
    assert ADDED_FIELDS == {
        "sinks": 0, "estimator": "centroid", "centroid_dtype": "float32", "sink_mass": False,
        "estimate_zone": 0.0,
    }  # fmt: skip
    later = ("estimator", "sink_mass")  # a file with sinks holds its "sinks": older ones had none

    def strip(header):
        for layer in header["layers"]:
            for name in later:
                del layer["config"][name]

    new = squeeze.ClusterIndex.load(good).config
    assert new.sink_mass and new.estimator == "spread"
    cfg = squeeze.ClusterIndex.load(rewrite(good, tmp_path / "old.sqz", header_fn=strip)).config
    assert {name: getattr(cfg, name) for name in later} == {n: ADDED_FIELDS[n] for n in later}
    bare = {k: v for k, v in new.to_dict().items() if k not in ADDED_FIELDS}
    assert SqueezeConfig.from_dict(bare).to_dict() == {**new.to_dict(), **ADDED_FIELDS}


def test_index_without_value_means_keeps_the_zone_off(good, tmp_path):
    """A file from before the value means loads (estimate_zone 0), and asking it for the
    estimated zone names the fix instead of estimating without them."""

    def strip(header):  # the field came with the tensor: a file before both
        for layer in header["layers"]:
            del layer["config"]["estimate_zone"]

    old = rewrite(good, tmp_path / "old.sqz", header_fn=strip, tensors_fn=_drop("value_means"))
    ix = squeeze.ClusterIndex.load(old)
    assert ix.value_means is None and ix.config.estimate_zone == 0
    with pytest.raises(ValueError, match="estimate_zone=0"):
        ix.with_config(estimate_zone=1.0)


# ----------------------------------------------------------------------------- signatures


def test_signature_round_trip(gen, tmp_path, monkeypatch):
    monkeypatch.delenv("SQUEEZE_INDEX_KEY", raising=False)
    ix = build(gen)
    signed = tmp_path / "signed.sqz"
    ix.save(signed, key=b"secret")
    back = squeeze.ClusterIndex.load(signed, key=b"secret")
    assert torch.equal(back.keys, ix.keys)
    squeeze.ClusterIndex.load(signed)  # no key: the signature is not checked
    with pytest.raises(IndexFileError, match="signature does not verify"):
        squeeze.ClusterIndex.load(signed, key=b"other")
    plain = tmp_path / "plain.sqz"
    ix.save(plain)
    with pytest.raises(IndexFileError, match="not signed"):
        squeeze.ClusterIndex.load(plain, key="secret")
    # the environment variable is the key when none is passed
    monkeypatch.setenv("SQUEEZE_INDEX_KEY", "secret")
    squeeze.ClusterIndex.load(signed)
    with pytest.raises(IndexFileError, match="not signed"):
        load_indexes(plain)
    env_signed = tmp_path / "env.sqz"
    ix.save(env_signed)
    monkeypatch.delenv("SQUEEZE_INDEX_KEY")
    squeeze.ClusterIndex.load(env_signed, key=b"secret")
    with pytest.raises(ValueError, match="must not be empty"):
        squeeze.ClusterIndex.load(env_signed, key=b"")


def test_resigned_digests_do_not_pass_the_signature(gen, tmp_path):
    """An attacker who recomputes every digest cannot recompute the signature."""
    signed = tmp_path / "signed.sqz"
    build(gen).save(signed, key=b"k")
    header, tensors = raw(signed)
    sig = header["signature"]
    tensors["layers.0.values"] = tensors["layers.0.values"] * 2
    forged = resign(header, tensors)
    forged["signature"] = sig  # kept: the attacker has no key to make a new one
    bad = write(tmp_path / "forged.sqz", forged, tensors)
    load_indexes(bad)  # the digests verify ...
    with pytest.raises(IndexFileError, match="signature does not verify"):
        load_indexes(bad, key=b"k")  # ... the signature does not


# ----------------------------------------------------------------------------- 9. saves


def test_save_leaves_no_temp_file_and_replaces_a_symlink(gen, tmp_path):
    ix = build(gen, levels=1, mode="topk")
    target = tmp_path / "elsewhere.txt"
    target.write_text("not yours")
    link = tmp_path / "ix.sqz"
    os.symlink(target, link)
    (tmp_path / "ix.sqz.tmp").symlink_to(target)  # the old fixed temp name, planted
    ix.save(link)
    assert target.read_text() == "not yours"  # the symlink was replaced, not followed
    assert not link.is_symlink() and squeeze.ClusterIndex.load(link).num_clusters
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.txt", "ix.sqz", "ix.sqz.tmp"]
    mode = link.stat().st_mode & 0o777
    assert mode & 0o600 == 0o600 and not mode & 0o022


def test_failed_save_cleans_up(gen, tmp_path, monkeypatch):
    ix = build(gen, levels=1, mode="topk")
    from squeeze import tensor_files

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(tensor_files.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        ix.save(tmp_path / "ix.sqz")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ix.save(tmp_path / "missing" / "ix.sqz")


def test_concurrent_saves_to_one_path(gen, tmp_path):
    """3 processes x 25 saves of three different indexes to one path: all succeed, and the
    file is always one of them, whole."""
    for i in range(3):
        build(gen, levels=1, mode="topk").save(tmp_path / f"src{i}.sqz")
    script = (
        "import sys, squeeze\n"
        "ix = squeeze.ClusterIndex.load(sys.argv[1])\n"
        "for _ in range(25):\n"
        "    ix.save(sys.argv[2])\n"
    )
    target = tmp_path / "shared.sqz"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / f"src{i}.sqz"), str(target)], env=env
        )
        for i in range(3)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    back = squeeze.ClusterIndex.load(target)
    assert any(
        torch.equal(back.keys, squeeze.ClusterIndex.load(tmp_path / f"src{i}.sqz").keys)
        for i in range(3)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shared.sqz", "src0.sqz", "src1.sqz", "src2.sqz",
    ]  # fmt: skip


def test_n_dense_is_the_one_rule_of_the_last_offset(gen):
    from squeeze import index_schema

    ix = build(gen, levels=1)
    assert int(ix.offsets[0, -2]) == N - index_schema.n_dense(ix.config, N)
    assert index_schema.n_dense(ix.config, 10) == 10  # capped by N
    assert not math.isnan(index_schema.MAX_ABS)
