"""ClusterIndex layout, config validation and index files."""

import dataclasses

import pytest
import torch
from reference import make_keys

import squeeze
from squeeze import IndexFileError, load_indexes, save_indexes
from squeeze.files import read_header

HKV, N, D, WINDOW, SINKS = 3, 900, 32, 50, 4
DENSE = SINKS + WINDOW


def _build(
    gen, levels=2, mode="threshold", dtype=torch.float32, sinks=SINKS, centroid_dtype="bfloat16"
):
    keys = make_keys(HKV, N, D, generator=gen).to(dtype)
    values = torch.randn(HKV, N, D, generator=gen).to(dtype)
    wq = make_keys(HKV * 2, WINDOW, D, generator=gen)
    cfg = squeeze.SqueezeConfig(
        window=WINDOW, sinks=sinks, l1_ratio=0.01 if levels == 2 else None, mode=mode,
        kmeans_iters=6, centroid_dtype=centroid_dtype,
    )  # fmt: skip
    return keys, values, squeeze.build_index(keys, values, cfg, queries=wq)


# the centroids' values at fp32 (the bf16 default is these, rounded: test_centroids_are_rounded)
@pytest.mark.parametrize("levels,sinks", [(1, SINKS), (2, SINKS), (2, 0)])
def test_layout_is_a_permutation_in_cluster_order(gen, levels, sinks):
    keys, values, index = _build(gen, levels, sinks=sinks, centroid_dtype="float32")
    nc = N - WINDOW - sinks
    k2 = round(0.05 * nc)
    assert index.centroids.shape == (HKV, k2, D) and index.offsets.shape == (HKV, k2 + 2)
    assert index.n_dense == WINDOW + sinks and index.n_clustered == nc
    assert index.levels == levels
    for h in range(HKV):
        pos = index.positions[h]
        assert sorted(pos.tolist()) == list(range(N))
        # the dense rows at the end: the sinks, then the window, in context order
        assert pos[nc:].tolist() == list(range(sinks)) + list(range(N - WINDOW, N))
        assert (pos[:nc] >= sinks).all() and (pos[:nc] < N - WINDOW).all()
        assert torch.equal(index.keys[h], keys[h, pos]) and torch.equal(
            index.values[h], values[h, pos]
        )
        # every cluster's centroid is the mean of the raw keys stored in its segment
        for c in range(0, k2, 7):
            a, b = int(index.offsets[h, c]), int(index.offsets[h, c + 1])
            assert b > a
            torch.testing.assert_close(
                index.centroids[h, c], keys[h, pos[a:b]].mean(0), rtol=1e-4, atol=1e-4
            )
    assert torch.equal(index.counts.sum(1), torch.full((HKV,), nc))


