"""vLLM plugin without an engine: where the copies are read from (sources, generations), when
they go stale (writes into their blocks: eviction), their memory, and a step's groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from squeeze.patches.vllm.config import SqueezeVllmConfigError, plugin_config
from squeeze.patches.vllm.contexts import ServedContext
from squeeze.patches.vllm.copies import (
    Sources,
    check_copy_memory,
    copy_bytes,
    copy_positions,
)
from squeeze.patches.vllm.routing import SqueezedRow, make_groups

BS = 128


def rows_of(*tables):
    return torch.tensor(tables, dtype=torch.int32)


def test_source_kept_while_held_then_renewed():
    src = Sources()
    a, gen_a = src.choose(0, rows_of([5, 6, 7, 9], [5, 6, 7, 11]), nb=3)
    assert gen_a == [True, True] and a.block_ids.tolist() == [5, 6, 7]
    # a later step: one request holds the blocks, one was computed elsewhere
    b, use = src.choose(0, rows_of([8, 2, 3, 12], [5, 6, 7, 13]), nb=3)
    assert b is a and use == [False, True]
    # nobody holds them any more (recomputed into other blocks): a new generation
    c, use = src.choose(0, rows_of([8, 2, 3, 12]), nb=3)
    assert c.generation > a.generation and use == [True]
    assert src.choose(1, rows_of([1, 2]), nb=0) == (None, [False])


def test_writes_into_a_source_drop_it_even_for_the_same_block_ids():
    """The context evicted and recomputed into the very same block ids: the block table matches
    the old source, but the step that recomputes it writes those blocks, so the source goes and
    the next request starts a new generation (copies are taken again)."""
    src = Sources()
    a, _ = src.choose(0, rows_of([5, 6, 7, 9]), nb=3)
    other, _ = src.choose(1, rows_of([20, 21, 22]), nb=2)
    # a decode step writes only the requests' last blocks: nothing dropped
    assert src.note_writes(torch.tensor([9 * BS + 3, 22 * BS + 5, -1]), BS) == []
    # a prefill writes position 130 into block 6 again
    assert src.note_writes(torch.tensor([6 * BS + 2, 6 * BS + 3]), BS) == [0]
    assert src.invalidated == 1
    again, use = src.choose(0, rows_of([5, 6, 7, 9]), nb=3)
    assert again.generation > a.generation and use == [True]
    kept, _ = src.choose(1, rows_of([20, 21, 22]), nb=2)
    assert kept is other


def test_copy_memory_accounting():
    # 1000 tokens, 128-token blocks: the copy holds the 896 positions of 7 full blocks
    assert copy_positions(1000, BS) == 896
    assert copy_positions(1024, BS) == 1024
    assert copy_positions(100, BS) == 0
    assert copy_bytes(1000, BS, kv_heads=3, head_dim=64, itemsize=4) == 2 * 3 * 896 * 64 * 4
    check_copy_memory({"a.sqz": 3 << 20, "b.sqz": 1 << 20}, None)
    check_copy_memory({"a.sqz": 3 << 20, "b.sqz": 1 << 20}, 4.0)
    with pytest.raises(SqueezeVllmConfigError, match=r"need 4\.0 MiB.*a\.sqz: 3\.0 MiB.*=3"):
        check_copy_memory({"a.sqz": 3 << 20, "b.sqz": 1 << 20}, 3)


def test_copy_memory_setting(tmp_path):
    f = tmp_path / "doc.sqz"
    f.write_bytes(b"x")
    assert plugin_config({"squeeze": {"contexts": [str(f)]}}).copy_memory_mib is None
    cfg = plugin_config({"squeeze": {"contexts": [str(f)], "copy_memory_mib": 512}})
    assert cfg.copy_memory_mib == 512.0
    for bad in (0, -1, "1G", True):
        with pytest.raises(SqueezeVllmConfigError, match="copy_memory_mib"):
            plugin_config({"squeeze": {"contexts": [str(f)], "copy_memory_mib": bad}})


def test_groups_per_context_and_query_length():
    ctxs = [
        ServedContext("a", np.arange(1000), {}),
        ServedContext("b", np.arange(120), {}),
    ]
    table = [1, 2, 3, 4, 5, 6, 7, 40, 41]
    rows = [
        SqueezedRow(0, 0, 1, 1001, torch.tensor(table, dtype=torch.int32)),
        SqueezedRow(0, 1, 2, 1005, torch.tensor([*table[:7], 42, 43], dtype=torch.int32)),
        SqueezedRow(1, 2, 3, 130, torch.tensor([9, 10, 11, 0, 0, 0, 0, 0, 0], dtype=torch.int32)),
        SqueezedRow(0, 3, 8, 1010, torch.tensor([8, *table[1:]], dtype=torch.int32)),
    ]
    groups = make_groups(rows, ctxs, Sources(), BS, torch.device("cpu"))
    keyed = {(g.context, g.m): g for g in groups}
    assert sorted(keyed) == [(0, 1), (0, 5), (1, 1)]
    decode = keyed[0, 1]
    assert decode.span == (0, 2) and decode.tokens.tolist() == [0, 1]
    assert decode.seq_lens == [1001, 1005] and decode.fast == [True, True]
    # the source was chosen over all of context 0's rows: the prefill row holds other blocks
    assert keyed[0, 5].source is decode.source and keyed[0, 5].fast == [False]
    assert decode.source.block_ids.tolist() == table[:7]  # 896 positions: 7 blocks
    assert keyed[1, 1].source is None  # 120 tokens: no full block


def test_groups_with_rows_apart():
    ctxs = [ServedContext("a", np.arange(1000), {})]
    table = torch.arange(1, 10, dtype=torch.int32)
    rows = [SqueezedRow(0, 0, 1, 1001, table), SqueezedRow(0, 5, 6, 1001, table)]
    (g,) = make_groups(rows, ctxs, Sources(), BS, torch.device("cpu"))
    assert g.span is None and g.tokens.tolist() == [0, 5]
