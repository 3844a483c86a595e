"""Randomized truncated SVD against scipy's svds, dense SVD and Halko et al.'s error bound."""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from mfsim.pipeline.blocks import CSRBlock, RowBlocks
from mfsim.pipeline.config import SvdSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.simulate import power_law_matrix
from mfsim.pipeline.model.svd import flip_signs, omega_rows, randomized_svd, truncated_svd
from tests_support import ml100k_csr


def _svds(x: sp.spmatrix, k: int):
    """Reference: ARPACK in float64, sorted descending; returns (s, V)."""
    u, s, vt = svds(x.astype(np.float64), k=k, solver="arpack", tol=1e-12, random_state=0)
    order = np.argsort(s)[::-1]
    return s[order], vt[order].T


def _dense_svd(a: np.ndarray):
    u, s, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    return u, s, vt.T


@pytest.fixture(scope="module")
def ml100k() -> sp.csr_matrix:
    return ml100k_csr()


@pytest.fixture(scope="module")
def power_law() -> sp.csr_matrix:
    x = power_law_matrix(3000, 1000, 60_000, seed=1)
    assert x.nnz == 60_000 and x.has_sorted_indices and x.data.min() == 1  # the generator's contract
    return x


def _gapped_prefix(s: np.ndarray, min_gap: float = 0.03) -> int:
    """The largest j with a relative gap (s_j - s_{j+1}) / s_j >= min_gap among the top components."""
    gaps = (s[:-1] - s[1:]) / s[:-1]
    ok = np.flatnonzero(gaps >= min_gap)
    return int(ok.max()) + 1 if len(ok) else 0


@pytest.fixture(scope="module")
def simulated() -> sp.csr_matrix:
    """The paper's Section 4 data at its default size (20,000 x 1,000), binarized."""
    from mfsim.pipeline.config import SimulateSection
    from mfsim.pipeline.simulate import simulate

    sim = simulate(SimulateSection())
    return sp.csr_matrix((np.ones(len(sim.user), np.float32), (sim.user, sim.item)),
                         shape=(sim.n_users, sim.n_items))


# Accuracy with the config defaults (svd.oversample=10, svd.power_iterations=32): the measured
# minimum q for a max relative error < 1e-3 on all k singular values over seeds 0-4 was 21-29
# (ml-100k, k=64) and 17-31 (this power-law matrix, k=50) with oversample=10; the simulator's
# data needs about 15 (1.2e-4 at q=20).
@pytest.mark.parametrize("name, k", [("ml100k", 64), ("power_law", 50), ("simulated", 50)])
def test_matches_svds(request, name, k):
    x = request.getfixturevalue(name)
    s_ref, v_ref = _svds(x, k)
    d = SvdSection()
    res = randomized_svd(RowBlocks.from_scipy(x, 700), k, oversample=d.oversample,
                         power_iterations=d.power_iterations, seed=d.seed)
    rel = np.abs(res.sigma - s_ref) / s_ref
    assert res.sigma.dtype == np.float64 and res.V.shape == (x.shape[1], k)
    assert np.all(np.diff(res.sigma) <= 0)
    assert rel.max() < 1e-3, rel.max()
    # principal angles between the top-j subspaces, j the last index with a clear (>= 3%) gap:
    # by Davis-Kahan they are bounded by the residual over the gap; subspace iteration drives the
    # residual down like (s_{l+1}/s_j)^(2q+1), far below 1e-3 here
    j = _gapped_prefix(s_ref)
    angles = scipy.linalg.subspace_angles(res.V[:, :j].astype(np.float64), v_ref[:, :j])
    print(f"{name}: top-{j} subspace, largest principal angle {angles.max():.2e} rad; max rel err sigma {rel.max():.2e}")
    assert j >= 2 and angles.max() < 1e-3


def test_v_orthonormal(power_law):
    res = randomized_svd(RowBlocks.from_scipy(power_law, 1000), 40, power_iterations=2)
    gram = res.V.astype(np.float64).T @ res.V.astype(np.float64)
    # Q is orthonormal to 1e-15 in float64; rounding Q and then V to float32 (u = 6e-8) moves each
    # unit column by at most ~u (sqrt(l) + sqrt(k)) ~ 1e-6 in norm; 1e-5 leaves a 5x margin
    assert np.abs(gram - np.eye(40)).max() < 1e-5


def _residual(x_dense: np.ndarray, v: np.ndarray) -> float:
    """||X - X V V^T||_2."""
    v = v.astype(np.float64)
    return np.linalg.norm(x_dense - (x_dense @ v) @ v.T, 2)


