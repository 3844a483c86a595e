"""The model trained with cosine similarity (pipeline.model.cosine_model) against dense NumPy on small data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mfsim.pipeline.blocks import RowBlocks
from mfsim.pipeline.model.cosine_model import PROGRESS_WINDOW, SPECTRAL_RANGE, CosineLoss, SpectralPreconditioner, \
    normalize_rows, train_cosine


def _small(n=40, p=15, density=0.3, seed=1, empty_rows=(3, 17)):
    X = sp.random(n, p, density=density, random_state=seed, dtype=np.float32, format="csr")
    X.data = np.ceil(X.data * 5).astype(np.float32)  # ratings 1..5
    X = X.tolil()
    for r in empty_rows:  # users with no interaction: their X A row is zero
        X[r, :] = 0
    return sp.csr_matrix(X)


def _start(X: sp.csr_matrix, k: int, seed: int = 0):
    _, _, Vt = np.linalg.svd(X.toarray().astype(np.float64), full_matrices=False)
    rng = np.random.default_rng(seed)
    V = Vt[:k].T
    return V + 0.05 * rng.standard_normal(V.shape), V * 3.0 + 0.05 * rng.standard_normal(V.shape)


def _dense_loss(X: np.ndarray, A: np.ndarray, B: np.ndarray, gamma: float, lam: float, zero_rows=()) -> float:
    """||X - gamma N(X A) N(B)^T||_F^2 + lam gamma (n+ + p+), straight from the definition; ``zero_rows`` of X A
    taken as zero (no direction)."""
    XA = X @ A
    XA[list(zero_rows)] = 0
    rn, bn = np.linalg.norm(XA, axis=1), np.linalg.norm(B, axis=1)
    P = np.where(rn[:, None] > 0, XA / np.where(rn > 0, rn, 1)[:, None], 0.0)
    Q = np.where(bn[:, None] > 0, B / np.where(bn > 0, bn, 1)[:, None], 0.0)
    return float(np.sum((X - gamma * P @ Q.T) ** 2) + lam * gamma * (np.count_nonzero(rn) + np.count_nonzero(bn)))


@pytest.mark.parametrize("centred", [False, True])
def test_loss_is_the_dense_formula_at_the_best_gamma(centred):
    X = _small()
    A, B = _start(X, 4)
    c = np.random.default_rng(2).uniform(0, 0.5, X.shape[1]) if centred else None
    fn = CosineLoss(RowBlocks.from_scipy(X, 9), 0.7, c)
    loss, _, _, gamma = fn(A, B)
    Xe = X.toarray().astype(np.float64) - (0.0 if c is None else c[None, :])
    assert gamma > 0
    np.testing.assert_allclose(loss, _dense_loss(Xe, A, B, gamma, 0.7), rtol=1e-12)
    # gamma minimizes the dense loss over gamma (a parabola: its neighbours are higher)
    for step in (1e-3, -1e-3):
        assert _dense_loss(Xe, A, B, gamma * (1 + step), 0.7) > loss


def test_a_user_all_but_orthogonal_to_a_has_no_direction():
    X = _small().tolil()
    X[5, :] = 0
    X[5, 2] = 4.0  # user 5 holds item 2 only
    X = sp.csr_matrix(X)
    A, B = _start(X, 4)
    A[2] *= 1e-6  # |x_5 A| = 4e-6 |a_2|, far below DIRECTION_FLOOR (1e-4) of |x_5| ||A||_F
    fn = CosineLoss(RowBlocks.from_scipy(X, 9), 0.7)
    loss, g_A, _, gamma = fn(A, B)
    Xd = X.toarray().astype(np.float64)
    assert fn.rows_with_direction == np.count_nonzero(np.linalg.norm(Xd @ A, axis=1)) - 1
    np.testing.assert_allclose(loss, _dense_loss(Xd, A, B, gamma, 0.7, zero_rows=[5]), rtol=1e-12)
    assert loss != pytest.approx(_dense_loss(Xd, A, B, gamma, 0.7), rel=1e-9)  # the row would count otherwise
    assert np.isfinite(g_A).all() and np.abs(g_A).max() < 1e6  # no 1 / |x_5 A| in the gradient


@pytest.mark.parametrize("centred", [False, True])
def test_gradient_matches_finite_differences(centred):
    X = _small()
    A, B = _start(X, 3)
    c = np.random.default_rng(3).uniform(0, 0.5, X.shape[1]) if centred else None
    Xe = X.toarray().astype(np.float64) - (0.0 if c is None else c[None, :])
    fn = CosineLoss(RowBlocks.from_scipy(X, 11), 0.3, c)
    _, g_A, g_B, _ = fn(A, B)

    def profile(A_, B_):  # min over gamma of the dense loss: the parabola's vertex, clipped at 0
        XA = Xe @ A_
        rn, bn = np.linalg.norm(XA, axis=1), np.linalg.norm(B_, axis=1)
        P, Q = XA / np.where(rn > 0, rn, 1)[:, None], B_ / bn[:, None]
        M = P @ Q.T
        rows = np.count_nonzero(rn) + np.count_nonzero(bn)
        gamma = max(0.0, (np.sum(Xe * M) - 0.3 * rows / 2) / np.sum(M * M))
        return _dense_loss(Xe, A_, B_, gamma, 0.3)

    eps = 1e-6  # central differences: truncation O(eps^2 |L'''|) and rounding O(1e-16 |L| / eps) ~ 1e-8
    for name, M, g in (("A", A, g_A), ("B", B, g_B)):
        num = np.zeros_like(M)
        for idx in np.ndindex(M.shape):
            up, down = M.copy(), M.copy()
            up[idx] += eps
            down[idx] -= eps
            args_up = (up, B) if name == "A" else (A, up)
            args_down = (down, B) if name == "A" else (A, down)
            num[idx] = (profile(*args_up) - profile(*args_down)) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-6 * np.abs(num).max(), err_msg=f"dL/d{name}")


def test_the_loss_does_not_change_with_the_scale_of_a_or_of_a_row_of_b():
    X = _small()
    A, B = _start(X, 4)
    fn = CosineLoss(RowBlocks.from_scipy(X, 16), 1.0)
    scaled_B = B * np.random.default_rng(4).uniform(0.1, 10, (B.shape[0], 1))
    loss = fn(A, B)[0]
    np.testing.assert_allclose(fn(7.0 * A, scaled_B)[0], loss, rtol=1e-12)


def _basis(X: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    _, s, Vt = np.linalg.svd(X.toarray().astype(np.float64), full_matrices=False)
    return Vt[:k].T, s[:k]


def test_spectral_preconditioner_by_hand():
    """T = I + V (diag(s_k / s) - I) V^T: v_i -> (s_k / s_i) v_i, a vector orthogonal to V unchanged; T^-1 undoes T;
    T is symmetric (so the gradient in Z is T times the gradient in A)."""
    V = np.array([[1.0, 0.0], [0.0, 0.6], [0.0, 0.8], [0.0, 0.0]])  # orthonormal columns
    pre = SpectralPreconditioner(V, np.array([8.0, 2.0]))
    np.testing.assert_allclose(pre.to_a(V[:, :1]), 0.25 * V[:, :1], atol=1e-15)
    np.testing.assert_allclose(pre.to_a(V[:, 1:]), V[:, 1:], atol=1e-15)
    w = np.array([[0.0], [0.8], [-0.6], [3.0]])  # orthogonal to both columns
    np.testing.assert_allclose(pre.to_a(w), w, atol=1e-15)
    rng = np.random.default_rng(0)
    M, N = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    np.testing.assert_allclose(pre.from_a(pre.to_a(M)), M, atol=1e-14)
    np.testing.assert_allclose(np.sum(pre.to_a(M) * N), np.sum(M * pre.to_a(N)), rtol=1e-14)
    dense = np.eye(4) + V @ np.diag([0.25 - 1, 1 - 1]) @ V.T
    np.testing.assert_allclose(pre.to_a(M), dense @ M, atol=1e-15)
    # X of lower rank than k: a zero singular value's column is dropped, a tiny one floored at SPECTRAL_RANGE s_1
    low = SpectralPreconditioner(V, np.array([1e6, 1e-9]))
    np.testing.assert_allclose(low.to_a(V[:, :1]), SPECTRAL_RANGE * V[:, :1], atol=1e-15)  # 1e6 x 1e-4 / 1e6
    np.testing.assert_allclose(low.to_a(V[:, 1:]), V[:, 1:], atol=1e-15)  # capped at 1
    np.testing.assert_allclose(low.from_a(low.to_a(M)), M, atol=1e-10)
    zero = SpectralPreconditioner(V, np.array([3.0, 0.0]))
    assert zero.V.shape == (4, 1)
    np.testing.assert_allclose(zero.to_a(V[:, 1:]), V[:, 1:], atol=1e-15)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_lbfgs_never_accepts_a_step_that_raises_the_loss(preconditioned):
    X = _small(n=80, p=20)
    A, B = _start(X, 4)
    basis = _basis(X, 4) if preconditioned else None
    fit = train_cosine(RowBlocks.from_scipy(X, 32), A, B, lam=0.5, max_iterations=60, tol=1e-10, basis=basis)
    losses = np.array([h[0] for h in fit.history])
    assert len(losses) == fit.iterations + 1 and fit.iterations > 5
    assert np.all(np.diff(losses) <= 0), losses
    assert losses[-1] < 0.9 * losses[0]  # it learns something
    # the published pair: B's rows have length gamma^1/2 and the cosine of B is the model's Q
    _, B_pub = fit.factors()
    nb = np.linalg.norm(B_pub.astype(np.float64), axis=1)
    np.testing.assert_allclose(nb, np.sqrt(fit.gamma), rtol=1e-6)
    Q, _ = normalize_rows(B_pub.astype(np.float64))
    np.testing.assert_allclose(Q, fit.Q, atol=1e-6)
    # the reported loss is the dense objective at the returned point
    np.testing.assert_allclose(fit.loss, _dense_loss(X.toarray().astype(np.float64), fit.A, fit.Q, fit.gamma, 0.5),
                               rtol=1e-10)


def test_it_stops_at_the_first_iterate_whose_recent_decrease_is_below_tol_of_the_total():
    """The stopping rule, checked on the returned history: ``L_(t-10) - L_t <= tol (L_0 - L_t)`` holds at the last
    iterate and at no earlier one; a run stopped by it is converged and says why."""
    X = _small(n=120, p=25, density=0.2)
    A, B = _start(X, 5)
    tol = 1e-2
    fit = train_cosine(RowBlocks.from_scipy(X, 64), A, B, lam=0.5, max_iterations=500, tol=tol, basis=_basis(X, 5))
    losses = np.array([h[0] for h in fit.history])
    w = PROGRESS_WINDOW
    met = [t for t in range(w, len(losses)) if losses[t - w] - losses[t] <= tol * (losses[0] - losses[t])]
    assert fit.iterations < 500 and met == [fit.iterations], (fit.iterations, met, fit.message)
    assert fit.converged and "decrease" in fit.message
    capped = train_cosine(RowBlocks.from_scipy(X, 64), A, B, lam=0.5, max_iterations=fit.iterations - 1, tol=tol,
                          basis=_basis(X, 5))
    assert not capped.converged and capped.iterations == fit.iterations - 1  # one short: the limit, not converged


def test_the_preconditioner_changes_the_path_not_the_model():
    """With and without the change of variables L-BFGS minimizes the same loss: from the same start both reach
    the same loss to within the stopping rule's reach (tol 1e-9 of the decrease: far below the 1e-3 compared)."""
    X = _small(n=120, p=25, density=0.2)
    A, B = _start(X, 5)
    fits = [train_cosine(RowBlocks.from_scipy(X, 64), A, B, lam=0.5, max_iterations=3000, tol=1e-9, basis=basis)
            for basis in (None, _basis(X, 5))]
    assert all(f.converged for f in fits), [f.message for f in fits]
    start = fits[0].history[0][0]
    assert fits[1].history[0][0] == pytest.approx(start, rel=1e-12)  # the same start: Z0 = T^-1 A0 gives A0 back
    drop = [start - f.loss for f in fits]
    assert abs(drop[0] - drop[1]) <= 1e-3 * max(drop), (fits[0].loss, fits[1].loss)


