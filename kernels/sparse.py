"""Sparse x dense products on raw CSR arrays: ``X @ M`` and ``X^T @ M``.

These are the two products of the randomized SVD (``pipeline/model/svd.py``) that finds the top-k
singular triplets behind Steck et al.'s (2024) closed forms (Eq. 1 and Eq. 2 need ``V_k`` and
``s``). Kernels take plain arrays (int64 ``indptr``, int32 ``indices`` sorted within each row,
float32 ``data``), a dense C-contiguous ``M`` and a preallocated ``out``.

Both products are memory-bound: each nonzero touches one l-wide row of a dense p x l matrix
(``M`` for ``X @ M``, ``out`` for ``X^T @ M``), and on large catalogues that matrix does not fit
in cache. Both kernels therefore cut X's columns into *panels* whose slice of the dense matrix
fits in ``PANEL_BYTES`` and work panel by panel; because indices are sorted within rows, a
binary search finds each row's entries in a panel. Measured at 1M x 200k, 50M nonzeros, l = 74,
2 cores: ``X @ M`` 1.2 s in 4 panels against 1.4-1.8 s without; ``X^T @ M`` 1.5 s in 8 panels
against 2.5 s with per-thread accumulators.

- ``csr_matmat``: ``out = X @ M``. Panels one after another, each parallel over rows.
- ``csr_t_matmat``: ``out = X^T @ M`` (``+=`` with ``accumulate``) without transposing X.
  Panels of about equal nnz, in parallel: each thread owns the rows of ``out`` of its panels, so
  there are no write conflicts and no per-thread copies (memory: ``out`` only).
- ``csc_t_matmat``: the same product from X's transpose in CSR form (``csr_transpose``: X's CSC
  arrays), for a caller that multiplies the same X many times: each row of ``out`` is one column's
  entries read in order (M's rows gathered, ``out`` written once, no scan of X's rows per panel).
  Measured at l = 16 on one thread (the Krylov SVD's width): a 65,536 x 50,000 block of 2.7M
  entries 30 -> 16 ms, an 80,000 x 200,000 range of 3.9M 77 -> 27 ms; at l = 64 no faster (108 vs
  110 ms), the gather of M's rows then costing what the scattered writes do.

In all three, every output value is a sum in one fixed order (over a row's columns, or over a column's
rows, ascending), so the result is bitwise the same for any number of threads or panels, and
``csc_t_matmat``'s equals ``csr_t_matmat``'s.
Every kernel has a SciPy reference below (``*_reference``) that the tests compare against.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp
from numba import njit, prange

PANEL_BYTES = 16 * 2**20  #: one panel's slice of the dense p x l matrix: half a 32 MiB L3; measured best at 8-16 MiB


@njit(nogil=True, cache=True)
def _first_at_least(indices, lo, hi, value):
    """Smallest jj in [lo, hi) with ``indices[jj] >= value`` (hi if none); ``indices[lo:hi]`` sorted."""
    while lo < hi:
        mid = (lo + hi) // 2
        if indices[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(parallel=True, nogil=True, cache=True)
def _matmat(indptr, indices, data, M, out, col_bounds):
    """``out[i, :] = sum_jj data[jj] * M[indices[jj], :]`` over row i, columns panel by panel."""
    n_rows = indptr.shape[0] - 1
    n_cols = M.shape[1]
    one = np.ones(1, dtype=out.dtype)[0]  # products in out's precision: float32 x float32 is exact in float64
    for i in prange(n_rows):
        for c in range(n_cols):
            out[i, c] = 0
    for t in range(col_bounds.shape[0] - 1):
        lo_c = col_bounds[t]
        hi_c = col_bounds[t + 1]
        for i in prange(n_rows):
            a = indptr[i]
            b = indptr[i + 1]
            if a == b or indices[b - 1] < lo_c or indices[a] >= hi_c:
                continue
            for jj in range(_first_at_least(indices, a, b, lo_c), b):
                j = indices[jj]
                if j >= hi_c:
                    break
                v = data[jj] * one
                for c in range(n_cols):
                    out[i, c] += v * M[j, c]


@njit(parallel=True, nogil=True, cache=True)
def _t_matmat(indptr, indices, data, M, out, col_bounds, accumulate):
    """``out[j, :] (+)= sum_i data[i, j] * M[i, :]`` for j in panel t, rows ascending; panels in parallel."""
    n_rows = indptr.shape[0] - 1
    n_cols = M.shape[1]
    one = np.ones(1, dtype=out.dtype)[0]
    for t in prange(col_bounds.shape[0] - 1):
        lo_c = col_bounds[t]
        hi_c = col_bounds[t + 1]
        if lo_c == hi_c:
            continue
        if not accumulate:
            for j in range(lo_c, hi_c):
                for c in range(n_cols):
                    out[j, c] = 0
        for i in range(n_rows):
            a = indptr[i]
            b = indptr[i + 1]
            if a == b or indices[b - 1] < lo_c or indices[a] >= hi_c:
                continue
            for jj in range(_first_at_least(indices, a, b, lo_c), b):
                j = indices[jj]
                if j >= hi_c:
                    break
                v = data[jj] * one
                for c in range(n_cols):
                    out[j, c] += v * M[i, c]


@njit(nogil=True, cache=True)
def _transpose(indptr, indices, data, t_indptr, t_indices, t_data):
    """X^T's CSR arrays by a counting sort of X's entries over their columns, rows visited in order."""
    n_rows = indptr.shape[0] - 1
    for jj in range(indptr[0], indptr[n_rows]):
        t_indptr[indices[jj] + 1] += 1
    for j in range(t_indptr.shape[0] - 1):
        t_indptr[j + 1] += t_indptr[j]
    at = t_indptr[:-1].copy()
    for i in range(n_rows):
        for jj in range(indptr[i], indptr[i + 1]):
            j = indices[jj]
            k = at[j]
            t_indices[k] = i
            t_data[k] = data[jj]
            at[j] = k + 1


@njit(parallel=True, nogil=True, cache=True)
def _csc_t_matmat(t_indptr, t_indices, t_data, M, out, col_bounds, accumulate):
    """``out[j, :] (+)= sum_i data[i, j] * M[i, :]`` for j in panel t, over column j's rows in order; panels in
    parallel."""
    n_cols = M.shape[1]
    one = np.ones(1, dtype=out.dtype)[0]
    for t in prange(col_bounds.shape[0] - 1):
        for j in range(col_bounds[t], col_bounds[t + 1]):
            if not accumulate:
                for c in range(n_cols):
                    out[j, c] = 0
            for jj in range(t_indptr[j], t_indptr[j + 1]):
                v = t_data[jj] * one
                i = t_indices[jj]
                for c in range(n_cols):
                    out[j, c] += v * M[i, c]


def _check_dense(name: str, a: np.ndarray, shape: tuple) -> None:
    """Raise ValueError unless ``a`` has ``shape`` and is a C-contiguous float32 or float64 array."""
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if a.dtype not in (np.float32, np.float64) or not a.flags.c_contiguous:
        raise ValueError(
            f"{name} must be a C-contiguous float32 or float64 array, got {a.dtype} "
            f"(C-contiguous: {a.flags.c_contiguous}); pass np.ascontiguousarray({name}, dtype=np.float32)"
        )


def _column_panels(cum: np.ndarray, panels: int) -> np.ndarray:
    """int64 bounds of ``panels`` column panels of about equal entries, from the columns' cumulative entries ``cum``
    (p + 1,): panel t starts at the first column whose cumulative count reaches t / panels of the total."""
    p = len(cum) - 1
    nnz = int(cum[-1]) if p else 0
    bounds = np.searchsorted(cum[1:], (np.arange(panels + 1, dtype=np.int64) * nnz) // panels, side="left")
    bounds = np.minimum(bounds, p).astype(np.int64)
    bounds[0], bounds[-1] = 0, p
    return bounds


def _n_panels(n_cols: int, width: int, itemsize: int, at_least: int = 1) -> int:
    """Panels so that one panel's rows of a dense (n_cols x width) matrix fit in PANEL_BYTES."""
    need = -(-n_cols * width * itemsize // PANEL_BYTES)
    return int(max(1, min(max(need, at_least), n_cols)))


def csr_matmat(indptr, indices, data, M, out):
    """``out = X @ M`` for X (n x p) in CSR form and dense M (p x l).

    Parameters
    ----------
    indptr, indices, data : ndarray
        X in CSR form: int64 ``indptr`` (n+1,), int32 ``indices`` (nnz,) in ``[0, p)`` and sorted
        within each row (as ``CSRBlock`` guarantees), ``data`` (nnz,). Indices are not
        bounds-checked inside the kernel.
    M : ndarray, shape (p, l)
        Dense, C-contiguous, float32 or float64.
    out : ndarray, shape (n, l)
        Preallocated, C-contiguous, float32 or float64, overwritten. Each row's sum is accumulated
        in ``out``'s dtype, over the row's columns in ascending order.

    Returns
    -------
    out : ndarray, shape (n, l)

    Notes
    -----
    Time O(nnz * l + panels * n log(nnz per row)), parallel over rows; no memory beyond ``out``.
    M's rows are read in ``ceil(p * l * itemsize / PANEL_BYTES)`` column panels of equal width,
    one after another, so the part of M being read stays in cache.
    """
    n = len(indptr) - 1
    if M.ndim != 2:
        raise ValueError(f"M must be 2-d (p x l), got shape {M.shape}")
    _check_dense("M", M, M.shape)
    _check_dense("out", out, (n, M.shape[1]))
    p = M.shape[0]
    panels = _n_panels(p, M.shape[1], M.itemsize)
    bounds = (np.arange(panels + 1, dtype=np.int64) * p) // panels  # equal widths: equal slices of M
    _matmat(indptr, indices, data, M, out, bounds)
    return out


def csr_t_matmat(indptr, indices, data, M, out, accumulate=False, column_cumsum=None):
    """``out = X^T @ M`` (``out += X^T @ M`` with ``accumulate``) for X (n x p) in CSR form.

    Parameters
    ----------
    indptr, indices, data : ndarray
        X in CSR form, indices sorted within each row, as for ``csr_matmat``.
    M : ndarray, shape (n, l)
        Dense, C-contiguous, float32 or float64.
    out : ndarray, shape (p, l)
        Preallocated, C-contiguous, float32 or float64. Each value is a sum over the column's
        rows in ascending order, accumulated in ``out``'s dtype (float64 keeps sums over long,
        popular columns exact to ~1e-16).
    accumulate : bool
        Add to ``out`` instead of overwriting it (to sum several row blocks of one matrix).
    column_cumsum : ndarray, optional
        int64 (p + 1,): cumulative stored entries per column of X, for the panel split; computed
        here (O(nnz)) when not given. Callers that multiply the same X often pass it in.

    Returns
    -------
    out : ndarray, shape (p, l)

    Notes
    -----
    X's columns are cut into panels of about equal nnz, at least one per thread and enough that a
    panel's rows of ``out`` fit in ``PANEL_BYTES``; threads take whole panels, so each row of
    ``out`` has one writer. Memory: ``out`` and one int64 count per column (no per-thread copies,
    no CSC copy of X). Time O(nnz * l) for the products, plus O(panels * n log(nnz per row)) for
    each panel's scan of the rows and O(nnz) to count the columns.
    """
    n = len(indptr) - 1
    if M.ndim != 2 or out.ndim != 2:
        raise ValueError(f"M and out must be 2-d (n x l and p x l), got shapes {M.shape} and {out.shape}")
    _check_dense("M", M, (n, out.shape[1]))
    _check_dense("out", out, out.shape)
    p, l = out.shape
    threads = numba.get_num_threads()
    panels = _n_panels(p, l, out.itemsize, at_least=threads)
    panels = -(-panels // threads) * threads if panels > threads else panels  # whole rounds of threads
    nnz = int(indptr[-1]) if n else 0
    if column_cumsum is not None and len(column_cumsum) == p + 1:
        cum = column_cumsum
    else:
        cum = np.zeros(p + 1, dtype=np.int64)
        if p:
            np.cumsum(np.bincount(indices[:nnz], minlength=p), out=cum[1:])
    _t_matmat(indptr, indices, data, M, out, _column_panels(cum, panels), bool(accumulate))
    return out


def csr_transpose(indptr, indices, data, n_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X^T in CSR form (X's CSC arrays) for X (n x ``n_cols``) in CSR form: int64 ``t_indptr`` (n_cols + 1,), int32
    ``t_indices`` (X's row of each entry, ascending within each column) and ``t_data`` (X's dtype). O(nnz + n +
    n_cols) time, one pass to count and one to place; memory: a copy of X's entries. ``indptr`` may start above 0
    (rows of a larger block's arrays)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    nnz = int(indptr[-1] - indptr[0]) if len(indptr) else 0
    t_indptr = np.zeros(int(n_cols) + 1, dtype=np.int64)
    t_indices = np.empty(nnz, dtype=np.int32)
    t_data = np.empty(nnz, dtype=data.dtype)
    if len(indptr) > 1:
        _transpose(indptr, indices, data, t_indptr, t_indices, t_data)
    return t_indptr, t_indices, t_data


def csc_t_matmat(t_indptr, t_indices, t_data, M, out, accumulate=False):
    """``out = X^T @ M`` (``out += X^T @ M`` with ``accumulate``) from X^T in CSR form (``csr_transpose``'s arrays).

    The same values as ``csr_t_matmat``'s, bit for bit: each ``out[j, c]`` is the sum over column j's rows in
    ascending order, accumulated in ``out``'s dtype (the products in that dtype). M (n x l) and ``out`` (p x l)
    as there; ``t_indices`` must lie in ``[0, n)`` (not checked in the kernel, as X's indices there). Columns in
    panels of about equal entries, one per thread: each thread writes its own rows of ``out``. Time O(nnz * l); no
    memory beyond ``out``.
    """
    p = len(t_indptr) - 1
    if M.ndim != 2 or out.ndim != 2:
        raise ValueError(f"M and out must be 2-d (n x l and p x l), got shapes {M.shape} and {out.shape}")
    _check_dense("M", M, M.shape)
    _check_dense("out", out, (p, M.shape[1]))
    panels = max(1, min(numba.get_num_threads(), p))
    _csc_t_matmat(t_indptr, t_indices, t_data, M, out, _column_panels(t_indptr, panels), bool(accumulate))
    return out


def load() -> None:
    """Load the Krylov SVD's kernels (``csr_transpose``, ``csr_matmat`` and ``csc_t_matmat`` with the types it
    passes) by calling each on a 2 x 2 matrix: numba loads a kernel from its cache at its first call, and the first
    in a process also sets numba up (measured: 0.22 s for the first, 5-10 ms for each next). The job calls it in a
    thread while the driver waits on the workers' ingest, so that an SVD in the driver does not start with it."""
    indptr, indices, data = np.array([0, 1, 2], np.int64), np.array([0, 1], np.int32), np.ones(2, np.float32)
    t_indptr, t_indices, t_data = csr_transpose(indptr, indices, data, 2)
    z = csr_matmat(indptr, indices, data, np.ones((2, 2), np.float32), np.empty((2, 2), np.float32))
    csc_t_matmat(t_indptr, t_indices, t_data, z, np.zeros((2, 2)), accumulate=True)


# ---------------------------------------------------------------------------------------------
# references (SciPy, float64), used by the tests


def _scipy(indptr, indices, data, n_cols):
    """The CSR arrays as a float64 SciPy matrix with ``n_cols`` columns."""
    return sp.csr_matrix((np.asarray(data, dtype=np.float64), indices, indptr), shape=(len(indptr) - 1, n_cols))


def csr_matmat_reference(indptr, indices, data, M):
    """``X @ M`` with SciPy in float64; X has ``M.shape[0]`` columns."""
    return np.asarray(_scipy(indptr, indices, data, M.shape[0]) @ M.astype(np.float64))


def csr_t_matmat_reference(indptr, indices, data, M, n_cols):
    """``X^T @ M`` with SciPy in float64; X has ``n_cols`` columns."""
    return np.asarray(_scipy(indptr, indices, data, n_cols).T @ M.astype(np.float64))
