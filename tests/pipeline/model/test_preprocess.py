"""Preprocessing against a dense NumPy re-implementation of each formula on a small matrix."""

from __future__ import annotations

import functools
import operator

import numpy as np
import pytest
import scipy.sparse as sp

from mfsim.pipeline.blocks import RowBlocks, tree_reduce
from mfsim.pipeline.config import PreprocessSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.model.factors import user_embeddings
from mfsim.pipeline.model.preprocess import apply_preprocess, fit_preprocess, idf_weights, preprocess

N, P = 41, 13
EMPTY_ROW, EMPTY_COL, FULL_COL = 7, 4, 9

# Values are stored as float32 (relative rounding 6e-8); products below sum <= P terms of O(10),
# so 1e-5 relative plus 1e-5 absolute covers float32 storage with a wide margin.
RTOL, ATOL = 1e-5, 1e-5


def make_x(seed: int = 0) -> sp.csr_matrix:
    """Counts 1..5 at density 0.3, one empty row, one empty column, one column every user has
    (except the empty row, which keeps it empty), and one row with every item but the empty one."""
    rng = np.random.default_rng(seed)
    mask = rng.random((N, P)) < 0.3
    vals = rng.integers(1, 6, size=(N, P)).astype(np.float64)
    X = np.where(mask, vals, 0.0)
    X[:, FULL_COL] = vals[:, FULL_COL]
    X[3, :] = vals[3, :]
    X[EMPTY_ROW, :] = 0.0
    X[:, EMPTY_COL] = 0.0
    return sp.csr_matrix(X)


def dense_reference(X: np.ndarray, cfg: PreprocessSection) -> np.ndarray:
    """X_eff written out densely from the definitions in the module docstring."""
    X = X.astype(np.float64).copy()
    n = X.shape[0]
    if cfg.binarize:
        X = (X != 0).astype(np.float64)
    df = (X != 0).sum(axis=0)
    with np.errstate(divide="ignore"):
        idf = np.where(df > 0, np.log(n / np.where(df > 0, df, 1)), 0.0)
    if cfg.column_weighting == "idf":
        X = X * idf
    elif cfg.column_weighting == "popularity_power":
        X = X * np.where(df > 0, np.where(df > 0, df, 1) ** -cfg.popularity_beta, 0.0)
    elif cfg.column_weighting == "bm25":
        k1, b = cfg.bm25_k1, cfg.bm25_b
        length = X.sum(axis=1, keepdims=True)
        avglen = length.mean()
        denom = X + k1 * (1 - b + b * length / avglen)
        X = np.where(X != 0, idf * X * (k1 + 1) / np.where(X != 0, denom, 1.0), 0.0)
    if cfg.standardize_columns:
        mu, sd = X.mean(axis=0), X.std(axis=0)  # two-pass, population sd
        const = sd <= 1e-9 * np.abs(X).max()
        X = np.where(const, 0.0, (X - mu) / np.where(const, 1.0, sd))
    elif cfg.center_columns:
        X = X - X.mean(axis=0)
    return X


CASES = {
    "binarize": dict(binarize=True),
    "idf": dict(column_weighting="idf"),
    "binarize+idf": dict(binarize=True, column_weighting="idf"),
    "bm25": dict(column_weighting="bm25"),
    "binarize+bm25": dict(binarize=True, column_weighting="bm25", bm25_k1=2.0, bm25_b=0.5),
    "popularity_power": dict(column_weighting="popularity_power"),
    "popularity_power_beta1": dict(column_weighting="popularity_power", popularity_beta=1.0),
    "center": dict(center_columns=True),
    "standardize": dict(standardize_columns=True),
    "idf+center": dict(column_weighting="idf", center_columns=True),
    "binarize+standardize": dict(binarize=True, standardize_columns=True),
    "bm25+standardize": dict(column_weighting="bm25", standardize_columns=True),
    "popularity+standardize": dict(column_weighting="popularity_power", standardize_columns=True),
}


def effective_dense(blocks: RowBlocks, prep) -> np.ndarray:
    """X_eff from the preprocessed blocks and the implicit offset (small data only)."""
    Xd = blocks.gather().toarray().astype(np.float64)
    if prep.col_offset is not None:
        Xd = Xd - prep.col_offset[None, :]
    return Xd


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_reference(name):
    cfg = PreprocessSection(**CASES[name])
    X = make_x()
    blocks = RowBlocks.from_scipy(X, block_rows=10)
    out, prep = preprocess(blocks, cfg)
    want = dense_reference(X.toarray(), cfg)
    np.testing.assert_allclose(effective_dense(out, prep), want, rtol=RTOL, atol=ATOL)
    # the offset is implicit: the stored values keep the sparsity pattern of X
    got = out.gather()
    np.testing.assert_array_equal(got.indptr, X.indptr)
    np.testing.assert_array_equal(got.indices, X.indices)
    assert (prep.col_offset is not None) == (cfg.center_columns or cfg.standardize_columns)