def test_the_same_result_in_process_and_on_one_and_two_workers(client, client1):
    X = _small(n=200, p=30, density=0.15)
    A, B = _start(X, 5)
    fits = [train_cosine(RowBlocks.from_scipy(X, 48, c), A, B, lam=0.5, max_iterations=25, tol=1e-12)
            for c in (None, client1, client)]
    for other in fits[1:]:
        assert other.iterations == fits[0].iterations
        np.testing.assert_array_equal(other.A, fits[0].A)
        np.testing.assert_array_equal(other.Q, fits[0].Q)
        assert other.gamma == fits[0].gamma


def test_rounds_run_in_process_below_the_work_limit_and_on_the_workers_above(client, monkeypatch):
    import mfsim.pipeline.blocks as blocks_module
    from mfsim.pipeline.blocks import rounds_where

    X = _small(n=200, p=30, density=0.15)
    on_cluster = RowBlocks.from_scipy(X, 48, client)
    assert on_cluster.nnz == X.nnz
    on_cluster.nnz = -1  # as a split's blocks: counted over the blocks when asked
    here, where = rounds_where(on_cluster, 5 * 4)
    assert where == "driver" and here.client is None and on_cluster.nnz == X.nnz
    assert (here.gather() != X).nnz == 0 and np.array_equal(here.row_offsets, on_cluster.row_offsets)
    # one round's work is nnz x width: the limit itself still runs here, one more multiply-add does not
    monkeypatch.setattr(blocks_module, "ROUNDS_HERE_MAX_WORK", X.nnz * 20)
    assert rounds_where(on_cluster, 20)[1] == "driver"
    same, where = rounds_where(on_cluster, 21)
    assert where == "workers" and same is on_cluster
    assert rounds_where(RowBlocks.from_scipy(X, 48), 10**9)[1] == "driver"  # no client: always here


