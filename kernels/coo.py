"""Building CSR from coordinate entries: bucketing by row block and summing duplicates, in one build
(``coo_to_csr_sum``) or folded into a running block chunk after chunk (``csr_add_coo``), and the
integer-id lookups and counts ingest does around them.

Serial kernels (each runs inside one single-threaded Dask task); ``nogil`` lets a multi-threaded
worker run several at once. Each is tested against NumPy/SciPy: a reference below, or one in the
tests (tests/kernels/test_coo.py, test_coo_fold.py).
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


@njit(cache=True, nogil=True)
def _unit_of(r, block_rows, first_unit, unit_offsets):
    """The unit of row ``r``: its block ``r // block_rows`` holds units ``first_unit[b]:first_unit[b + 1]``, unit
    ``u`` rows ``unit_offsets[u]:unit_offsets[u + 1]`` (a binary search among the block's units)."""
    b = r // block_rows
    lo = first_unit[b]
    hi = first_unit[b + 1] - 1
    while lo < hi:  # the last unit of the block whose first row is <= r
        mid = (lo + hi + 1) // 2
        if unit_offsets[mid] <= r:
            lo = mid
        else:
            hi = mid - 1
    return lo


@njit(cache=True, nogil=True)
def bucket_entries(rows, cols, vals, ts, block_rows, first_unit, unit_offsets, slot_of_unit):
    """COO entries sorted by the slot of their row's unit (stably: input order within a unit).

    Row ``r`` lies in block ``r // block_rows``; a block is cut into one or more units of consecutive rows (block
    ``b``'s are ``first_unit[b]:first_unit[b + 1]``, unit ``u`` holds rows ``unit_offsets[u]:unit_offsets[u + 1]``),
    and unit ``u`` goes to slot ``slot_of_unit[u]`` (a permutation of the units: e.g. grouped by worker). Returns
    (rows local to their unit as int32, cols as int32, vals as float32, ts as int64, bounds): slot ``s`` holds
    entries ``bounds[s]:bounds[s+1]``; ``ts`` is carried when it holds one value per entry, else the result's is
    empty. Two passes, O(nnz log(units per block) + units), no index array.
    """
    nnz = rows.shape[0]
    n_slots = slot_of_unit.shape[0]
    has_ts = ts.shape[0] == nnz and nnz > 0
    counts = np.zeros(n_slots + 1, dtype=np.int64)
    for k in range(nnz):
        counts[slot_of_unit[_unit_of(rows[k], block_rows, first_unit, unit_offsets)] + 1] += 1
    for s in range(n_slots):
        counts[s + 1] += counts[s]
    bounds = counts.copy()
    out_rows = np.empty(nnz, dtype=np.int32)
    out_cols = np.empty(nnz, dtype=np.int32)
    out_vals = np.empty(nnz, dtype=np.float32)
    out_ts = np.empty(nnz if has_ts else 0, dtype=np.int64)
    for k in range(nnz):
        u = _unit_of(rows[k], block_rows, first_unit, unit_offsets)
        s = slot_of_unit[u]
        p = counts[s]
        out_rows[p] = rows[k] - unit_offsets[u]
        out_cols[p] = cols[k]
        out_vals[p] = vals[k]
        if has_ts:
            out_ts[p] = ts[k]
        counts[s] = p + 1
    return out_rows, out_cols, out_vals, out_ts, bounds


@njit(cache=True, nogil=True)
def lookup(values, lo, table):
    """``table[values - lo]`` for integer ids, in one pass: (positions, True), or (partial, False) as soon as a
    value is outside the table or maps to a negative entry (an id the table does not know)."""
    n = values.shape[0]
    out = np.empty(n, dtype=table.dtype)
    size = table.shape[0]
    for k in range(n):
        i = values[k] - lo
        if i < 0 or i >= size:
            return out, False
        p = table[i]
        if p < 0:
            return out, False
        out[k] = p
    return out, True


@njit(cache=True, nogil=True)
def count_ids(values, lo, size, weights):
    """The distinct integers of ``values`` (all in ``[lo, lo + size)``) as ascending offsets from ``lo`` (int64),
    and each one's count (int64): how many times it occurs, or the sum of its ``weights`` (one per value; an
    empty array: 1 each). O(n + size), no sort; the counts are summed in an array of ``size`` values of the
    weights' dtype (an empty int32 array for a piece's counts: 4 bytes each, fewer pages to touch)."""
    counts = np.zeros(size, dtype=weights.dtype)
    if weights.shape[0] == values.shape[0]:
        for k in range(values.shape[0]):
            counts[values[k] - lo] += weights[k]
    else:
        for k in range(values.shape[0]):
            counts[values[k] - lo] += 1
    n = 0
    for i in range(size):
        if counts[i]:
            n += 1
    present = np.empty(n, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    n = 0
    for i in range(size):
        if counts[i]:
            present[n] = i
            out[n] = counts[i]
            n += 1
    return present, out


def bucket_order_reference(rows: np.ndarray, block_rows: int, n_blocks: int):
    """``bucket_order`` with a stable NumPy argsort: the same (order, bounds)."""
    block = rows // block_rows
    order = np.argsort(block, kind="stable")
    return order, np.searchsorted(block[order], np.arange(n_blocks + 1))


@njit(cache=True, nogil=True)
def _sort_segment(cols, vals, ts, lo, hi, has_ts):
    """Sort entries ``lo:hi`` of (cols, vals, ts) by column, stably (equal columns keep their order)."""
    m = hi - lo
    if m <= 24:  # insertion sort: short rows are the common case, and it allocates nothing
        for k in range(lo + 1, hi):
            c, v = cols[k], vals[k]
            t = ts[k] if has_ts else 0
            j = k - 1
            while j >= lo and cols[j] > c:
                cols[j + 1] = cols[j]
                vals[j + 1] = vals[j]
                if has_ts:
                    ts[j + 1] = ts[j]
                j -= 1
            cols[j + 1] = c
            vals[j + 1] = v
            if has_ts:
                ts[j + 1] = t
        return
    order = np.argsort(cols[lo:hi], kind="mergesort")
    seg_cols = cols[lo:hi][order]
    seg_vals = vals[lo:hi][order]
    cols[lo:hi] = seg_cols
    vals[lo:hi] = seg_vals
    if has_ts:
        seg_ts = ts[lo:hi][order]
        ts[lo:hi] = seg_ts


@njit(cache=True, nogil=True)
def _rows_sorted(rows, cols, vals, ts, n_rows, has_ts):
    """COO entries grouped by row (stable counting sort), then sorted by column within each row (stable).

    Returns (row starts (n_rows + 1,), cols, vals, ts): row r's entries are ``starts[r]:starts[r+1]``.
    """
    nnz = rows.shape[0]
    starts = np.zeros(n_rows + 1, dtype=np.int64)
    for k in range(nnz):
        starts[rows[k] + 1] += 1
    for r in range(n_rows):
        starts[r + 1] += starts[r]
    fill = starts[:-1].copy()
    out_cols = np.empty(nnz, dtype=np.int32)
    out_vals = np.empty(nnz, dtype=np.float32)
    out_ts = np.empty(nnz if has_ts else 0, dtype=np.int64)
    for k in range(nnz):
        r = rows[k]
        p = fill[r]
        out_cols[p] = cols[k]
        out_vals[p] = vals[k]
        if has_ts:
            out_ts[p] = ts[k]
        fill[r] = p + 1
    for r in range(n_rows):
        if starts[r + 1] - starts[r] > 1:
            _sort_segment(out_cols, out_vals, out_ts, starts[r], starts[r + 1], has_ts)
    return starts, out_cols, out_vals, out_ts


@njit(cache=True, nogil=True)
def _merge_rows(indptr, indices, data, ts, starts, new_cols, new_vals, new_ts, out_indptr, out_indices, out_data,
                out_ts):
    """``csr_add_coo``'s merge of each block row with its sorted new entries; returns the entries written.

    ``ts``, ``new_ts`` and ``out_ts`` are all arrays (the latest timestamp is kept) or all ``None``
    (numba then compiles the loop without them).
    """
    out = 0
    for r in range(indptr.shape[0] - 1):
        a, a_end = indptr[r], indptr[r + 1]
        k, k_end = starts[r], starts[r + 1]
        while a < a_end or k < k_end:
            if k == k_end or (a < a_end and indices[a] < new_cols[k]):  # a block entry without new ones
                out_indices[out] = indices[a]
                out_data[out] = data[a]
                if out_ts is not None:
                    out_ts[out] = ts[a]
                out += 1
                a += 1
                continue
            c = new_cols[k]
            acc = np.float32(0.0)
            latest = np.iinfo(np.int64).min
            if a < a_end and indices[a] == c:
                acc = data[a]
                if ts is not None:
                    latest = ts[a]
                a += 1
            while k < k_end and new_cols[k] == c:
                acc += new_vals[k]
                if new_ts is not None:
                    latest = max(latest, new_ts[k])
                k += 1
            out_indices[out] = c
            out_data[out] = acc
            if out_ts is not None:
                out_ts[out] = latest
            out += 1
        out_indptr[r + 1] = out
    return out


@njit(cache=True, nogil=True)
def _drop_zeros(indptr, indices, data, ts, has_ts):
    """A CSR without its entries whose value is 0, compacted in place; returns how many entries are left."""
    out = 0
    for r in range(indptr.shape[0] - 1):
        lo, hi = indptr[r], indptr[r + 1]
        indptr[r] = out
        for q in range(lo, hi):
            if data[q] != 0:
                indices[out] = indices[q]
                data[out] = data[q]
                if has_ts:
                    ts[out] = ts[q]
                out += 1
    indptr[indptr.shape[0] - 1] = out
    return out


@njit(cache=True, nogil=True)
def csr_add_coo(indptr, indices, data, ts, rows, cols, vals, new_ts, drop_zeros, exact=True):
    """A CSR block plus COO entries: the CSR of their sum, (indptr int64, indices int32, data float32, ts int64).

    The block (``indptr``, ``indices`` sorted within each row and without duplicates, ``data``,
    ``ts``) is the running sum of earlier entries; ``rows`` (local row indices), ``cols``, ``vals``
    and ``new_ts`` are later ones. Each (row, column) of the result is the block's value (0.0 where
    it has none) plus the later entries of that position added one at a time in their input order,
    in float32: folding a log piece by piece gives the same bits as summing all its entries in one
    ``coo_to_csr_sum``. ``ts`` is the latest timestamp (max); it is kept when ``ts`` and ``new_ts``
    hold one per entry (pass empty arrays for none). Entries that sum to zero are kept unless
    ``drop_zeros`` (a running sum keeps them, so that a later entry's timestamp is not the only one
    left). The result's arrays are sized for the block's and the new entries; with ``exact`` they are
    copied to their length when duplicates were summed, without it only when that frees more than an
    eighth (a running block is replaced at its next merge: no third copy of it meanwhile). Time
    O(block nnz + new log(row length)), memory about 24 x (block nnz + new) bytes.
    """
    n_rows = indptr.shape[0] - 1
    nnz_new = rows.shape[0]
    has_ts = new_ts.shape[0] == nnz_new and ts.shape[0] == indices.shape[0] and (nnz_new > 0 or ts.shape[0] > 0)
    starts, new_cols, new_vals, new_ts_sorted = _rows_sorted(rows, cols, vals, new_ts, n_rows, has_ts)
    total = indices.shape[0] + nnz_new
    out_indptr = np.zeros(n_rows + 1, dtype=np.int64)
    out_indices = np.empty(total, dtype=np.int32)
    out_data = np.empty(total, dtype=np.float32)
    out_ts = np.empty(total if has_ts else 0, dtype=np.int64)
    if has_ts:
        out = _merge_rows(indptr, indices, data, ts, starts, new_cols, new_vals, new_ts_sorted, out_indptr,
                          out_indices, out_data, out_ts)
    else:
        out = _merge_rows(indptr, indices, data, None, starts, new_cols, new_vals, None, out_indptr, out_indices,
                          out_data, None)
    if drop_zeros and (out_data[:out] == 0).any():
        out = _drop_zeros(out_indptr, out_indices, out_data, out_ts, has_ts)
    n_ts = out if has_ts else 0
    if out < total and (exact or 8 * (total - out) > total):  # duplicates summed, or zeros dropped
        return out_indptr, out_indices[:out].copy(), out_data[:out].copy(), out_ts[:n_ts].copy()
    return out_indptr, out_indices[:out], out_data[:out], out_ts[:n_ts]


def coo_to_csr_sum(rows, cols, vals, n_rows, ts):
    """CSR (indptr int64, indices int32, data float32, ts int64) of COO entries, duplicates summed, zeros dropped.

    ``ts`` (int64 timestamps, one per entry, or an empty array) is reduced by max over duplicates;
    the returned ``ts`` is empty when the input's is.

    Entries are grouped by row with a stable counting sort, then sorted by column within each row
    (stable), so duplicates are summed in input order: the result does not depend on how the
    input was split between workers, only on its order. ``csr_add_coo`` on an empty block. Time
    O(nnz log(row length)), memory about 24 nnz bytes.
    """
    return csr_add_coo(np.zeros(n_rows + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
                       np.zeros(0, np.int64), rows, cols, vals, ts, True)


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