@pytest.mark.parametrize("q", [0, 2])
def test_halko_error_bound(q):
    # Halko, Martinsson & Tropp (2011) eq. (1.11): with probability >= 1 - 6 p^-p (p = oversample),
    # ||A - Q Q^T A|| <= [1 + 11 sqrt(k + p) sqrt(min(m, n))]^(1/(2q+1)) s_{k+1}; truncating to
    # rank k adds at most s_{k+1} (their Thm 9.3). Eckart-Young gives s_{k+1} as the lower bound.
    # X: k sparse rank-one blocks (a clear structure, s_k >> s_{k+1}) plus sparse noise, so that a
    # wrong basis (residual ~ s_1) fails the bound by orders of magnitude.
    rng = np.random.default_rng(3)
    n, p, k, over = 400, 240, 8, 10
    rows = np.array_split(rng.permutation(n), k)
    cols = np.array_split(rng.permutation(p), k)
    x = sp.lil_matrix((n, p))
    for r, c in zip(rows, cols):
        x[np.ix_(r, c)] = np.outer(rng.uniform(1, 2, len(r)), rng.uniform(1, 2, len(c)))
    x = sp.csr_matrix(x) + sp.random(n, p, density=0.02, random_state=rng, data_rvs=lambda m: 1e-3 * rng.normal(size=m))
    x = sp.csr_matrix(x, dtype=np.float32)
    dense = x.toarray().astype(np.float64)
    s = np.linalg.svd(dense, compute_uv=False)
    res = randomized_svd(RowBlocks.from_scipy(x, 97), k, oversample=over, power_iterations=q, seed=5)
    err = _residual(dense, res.V)
    bound = (1 + (1 + 11 * np.sqrt(k + over) * np.sqrt(min(n, p))) ** (1 / (2 * q + 1))) * s[k]
    assert s[k] * (1 - 1e-6) <= err <= bound, (err, bound, s[0])
    # the bound is informative: a basis missing one of the k blocks leaves at least that block's
    # singular value (>= s_k) in the residual, and the bound is below s_k by a wide margin
    assert bound < 0.2 * s[k - 1]


def _offset_case():
    rng = np.random.default_rng(11)
    x = sp.random(150, 40, density=0.15, random_state=rng, format="csr", dtype=np.float32)
    x.data = rng.integers(1, 6, x.nnz).astype(np.float32)
    dense = x.toarray().astype(np.float64)
    mean = dense.mean(axis=0)
    std = dense.std(axis=0)
    return x, dense, mean, std


@pytest.mark.parametrize("kind", ["center", "standardize"])
def test_col_offset_equals_dense_centered_svd(kind):
    # X_eff = X - 1 c^T (centering) or X D^-1 - 1 (c/std)^T (standardizing, the scaling applied to
    # X's values); with l = p the range finder spans every column, so the result is exact up to
    # float32 rounding of X's values, Q and V (relative 1e-5 leaves ~100x margin over u = 6e-8
    # times the few roundings)
    x, dense, mean, std = _offset_case()
    if kind == "center":
        c = mean
    else:
        x = sp.csr_matrix(x.multiply(1.0 / std[None, :]), dtype=np.float32)
        dense = x.toarray().astype(np.float64)
        c = mean / std
    eff = dense - c[None, :]
    u_ref, s_ref, v_ref = _dense_svd(eff)
    k = 6
    res = randomized_svd(RowBlocks.from_scipy(x, 64), k, oversample=40, power_iterations=1, col_offset=c, compute_u=True)
    np.testing.assert_allclose(res.sigma, s_ref[:k], rtol=1e-5)
    # vectors up to sign: |<v, v_ref>| = 1 for the well-separated components
    cosines = np.abs(np.sum(res.V.astype(np.float64) * v_ref[:, :k], axis=0))
    np.testing.assert_allclose(cosines, 1.0, atol=1e-5)
    u = res.gather_u().astype(np.float64)
    np.testing.assert_allclose(eff @ res.V.astype(np.float64), u * res.sigma, atol=1e-5 * s_ref[0])
    # the offset is not a no-op: the uncentered spectrum differs
    assert abs(randomized_svd(RowBlocks.from_scipy(x, 64), k, oversample=40).sigma[0] - s_ref[0]) > 1e-2 * s_ref[0]


def test_deterministic_for_a_seed(power_law):
    blocks = RowBlocks.from_scipy(power_law, 1000)
    a = randomized_svd(blocks, 20, power_iterations=1, seed=7)
    b = randomized_svd(blocks, 20, power_iterations=1, seed=7)
    c = randomized_svd(blocks, 20, power_iterations=1, seed=8)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    np.testing.assert_array_equal(a.V, b.V)
    assert np.abs(a.sigma - c.sigma).max() > 1e-6 * a.sigma[0]  # the seed matters at q = 1