def test_level1_children_are_contiguous(gen):
    _, _, index = _build(gen, levels=2, centroid_dtype="float32")
    k1 = round(0.01 * (N - DENSE))
    assert index.l1_centroids.shape == (HKV, k1, D)
    assert (
        index.l1_offsets[:, 0].eq(0).all() and index.l1_offsets[:, -1].eq(index.num_clusters).all()
    )
    assert torch.equal(index.l1_counts.sum(1), torch.full((HKV,), N - DENSE))
    parent = index.l1_parent
    assert (parent[:, 1:] >= parent[:, :-1]).all()  # siblings adjacent
    for h in range(HKV):  # level-1 centroid = size-weighted mean of its children
        for i in range(k1):
            kids = slice(int(index.l1_offsets[h, i]), int(index.l1_offsets[h, i + 1]))
            w = index.counts[h, kids].float()
            want = (index.centroids[h, kids] * w[:, None]).sum(0) / w.sum()
            torch.testing.assert_close(index.l1_centroids[h, i], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("levels", [1, 2])
def test_centroids_are_rounded_once_after_fp32_clustering(gen, levels):
    """bf16 centroids (the default) are the fp32 index's centroids, both levels, rounded: the
    same clusters, layout and fp32 spreads; the thresholds are calibrated on the rounded
    centroids, scored exactly as their fp32 values."""
    keys = make_keys(HKV, N, D, generator=gen)
    values = torch.randn(HKV, N, D, generator=gen)
    wq = make_keys(HKV * 2, WINDOW, D, generator=gen)
    cfg = squeeze.SqueezeConfig(
        window=WINDOW, sinks=SINKS, l1_ratio=0.01 if levels == 2 else None, kmeans_iters=6
    )
    assert cfg.centroid_dtype == "bfloat16"
    bf16 = squeeze.build_index(keys, values, cfg, queries=wq)
    fp32 = squeeze.build_index(keys, values, cfg.replace(centroid_dtype="float32"), queries=wq)
    assert fp32.centroids.dtype == torch.float32 and bf16.centroids.dtype == torch.bfloat16
    assert torch.equal(bf16.centroids, fp32.centroids.to(torch.bfloat16))
    if levels == 2:
        assert bf16.l1_centroids.dtype == torch.bfloat16
        assert torch.equal(bf16.l1_centroids, fp32.l1_centroids.to(torch.bfloat16))
    for name in ("positions", "offsets", "l1_offsets", "spread", "l1_spread"):
        a, b = getattr(fp32, name), getattr(bf16, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    assert bf16.spread.dtype == torch.float32 and bf16.log_counts.dtype == torch.float32
    upcast = dataclasses.replace(
        fp32,
        centroids=bf16.centroids.float(),
        l1_centroids=None if levels == 1 else bf16.l1_centroids.float(),
        sink_keys=bf16.sink_keys.float(),  # scored beside the centroids, rounded alike
        _derived={},
    )
    want = squeeze.calibration.calibrate(upcast, wq)
    assert torch.equal(bf16.calibration.log_thresholds, want.log_thresholds)
    if levels == 2:
        assert torch.equal(bf16.calibration.l1_log_thresholds, want.l1_log_thresholds)
    with pytest.raises(ValueError, match="centroid_dtype"):
        bf16.with_config(centroid_dtype="float32")  # fixed at build


def test_calibration_curve_is_monotone(gen):
    _, _, index = _build(gen)
    cal = index.calibration
    finite = cal.log_thresholds[cal.budgets < 1]
    assert (finite[1:] <= finite[:-1]).all()
    assert cal.threshold(0.1) >= cal.threshold(0.2) >= cal.threshold(0.5)
    assert cal.threshold(1.0) == float("-inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("centroid_dtype", ["bfloat16", "float32"])
def test_save_load_round_trip(gen, tmp_path, dtype, centroid_dtype):
    _, _, index = _build(gen, dtype=dtype, centroid_dtype=centroid_dtype)
    path = tmp_path / "layer.sqz"
    index.save(path, metadata={"model": "tiny"})
    back = squeeze.ClusterIndex.load(path)
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
        a, b = getattr(index, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name  # bit for bit
    stored = getattr(torch, centroid_dtype)
    assert back.centroids.dtype == back.l1_centroids.dtype == stored
    assert back.spread.dtype == torch.float32
    assert back.config == index.config
    assert torch.equal(back.calibration.log_thresholds, index.calibration.log_thresholds)
    assert read_header(path)["metadata"] == {"model": "tiny"}
    layers, meta = load_indexes(path)
    assert len(layers) == 1 and meta == {"model": "tiny"}


def test_truncated_file_refused(gen, tmp_path):
    _, _, index = _build(gen)
    path = tmp_path / "layer.sqz"
    index.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFileError, match="truncated"):
        squeeze.ClusterIndex.load(path)
    path.write_bytes(data[:5])
    with pytest.raises(IndexFileError, match="truncated or corrupt header"):
        squeeze.ClusterIndex.load(path)


def test_flipped_byte_refused(gen, tmp_path):
    _, _, index = _build(gen)
    path = tmp_path / "layer.sqz"
    index.save(path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="checksum mismatch"):
        squeeze.ClusterIndex.load(path)


def test_foreign_files_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.randn(3)}, str(path))
    with pytest.raises(IndexFileError, match="not a squeeze index"):
        squeeze.ClusterIndex.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        squeeze.ClusterIndex.load(tmp_path / "missing.sqz")


def test_multi_layer_file(gen, tmp_path):
    keys = torch.stack([make_keys(HKV, N, D, generator=gen) for _ in range(2)])
    values = torch.randn(2, HKV, N, D, generator=gen)
    cfg = squeeze.SqueezeConfig(window=WINDOW, mode="topk", kmeans_iters=4)
    indexes = squeeze.build_indexes(keys, values, cfg)
    assert len(indexes) == 2 and indexes[1].calibration is None
    path = tmp_path / "two.sqz"
    save_indexes(path, indexes)
    back, _ = load_indexes(path)
    assert [torch.equal(a.keys, b.keys) for a, b in zip(indexes, back, strict=True)] == [True, True]
    with pytest.raises(IndexFileError, match="2 layers"):
        squeeze.ClusterIndex.load(path)
    with pytest.raises(ValueError, match="built in top-k mode"):
        indexes[0].with_config(mode="threshold")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(budget=0.0), ValueError, "budget"),
        (dict(budget=1.5), ValueError, "budget"),
        (dict(budget=-0.1), ValueError, "budget"),
        (dict(centroid_ratio=0), ValueError, "centroid_ratio"),
        (dict(l1_ratio=0.2), ValueError, "l1_ratio"),
        (dict(window=-1), ValueError, "window"),
        (dict(window=2.5), TypeError, "window"),
        (dict(mode="fast"), ValueError, "mode"),
        (dict(metric="dot"), ValueError, "metric"),
        (dict(gqa_reduce="sum"), ValueError, "gqa_reduce"),
        (dict(kmeans_iters=0), ValueError, "kmeans_iters"),
        (dict(kmeans_iters=2.0), TypeError, "kmeans_iters"),
        (dict(seed="0"), TypeError, "seed"),
        (dict(l1_budget=0.05, budget=0.1), ValueError, "l1_budget"),
        (dict(budget="0.1"), TypeError, "budget"),
        (dict(centroid_dtype="float16"), ValueError, r"centroid_dtype .*\('bfloat16', 'float32'\)"),
        (dict(centroid_dtype=torch.bfloat16), ValueError, "centroid_dtype must be one of"),
    ],
)
def test_config_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match) as err:
        squeeze.SqueezeConfig(**kwargs)
    assert type(err.value) is exc


