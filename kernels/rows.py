"""Row-wise work on dense float64 matrices in one fixed order: row norms, row-by-row dot products, rows scaled
to unit length and the gradient through that scaling.

The cosine-trained model (``pipeline/model/cosine_model.py``) normalizes rows and sums ``<P, Z>`` over X's row
blocks; its result must be the same bit for bit in any process. NumPy's own reductions (``einsum``,
``sum``) use SIMD loops whose rounding can depend on the arrays' memory alignment, which differs from
one process to another; these kernels add each row's terms left to right, and rows in order. Each has
a NumPy reference (``*_reference``) that the tests compare against.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True)
def _row_dots(X, Y, out):
    n, k = X.shape
    for i in prange(n):
        acc = 0.0
        for j in range(k):
            acc += X[i, j] * Y[i, j]
        out[i] = acc


def row_dots(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """``sum_j X_ij Y_ij`` per row (float64), each row's terms added left to right. O(n k)."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    Y = np.ascontiguousarray(Y, dtype=np.float64)
    if X.shape != Y.shape or X.ndim != 2:
        raise ValueError(f"row_dots needs two 2-d arrays of one shape, got {X.shape} and {Y.shape}")
    out = np.empty(X.shape[0], dtype=np.float64)
    _row_dots(X, Y, out)
    return out


def row_norms(X: np.ndarray) -> np.ndarray:
    """``|x_i|`` per row (float64), from ``row_dots(X, X)``."""
    return np.sqrt(row_dots(X, X))


@njit(nogil=True, cache=True)
def _ordered_sum(v):
    acc = 0.0
    for i in range(v.shape[0]):
        acc += v[i]
    return acc


def ordered_sum(v: np.ndarray) -> float:
    """``v[0] + v[1] + ...`` left to right (float64). O(n)."""
    return float(_ordered_sum(np.ascontiguousarray(v, dtype=np.float64)))


@njit(parallel=True, nogil=True, cache=True)
def _unit_rows(Y, k, min_norms, P, r, inv):
    n = Y.shape[0]
    for i in prange(n):
        acc = 0.0
        for j in range(k):
            acc += Y[i, j] * Y[i, j]
        ri = np.sqrt(acc)
        if ri < min_norms[i]:
            ri = 0.0
        r[i] = ri
        v = 1.0 / ri if ri > 0 else 0.0
        inv[i] = v
        for j in range(k):
            P[i, j] = Y[i, j] * v


def unit_rows(Y: np.ndarray, k: int, min_norms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(N, |y|, 1/|y|)`` of the first ``k`` columns of ``Y``: each row scaled to unit length, its norm and the
    inverse (a row whose norm is below its ``min_norms`` entry counts as zero: norm 0, inverse 0, row 0). The
    same floats as ``normalize_rows`` in NumPy (norm from ``row_dots``, then ``y * (1 / |y|)``). O(n k)."""
    Y = np.ascontiguousarray(Y, dtype=np.float64)
    n = Y.shape[0]
    if not 0 <= k <= Y.shape[1] or np.shape(min_norms) != (n,):
        raise ValueError(f"unit_rows needs k <= {Y.shape[1]} columns and {n} floors, got k={k} and "
                         f"{np.shape(min_norms)}")
    P, r, inv = np.empty((n, k)), np.empty(n), np.empty(n)
    _unit_rows(Y, k, np.ascontiguousarray(min_norms, dtype=np.float64), P, r, inv)
    return P, r, inv


@njit(parallel=True, nogil=True, cache=True)
def _unit_rows_backward(G, gcol, N, inv, out, col, dots):
    n, k = N.shape
    for i in prange(n):
        d = 0.0
        for j in range(k):
            d += G[i, gcol + j] * N[i, j]
        dots[i] = d
        for j in range(k):
            out[i, col + j] = (G[i, gcol + j] - d * N[i, j]) * inv[i]


def unit_rows_backward_into(G: np.ndarray, gcol: int, N: np.ndarray, inv: np.ndarray, out: np.ndarray,
                            col: int) -> np.ndarray:
    """Columns ``col:col + k`` of ``out`` = ``(g - (g . n) n) / |y|`` per row, the gradient through ``N(y)``, with
    ``g`` the columns ``gcol:gcol + k`` of ``G`` and ``inv`` = 1 / |y| (0 for a zero row); returns ``g . n`` per
    row. The same floats as ``normalize_rows_backward`` and ``row_dots`` in NumPy. O(n k)."""
    n, k = N.shape
    if G.dtype != np.float64 or G.shape[0] != n or not 0 <= gcol <= G.shape[1] - k or out.shape[0] != n \
            or not 0 <= col <= out.shape[1] - k:
        raise ValueError(f"unit_rows_backward_into: G {G.shape} {G.dtype} at column {gcol}, N {N.shape} and out "
                         f"{out.shape} at column {col} do not fit")
    dots = np.empty(n)
    _unit_rows_backward(G, int(gcol), np.ascontiguousarray(N, dtype=np.float64),
                        np.ascontiguousarray(inv, dtype=np.float64), out, int(col), dots)
    return dots


def unit_rows_reference(Y: np.ndarray, k: int, min_norms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy reference of ``unit_rows``."""
    Y = np.asarray(Y, np.float64)[:, :k]
    r = np.linalg.norm(Y, axis=1)
    r[r < min_norms] = 0.0
    inv = np.where(r > 0, 1.0 / np.where(r > 0, r, 1.0), 0.0)
    return Y * inv[:, None], r, inv


def unit_rows_backward_reference(G: np.ndarray, N: np.ndarray, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference of ``unit_rows_backward_into``: the block it writes, and the dots it returns."""
    dots = np.einsum("ij,ij->i", G, N)
    return (G - dots[:, None] * N) * np.asarray(inv)[:, None], dots


def row_dots_reference(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """NumPy reference of ``row_dots``."""
    return np.einsum("ij,ij->i", np.asarray(X, np.float64), np.asarray(Y, np.float64))