@pytest.mark.parametrize("scale", [1.0, 1e14], ids=["unit", "lastfm-scale"])
def test_lbfgs_finds_the_minimum_of_a_quadratic_and_of_rosenbrock_as_scipy_does(scale):
    """``cosine_model.lbfgs`` against closed forms: a convex quadratic's minimizer ``A^-1 b`` (also at the scale of
    lastfm's raw play counts, losses ~1e12 and gradients ~1e14, where skipping pairs by ``eps |y|^2`` left it at
    steepest descent), and Rosenbrock's (1, ..., 1), which scipy's L-BFGS-B reaches too."""
    from scipy.optimize import minimize, rosen, rosen_der

    from mfsim.pipeline.model.cosine_model import lbfgs

    rng = np.random.default_rng(0)
    M = rng.standard_normal((30, 30))
    A = scale * (M @ M.T + 30 * np.eye(30))
    b = scale * rng.standard_normal(30)
    exact = np.linalg.solve(A, b)
    res = lbfgs(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), np.zeros(30), memory=5, max_iterations=200)
    np.testing.assert_allclose(res.x, exact, rtol=1e-6, atol=1e-9)
    assert res.reason in ("stationary", "no progress") and res.iterations < 100
    x0 = np.full(10, -1.2)
    ours = lbfgs(lambda x: (rosen(x), rosen_der(x)), x0, memory=5, max_iterations=2000)
    theirs = minimize(rosen, x0, jac=rosen_der, method="L-BFGS-B", options={"maxcor": 5, "maxiter": 2000,
                                                                             "ftol": 1e-15, "gtol": 1e-12})
    np.testing.assert_allclose(ours.x, np.ones(10), atol=1e-6)
    np.testing.assert_allclose(theirs.x, np.ones(10), atol=1e-5)


def test_lbfgs_stops_where_the_callback_says_and_after_max_iterations():
    from mfsim.pipeline.model.cosine_model import lbfgs

    seen = []

    def stop_at_three(x, f):
        seen.append(f)
        if len(seen) == 3:
            raise StopIteration

    # not a quadratic: L-BFGS could solve one exactly in two steps (a zero gradient: "stationary" before the rule)
    fun = lambda x: (float(np.sum(x ** 4) + x @ x), 4 * x ** 3 + 2 * x)  # noqa: E731
    res = lbfgs(fun, np.arange(1.0, 4.0), memory=3, max_iterations=50, callback=stop_at_three)
    assert (res.reason, res.iterations, res.f) == ("rule", 3, seen[-1])
    capped = lbfgs(lambda x: (float(np.sum(x ** 4)), 4 * x ** 3), np.ones(4), memory=3, max_iterations=2)
    assert (capped.reason, capped.iterations) == ("max_iterations", 2)
