"""Folding COO entries into a CSR block chunk by chunk (``csr_add_coo``) and bucketing them by block group
(``bucket_entries``), against one ``coo_to_csr_sum`` of all the entries and a stable NumPy sort."""

from __future__ import annotations

import numpy as np
import pytest

from mfsim.kernels.coo import bucket_entries, coo_to_csr_sum, csr_add_coo

NO_TS = np.zeros(0, np.int64)


def _entries(rng, nnz, n_rows, n_cols):
    rows = rng.integers(0, n_rows, nnz).astype(np.int64)
    rows[rows == 1] = 0  # row 1 has no entry
    cols = rng.integers(0, n_cols, nnz).astype(np.int32)
    # floats whose sums round differently in another order; some zeros and exact cancellations
    vals = (rng.standard_normal(nnz) * 10.0 ** rng.integers(-3, 8, nnz)).astype(np.float32)
    vals[rng.random(nnz) < 0.05] = 0.0
    ts = rng.integers(0, 10_000, nnz).astype(np.int64)
    return rows, cols, vals, ts


def _fold(rows, cols, vals, ts, n_rows, cuts, keep_ts):
    """The entries folded chunk by chunk (chunks ``cuts``), zeros kept and arrays unsized until the last fold."""
    block = (np.zeros(n_rows + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), NO_TS)
    bounds = [0, *cuts, len(rows)]
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        new_ts = ts[lo:hi] if keep_ts else NO_TS
        last = i == len(bounds) - 2
        block = csr_add_coo(*block, rows[lo:hi], cols[lo:hi], vals[lo:hi], new_ts, last, last)
    return block


@pytest.mark.parametrize("nnz, n_rows, n_cols", [(0, 4, 3), (1, 1, 1), (300, 7, 4), (20_000, 300, 50)])
@pytest.mark.parametrize("keep_ts", [False, True])
def test_folding_in_chunks_gives_the_bits_of_one_build(nnz, n_rows, n_cols, keep_ts):
    rng = np.random.default_rng(nnz + keep_ts)
    rows, cols, vals, ts = _entries(rng, nnz, n_rows, n_cols)
    whole = coo_to_csr_sum(rows, cols, vals, n_rows, ts if keep_ts else NO_TS)
    for n_chunks in (1, 2, 7):
        cuts = sorted(rng.integers(0, nnz + 1, n_chunks - 1).tolist())
        got = _fold(rows, cols, vals, ts, n_rows, cuts, keep_ts)
        for g, w in zip(got, whole):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)
    if keep_ts:
        assert len(whole[3]) == len(whole[1])


def test_running_sum_keeps_a_zero_and_its_timestamp():
    """A position whose weights sum to 0 so far stays in the running block, so the latest timestamp of all its
    entries survives a later non-zero entry (as in one build), and is dropped when it ends at zero."""
    block = (np.zeros(2, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), NO_TS)
    one = np.zeros(1, np.int64)
    block = csr_add_coo(*block, one, np.array([0], np.int32), np.array([0.0], np.float32), np.array([100]), False)
    assert block[1].tolist() == [0] and block[2].tolist() == [0.0] and block[3].tolist() == [100]
    later = csr_add_coo(*block, one, np.array([0], np.int32), np.array([2.0], np.float32), np.array([50]), True)
    assert later[2].tolist() == [2.0] and later[3].tolist() == [100]
    ended = csr_add_coo(*block, one[:0], np.zeros(0, np.int32), np.zeros(0, np.float32), NO_TS[:0], True)
    assert ended[1].tolist() == [] and ended[0].tolist() == [0, 0]


