"""Building CSR from coordinate entries: bucketing by row block and summing duplicates.

Serial kernels (each runs inside one single-threaded Dask task); ``nogil`` lets a multi-threaded
worker run several at once. Each has a NumPy/SciPy reference below, used by the tests.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit


@njit(cache=True, nogil=True)
def bucket_order(rows, block_rows, n_blocks):
    """Stable counting sort of entries by row block ``rows // block_rows``.

    Returns (order, bounds): entries of block b are ``order[bounds[b]:bounds[b+1]]``, in input
    order. Time O(nnz + n_blocks), memory 8 nnz bytes.
    """
    counts = np.zeros(n_blocks + 1, dtype=np.int64)
    for k in range(rows.shape[0]):
        counts[rows[k] // block_rows + 1] += 1
    for b in range(n_blocks):
        counts[b + 1] += counts[b]
    bounds = counts.copy()
    order = np.empty(rows.shape[0], dtype=np.int64)
    for k in range(rows.shape[0]):
        b = rows[k] // block_rows
        order[counts[b]] = k
        counts[b] += 1
    return order, bounds


def bucket_order_reference(rows: np.ndarray, block_rows: int, n_blocks: int):
    """``bucket_order`` with a stable NumPy argsort: the same (order, bounds)."""
    block = rows // block_rows
    order = np.argsort(block, kind="stable")
    return order, np.searchsorted(block[order], np.arange(n_blocks + 1))


@njit(cache=True, nogil=True)
def coo_to_csr_sum(rows, cols, vals, n_rows, ts):
    """CSR (indptr int64, indices int32, data float32, ts int64) of COO entries, duplicates summed, zeros dropped.

    ``ts`` (int64 timestamps, one per entry, or an empty array) is reduced by max over duplicates;
    the returned ``ts`` is empty when the input's is.

    Entries are grouped by row with a stable counting sort, then sorted by column within each row
    (stable), so duplicates are summed in input order: the result does not depend on how the
    input was split between workers, only on its order. Time O(nnz log(row length)), memory
    about 24 nnz bytes.
    """
    nnz = rows.shape[0]
    counts = np.zeros(n_rows + 1, dtype=np.int64)
    for k in range(nnz):
        counts[rows[k] + 1] += 1
    for r in range(n_rows):
        counts[r + 1] += counts[r]
    start = counts.copy()
    tmp_cols = np.empty(nnz, dtype=np.int32)
    tmp_vals = np.empty(nnz, dtype=np.float32)
    has_ts = ts.shape[0] == nnz and nnz > 0
    tmp_ts = np.empty(nnz if has_ts else 0, dtype=np.int64)
    for k in range(nnz):
        r = rows[k]
        tmp_cols[start[r]] = cols[k]
        tmp_vals[start[r]] = vals[k]
        if has_ts:
            tmp_ts[start[r]] = ts[k]
        start[r] += 1
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    indices = np.empty(nnz, dtype=np.int32)
    data = np.empty(nnz, dtype=np.float32)
    ts_out = np.empty(nnz if has_ts else 0, dtype=np.int64)
    out = 0
    for r in range(n_rows):
        lo, hi = counts[r], counts[r + 1]
        if hi > lo:
            seg = tmp_cols[lo:hi]
            order = np.argsort(seg, kind="mergesort")
            k = 0
            while k < hi - lo:
                c = seg[order[k]]
                acc = np.float32(0.0)
                latest = np.iinfo(np.int64).min
                while k < hi - lo and seg[order[k]] == c:
                    acc += tmp_vals[lo + order[k]]
                    if has_ts:
                        latest = max(latest, tmp_ts[lo + order[k]])
                    k += 1
                if acc != 0:
                    indices[out] = c
                    data[out] = acc
                    if has_ts:
                        ts_out[out] = latest
                    out += 1
        indptr[r + 1] = out
    return indptr, indices[:out].copy(), data[:out].copy(), ts_out[: out if has_ts else 0].copy()


def coo_to_csr_sum_reference(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int, n_cols: int,
                             ts: np.ndarray | None = None):
    """``coo_to_csr_sum`` with SciPy (sum_duplicates, eliminate_zeros, sort_indices) and a dict for ``ts``."""
    m = sp.coo_matrix((vals.astype(np.float32), (rows, cols)), shape=(n_rows, n_cols)).tocsr()
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    out_ts = np.zeros(0, np.int64)
    if ts is not None and len(ts):
        latest: dict = {}
        for r, c, t in zip(rows.tolist(), cols.tolist(), ts.tolist()):
            latest[(r, c)] = max(latest.get((r, c), t), t)
        row_of = np.repeat(np.arange(n_rows), np.diff(m.indptr))
        out_ts = np.array([latest[(r, c)] for r, c in zip(row_of.tolist(), m.indices.tolist())], np.int64)
    return m.indptr.astype(np.int64), m.indices.astype(np.int32), m.data.astype(np.float32), out_ts