@pytest.mark.parametrize("name", ["center", "standardize", "bm25+standardize", "idf+center"])
def test_implicit_products(name):
    """(X diag(d) - 1 c^T) M and its transpose through the offset equal the dense products."""
    cfg = PreprocessSection(**CASES[name])
    X = make_x(1)
    out, prep = preprocess(RowBlocks.from_scipy(X, block_rows=8), cfg)
    want = dense_reference(X.toarray(), cfg)
    rng = np.random.default_rng(5)
    M = rng.standard_normal((P, 4))
    Mt = rng.standard_normal((N, 4))
    S = out.gather().astype(np.float64)
    c = prep.col_offset
    XM = S @ M - np.outer(np.ones(N), c @ M)  # (X - 1 c^T) M
    XtM = S.T @ Mt - np.outer(c, Mt.sum(axis=0))  # (X - 1 c^T)^T M = X^T M - c (1^T M)
    scale = np.abs(want).max() * np.abs(M).max() * P  # bound on the entries of the products
    np.testing.assert_allclose(XM, want @ M, rtol=0, atol=RTOL * scale)
    np.testing.assert_allclose(XtM, want.T @ Mt, rtol=0, atol=RTOL * scale * N / P)
    # the user embeddings apply the same offset block-wise
    P_emb = user_embeddings(out, M.astype(np.float32), prep.col_offset)
    np.testing.assert_allclose(P_emb, want @ M.astype(np.float32), rtol=0, atol=RTOL * scale)


def test_standardized_columns_have_zero_mean_unit_variance():
    cfg = PreprocessSection(standardize_columns=True)
    X = make_x(2)
    out, prep = preprocess(RowBlocks.from_scipy(X, block_rows=16), cfg)
    Xe = effective_dense(out, prep)
    sd = Xe.std(axis=0)
    const = prep.col_scale == 0
    assert const[EMPTY_COL] and np.count_nonzero(const) == 1  # FULL_COL has varying counts
    np.testing.assert_allclose(Xe.mean(axis=0), 0.0, atol=1e-6)  # float32 values, O(1) entries
    np.testing.assert_allclose(sd[~const], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(Xe[:, EMPTY_COL], 0.0)


def test_binarize_zero_variance_column_is_zero():
    """Under binarize a column held by every user but one is not constant, one held by all is."""
    X = make_x(3).toarray()
    X[EMPTY_ROW, FULL_COL] = 2.0  # now every user has FULL_COL: constant 1 after binarize
    cfg = PreprocessSection(binarize=True, standardize_columns=True)
    out, prep = preprocess(RowBlocks.from_scipy(sp.csr_matrix(X), block_rows=10), cfg)
    assert prep.col_scale[FULL_COL] == 0 and prep.col_offset[FULL_COL] == 0
    Xe = effective_dense(out, prep)
    np.testing.assert_array_equal(Xe[:, FULL_COL], 0.0)
    np.testing.assert_allclose(Xe, dense_reference(X, cfg), rtol=RTOL, atol=ATOL)


def test_idf_hand_computed():
    # 3 users; column 0 held by 1 user, column 1 by 2, column 2 by all 3, column 3 by none
    X = sp.csr_matrix(np.array([[1, 1, 1, 0], [0, 2, 1, 0], [0, 0, 3, 0]], dtype=np.float32))
    out, prep = preprocess(RowBlocks.from_scipy(X, block_rows=2), PreprocessSection(column_weighting="idf"))
    np.testing.assert_allclose(prep.col_weight, [np.log(3), np.log(1.5), 0.0, 0.0])
    want = np.array([[np.log(3), np.log(1.5), 0, 0], [0, 2 * np.log(1.5), 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(out.gather().toarray(), want, rtol=1e-6)
    np.testing.assert_array_equal(idf_weights(np.array([0, 3]), 3), [0.0, 0.0])


def test_bm25_hand_computed():
    # one row of length 2 and one of length 4: avglen 3; item 0 in both rows (idf log 1 = 0)
    X = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 3]], dtype=np.float32))
    cfg = PreprocessSection(column_weighting="bm25", bm25_k1=1.0, bm25_b=1.0)
    out, prep = preprocess(RowBlocks.from_scipy(X, block_rows=1), cfg)
    assert prep.bm25 == (1.0, 1.0, 3.0)
    # x' = idf x (k1+1) / (x + k1 (1 - b + b len/avglen)) = log(2) x 2 / (x + len/3)
    want = np.array([[0.0, np.log(2) * 2 / (1 + 2 / 3), 0.0], [0.0, 0.0, np.log(2) * 6 / (3 + 4 / 3)]])
    np.testing.assert_allclose(out.gather().toarray(), want, rtol=1e-6)


