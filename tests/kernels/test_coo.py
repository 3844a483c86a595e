"""COO -> CSR kernels against SciPy and NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from mfsim.kernels.coo import bucket_order, bucket_order_reference, coo_to_csr_sum, coo_to_csr_sum_reference


def _entries(rng, nnz, n_rows, n_cols, *, empty_rows=True):
    rows = rng.integers(0, n_rows, nnz)
    if empty_rows and n_rows > 3:
        rows[rows == 1] = 0  # row 1 has no entry
    cols = rng.integers(0, n_cols, nnz).astype(np.int32)
    vals = rng.integers(0, 4, nnz).astype(np.float32)  # zeros included; small integers sum exactly
    return rows.astype(np.int64), cols, vals


@pytest.mark.parametrize("nnz, n_rows, n_cols", [(0, 5, 3), (1, 1, 1), (200, 7, 4), (5000, 300, 50)])
def test_coo_to_csr_sum_matches_scipy(nnz, n_rows, n_cols):
    rng = np.random.default_rng(nnz)
    rows, cols, vals = _entries(rng, nnz, n_rows, n_cols)
    ts = rng.integers(0, 1000, nnz).astype(np.int64)
    got = coo_to_csr_sum(rows, cols, vals, n_rows, ts)
    ref = coo_to_csr_sum_reference(rows, cols, vals, n_rows, n_cols, ts)
    assert len(got[3]) == len(got[1])  # the latest timestamp of each stored entry
    no_ts = coo_to_csr_sum(rows, cols, vals, n_rows, np.zeros(0, np.int64))
    assert len(no_ts[3]) == 0 and all((a == b).all() for a, b in zip(no_ts[:3], got[:3]))
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
        assert g.dtype == r.dtype
    assert (got[2] != 0).all()  # explicit zeros (entries summing to zero) are dropped


def test_duplicates_summed_in_input_order():
    # float32 addition is not associative: the sum follows the input order, whatever the columns' order
    rows = np.zeros(3, np.int64)
    cols = np.zeros(3, np.int32)
    _, _, data, _ = coo_to_csr_sum(rows, cols, np.array([1e8, -1e8, 1.0], np.float32), 1, np.zeros(0, np.int64))
    assert data.tolist() == [1.0]  # (1e8 - 1e8) + 1
    _, _, data, _ = coo_to_csr_sum(rows, cols, np.array([1.0, 1e8, -1e8], np.float32), 1, np.zeros(0, np.int64))
    assert data.tolist() == []  # (1 + 1e8) rounds to 1e8 in float32, minus 1e8 is 0: dropped


@pytest.mark.parametrize("block_rows, n_blocks", [(1, 30), (7, 5), (30, 1), (4, 8)])
def test_bucket_order_matches_stable_argsort(block_rows, n_blocks):
    rows = np.random.default_rng(0).integers(0, min(30, block_rows * n_blocks), 500).astype(np.int64)
    order, bounds = bucket_order(rows, block_rows, n_blocks)
    ref_order, ref_bounds = bucket_order_reference(rows, block_rows, n_blocks)
    np.testing.assert_array_equal(order, ref_order)
    np.testing.assert_array_equal(bounds, ref_bounds)
