"""Eq. 1 and Eq. 2 closed forms against the objectives themselves, on small dense X with an exact SVD.

Objectives (Steck, Ekanadham & Kallus 2024):
    f1(A, B) = ||X - X A B^T||^2 + lam ||A B^T||^2                      (Eq. 1)
    f2(A, B) = ||X - X A B^T||^2 + lam (||X A||^2 + ||B||^2)             (Eq. 2)
Gradients, with R = X - X A B^T:
    df1/dA = -2 X^T R B + 2 lam A (B^T B)      df1/dB = -2 R^T X A + 2 lam B (A^T A)
    df2/dA = -2 X^T R B + 2 lam X^T X A        df2/dB = -2 R^T X A + 2 lam B
Optimal values (per singular value s_i, i <= k kept; i > k contributes s_i^2 since A B^T has rank <= k):
    Eq. 1: w = s^2/(s^2+lam): s^2 (1-w)^2 + lam w^2 = lam s^2 / (s^2 + lam)
    Eq. 2: z = (s - lam)_+:  (s - z)^2 + 2 lam z  = s^2 - (s - lam)_+^2
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.optimize as so
import scipy.sparse as sp

from mfsim.pipeline.blocks import RowBlocks
from mfsim.pipeline.config import ObjectivesSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.model.factors import (
    Factors,
    scaled_columns,
    build_embeddings,
    eq1_factors,
    eq1_weights,
    eq2_factors,
    scaling_exponents,
    user_embeddings,
)
from mfsim.pipeline.registry import EQ1_SCALINGS

N, P = 30, 12
LAM1 = 5.0  # comparable to the smaller s_i^2 of X below, so W shrinks visibly
SCALINGS = {"symmetric": (0.5, 0.0), "item_orthonormal": (0.0, 0.0), "user_orthonormal": (1.0, 0.0),
            "eq2_like": (0.5, 0.5), "custom": (0.3, -0.7)}
# float64 round-off of objectives of size O(||X||^2) = O(400) computed from O(P^2 N) products:
# relative 1e-12 is ~4500 eps64, far above accumulated rounding and far below any real improvement.
REL_TOL = 1e-12


@pytest.fixture(scope="module")
def svd():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, P))
    U, s, Vt = np.linalg.svd(X, full_matrices=False)
    return X, s, Vt.T


def lam2(s):
    """Eq. 2 lambda between the 8th and 9th singular value: 8 components survive at full rank."""
    return 0.5 * (s[7] + s[8])


def f1(X, A, B, lam):
    Z = A @ B.T
    return np.sum((X - X @ Z) ** 2) + lam * np.sum(Z**2)


def f2(X, A, B, lam):
    XA = X @ A
    return np.sum((X - XA @ B.T) ** 2) + lam * (np.sum(XA**2) + np.sum(B**2))


def grad1(X, A, B, lam):
    R = X - X @ A @ B.T
    return -2 * X.T @ R @ B + 2 * lam * A @ (B.T @ B), -2 * R.T @ X @ A + 2 * lam * B @ (A.T @ A)


def grad2(X, A, B, lam):
    R = X - X @ A @ B.T
    return -2 * X.T @ R @ B + 2 * lam * X.T @ X @ A, -2 * R.T @ X @ A + 2 * lam * B


def fstar1(s, k, lam):
    return np.sum(lam * s[:k] ** 2 / (s[:k] ** 2 + lam)) + np.sum(s[k:] ** 2)


def fstar2(s, k, lam):
    return np.sum(s**2) - np.sum(np.maximum(s[:k] - lam, 0) ** 2)


OBJ = {"eq1": (f1, grad1, fstar1), "eq2": (f2, grad2, fstar2)}


def closed_form(kind, s, V, k, scaling="symmetric"):
    if kind == "eq1":
        alpha, beta = SCALINGS[scaling]
        return eq1_factors(s[:k], V[:, :k], LAM1, alpha, beta, dtype=np.float64), LAM1
    lam = lam2(s)
    A, B, _ = eq2_factors(s[:k], V[:, :k], lam, dtype=np.float64)
    return (A, B), lam


# ---------------------------------------------------------------------------------------------
# the math


@pytest.mark.parametrize("kind,scaling", [("eq1", name) for name in SCALINGS] + [("eq2", "unique")])
def test_gradient_formulas_match_finite_differences(svd, kind, scaling):
    """The gradients used below are right: central differences at a random point."""
    X, s, V = svd
    f, grad, _ = OBJ[kind]
    lam = LAM1 if kind == "eq1" else lam2(s)
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((P, 4)) * 0.3, rng.standard_normal((P, 4)) * 0.3
    gA, gB = grad(X, A, B, lam)
    h = 1e-6
    for _ in range(5):
        DA, DB = rng.standard_normal(A.shape), rng.standard_normal(B.shape)
        fd = (f(X, A + h * DA, B + h * DB, lam) - f(X, A - h * DA, B - h * DB, lam)) / (2 * h)
        # central difference error O(h^2 f''') ~ 1e-12 * O(1e3), float64 cancellation ~ eps*f/h ~ 1e-7
        np.testing.assert_allclose(fd, np.sum(gA * DA) + np.sum(gB * DB), rtol=1e-6)


@pytest.mark.parametrize("k", [P, 5])
@pytest.mark.parametrize("kind,scaling", [("eq1", name) for name in SCALINGS] + [("eq2", "unique")])
def test_closed_form_value_and_stationarity(svd, kind, scaling, k):
    X, s, V = svd
    f, grad, fstar = OBJ[kind]
    (A, B), lam = closed_form(kind, s, V, k, scaling)
    value = f(X, A, B, lam)
    np.testing.assert_allclose(value, fstar(s, k, lam), rtol=REL_TOL)
    gA, gB = grad(X, A, B, lam)
    scale = np.sum(s**2)  # gradients are sums of O(||X||^2)-sized terms
    assert np.abs(gA).max() < 1e-11 * scale and np.abs(gB).max() < 1e-11 * scale


def test_eq1_full_rank_matches_ridge_solution(svd):
    """At k = p the Eq. 1 product is the ridge solution (X^T X + lam I)^-1 X^T X."""
    X, s, V = svd
    A, B = eq1_factors(s, V, LAM1, 0.5, 0.0, dtype=np.float64)
    G = X.T @ X
    np.testing.assert_allclose(A @ B.T, np.linalg.solve(G + LAM1 * np.eye(P), G), atol=1e-12)


def test_eq2_scales_match_soft_thresholding(svd):
    """X A and B both equal U_k / V_k times sqrt((s - lam)_+): the singular values soft-thresholded."""
    X, s, V = svd
    lam = lam2(s)
    A, B, n_active = eq2_factors(s, V, lam, dtype=np.float64)
    U = X @ V / s
    root = np.sqrt(np.maximum(s - lam, 0))
    np.testing.assert_allclose(X @ A, U * root, atol=1e-12)
    np.testing.assert_allclose(B, V * root, atol=1e-12)
    np.testing.assert_allclose(np.linalg.svd(X @ A @ B.T, compute_uv=False), np.maximum(s - lam, 0), atol=1e-12)
    assert n_active == 8


@pytest.mark.parametrize("k", [P, 5])
@pytest.mark.parametrize("kind,scaling", [("eq1", "symmetric"), ("eq1", "eq2_like"), ("eq1", "custom"), ("eq2", "unique")])
def test_random_perturbations_do_not_improve(svd, kind, scaling, k):
    X, s, V = svd
    f, _, _ = OBJ[kind]
    (A, B), lam = closed_form(kind, s, V, k, scaling)
    best = f(X, A, B, lam)
    rng = np.random.default_rng(2)
    nA, nB = np.linalg.norm(A), np.linalg.norm(B)
    worst_gain = -np.inf
    for step in (1e-6, 1e-4, 1e-2, 1e-1, 1.0):
        for _ in range(60):
            DA, DB = rng.standard_normal(A.shape), rng.standard_normal(B.shape)
            DA *= step * nA / np.linalg.norm(DA)
            DB *= step * nB / np.linalg.norm(DB)
            worst_gain = max(worst_gain, best - f(X, A + DA, B + DB, lam))
    assert worst_gain <= REL_TOL * best


@pytest.mark.parametrize("k", [P, 5])
@pytest.mark.parametrize("kind", ["eq1", "eq2"])
def test_gradient_descent_from_solution_does_not_improve(svd, kind, k):
    X, s, V = svd
    f, grad, _ = OBJ[kind]
    (A, B), lam = closed_form(kind, s, V, k)
    best = f(X, A, B, lam)
    lr = 0.05 / s[0] ** 2  # below 1/L: the Hessian scales with s_max^2 (|A|, |B| <= 1 here)
    rng = np.random.default_rng(3)
    A = A + 1e-3 * rng.standard_normal(A.shape)  # start just off the solution, then descend
    B = B + 1e-3 * rng.standard_normal(B.shape)
    lowest = np.inf
    for _ in range(300):
        gA, gB = grad(X, A, B, lam)
        A, B = A - lr * gA, B - lr * gB
        lowest = min(lowest, f(X, A, B, lam))
    assert lowest >= best * (1 - REL_TOL)
    assert lowest - best < 1e-3 * best  # it did descend back towards the optimum


@pytest.mark.parametrize("k", [P, 5])
@pytest.mark.parametrize("kind", ["eq1", "eq2"])
def test_independent_optimizer_from_random_starts(svd, kind, k):
    """L-BFGS from random rank-k starts never beats the closed form and reaches it."""
    X, s, V = svd
    f, grad, fstar = OBJ[kind]
    lam = LAM1 if kind == "eq1" else lam2(s)
    target = fstar(s, k, lam)
    rng = np.random.default_rng(4)

    def fun(z):
        A, B = z[: P * k].reshape(P, k), z[P * k :].reshape(P, k)
        gA, gB = grad(X, A, B, lam)
        return f(X, A, B, lam), np.concatenate([gA.ravel(), gB.ravel()])

    found = []
    for _ in range(4):
        res = so.minimize(fun, 0.3 * rng.standard_normal(2 * P * k), jac=True, method="L-BFGS-B",
                          options={"maxiter": 5000, "gtol": 1e-10, "ftol": 1e-15})
        found.append(res.fun)
    assert min(found) >= target * (1 - REL_TOL)
    # local search reaches the global value from at least one start (tolerance: L-BFGS stopping rule)
    assert min(found) <= target * (1 + 1e-6)


# ---------------------------------------------------------------------------------------------
# the paper's point: Eq. 1 fixes only the product; the cosine of its embeddings is arbitrary


def cosine_rows(M):
    norms = np.linalg.norm(M, axis=1, keepdims=True)
    Mn = M / norms
    return Mn @ Mn.T


@pytest.mark.parametrize("k", [P, 5])
def test_eq1_product_unique_cosine_arbitrary(svd, k):
    X, s, V = svd
    sk, Vk = s[:k], V[:, :k]
    want = Vk @ np.diag(sk**2 / (sk**2 + LAM1)) @ Vk.T
    cosines = {}
    for name, (alpha, beta) in SCALINGS.items():
        A, B = eq1_factors(sk, Vk, LAM1, alpha, beta, dtype=np.float64)
        np.testing.assert_allclose(A @ B.T, want, atol=1e-12)
        np.testing.assert_allclose(f1(X, A, B, LAM1), fstar1(s, k, LAM1), rtol=REL_TOL)
        cosines[name] = cosine_rows(B)
    names = list(cosines)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            # same model, different item-item cosines: here 0.02 to 0.7 apart (the spread of the
            # top-5 w_i is small, so k = 5 differs least); round-off would be ~1e-15
            assert np.abs(cosines[a] - cosines[b]).max() > 1e-2, (a, b)
    if k == P:  # B = V orthogonal: every item is cosine-orthogonal to every other, whatever X is
        np.testing.assert_allclose(cosines["item_orthonormal"], np.eye(P), atol=1e-12)
        assert np.abs(cosines["symmetric"] - np.eye(P)).max() > 0.05


def test_float32_output_and_default_dtype(svd):
    X, s, V = svd
    A, B = eq1_factors(s, V, LAM1, 0.5, 0.0)
    A2, B2, _ = eq2_factors(s, V, lam2(s))
    assert A.dtype == B.dtype == A2.dtype == B2.dtype == np.float32
    A64, B64 = eq1_factors(s, V, LAM1, 0.5, 0.0, dtype=np.float64)
    np.testing.assert_allclose(A, A64, rtol=1e-6, atol=1e-7)  # float32 rounding of O(1) values


# ---------------------------------------------------------------------------------------------
# edge cases, hand-computed


def test_eq1_weights_hand_computed():
    np.testing.assert_allclose(eq1_weights(np.array([2.0, 1.0, 0.0]), 4.0), [0.5, 0.2, 0.0])
    np.testing.assert_array_equal(eq1_weights(np.array([3.0, 0.0]), 0.0), [1.0, 0.0])


def test_eq1_zero_singular_values_are_safe():
    s = np.array([2.0, 0.0])
    V = np.eye(3)[:, :2]
    for alpha, beta in [(0.0, 0.0), (1.0, 0.0), (0.5, 0.5), (0.3, -0.7), (0.0, 1.0)]:
        for lam in (0.0, 1.0):
            A, B = eq1_factors(s, V, lam, alpha, beta, dtype=np.float64)
            assert np.all(np.isfinite(A)) and np.all(np.isfinite(B))
            np.testing.assert_array_equal(A[:, 1], 0.0)
            np.testing.assert_array_equal(B[:, 1], 0.0)
            np.testing.assert_allclose((A @ B.T)[0, 0], 4.0 / (4.0 + lam))


def test_eq2_n_active_hand_computed():
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.0])
    V = np.eye(6)[:, :5]
    for lam, want in [(0.0, 4), (0.5, 4), (1.0, 3), (2.0, 2), (2.5, 2), (4.0, 1), (5.0, 0), (9.0, 0)]:
        A, B, n_active = eq2_factors(s, V, lam, dtype=np.float64)
        assert n_active == want, lam
        assert np.all(np.isfinite(A)) and np.all(np.isfinite(B))
        assert np.count_nonzero(np.abs(A).sum(axis=0)) == want
        assert np.count_nonzero(np.abs(B).sum(axis=0)) == want
    A, B, _ = eq2_factors(s, V, 1.0, dtype=np.float64)
    np.testing.assert_allclose(np.diag(A[:5]), [np.sqrt(0.8 / 5), np.sqrt((2 / 3) / 3), np.sqrt(0.5 / 2), 0, 0])
    np.testing.assert_allclose(np.diag(B[:5]), [2.0, np.sqrt(2.0), 1.0, 0, 0])


def test_eq2_lambda_above_every_singular_value(svd):
    X, s, V = svd
    A, B, n_active = eq2_factors(s, V, s[0] * 1.01)
    assert n_active == 0
    np.testing.assert_array_equal(A, 0.0)
    np.testing.assert_array_equal(B, 0.0)


def test_registry_and_errors():
    assert set(EQ1_SCALINGS) == set(SCALINGS)
    for name, exps in SCALINGS.items():
        if name != "custom":
            assert scaling_exponents(name) == exps
    assert scaling_exponents("custom", (0.3, -0.7)) == (0.3, -0.7)
    with pytest.raises(MfsimError, match="symmetric, item_orthonormal, user_orthonormal, eq2_like, custom"):
        scaling_exponents("cosine")
    with pytest.raises(MfsimError, match="custom"):
        scaling_exponents("custom")
    with pytest.raises(MfsimError, match="shape"):
        eq1_factors(np.ones(3), np.ones((4, 2)), 1.0, 0.5, 0.0)
    with pytest.raises(MfsimError, match="lambda"):
        eq2_factors(np.ones(2), np.ones((4, 2)), -1.0)


# ---------------------------------------------------------------------------------------------
# user embeddings and the assembled output


def sparse_x(seed=0, n=37, p=P):
    rng = np.random.default_rng(seed)
    X = sp.random(n, p, density=0.3, random_state=rng, format="csr", dtype=np.float64)
    X.data = np.round(X.data * 4 + 1)
    X = X.tolil()
    X[5, :] = 0  # an empty row
    return X.tocsr()


def test_user_embeddings_match_dense():
    X = sparse_x()
    rng = np.random.default_rng(6)
    A = rng.standard_normal((P, 4)).astype(np.float32)
    c = rng.standard_normal(P)
    Xd = X.toarray()
    blocks = RowBlocks.from_scipy(X, block_rows=10)
    # float32 products of P terms of O(5) values: ~1e-6 relative error
    np.testing.assert_allclose(user_embeddings(blocks, A), Xd @ A, rtol=1e-5, atol=1e-5)
    got = user_embeddings(blocks, A, col_offset=c)
    assert got.dtype == np.float32 and got.shape == (37, 4)
    np.testing.assert_allclose(got, (Xd - c) @ A.astype(np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[5], -(c @ A), rtol=1e-5)  # the empty row gets - c^T A


def test_user_embeddings_on_client(client):
    X = sparse_x(1)
    rng = np.random.default_rng(7)
    A = rng.standard_normal((P, 3)).astype(np.float32)
    c = rng.standard_normal(P)
    local = user_embeddings(RowBlocks.from_scipy(X, block_rows=9), A, col_offset=c)
    dist = user_embeddings(RowBlocks.from_scipy(X, block_rows=9, client=client), A, col_offset=c)
    np.testing.assert_array_equal(local, dist)
    np.testing.assert_allclose(dist, (X.toarray() - c) @ A.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_user_embeddings_checks_shape():
    blocks = RowBlocks.from_scipy(sparse_x(), block_rows=10)
    with pytest.raises(MfsimError, match="shape"):
        user_embeddings(blocks, np.ones((P + 1, 2)))
    with pytest.raises(MfsimError, match="col_offset"):
        user_embeddings(blocks, np.ones((P, 2)), col_offset=np.ones(P - 1))


def test_build_embeddings(svd, caplog):
    X, s, V = svd
    cfg = ObjectivesSection.model_validate(
        {"eq1": {"lambda": LAM1, "scalings": ["symmetric", "item_orthonormal", "custom"],
                 "custom": {"alpha": 0.3, "beta": -0.7}},
         "eq2": {"lambda": lam2(s)}}
    )
    out = build_embeddings(s, V, cfg)
    assert set(out["factors"]) == {("eq1", "symmetric"), ("eq1", "item_orthonormal"), ("eq1", "custom"), ("eq2", "unique")}
    for (obj, name), (A, B) in out["factors"].items():
        assert A.shape == B.shape == (P, P) and A.dtype == B.dtype == np.float32
    A, B = out["factors"][("eq1", "custom")]
    A64, B64 = eq1_factors(s, V, LAM1, 0.3, -0.7, dtype=np.float64)
    np.testing.assert_allclose(A, A64, rtol=1e-6, atol=1e-7)  # float32 rounding
    assert out["meta"]["eq1"]["scalings"]["custom"] == (0.3, -0.7)
    np.testing.assert_allclose(out["meta"]["eq1"]["weights"], s**2 / (s**2 + LAM1))
    assert out["meta"]["eq2"]["n_active"] == 8

    only_eq2 = ObjectivesSection.model_validate({"eq1": None, "eq2": {"lambda": 2 * s[0]}})
    with caplog.at_level(logging.WARNING, logger="mfsim.factors"):
        out = build_embeddings(s, V, only_eq2)
    assert list(out["factors"]) == [("eq2", "unique")] and out["meta"]["eq2"]["n_active"] == 0
    assert "all Eq. 2 embeddings are zero" in caplog.text


def test_factors_are_built_from_v_on_access_equal_to_the_closed_forms(svd, monkeypatch):
    """``Factors`` keeps V and the scales only; each read equals ``eq1_factors`` / ``eq2_factors`` bit for bit,
    also when ``scaled_columns`` works in several row steps."""
    import mfsim.pipeline.model.factors as factors_module

    X, s, V = svd
    monkeypatch.setattr(factors_module, "SCALE_ROWS", 3)  # P = 8 rows: steps of 3, 3 and 2
    V32 = V.astype(np.float32)
    cfg = ObjectivesSection.model_validate({"eq1": {"lambda": LAM1, "scalings": ["symmetric", "user_orthonormal"]},
                                            "eq2": {"lambda": lam2(s)}})
    f = build_embeddings(s, V32, cfg)["factors"]
    assert isinstance(f, Factors) and list(f) == [("eq1", "symmetric"), ("eq1", "user_orthonormal"), ("eq2", "unique")]
    for name in ("symmetric", "user_orthonormal"):
        A, B = eq1_factors(s, V32, LAM1, *EQ1_SCALINGS[name])
        A2, B2 = f[("eq1", name)]
        assert np.array_equal(A, A2) and np.array_equal(B, B2) and np.array_equal(f.b(("eq1", name)), B)
        assert A2 is not f[("eq1", name)][0]  # a fresh pair per read: the mapping holds none
    A, B, _ = eq2_factors(s, V32, lam2(s))
    assert all(np.array_equal(x, y) for x, y in zip(f[("eq2", "unique")], (A, B)))
    naive = (V32.astype(np.float64) * np.linspace(-2, 3, V.shape[1])).astype(np.float32)
    assert np.array_equal(scaled_columns(V32, np.linspace(-2, 3, V.shape[1])), naive)
    eq1 = f.of("eq1")
    assert list(eq1) == ["symmetric", "user_orthonormal"] and len(eq1) == 2 and "eq2" not in list(eq1)
    assert np.array_equal(eq1["symmetric"][1], f[("eq1", "symmetric")][1])
    with pytest.raises(KeyError):
        eq1["unique"]
    extra = np.ones_like(V32)
    f.add(("cos", "unique"), extra, extra)
    assert f[("cos", "unique")][0] is extra and ("cos", "unique") in f and len(f) == 4
    # some rows alone (the report's samples): the whole solution's rows, bit for bit, for scaled and added solutions
    items = np.array([6, 0, 6, 3])
    for key in f:
        A, B = f[key]
        rows = f.rows(key, items)
        assert np.array_equal(rows[0], A[items]) and np.array_equal(rows[1], B[items]) and rows[1].dtype == B.dtype
        assert np.array_equal(f.b_rows(key, items), B[items])
