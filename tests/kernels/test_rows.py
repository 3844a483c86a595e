"""Row-wise reductions (kernels.rows) against NumPy."""

import numpy as np

from mfsim.kernels.rows import ordered_sum, row_dots, row_dots_reference, row_norms


def test_row_dots_and_norms_match_numpy():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((257, 13)), rng.standard_normal((257, 13))
    np.testing.assert_allclose(row_dots(X, Y), row_dots_reference(X, Y), rtol=1e-13)
    np.testing.assert_allclose(row_norms(X), np.linalg.norm(X, axis=1), rtol=1e-14)
    assert row_dots(np.zeros((0, 3)), np.zeros((0, 3))).shape == (0,)


def test_row_dots_add_left_to_right_whatever_the_alignment():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((64, 33)) * np.logspace(0, 12, 33)  # terms of very different size: order matters
    want = np.array([sum(float(a) * float(a) for a in row) for row in X])  # Python floats, left to right
    buf = np.empty(X.size + 1)
    shifted = buf[1:].reshape(X.shape)  # an 8-byte offset from the allocation's alignment
    shifted[:] = X
    np.testing.assert_array_equal(row_dots(X, X), want)
    np.testing.assert_array_equal(row_dots(shifted, shifted), want)


def test_ordered_sum_is_left_to_right():
    v = np.array([1e16, 1.0, -1e16, 1.0])
    assert ordered_sum(v) == ((1e16 + 1.0) - 1e16) + 1.0
    assert ordered_sum(np.zeros(0)) == 0.0