def test_popularity_hand_computed():
    X = sp.csr_matrix(np.array([[2, 1], [0, 1], [0, 1], [0, 1]], dtype=np.float32))
    out, prep = preprocess(RowBlocks.from_scipy(X, block_rows=3), PreprocessSection(column_weighting="popularity_power"))
    np.testing.assert_allclose(prep.col_weight, [1.0, 4.0**-0.75])
    np.testing.assert_allclose(out.gather().toarray()[:, 1], 4.0**-0.75, rtol=1e-6)
    np.testing.assert_allclose(out.gather().toarray()[0, 0], 2.0)


def test_defaults_leave_x_unchanged():
    X = make_x(4)
    blocks = RowBlocks.from_scipy(X, block_rows=10)
    out, prep = preprocess(blocks, PreprocessSection())
    assert prep.is_identity and prep.col_offset is None and prep.col_scale is None
    assert out is blocks
    np.testing.assert_array_equal(out.gather().toarray(), X.toarray().astype(np.float32))


def test_bm25_rejects_negative_values():
    X = sp.csr_matrix(np.array([[1.0, -2.0], [0.0, 1.0]]))
    with pytest.raises(MfsimError, match="non-negative"):
        fit_preprocess(RowBlocks.from_scipy(X, block_rows=1), PreprocessSection(column_weighting="bm25"))


def test_apply_checks_columns():
    prep = fit_preprocess(RowBlocks.from_scipy(make_x(), block_rows=10), PreprocessSection(binarize=True))
    other = RowBlocks.from_scipy(sp.csr_matrix((3, P + 1), dtype=np.float32), block_rows=2)
    with pytest.raises(MfsimError, match="columns"):
        apply_preprocess(other, prep)


def test_block_size_does_not_change_result():
    cfg = PreprocessSection(column_weighting="bm25", standardize_columns=True)
    X = make_x(6)
    out1, prep1 = preprocess(RowBlocks.from_scipy(X, block_rows=N), cfg)
    out2, prep2 = preprocess(RowBlocks.from_scipy(X, block_rows=3), cfg)
    # different summation orders: float64 sums of O(10) values agree to ~1e-15 relative
    np.testing.assert_allclose(prep1.col_offset, prep2.col_offset, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out1.gather().toarray(), out2.gather().toarray(), rtol=1e-6)


@pytest.mark.parametrize("name", ["binarize+idf", "bm25+standardize", "popularity+standardize", "center"])
def test_local_and_client_identical(client, name):
    cfg = PreprocessSection(**CASES[name])
    X = make_x(7)
    local_out, local_prep = preprocess(RowBlocks.from_scipy(X, block_rows=6), cfg)
    dist_out, dist_prep = preprocess(RowBlocks.from_scipy(X, block_rows=6, client=client), cfg)
    assert dist_out.client is client
    for field in ("col_weight", "col_scale", "col_offset"):
        a, b = getattr(local_prep, field), getattr(dist_prep, field)
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
    assert local_prep.bm25 == dist_prep.bm25
    L, D = local_out.gather(), dist_out.gather()
    np.testing.assert_array_equal(L.data, D.data)
    np.testing.assert_array_equal(L.indices, D.indices)
    np.testing.assert_allclose(effective_dense(dist_out, dist_prep), dense_reference(X.toarray(), cfg), rtol=RTOL, atol=ATOL)


def _bracket(*parts: str) -> str:
    """A combine that records the tree: ``(a+b)``, ``(a+b+c)``."""
    return "(" + "+".join(parts) + ")"


@pytest.mark.parametrize("on_client", [False, True])
def test_tree_reduce_order_and_result(request, on_client):
    # the statistics above are summed by tree_reduce; its tree, written out by hand, then checked
    # against functools.reduce for an associative but non-commutative combine (concatenation)
    # and for an n-ary exact one (set union, fan-in 8 as in ingest)
    client = request.getfixturevalue("client") if on_client else None

    def parts(values):
        return client.scatter(list(values), hash=False) if client is not None else list(values)

    assert tree_reduce(parts("01234"), _bracket, client=client) == "(((0+1)+(2+3))+4)"
    assert tree_reduce(parts("0"), _bracket, client=client) == "0"
    assert tree_reduce(parts("0123456789"), _bracket, client=client, fan_in=8) == "((0+1+2+3+4+5+6+7)+(8+9))"
    for n in (1, 2, 3, 7, 8, 9, 17):
        strings = [chr(ord("a") + i) for i in range(n)]
        assert tree_reduce(parts(strings), operator.add, client=client) == functools.reduce(operator.add, strings)
        sets = [frozenset({i, i + 1, 2 * i}) for i in range(n)]
        union = tree_reduce(parts(sets), frozenset.union, client=client, fan_in=8)
        assert union == functools.reduce(operator.or_, sets)
    with pytest.raises(ValueError, match="at least one part"):
        tree_reduce([], operator.add)
