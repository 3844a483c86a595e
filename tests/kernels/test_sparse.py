"""Sparse x dense kernels against SciPy float64 references."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import scipy.sparse as sp

import mfsim.kernels.sparse as ks
from mfsim.kernels.sparse import (csc_t_matmat, csr_matmat, csr_matmat_reference, csr_t_matmat,
                                  csr_t_matmat_reference, csr_transpose)


def _csr(rng, n, p, density, *, empty_row=True, empty_col=True, zero=False):
    X = sp.random(n, p, density=density, format="csr", random_state=rng, dtype=np.float64)
    X.data = rng.normal(size=X.nnz)
    X = X.tolil()
    if empty_row and n > 2:
        X[1, :] = 0  # row 1 has no entry
    if empty_col and p > 2:
        X[:, 2] = 0  # column 2 has no entry
    X = sp.csr_matrix(X)
    if zero:
        X = sp.csr_matrix((n, p))
    X = X.astype(np.float32)
    X.eliminate_zeros()
    X.sort_indices()
    return X.indptr.astype(np.int64), X.indices.astype(np.int32), X.data.astype(np.float32), X


def _bound(terms_abs: np.ndarray, m: int, dtype) -> np.ndarray:
    # recursive summation of m products, each product rounded once: |fl - exact| <= gamma_{m+1} sum|terms|
    # with gamma_k = k u / (1 - k u), u the unit roundoff of the accumulating dtype (Higham, ASNA 2nd ed., 3.1)
    u = np.finfo(dtype).eps / 2
    k = m + 1
    return k * u / (1 - k * u) * terms_abs + np.finfo(np.float64).tiny


CASES = [
    # (n, p, l, density, zero)
    (50, 30, 7, 0.2, False),
    (120, 40, 1, 0.1, False),  # l = 1
    (40, 60, 5, 0.0, True),  # the zero matrix
    (0, 25, 4, 0.0, False),  # a block with no rows
    (7, 1, 3, 0.5, False),  # one column
]


@pytest.mark.parametrize("n, p, l, density, zero", CASES)
@pytest.mark.parametrize("m_dtype, out_dtype", [(np.float32, np.float32), (np.float32, np.float64), (np.float64, np.float64)])
def test_csr_matmat_matches_scipy(n, p, l, density, zero, m_dtype, out_dtype):
    rng = np.random.default_rng(n * 1000 + p)
    indptr, indices, data, X = _csr(rng, n, p, density, zero=zero)
    M = rng.normal(size=(p, l)).astype(m_dtype)
    out = np.full((n, l), np.nan, dtype=out_dtype)  # every entry must be written, including empty rows
    got = csr_matmat(indptr, indices, data, M, out)
    ref = csr_matmat_reference(indptr, indices, data, M)
    m = int(np.diff(indptr).max(initial=0))
    # M and data are exact in float64, so the only error is the kernel's accumulation in out's dtype
    bound = _bound(np.abs(X.astype(np.float64)) @ np.abs(M.astype(np.float64)), m, out_dtype)
    assert got is out and got.dtype == out_dtype
    assert np.all(np.abs(got - ref) <= bound)
    if n > 2:
        assert np.all(got[1] == 0)  # the empty row


@pytest.mark.parametrize("n, p, l, density, zero", CASES)
@pytest.mark.parametrize("m_dtype, out_dtype", [(np.float32, np.float32), (np.float32, np.float64), (np.float64, np.float64)])
@pytest.mark.parametrize("threads", [1, 2])
def test_csr_t_matmat_and_csc_t_matmat_match_scipy(n, p, l, density, zero, m_dtype, out_dtype, threads):
    rng = np.random.default_rng(n * 1000 + p + 1)
    indptr, indices, data, X = _csr(rng, n, p, density, zero=zero)
    M = rng.normal(size=(n, l)).astype(m_dtype)
    out = np.full((p, l), np.nan, dtype=out_dtype)
    before = numba.get_num_threads()
    t_indptr, t_indices, t_data = csr_transpose(indptr, indices, data, p)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        got = csr_t_matmat(indptr, indices, data, M, out)
        from_t = csc_t_matmat(t_indptr, t_indices, t_data, M, np.full((p, l), np.nan, dtype=out_dtype))
        added = (csr_t_matmat(indptr, indices, data, M, np.full((p, l), 0.5, out_dtype), accumulate=True),
                 csc_t_matmat(t_indptr, t_indices, t_data, M, np.full((p, l), 0.5, out_dtype), accumulate=True))
    finally:
        numba.set_num_threads(before)
    ref = csr_t_matmat_reference(indptr, indices, data, M, p)
    m = int(np.bincount(indices, minlength=p).max(initial=0))
    bound = _bound(np.abs(X.T.astype(np.float64)) @ np.abs(M.astype(np.float64)), m, out_dtype)
    assert got is out and got.dtype == out_dtype
    assert np.all(np.abs(got - ref) <= bound)
    if p > 2:
        assert np.all(got[2] == 0)  # the empty column
    # from X's transpose (its CSC arrays, as SciPy makes them): each column's rows summed in the same order, the
    # same bits, with and without accumulate
    csc = X.tocsc()
    csc.sort_indices()
    for made, want in zip((t_indptr, t_indices, t_data), (csc.indptr, csc.indices, csc.data)):
        np.testing.assert_array_equal(made, want)
    np.testing.assert_array_equal(from_t, got)
    np.testing.assert_array_equal(added[1], added[0])


def test_accumulate_sums_row_blocks():
    # X^T M added block by block (a block with no rows in the middle) equals the whole product
    rng = np.random.default_rng(7)
    indptr, indices, data, X = _csr(rng, 90, 33, 0.15)
    M = rng.normal(size=(90, 6)).astype(np.float32)
    ref = csr_t_matmat_reference(indptr, indices, data, M, 33)
    out = np.full((33, 6), 5.0)
    for i, (lo, hi) in enumerate(((0, 31), (31, 31), (31, 90))):
        block = X[lo:hi]
        csr_t_matmat(block.indptr.astype(np.int64), block.indices, block.data, M[lo:hi], out, accumulate=i > 0)
    # float64 accumulation of float32 inputs: error <= gamma_{m+1} * sum|terms| in float64
    bound = _bound(np.abs(X.T.astype(np.float64)) @ np.abs(M.astype(np.float64)), 90, np.float64)
    assert np.all(np.abs(out - ref) <= bound)


@pytest.mark.parametrize("panel_bytes", [64, 1000, 10**9])
def test_panels_and_threads_do_not_change_the_result(monkeypatch, panel_bytes):
    # column panels (forced small here: 64 bytes is two columns per panel) and the thread count
    # change only which thread computes a value, never the order of its sum: results are bitwise equal
    rng = np.random.default_rng(9)
    indptr, indices, data, X = _csr(rng, 200, 70, 0.1)
    M = rng.normal(size=(70, 8)).astype(np.float32)
    Z = rng.normal(size=(200, 8)).astype(np.float32)
    base = (csr_matmat(indptr, indices, data, M, np.empty((200, 8), np.float32)),
            csr_t_matmat(indptr, indices, data, Z, np.empty((70, 8), np.float32)))
    monkeypatch.setattr(ks, "PANEL_BYTES", panel_bytes)
    before = numba.get_num_threads()
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            got = (csr_matmat(indptr, indices, data, M, np.empty((200, 8), np.float32)),
                   csr_t_matmat(indptr, indices, data, Z, np.empty((70, 8), np.float32)))
        finally:
            numba.set_num_threads(before)
        np.testing.assert_array_equal(got[0], base[0])
        np.testing.assert_array_equal(got[1], base[1])
    # and still the product
    np.testing.assert_allclose(got[0], csr_matmat_reference(indptr, indices, data, M), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], csr_t_matmat_reference(indptr, indices, data, Z, 70), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
    rng = np.random.default_rng(0)
    indptr, indices, data, _ = _csr(rng, 10, 8, 0.3)
    with pytest.raises(ValueError, match="out must have shape"):
        csr_matmat(indptr, indices, data, np.zeros((8, 3), np.float32), np.zeros((10, 4), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        csr_matmat(indptr, indices, data, np.zeros((3, 8), np.float32).T, np.zeros((10, 3), np.float32))
    with pytest.raises(ValueError, match="float32 or float64"):
        csr_t_matmat(indptr, indices, data, np.zeros((10, 3), np.int64), np.zeros((8, 3), np.float32))


def test_csr_transpose_of_rows_inside_a_larger_block():
    # rows lo:hi of a block's arrays (indptr starting above 0): their own transpose, rows counted from lo
    rng = np.random.default_rng(11)
    indptr, indices, data, X = _csr(rng, 40, 12, 0.3)
    lo, hi = 9, 30
    t = csr_transpose(indptr[lo : hi + 1], indices, data, 12)
    sub = X[lo:hi].tocsc()
    sub.sort_indices()
    for got, want in zip(t, (sub.indptr, sub.indices, sub.data)):
        np.testing.assert_array_equal(got, want)
    empty = csr_transpose(np.zeros(1, np.int64), indices[:0], data[:0], 5)
    assert empty[0].tolist() == [0] * 6 and len(empty[1]) == len(empty[2]) == 0
