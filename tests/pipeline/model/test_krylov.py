"""Randomized block Krylov SVD (``svd.solver: krylov``) against svds, dense SVD and its own stopping rule."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from mfsim.pipeline.blocks import RowBlocks
from mfsim.pipeline.config import SvdSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.simulate import power_law_matrix
from mfsim.pipeline.model.svd import krylov_svd, truncated_svd
from tests_support import ml100k_csr

DEFAULTS = SvdSection()


def _svds(x: sp.spmatrix, k: int):
    """Reference: ARPACK in float64 at tol 1e-12, sorted descending; (s, V)."""
    _, s, vt = svds(x.astype(np.float64), k=k, solver="arpack", tol=1e-12, random_state=0)
    order = np.argsort(s)[::-1]
    return s[order], vt[order].T


def _gapped_prefix(s: np.ndarray, min_gap: float = 0.03) -> int:
    gaps = (s[:-1] - s[1:]) / s[:-1]
    ok = np.flatnonzero(gaps >= min_gap)
    return int(ok.max()) + 1 if len(ok) else 0


def _default(x, k, blocks=700, **kw):
    return krylov_svd(RowBlocks.from_scipy(x, blocks), k, block_size=DEFAULTS.block_size, tol=DEFAULTS.tol,
                      max_blocks=DEFAULTS.max_blocks, seed=DEFAULTS.seed, **kw)


@pytest.fixture(scope="module")
def ml100k() -> sp.csr_matrix:
    return ml100k_csr()


@pytest.fixture(scope="module")
def power_law() -> sp.csr_matrix:
    return power_law_matrix(3000, 1000, 60_000, seed=1)


@pytest.fixture(scope="module")
def simulated() -> sp.csr_matrix:
    from mfsim.pipeline.config import SimulateSection
    from mfsim.pipeline.simulate import simulate

    sim = simulate(SimulateSection())
    return sp.csr_matrix((np.ones(len(sim.user), np.float32), (sim.user, sim.item)), shape=(sim.n_users, sim.n_items))


# The targets at the config defaults: max relative error of the top-k sigma <= 1e-6 against
# svds, the top-j right singular subspace (j: the last clear gap) within 1e-4 rad. Measured here:
# errors ~1e-8 (float32 products: Ritz values carry ~1e-8 of rounding), estimates ~1e-7.
@pytest.mark.parametrize("name, k", [("ml100k", 64), ("power_law", 50), ("simulated", 50)])
def test_matches_svds_at_the_defaults(request, name, k):
    x = request.getfixturevalue(name)
    s_ref, v_ref = _svds(x, k)
    res = _default(x, k)
    rel = np.abs(res.sigma - s_ref) / s_ref
    d = res.diagnostics
    assert d["solver"] == "krylov" and d["converged"] and np.all(np.diff(res.sigma) <= 0)
    assert rel.max() <= 1e-6, rel.max()
    # the stopping rule's estimate bounds the true error
    assert rel.max() <= d["estimated_error"] <= DEFAULTS.tol, (rel.max(), d["estimated_error"])
    j = _gapped_prefix(s_ref)
    angles = scipy.linalg.subspace_angles(res.V[:, :j].astype(np.float64), v_ref[:, :j])
    print(f"{name}: err {rel.max():.1e}, estimate {d['estimated_error']:.1e}, {d['passes']} passes, "
          f"{d['blocks']} blocks, top-{j} angle {angles.max():.1e}")
    assert j >= 2 and angles.max() <= 1e-4


def test_flat_spectrum_around_k_and_the_estimate():
    # singular values 10, 9.9, ..., a flat stretch around k = 20 (gaps of 1e-3 relative): Krylov's
    # convergence is slow there; the estimate still bounds the error at every tolerance tried
    rng = np.random.default_rng(3)
    n, p, k = 400, 150, 20
    u = np.linalg.qr(rng.standard_normal((n, p)))[0]
    v = np.linalg.qr(rng.standard_normal((p, p)))[0]
    s = np.concatenate([np.linspace(10, 6, 15), 6 * (1 - 1e-3 * np.arange(1, 16)), np.linspace(5, 0.1, p - 30)])
    x = sp.csr_matrix(((u * s) @ v.T).astype(np.float32))
    s_ref = np.linalg.svd(x.toarray().astype(np.float64), compute_uv=False)[:k]
    for tol in (1e-3, 1e-5):
        res = krylov_svd(RowBlocks.from_scipy(x, 128), k, block_size=8, tol=tol, max_blocks=40)
        err = np.max(np.abs(res.sigma - s_ref) / s_ref)
        assert res.diagnostics["converged"] and err <= res.diagnostics["estimated_error"] <= tol, (tol, err)


def test_rank_below_k_and_the_zero_matrix():
    rng = np.random.default_rng(5)
    left, right = rng.random((300, 4)), rng.random((4, 80))
    x = sp.csr_matrix((left @ right).astype(np.float32))  # rank 4
    res = krylov_svd(RowBlocks.from_scipy(x, 100), 10, block_size=8, compute_u=True)
    s_ref = np.linalg.svd(x.toarray().astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(res.sigma[:4], s_ref[:4], rtol=1e-6)
    assert np.all(res.sigma[4:] <= 1e-5 * s_ref[0])
    np.testing.assert_allclose(res.V.T.astype(np.float64) @ res.V, np.eye(10), atol=1e-6)  # still orthonormal
    zero = krylov_svd(RowBlocks.from_scipy(sp.csr_matrix((20, 9), dtype=np.float32), 7), 3, block_size=2)
    np.testing.assert_array_equal(zero.sigma, 0.0)
    np.testing.assert_allclose(zero.V.T @ zero.V, np.eye(3), atol=1e-6)


@pytest.mark.parametrize("kind", ["center", "standardize"])
def test_col_offset_equals_dense_centered_svd(kind):
    rng = np.random.default_rng(11)
    x = sp.random(500, 60, density=0.1, random_state=rng, format="csr", dtype=np.float32)
    x.data[:] = rng.integers(1, 6, x.nnz)
    dense = x.toarray().astype(np.float64)
    c = dense.mean(axis=0)
    if kind == "standardize":
        std = dense.std(axis=0) + 1e-3
        x = sp.csr_matrix(x.multiply(1.0 / std[None, :]), dtype=np.float32)
        dense = x.toarray().astype(np.float64)
        c = c / std
    eff = dense - c[None, :]
    _, s_ref, vt = np.linalg.svd(eff, full_matrices=False)
    k = 8
    res = krylov_svd(RowBlocks.from_scipy(x, 64), k, block_size=4, col_offset=c, compute_u=True)
    np.testing.assert_allclose(res.sigma, s_ref[:k], rtol=1e-6)
    u = res.gather_u().astype(np.float64)
    np.testing.assert_allclose(eff @ res.V.astype(np.float64), u * res.sigma, atol=1e-5 * s_ref[0])


def test_identical_for_block_splits_and_workers(power_law, client1, client):
    c = np.asarray(power_law.mean(axis=0)).ravel()
    kw = dict(block_size=8, tol=1e-6, col_offset=c, seed=2)
    base = krylov_svd(RowBlocks.from_scipy(power_law, 3000), 20, **kw)
    others = [krylov_svd(RowBlocks.from_scipy(power_law, 333), 20, **kw),
              krylov_svd(RowBlocks.from_scipy(power_law, 1000, client1), 20, **kw),
              krylov_svd(RowBlocks.from_scipy(power_law, 250, client), 20, **kw)]
    assert [o.diagnostics["executor"] for o in others] == ["local", "dask", "dask"]
    for other in others:
        # the same numbers summed in another grouping (~1e-16), which can flip the last bit of a float32 copy
        # of a basis block; the space then differs by ~1e-7 and converged Ritz values by far less
        assert other.diagnostics["blocks"] == base.diagnostics["blocks"]
        np.testing.assert_allclose(other.sigma, base.sigma, rtol=1e-6)
        np.testing.assert_allclose(np.abs(np.sum(other.V * base.V, axis=0)), 1.0, atol=1e-5)


def test_fewer_passes_than_subspace_iteration_for_more_accuracy(power_law):
    s_ref, _ = _svds(power_law, 50)
    kry = _default(power_law, 50)
    sub = truncated_svd(RowBlocks.from_scipy(power_law, 700), SvdSection(rank=50, solver="subspace"))
    err = {r.diagnostics["solver"]: np.max(np.abs(r.sigma - s_ref) / s_ref) for r in (kry, sub)}
    assert kry.diagnostics["passes"] < sub.diagnostics["passes"] / 2 and err["krylov"] < err["subspace"] / 100


def test_not_converged_is_reported_and_bad_settings_are_errors(power_law):
    res = krylov_svd(RowBlocks.from_scipy(power_law, 1000), 50, block_size=4, tol=1e-12, max_blocks=2)
    assert res.diagnostics["converged"] is False and res.diagnostics["blocks"] == 2
    assert res.diagnostics["estimated_error"] > 1e-12
    with pytest.raises(MfsimError, match="svd.block_size, svd.max_blocks and svd.tol must be positive"):
        krylov_svd(RowBlocks.from_scipy(power_law, 1000), 5, block_size=4, tol=0.0)


def test_warm_start_equals_a_cold_start_in_fewer_passes(simulated):
    # the next day's matrix: 3% of the interactions moved to random (user, item) pairs; the start is the
    # first day's V_k, aligned by item (all items are known here; aligned_start gives new ones random rows)
    from mfsim.pipeline.model.svd import aligned_start

    k, rng = 50, np.random.default_rng(0)
    x = simulated.tocoo()
    u, i = x.row.copy(), x.col.copy()
    moved = rng.choice(len(u), int(0.03 * len(u)), replace=False)
    u[moved], i[moved] = rng.integers(0, x.shape[0], len(moved)), rng.integers(0, x.shape[1], len(moved))
    day2 = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=x.shape)
    day2.data[:] = 1
    day1 = _default(simulated, k)
    ids = np.arange(simulated.shape[1])
    start, matched = aligned_start(ids, day1.V, ids)
    assert matched == len(ids)
    cold, warm = _default(day2, k), _default(day2, k, start=start)
    np.testing.assert_allclose(warm.sigma, cold.sigma, rtol=DEFAULTS.tol)
    assert warm.diagnostics["converged"] and warm.diagnostics["passes"] < cold.diagnostics["passes"]
    # items the previous run did not have get seeded random rows of the same scale
    start2, matched2 = aligned_start(ids[:10], day1.V[:10], ids)
    assert matched2 == 10 and np.array_equal(start2[:10], day1.V[:10].astype(np.float64))
    assert 0 < np.abs(start2[10:]).mean() < 1


def test_error_estimate_on_hand_made_sequences():
    from mfsim.pipeline.model.svd import ritz_error_estimate

    # Ritz values rising geometrically to the truth sigma: theta_j = sigma (1 - e rho^j); after j spaces the
    # error is e rho^j / (1 - e rho^j) of theta_j, which the estimate must bound for every j
    sigma = np.array([10.0, 5.0, 2.0])
    e, rho = np.array([1e-2, 3e-2, 1e-1]), np.array([0.3, 0.6, 0.8])
    history = [sigma * (1 - e * rho**j) for j in range(12)]
    for j in range(2, 12):
        truth = np.max((sigma - history[j]) / history[j])
        est = ritz_error_estimate(history[: j + 1])
        assert truth <= est <= 20 * truth, (j, truth, est)
    assert ritz_error_estimate(history[:2]) == np.inf  # two spaces show one change, no ratio
    # a value that has stopped moving (changes at rounding level) counts as converged; one still jumping
    # (ratio above 1) is extrapolated with the capped ratio 0.9: ten times its last change
    flat = [np.array([3.0, 1.0]), np.array([3.0, 1.0 + 1e-4]), np.array([3.0, 1.0 + 3e-4])]
    assert ritz_error_estimate(flat) == pytest.approx(10 * 2e-4 / (1 + 3e-4))


@pytest.mark.parametrize("min_rows", [100, 8192], ids=["8-chunks", "1-chunk"])
def test_basis_in_chunks_on_the_workers_equals_the_local_basis(power_law, client, monkeypatch, min_rows):
    """On a client the basis lives in row chunks on the workers (``krylov_basis.ChunkedBasis``): the same space
    as the in-process basis up to the order of the sums (~1e-16), hence the same blocks, sigma and V."""
    from mfsim.pipeline.model import krylov_basis
    monkeypatch.setattr(krylov_basis, "MIN_CHUNK_ROWS", min_rows)  # 1000 items: 8 chunks of 125 rows, or one
    kw = dict(block_size=8, tol=1e-6, seed=2)
    local = krylov_svd(RowBlocks.from_scipy(power_law, 500), 20, **kw)
    chunked = krylov_svd(RowBlocks.from_scipy(power_law, 500, client), 20, compute_u=True, **kw)
    assert (local.diagnostics["basis"], chunked.diagnostics["basis"]) == ("local", "chunked")
    assert chunked.diagnostics["blocks"] == local.diagnostics["blocks"]
    np.testing.assert_allclose(chunked.sigma, local.sigma, rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(chunked.V * local.V, axis=0)), 1.0, atol=1e-5)
    v = chunked.V.astype(np.float64)
    np.testing.assert_allclose(v.T @ v, np.eye(20), atol=1e-6)
    s_ref, _ = _svds(power_law, 20)
    np.testing.assert_allclose(chunked.sigma, s_ref, rtol=1e-6)
    # the signs: each column's largest-magnitude entry positive, as flip_signs makes them in process
    assert np.all(v[np.abs(v).argmax(axis=0), np.arange(20)] > 0)
    np.testing.assert_allclose(power_law @ v, chunked.gather_u() * chunked.sigma, atol=1e-4 * s_ref[0])
    warm = krylov_svd(RowBlocks.from_scipy(power_law, 500, client), 20, start=local.V, **kw)  # a start from the driver
    np.testing.assert_allclose(warm.sigma, s_ref, rtol=1e-6)


def test_basis_in_chunks_for_rank_below_k_and_the_zero_matrix(client, monkeypatch):
    """Columns lost against the basis are replaced chunk by chunk, and a space narrower than k completes V."""
    from mfsim.pipeline.model import krylov_basis
    monkeypatch.setattr(krylov_basis, "MIN_CHUNK_ROWS", 2)  # 80 items: 8 chunks of 10 rows
    rng = np.random.default_rng(5)
    x = sp.csr_matrix((rng.random((300, 4)) @ rng.random((4, 80))).astype(np.float32))  # rank 4
    # 4 blocks: the first spans X's rank 4, each later one loses columns against the basis and replaces them; more
    # blocks (the default 16) only repeat that, at ~0.5 s each on the workers
    res = krylov_svd(RowBlocks.from_scipy(x, 100, client), 10, block_size=8, compute_u=True, max_blocks=4)
    s_ref = np.linalg.svd(x.toarray().astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(res.sigma[:4], s_ref[:4], rtol=1e-6)
    assert np.all(res.sigma[4:] <= 1e-5 * s_ref[0])
    np.testing.assert_allclose(res.V.T.astype(np.float64) @ res.V, np.eye(10), atol=1e-6)
    zero = krylov_svd(RowBlocks.from_scipy(sp.csr_matrix((20, 9), dtype=np.float32), 7, client), 3, block_size=2,
                      max_blocks=4)
    np.testing.assert_array_equal(zero.sigma, 0.0)
    np.testing.assert_allclose(zero.V.T @ zero.V, np.eye(3), atol=1e-6)


def test_one_reduction_gram_schmidt_equals_the_explicit_passes(power_law, client, monkeypatch):
    """On the workers each new block comes from Gram-Schmidt with one reduction per pass (``PIP_MIN_RATIO``: Y well
    conditioned against the basis, as on every block here); forced onto the explicit passes (ratio infinite) the same
    space comes out: both match svds and each other, and both bases are orthonormal."""
    from mfsim.pipeline.model import krylov_basis
    kw = dict(block_size=8, tol=1e-6, seed=2, compute_u=True)
    fast = krylov_svd(RowBlocks.from_scipy(power_law, 500, client), 20, **kw)
    monkeypatch.setattr(krylov_basis, "PIP_MIN_RATIO", np.inf)
    explicit = krylov_svd(RowBlocks.from_scipy(power_law, 500, client), 20, **kw)
    blocks = fast.diagnostics["blocks"]
    assert fast.diagnostics["explicit_steps"] == 0
    assert explicit.diagnostics["blocks"] == blocks
    assert explicit.diagnostics["explicit_steps"] >= blocks - 1  # every block the space grew by (not a last, full one)
    s_ref, _ = _svds(power_law, 20)
    for res in (fast, explicit):
        np.testing.assert_allclose(res.sigma, s_ref, rtol=1e-6)
        v = res.V.astype(np.float64)
        np.testing.assert_allclose(v.T @ v, np.eye(20), atol=1e-6)
        np.testing.assert_allclose(power_law @ v, res.gather_u() * res.sigma, atol=1e-4 * s_ref[0])
    np.testing.assert_allclose(np.abs(np.sum(fast.V * explicit.V, axis=0)), 1.0, atol=1e-5)


def test_steps_ahead_on_the_workers_give_the_same_svd(power_law, client, monkeypatch):
    """On a client each step's factors are computed on a worker and the next product is submitted before the
    driver reads them; in this process each call runs at once. With X in one block (one product task, so the same
    sums in the same order) both give the same sigma, V and count of passes, bit for bit, also where every block
    is dropped and made again by the explicit passes."""
    from mfsim.pipeline.model import krylov_basis
    kw = dict(block_size=8, tol=1e-6, seed=2)
    n = power_law.shape[0]
    for ratio in (krylov_basis.PIP_MIN_RATIO, np.inf):
        monkeypatch.setattr(krylov_basis, "PIP_MIN_RATIO", ratio)
        ahead = krylov_svd(RowBlocks.from_scipy(power_law, n, client), 20, **kw)
        here = krylov_svd(RowBlocks.from_scipy(power_law, n), 20, chunked_basis=True, **kw)
        np.testing.assert_array_equal(ahead.sigma, here.sigma)
        np.testing.assert_array_equal(ahead.V, here.V)
        for key in ("passes", "blocks", "explicit_steps"):
            assert ahead.diagnostics[key] == here.diagnostics[key], key
    assert ahead.diagnostics["explicit_steps"] >= ahead.diagnostics["blocks"] - 1
    np.testing.assert_allclose(ahead.sigma, _svds(power_law, 20)[0], rtol=1e-6)


@pytest.mark.parametrize("tile_rows", [2048, 7], ids=["one-tile", "tiles-of-7"])
def test_one_reduction_pass_by_hand(monkeypatch, tile_rows):
    """``pip_first`` / ``pip_second`` / ``pip_block`` over two chunks against dense Gram-Schmidt: K is orthonormal,
    orthogonal to the basis, spans Y's part outside it, and ``Y = Q H + K R2 R1``; ``pip_second`` in one tile or in
    tiles of 7 rows (the last one short)."""
    from mfsim.pipeline.model import krylov_basis
    from mfsim.pipeline.model.krylov_basis import pip_block, pip_factor, pip_first, pip_second
    monkeypatch.setattr(krylov_basis, "GS_TILE_ROWS", tile_rows)
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((50, 6)))[0]
    y = q @ rng.standard_normal((6, 3)) + 0.1 * rng.standard_normal((50, 3))
    chunks = [(0, 20), (20, 50)]
    blocks = [((q[a:b].copy(), q[a:b].astype(np.float32)),) for a, b in chunks]
    c1, r1 = pip_factor([pip_first(y, a, b, *blk) for (a, b), blk in zip(chunks, blocks)], 6)
    np.testing.assert_allclose(c1, q.T @ y, atol=1e-14)
    pairs = [pip_second(y, a, b, c1, r1, *blk) for (a, b), blk in zip(chunks, blocks)]
    c2, r2 = pip_factor([s for _, s in pairs], 6, scale=1.0, max_deviation=1e-3)
    k = np.concatenate([pip_block(y1, c2, r2, 3, *blk)[0] for (y1, _), blk in zip(pairs, blocks)])
    np.testing.assert_allclose(k.T @ k, np.eye(3), atol=1e-14)
    np.testing.assert_allclose(q.T @ k, 0.0, atol=1e-14)
    np.testing.assert_allclose(q @ (c1 + c2 @ r1) + k @ r2 @ r1, y, atol=1e-13)
    outside = y - q @ (q.T @ y)
    np.testing.assert_allclose(k @ (k.T @ outside), outside, atol=1e-13)
    # Y inside the basis up to 1e-6: its part outside is below the ratio, so no factor (the explicit passes run)
    assert pip_factor([pip_first(q[:, :3] + 1e-6 * y, 0, 50, (q, q.astype(np.float32)))], 6)[1] is None


def test_products_in_row_ranges_on_the_workers(power_law, client, monkeypatch):
    """Blocks above ``PRODUCT_TASK_NNZ`` are cut into row ranges of about equal entries, one product task each,
    added on their worker: the same SVD as one task per block."""
    from mfsim.pipeline.model import svd as svd_module
    from mfsim.pipeline.model.svd import row_ranges
    from mfsim.pipeline.blocks import CSRBlock
    block = CSRBlock.from_scipy(power_law[:500])
    ranges = row_ranges(block, -(-block.nnz // 3))
    assert len(ranges) == 3 and ranges[0][0] == 0 and ranges[-1][1] == 500
    assert all(a < b for a, b in ranges) and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
    sizes = [int(block.indptr[b] - block.indptr[a]) for a, b in ranges]
    assert max(sizes) - min(sizes) <= 2 * int(np.diff(block.indptr).max())
    assert row_ranges(block, block.nnz) == [(0, 500)]
    kw = dict(block_size=8, tol=1e-6, seed=2)
    whole = krylov_svd(RowBlocks.from_scipy(power_law, 1000, client), 20, **kw)
    monkeypatch.setattr(svd_module, "PRODUCT_TASK_NNZ", 5000)  # ~20,000 entries per block: 4 ranges each
    cut = krylov_svd(RowBlocks.from_scipy(power_law, 1000, client), 20, **kw)
    s_ref, _ = _svds(power_law, 20)
    np.testing.assert_allclose(cut.sigma, s_ref, rtol=1e-6)
    np.testing.assert_allclose(cut.sigma, whole.sigma, rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(cut.V * whole.V, axis=0)), 1.0, atol=1e-5)


def test_products_summed_chunk_by_chunk_give_the_same_svd(power_law, client, monkeypatch):
    """On a client each Krylov step's product reaches the basis chunk by chunk (``_BlockTasks.product_rows``: the rows
    of each worker's partials cut and added where they live, each chunk's rows added on its worker with the offset
    term): the same values as
    the whole product of ``centered_sum`` cut into chunks, so the same sigma and V bit for bit, with a column offset,
    blocks on both workers and 4 chunks."""
    from mfsim.pipeline.model import krylov_basis
    from mfsim.pipeline.model.svd import _add_pairs, _BlockTasks, centered_rows, centered_sum, rows_for
    rng = np.random.default_rng(3)
    partials = [[(rng.standard_normal((40, 5)), rng.standard_normal(5)) for _ in range(n)] for n in (3, 1, 2)]
    parts = [_add_pairs(*p) for p in partials]  # each worker's sum of its partials
    c = rng.standard_normal(40)
    whole = centered_sum(c, *parts)
    spans = [(0, 7), (20, 40)]  # one worker's chunks: the second worker's partials there, the others' rows cut
    for lo, hi in spans:
        mixed = [rows_for(spans, *partials[0]), partials[1], rows_for(spans, *partials[2])]
        np.testing.assert_array_equal(centered_rows(c, lo, hi, *mixed), whole[lo:hi])
        summed = [rows_for(spans, parts[0]), parts[1], rows_for(spans, parts[2])]  # from the workers' sums
        np.testing.assert_array_equal(centered_rows(c, lo, hi, *summed), whole[lo:hi])
    np.testing.assert_array_equal(centered_rows(None, 3, 9, parts[0]), parts[0][0][3:9])
    np.testing.assert_array_equal(centered_rows(None, 3, 9, partials[0]), parts[0][0][3:9])

    monkeypatch.setattr(krylov_basis, "MIN_CHUNK_ROWS", 250)  # 1000 items: 4 chunks, 2 on each worker
    kw = dict(block_size=8, tol=1e-6, seed=2, col_offset=np.asarray(power_law.mean(axis=0)).ravel())
    blocks = RowBlocks.from_scipy(power_law, 250, client)
    assert len({w for w in client.who_has(blocks.parts).values() for w in w}) == 2
    split = krylov_svd(blocks, 20, **kw)
    monkeypatch.setattr(_BlockTasks, "product_rows", lambda self, k, c, l, seed, rows, workers:
                        self.product(k, c, l, seed))  # the whole product, cut by the basis
    joined = krylov_svd(blocks, 20, **kw)
    np.testing.assert_array_equal(split.sigma, joined.sigma)
    np.testing.assert_array_equal(split.V, joined.V)
    assert split.diagnostics["passes"] == joined.diagnostics["passes"]
    here = krylov_svd(RowBlocks.from_scipy(power_law, 250), 20, **kw)  # in this process: the sums in another order
    np.testing.assert_allclose(split.sigma, here.sigma, rtol=1e-6)


def test_kernel_load_covers_the_types_the_svd_passes(power_law):
    """``kernels.sparse.load`` (run by the job while the workers ingest) loads the SVD's kernels for the argument
    types the SVD passes: an SVD in this process afterwards adds no signature to them (a new one would be loaded at
    its first product, the cost ``load`` is there to take out of the SVD)."""
    import mfsim.kernels.sparse as ks
    ks.load()
    kernels = (ks._transpose, ks._matmat, ks._csc_t_matmat)
    before = [set(k.signatures) for k in kernels]
    res = krylov_svd(RowBlocks.from_scipy(power_law, 500), 8, block_size=8, tol=1e-6, seed=1, chunked_basis=True)
    assert res.diagnostics["converged"]
    assert [set(k.signatures) for k in kernels] == before