def test_sum_continues_from_the_block_value_in_float32():
    # (1 + 1e8) rounds to 1e8 in float32; minus 1e8 gives 0, as in one build of the three entries: the later
    # entries are added one at a time to the running value, never summed among themselves first (which would
    # give 1 + (1e8 - 1e8) = 1)
    block = coo_to_csr_sum(np.zeros(1, np.int64), np.zeros(1, np.int32), np.array([1.0], np.float32), 1, NO_TS)
    rows, cols = np.zeros(2, np.int64), np.zeros(2, np.int32)
    out = csr_add_coo(*block[:3], NO_TS, rows, cols, np.array([1e8, -1e8], np.float32), NO_TS, True)
    whole = coo_to_csr_sum(np.zeros(3, np.int64), np.zeros(3, np.int32), np.array([1.0, 1e8, -1e8], np.float32), 1,
                           NO_TS)
    assert out[2].tolist() == whole[2].tolist() == []


@pytest.mark.parametrize("block_rows, n_blocks, cuts", [(1, 30, ()), (7, 5, ()), (30, 1, ()), (4, 8, ()),
                                                       (3, 10, ()), (30, 1, (1, 2, 17)), (7, 5, (3, 8, 9, 13))])
def test_bucket_entries_sorts_stably_by_slot(block_rows, n_blocks, cuts):
    """Against a stable NumPy sort by each row's unit's slot: a block a unit, or cut into units at ``cuts``."""
    rng = np.random.default_rng(block_rows * n_blocks + len(cuts))
    n_rows = min(30, block_rows * n_blocks)
    rows = rng.integers(0, n_rows, 500).astype(np.int64)
    cols = rng.integers(0, 99, 500).astype(np.int32)
    vals = rng.random(500).astype(np.float32)
    ts = rng.integers(0, 9, 500).astype(np.int64)
    units = np.unique(np.concatenate([np.arange(n_blocks) * block_rows, cuts, [n_rows]])).astype(np.int64)
    first_unit = np.searchsorted(units, np.minimum(np.arange(n_blocks + 1) * block_rows, n_rows)).astype(np.int64)
    slot_of_unit = rng.permutation(len(units) - 1).astype(np.int64)
    out_rows, out_cols, out_vals, out_ts, bounds = bucket_entries(rows, cols, vals, ts, block_rows, first_unit, units,
                                                                  slot_of_unit)
    unit = np.searchsorted(units, rows, side="right") - 1  # the unit whose first row is the last at or below the row
    slot = slot_of_unit[unit]
    order = np.argsort(slot, kind="stable")
    np.testing.assert_array_equal(out_rows, rows[order] - units[unit[order]])
    np.testing.assert_array_equal(out_cols, cols[order])
    np.testing.assert_array_equal(out_vals, vals[order])
    np.testing.assert_array_equal(out_ts, ts[order])
    np.testing.assert_array_equal(bounds, np.searchsorted(slot[order], np.arange(len(units))))
    assert out_rows.dtype == out_cols.dtype == np.int32
    assert len(bucket_entries(rows, cols, vals, NO_TS, block_rows, first_unit, units, slot_of_unit)[3]) == 0


def test_lookup_and_count_ids_against_numpy():
    from mfsim.kernels.coo import count_ids, lookup

    rng = np.random.default_rng(3)
    table = np.full(50, -1, np.int32)
    known = rng.choice(50, 30, replace=False)
    table[known] = np.arange(30, dtype=np.int32)
    values = rng.choice(known, 400).astype(np.int64) + 1000
    pos, ok = lookup(values, np.int64(1000), table)
    assert ok and pos.dtype == np.int32
    np.testing.assert_array_equal(pos, table[values - 1000])
    for bad in (999, 1050, 1000 + int(np.setdiff1d(np.arange(50), known)[0])):
        assert not lookup(np.append(values, bad), np.int64(1000), table)[1]
    present, n = count_ids(values, np.int64(1000), 50, np.zeros(0, np.int32))
    ref_ids, ref_n = np.unique(values, return_counts=True)
    np.testing.assert_array_equal(present + 1000, ref_ids)
    np.testing.assert_array_equal(n, ref_n)
    weights = rng.integers(1, 9, 400)
    present, n = count_ids(values, np.int64(1000), 50, weights)
    np.testing.assert_array_equal(n, np.bincount(np.searchsorted(ref_ids, values), weights).astype(np.int64))