def test_omega_rows_independent_of_split():
    whole = omega_rows(0, 10_000, 5, seed=3)
    parts = np.vstack([omega_rows(lo, hi - lo, 5, seed=3) for lo, hi in [(0, 1), (1, 4097), (4097, 4097), (4097, 10_000)]])
    np.testing.assert_array_equal(whole, parts)
    assert whole.dtype == np.float32
    # standard normal entries: mean 0 and variance 1 within 5 standard errors (n = 50,000)
    assert abs(whole.mean()) < 5 / np.sqrt(whole.size) and abs(whole.var() - 1) < 5 * np.sqrt(2 / whole.size)


def _compare(a, b, rtol: float = 1e-6):
    # the same algorithm on the same numbers: only the order of float64 sums over blocks and workers
    # differs (~1e-16 relative), which can flip the last bit of a float32 copy of Q (6e-8 relative)
    np.testing.assert_allclose(a.sigma, b.sigma, rtol=rtol)
    np.testing.assert_allclose(a.V, b.V, atol=1e-5)


def test_identical_for_block_sizes_and_workers(power_law, client1, client):
    c = np.asarray(power_law.mean(axis=0)).ravel()
    kw = dict(power_iterations=3, col_offset=c, compute_u=True, seed=2)
    base = randomized_svd(RowBlocks.from_scipy(power_law, 3000), 20, **kw)
    u_base = base.gather_u()
    others = [
        randomized_svd(RowBlocks.from_scipy(power_law, 333), 20, **kw),
        randomized_svd(RowBlocks.from_scipy(power_law, 1000, client1), 20, **kw),
        randomized_svd(RowBlocks.from_scipy(power_law, 250, client), 20, **kw),
    ]
    assert [o.diagnostics["executor"] for o in others] == ["local", "dask", "dask"]
    assert others[2].diagnostics["n_workers"] == 2
    for other in others:
        _compare(base, other)
        np.testing.assert_allclose(other.gather_u(), u_base, atol=1e-5)


def test_empty_block_and_full_rank():
    # a block with no rows changes nothing; k = min(n, p) with l = p recovers the whole spectrum
    rng = np.random.default_rng(4)
    x = sp.random(30, 12, density=0.3, random_state=rng, format="csr", dtype=np.float32)
    b = RowBlocks.from_scipy(x, 10)
    empty = CSRBlock.from_scipy(sp.csr_matrix((0, 12), dtype=np.float32))
    with_empty = RowBlocks([b.parts[0], empty, *b.parts[1:]], np.array([0, 10, 10, 20, 30]), 12)
    _, s_ref, _ = _dense_svd(x.toarray())
    r1 = randomized_svd(b, 12, power_iterations=0)
    r2 = randomized_svd(with_empty, 12, power_iterations=0)
    np.testing.assert_allclose(r1.sigma, s_ref, rtol=1e-5, atol=1e-6 * s_ref[0])
    _compare(r1, r2)


def test_zero_matrix_gives_zero_spectrum():
    res = randomized_svd(RowBlocks.from_scipy(sp.csr_matrix((20, 9), dtype=np.float32), 7), 3, compute_u=True)
    np.testing.assert_array_equal(res.sigma, 0.0)
    np.testing.assert_allclose(res.V.T @ res.V, np.eye(3), atol=1e-6)
    np.testing.assert_array_equal(res.gather_u(), 0.0)


def test_u_when_asked(power_law, client):
    k = 15
    s_ref, _ = _svds(power_law, k)
    for blocks in (RowBlocks.from_scipy(power_law, 800), RowBlocks.from_scipy(power_law, 800, client)):
        res = randomized_svd(blocks, k, oversample=k, power_iterations=10, compute_u=True)
        u = res.gather_u().astype(np.float64)
        v = res.V.astype(np.float64)
        assert u.shape == (power_law.shape[0], k) and len(res.U) == blocks.n_blocks
        # X V = U S up to float32 storage of U and V (relative 6e-8 per entry, ~1e-6 after the products)
        np.testing.assert_allclose(power_law @ v, u * res.sigma, atol=1e-5 * s_ref[0])
        # U orthonormal: U = Q_C U_r with both factors orthonormal, up to float32 storage
        assert np.abs(u.T @ u - np.eye(k)).max() < 1e-5
        # and U, V are the singular vectors: U^T X V = S (diagonal), to the accuracy of sigma (1e-3)
        np.testing.assert_allclose(u.T @ (power_law @ v), np.diag(res.sigma), atol=1e-3 * s_ref[0])
    # q is irrelevant to this check; 4 keeps it at the cost it had when the default was 4
    assert randomized_svd(RowBlocks.from_scipy(power_law, 800), k, power_iterations=4).U is None


