"""Row-wise reductions of dense float64 matrices in one fixed order: row norms and row-by-row dot products.

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


def row_dots_reference(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """NumPy reference of ``row_dots``."""
    return np.einsum("ij,ij->i", np.asarray(X, np.float64), np.asarray(Y, np.float64))
