"""The two-loop recursion (kernels.lbfgs) against the NumPy reference and against the inverse Hessian it stands for."""

import numpy as np
import pytest

from mfsim.kernels.lbfgs import lbfgs_direction, lbfgs_direction_reference, store_pair


def _pairs(rng, m, n, slots):
    S = rng.standard_normal((slots, n))
    Y = S + 0.3 * rng.standard_normal((slots, n))  # s.y > 0: pairs L-BFGS would keep
    rho = 1.0 / np.einsum("ij,ij->i", S, Y)
    return S, Y, rho


@pytest.mark.parametrize("order", [[0], [2, 0, 1], [3, 1, 4, 0, 2]])
def test_direction_matches_the_reference_in_any_slot_order(order):
    rng = np.random.default_rng(len(order))
    S, Y, rho = _pairs(rng, len(order), 1001, 6)
    g = rng.standard_normal(1001)
    want = lbfgs_direction_reference(g, S, Y, rho, np.array(order))
    got = lbfgs_direction(g, S, Y, rho, np.array(order))
    # the reference's dot products are BLAS's (blocked sums), the kernel's left to right: they differ by rounding,
    # each of the 2 m + 1 passes by a few ulp of its terms' sizes
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_no_pairs_is_steepest_descent_and_out_is_filled():
    g = np.array([1.0, -2.0, 3.0])
    out = np.empty(3)
    assert lbfgs_direction(g, np.empty((2, 3)), np.empty((2, 3)), np.zeros(2), np.zeros(0, np.int64), out=out) is out
    np.testing.assert_array_equal(out, -g)


def test_on_a_quadratic_the_pairs_give_the_inverse_hessian_in_their_span():
    # f = x^T H x / 2: y = H s exactly, and BFGS's update satisfies the secant equation for the newest pair:
    # the direction for g = y_newest is -s_newest (Nocedal & Wright, eq. 6.6)
    rng = np.random.default_rng(7)
    n = 40
    Q = rng.standard_normal((n, n))
    H = Q @ Q.T + n * np.eye(n)
    S = rng.standard_normal((3, n))
    Y = S @ H
    rho = 1.0 / np.einsum("ij,ij->i", S, Y)
    d = lbfgs_direction(Y[2], S, Y, rho, np.array([0, 1, 2]))
    np.testing.assert_allclose(d, -S[2], rtol=1e-10, atol=1e-10 * np.abs(S[2]).max())


def test_same_bits_whatever_the_alignment():
    rng = np.random.default_rng(3)
    S, Y, rho = _pairs(rng, 3, 513, 3)
    g = rng.standard_normal(513)
    want = lbfgs_direction(g, S, Y, rho, np.array([1, 2, 0]))
    buf = np.empty(g.size + 1)
    shifted = buf[1:]  # an 8-byte offset from the allocation's alignment
    shifted[:] = g
    np.testing.assert_array_equal(lbfgs_direction(shifted, S, Y, rho, np.array([1, 2, 0])), want)


def test_float32_pairs_give_the_direction_of_their_float64_values():
    # float32 slots (the cosine model's L-BFGS): the direction of exactly those values taken as float64, the
    # products and sums in float64 (the store rounds, the arithmetic does not)
    rng = np.random.default_rng(11)
    S, Y, rho = _pairs(rng, 4, 777, 5)
    S32, Y32 = S.astype(np.float32), Y.astype(np.float32)
    rho32 = 1.0 / np.einsum("ij,ij->i", S32.astype(np.float64), Y32.astype(np.float64))
    g = rng.standard_normal(777)
    order = np.array([4, 0, 2, 1])
    want = lbfgs_direction_reference(g, S32.astype(np.float64), Y32.astype(np.float64), rho32, order)
    got = lbfgs_direction(g, S32, Y32, rho32, order)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_store_pair_writes_the_pair_and_its_float64_products():
    rng = np.random.default_rng(12)
    x, x_new, g, g_new = (rng.standard_normal(301) for _ in range(4))
    s, y = np.empty(301, np.float32), np.empty(301, np.float32)
    sy, gs = store_pair(x_new, x, g_new, g, s, y)
    np.testing.assert_array_equal(s, (x_new - x).astype(np.float32))
    np.testing.assert_array_equal(y, (g_new - g).astype(np.float32))
    s64, y64 = s.astype(np.float64), y.astype(np.float64)
    assert sy == pytest.approx(float(s64 @ y64), rel=1e-13) and gs == pytest.approx(float(g @ s64), rel=1e-13)


@pytest.mark.parametrize("split", [1, 300, 776])
def test_a_block_diagonal_initial_hessian_matches_the_reference(split):
    rng = np.random.default_rng(13)
    S, Y, rho = _pairs(rng, 4, 777, 5)
    Y[:, split:] *= 50.0  # the second block curves 50x less (y = H s): its own scale differs from the first's
    rho = 1.0 / np.einsum("ij,ij->i", S, Y)
    g = rng.standard_normal(777)
    order = np.array([1, 3, 0, 4])
    want = lbfgs_direction_reference(g, S, Y, rho, order, split=split)
    got = lbfgs_direction(g, S, Y, rho, order, split=split)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert not np.allclose(got, lbfgs_direction(g, S, Y, rho, order))  # the split changes the direction


def test_split_on_a_separable_quadratic_gives_each_block_its_curvature():
    # f = a |x_1|^2 / 2 + b |x_2|^2 / 2 with one pair: y = diag(a, b) s, so gamma_b = 1 / curvature of block b and
    # the first direction is exactly -H^-1 g (Newton's step), which one scale for both cannot give
    a, b, n1, n = 4.0, 0.01, 5, 12
    curv = np.r_[np.full(n1, a), np.full(n - n1, b)]
    s = np.random.default_rng(14).standard_normal(n)
    S, Y = s[None, :], (curv * s)[None, :]
    rho = np.array([1.0 / float(S[0] @ Y[0])])
    g = curv * np.random.default_rng(15).standard_normal(n)
    d = lbfgs_direction(g, S.copy(), Y.copy(), rho, np.array([0]), split=n1)
    # on each block the pair's curvature is exact; the BFGS update of one pair leaves H_0 = -g / curv along
    # directions orthogonal to y, and s itself maps to y: the whole direction is Newton's
    np.testing.assert_allclose(d, -g / curv, rtol=1e-10, atol=1e-12)
