"""The vector comparisons of ``kernels.select`` (a run of 64 scores against the dot and cosine thresholds, one bit
each) against NumPy's float32 arithmetic in the same order: the products round the same way, a score equal to its
threshold passes, -0.0 equals 0.0, and an infinite threshold lets nothing through."""

from __future__ import annotations

import numpy as np
from numba import njit

from mfsim.kernels.select import _RUN, _run_masks, _run_masks_columns


@njit(cache=False)
def _rows(row, cinv, qi, thr_d, thr_c):
    out = np.zeros((row.shape[0] // _RUN, 2), dtype=np.uint64)
    for i in range(out.shape[0]):
        out[i, 0], out[i, 1] = _run_masks(row, cinv, i * _RUN, qi, thr_d, thr_c)
    return out


@njit(cache=False)
def _columns(row, thr_d, thr_c, qinv, ci):
    out = np.zeros((row.shape[0] // _RUN, 2), dtype=np.uint64)
    for i in range(out.shape[0]):
        out[i, 0], out[i, 1] = _run_masks_columns(row, thr_d, thr_c, qinv, i * _RUN, ci)
    return out


def _bits(passed: np.ndarray) -> np.ndarray:
    """uint64 per run of 64 booleans, bit jj for position jj."""
    weights = np.left_shift(np.uint64(1), np.arange(_RUN, dtype=np.uint64))
    return (passed.reshape(-1, _RUN).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


def _scores(seed: int, runs: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(runs * _RUN).astype(np.float32)
    x[rng.integers(0, x.size, 20)] = np.float32(0.5)  # exact ties with the thresholds below
    x[rng.integers(0, x.size, 5)] = np.float32(-0.0)
    x[rng.integers(0, x.size, 5)] = np.float32(0.0)
    return x


def test_row_masks_equal_numpy():
    for seed in range(5):
        row = _scores(seed)
        rng = np.random.default_rng(100 + seed)
        cinv = rng.uniform(0.1, 3.0, row.size).astype(np.float32)
        cinv[:7] = 0.0  # zero-norm candidates
        qi = np.float32(rng.uniform(0.1, 3.0))
        for thr_d, thr_c in ((0.5, 0.5), (0.0, -0.0), (-np.inf, -np.inf), (np.inf, np.inf), (1.25, 0.75)):
            thr_d, thr_c = np.float32(thr_d), np.float32(thr_c)
            got = _rows(row, cinv, qi, thr_d, thr_c)
            np.testing.assert_array_equal(got[:, 0], _bits(row >= thr_d))
            np.testing.assert_array_equal(got[:, 1], _bits((row * qi) * cinv >= thr_c))


def test_column_masks_equal_numpy():
    for seed in range(5):
        row = _scores(seed)
        rng = np.random.default_rng(200 + seed)
        qinv = rng.uniform(0.1, 3.0, row.size).astype(np.float32)
        thr_d = rng.choice(np.float32([0.5, 0.0, -0.0, np.inf, -np.inf, 1.0]), row.size)
        thr_c = np.where(rng.random(row.size) < 0.5, (row * qinv) * np.float32(0.7), thr_d).astype(np.float32)
        ci = np.float32(0.7)
        got = _columns(row, thr_d, thr_c, qinv, ci)
        np.testing.assert_array_equal(got[:, 0], _bits(row >= thr_d))
        np.testing.assert_array_equal(got[:, 1], _bits((row * qinv) * ci >= thr_c))