def test_centroid_dtype_choices():
    assert squeeze.SqueezeConfig().centroid_dtype == "bfloat16"
    assert squeeze.SqueezeConfig(centroid_dtype="float32").centroid_dtype == "float32"
    # a config written before the field existed reproduces its fp32 centroids
    old = {k: v for k, v in squeeze.SqueezeConfig().to_dict().items() if k != "centroid_dtype"}
    assert squeeze.SqueezeConfig.from_dict(old).centroid_dtype == "float32"


def test_l1_ratio_rule():
    from squeeze.config import l1_ratio_for

    cfg = squeeze.SqueezeConfig(l1_ratio=0.01)
    assert l1_ratio_for(cfg.centroid_ratio, 2) == pytest.approx(cfg.l1_ratio)
    assert squeeze.SqueezeConfig().levels == 1  # the default: one level (README, fidelity)
    assert l1_ratio_for(0.2, 1) is None
    with pytest.raises(ValueError, match="levels"):
        l1_ratio_for(0.2, 3)


def test_build_rejects_bad_input(gen):
    keys = make_keys(HKV, N, D, generator=gen)
    values = torch.randn(HKV, N, D, generator=gen)
    wq = torch.randn(HKV * 2, WINDOW, D, generator=gen)
    cfg = squeeze.SqueezeConfig(window=WINDOW)
    nan_keys = keys.clone()
    nan_keys[1, 2, 3] = float("inf")
    cases = [
        ("keys", ValueError, dict(keys=keys[0])),
        ("values shape", ValueError, dict(values=values[:, :10])),
        ("NaN or inf", ValueError, dict(keys=nan_keys)),
        ("queries head_dim", ValueError, dict(queries=wq[..., :16])),
        ("multiple", ValueError, dict(queries=torch.randn(HKV * 2 + 1, WINDOW, D))),
        ("required in threshold mode", ValueError, dict(queries=None)),
        (
            "nothing left to cluster",
            ValueError,
            dict(keys=keys[:, :WINDOW], values=values[:, :WINDOW]),
        ),
        ("one device", ValueError, dict(queries=wq.to("meta"))),
        ("float tensor", TypeError, dict(keys=keys.to(torch.int32))),
        ("torch.Tensor", TypeError, dict(values=values.tolist())),
        ("SqueezeConfig", TypeError, dict(cfg={"budget": 0.1})),
    ]
    good = dict(keys=keys, values=values, cfg=cfg, queries=wq)
    for match, exc, override in cases:
        a = {**good, **override}
        with pytest.raises(exc, match=match) as err:
            squeeze.build_index(a["keys"], a["values"], a["cfg"], queries=a["queries"])
        assert type(err.value) is exc, match