def test_flip_signs_hand_computed():
    # columns: largest |entry| negative, positive, a tie in magnitude (the first entry wins), zero
    v = np.array([[1.0, -1.0, 2.0, 0.0],
                  [-2.0, 3.0, -2.0, 0.0],
                  [0.5, 1.0, 1.0, 0.0]])
    flipped, sign = flip_signs(v)
    np.testing.assert_array_equal(sign, [-1.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(flipped, [[-1.0, -1.0, 2.0, 0.0],
                                            [2.0, 3.0, -2.0, 0.0],
                                            [-0.5, 1.0, 1.0, 0.0]])


@pytest.mark.parametrize("solver", ["krylov", "subspace", "sklearn"])
def test_both_solvers_fix_the_sign_of_v_and_u(power_law, solver):
    # each column of V has its largest-magnitude entry positive, and U is flipped with it (X V = U S)
    cfg = SvdSection(rank=5, oversample=10, power_iterations=2, solver=solver)
    res = truncated_svd(RowBlocks.from_scipy(power_law, 1000), cfg, compute_u=True)
    v = res.V.astype(np.float64)
    assert all(col[np.argmax(np.abs(col))] > 0 for col in v.T)
    # u_j^T X v_j = s_j > 0: a U column left unflipped while its V column flipped gives -s_j
    proj = np.diag(res.gather_u().astype(np.float64).T @ (power_law @ v))
    np.testing.assert_allclose(proj, res.sigma, rtol=0.1)


def test_sklearn_solver_agrees(power_law):
    blocks = RowBlocks.from_scipy(power_law, 1000)
    k = 50  # with the settings measured in test_matches_svds
    s_ref, v_ref = _svds(power_law, k)
    cfg = SvdSection(rank=k, oversample=k, power_iterations=10, solver="subspace")
    ours = truncated_svd(blocks, cfg, compute_u=True)
    theirs = truncated_svd(blocks, cfg.model_copy(update={"solver": "sklearn"}), compute_u=True)
    assert theirs.diagnostics["solver"] == "sklearn" and ours.diagnostics["solver"] == "subspace"
    for res in (ours, theirs):  # both within 1e-3 of svds (see test_matches_svds for the settings)
        assert (np.abs(res.sigma - s_ref) / s_ref).max() < 1e-3
    np.testing.assert_allclose(ours.sigma, theirs.sigma, rtol=2e-3)
    j = _gapped_prefix(s_ref)
    angles = scipy.linalg.subspace_angles(ours.V[:, :j].astype(np.float64), theirs.V[:, :j].astype(np.float64))
    assert j >= 2 and angles.max() < 1e-3
    # sklearn's U, split into the same row blocks: U^T X V = S to the accuracy of sigma (1e-3)
    u = theirs.gather_u().astype(np.float64)
    np.testing.assert_allclose(u.T @ (power_law @ theirs.V.astype(np.float64)), np.diag(theirs.sigma), atol=1e-3 * s_ref[0])
    with pytest.raises(MfsimError, match="column offset"):
        truncated_svd(blocks, cfg.model_copy(update={"solver": "sklearn"}), col_offset=np.zeros(power_law.shape[1]))


def test_user_errors():
    blocks = RowBlocks.from_scipy(sp.random(10, 6, density=0.5, format="csr", random_state=0, dtype=np.float32), 4)
    with pytest.raises(MfsimError, match=r"svd.rank must be between 1 and min\(n_users, n_items\) = min\(10, 6\) = 6, got 7"):
        randomized_svd(blocks, 7)
    with pytest.raises(MfsimError, match="unknown svd.solver 'nope'; valid: krylov, subspace, sklearn"):
        truncated_svd(blocks, SvdSection.model_construct(rank=2, solver="nope"))
    with pytest.raises(ValueError, match=r"col_offset must be .* shape \(6,\)"):
        randomized_svd(blocks, 2, col_offset=np.zeros(5))
    with pytest.raises(MfsimError, match="compute_u=True"):
        randomized_svd(blocks, 2).gather_u()


def test_power_iterations_report_progress(caplog, monkeypatch):
    """One ``svd power iterations`` step per iteration: off a terminal a log line at each tenth (when due: here
    always, ``LOG_EVERY_S`` 0), i.e. at every one of the 8."""
    import mfsim.pipeline.progress as progress_module

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, whatever runs the tests
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    x = sp.random(60, 30, density=0.2, random_state=np.random.default_rng(2), format="csr", dtype=np.float32)
    with caplog.at_level(logging.INFO, logger="mfsim.progress"):
        randomized_svd(RowBlocks.from_scipy(x, 16), 3, oversample=2, power_iterations=8)
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "mfsim.progress"] == [
        f"svd power iterations: {d}/8" for d in range(1, 9)]
