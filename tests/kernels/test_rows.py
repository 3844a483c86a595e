"""Row-wise reductions (kernels.rows) against NumPy."""

import numpy as np
import pytest

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


def test_unit_rows_and_their_backward_match_numpy_with_zero_and_floored_rows():
    from mfsim.kernels.rows import unit_rows, unit_rows_backward_into, unit_rows_backward_reference, \
        unit_rows_reference

    rng = np.random.default_rng(2)
    Y = rng.standard_normal((41, 9))
    Y[3, :5] = 0.0  # a zero row of the first k = 5 columns
    Y[7, :5] *= 1e-9  # below its floor: counts as zero
    floors = np.full(41, 1e-6)
    P, r, inv = unit_rows(Y, 5, floors)
    P_ref, r_ref, inv_ref = unit_rows_reference(Y, 5, floors)
    np.testing.assert_allclose(r, r_ref, rtol=1e-14)
    np.testing.assert_allclose(inv, inv_ref, rtol=1e-14)
    np.testing.assert_allclose(P, P_ref, rtol=1e-14, atol=1e-15)
    assert r[3] == r[7] == inv[7] == 0 and not P[3].any() and not P[7].any()
    np.testing.assert_allclose(np.linalg.norm(P[r > 0], axis=1), 1.0, rtol=1e-14)
    out = np.full((41, 12), np.nan)
    dots = unit_rows_backward_into(Y, 4, P, inv, out, 7)  # g: columns 4..8 of Y, written to columns 7..11
    want, want_dots = unit_rows_backward_reference(Y[:, 4:9], P, inv)
    np.testing.assert_allclose(out[:, 7:], want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dots, want_dots, rtol=1e-12, atol=1e-14)
    assert np.isnan(out[:, :7]).all()  # nothing written outside its columns
    assert not out[3, 7:].any() and not out[7, 7:].any()  # N is constant at a zero row
    with pytest.raises(ValueError, match="do not fit"):
        unit_rows_backward_into(Y, 5, P, inv, out, 7)  # columns 5..9 of a 9-column G


def test_unit_rows_are_the_same_floats_as_the_numpy_normalization():
    from mfsim.kernels.rows import unit_rows, unit_rows_backward_into
    from mfsim.pipeline.model.cosine_model import normalize_rows, normalize_rows_backward

    rng = np.random.default_rng(3)
    Y = rng.standard_normal((300, 24)) * np.logspace(-3, 3, 24)
    floors = np.full(300, 1e-2)
    P, r, inv = unit_rows(Y, 12, floors)
    P_np, r_np = normalize_rows(Y[:, :12], floors)
    np.testing.assert_array_equal(P, P_np)
    np.testing.assert_array_equal(r, r_np)
    out = np.empty((300, 12))
    dots = unit_rows_backward_into(Y, 12, P, inv, out, 0)
    np.testing.assert_array_equal(out, normalize_rows_backward(Y[:, 12:], P_np, r_np))
    np.testing.assert_array_equal(dots, row_dots(P_np, Y[:, 12:]))
