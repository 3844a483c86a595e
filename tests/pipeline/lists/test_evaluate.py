"""Holdout splits, ranking metrics, cluster precision and the raw cosine baseline.

References: per-user Python loops over the definitions, hand-computed cases, the
``implicit.evaluation.ranking_metrics_at_k`` implementation, and dense NumPy cosine + lexsort.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from mfsim.kernels.topn import topn_blocked
from mfsim.pipeline.blocks import CSRBlock, RowBlocks
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.lists.evaluate import (
    chance_level,
    cluster_precision,
    cluster_sums,
    held_out_rows,
    merge_sums,
    ranking_metrics,
    ranking_per_user,
    ranking_sums,
    raw_cosine_topn,
    sample_users,
    split_block,
    split_holdout,
)

N_USERS, P = 97, 40


def make_x(seed: int = 0) -> sp.csr_matrix:
    """Counts 1..4 with row lengths from 0 to P: empty rows, one-item rows, a full row."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 15, size=N_USERS)
    lengths[:4] = [0, 1, 2, P]
    dense = np.zeros((N_USERS, P))
    for u, m in enumerate(lengths):
        dense[u, rng.choice(P, size=m, replace=False)] = rng.integers(1, 5, size=m)
    return sp.csr_matrix(dense)


def entry_sets(m: sp.csr_matrix) -> list[set[int]]:
    m = sp.csr_matrix(m)
    return [set(m.indices[m.indptr[u] : m.indptr[u + 1]].tolist()) for u in range(m.shape[0])]


def rule(m: int, f: float) -> int:
    """The documented holdout count: round half up, but keep at least one training entry."""
    return max(0, min(math.floor(f * m + 0.5), m - 1))


def split_all(X, block_rows, mode="random", fraction=0.2, seed=0, ts=None, client=None):
    blocks = RowBlocks.from_scipy(X, block_rows=block_rows, client=client)
    ts_parts = None
    if ts is not None:
        ts_parts = [ts[X.indptr[a] : X.indptr[b]] for a, b in zip(blocks.row_offsets[:-1], blocks.row_offsets[1:])]
    train, test = split_holdout(blocks, mode, fraction, seed, ts_parts)
    return train.gather(), test.gather()


# ---------------------------------------------------------------------------------------------
# split


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_random_split_partitions_each_user_by_the_rule(fraction):
    X = make_x()
    train, test = split_all(X, block_rows=10, fraction=fraction)
    assert train.shape == test.shape == X.shape
    for u, (tr, te, full) in enumerate(zip(entry_sets(train), entry_sets(test), entry_sets(X))):
        assert not tr & te and tr | te == full, u
        assert len(te) == rule(len(full), fraction), u
    # values travel with their entries: train + test is X entry by entry
    assert abs(train + test - X).max() == 0
    assert train.has_sorted_indices and test.has_sorted_indices


def test_random_split_does_not_depend_on_blocks_and_is_deterministic():
    X = make_x(1)
    ref_train, ref_test = split_all(X, block_rows=N_USERS)
    for block_rows in (1, 7, 32):
        train, test = split_all(X, block_rows=block_rows)
        assert (train != ref_train).nnz == 0 and (test != ref_test).nnz == 0
    again = split_all(X, block_rows=N_USERS)[1]
    assert (again != ref_test).nnz == 0
    other = split_all(X, block_rows=N_USERS, seed=1)[1]
    assert (other != ref_test).nnz > 0  # another seed picks other entries


def test_random_split_holds_out_every_entry_equally_often():
    # one user with 10 items, fraction 0.3: each entry is held out with probability 0.3. Over 600
    # seeds each count is Binomial(600, 0.3): sd = sqrt(600 * 0.21) = 11.2, so 180 +- 50 (4.5 sd)
    # fails by chance with probability ~1e-4 over the 10 entries; a bias toward small or large
    # columns (a broken hash or rank) moves counts by far more.
    block = CSRBlock.from_scipy(sp.csr_matrix(np.ones((1, 10))))
    counts = np.zeros(10)
    for seed in range(600):
        _, test = split_block(block, 0, "random", 0.3, seed)
        assert test.nnz == 3
        counts[test.indices] += 1
    assert np.all(np.abs(counts - 180) < 50), counts


@pytest.mark.parametrize("pack_bits", [64, 0])  # 0: the lexsort path for keys that do not pack
def test_temporal_split_holds_out_the_latest(pack_bits, monkeypatch):
    monkeypatch.setattr("mfsim.pipeline.lists.evaluate._PACK_BITS", pack_bits)
    X = make_x(2)
    rng = np.random.default_rng(3)
    ts = rng.integers(0, 6, size=X.nnz).astype(np.int64) * 1_000_000  # few values: many ties
    for block_rows in (5, N_USERS):
        train, test = split_all(X, block_rows=block_rows, mode="temporal", fraction=0.3, ts=ts)
        for u in range(N_USERS):
            lo, hi = X.indptr[u], X.indptr[u + 1]
            entries = sorted(zip(ts[lo:hi], X.indices[lo:hi]), reverse=True)  # latest, ties: larger column
            want = {int(c) for _, c in entries[: rule(hi - lo, 0.3)]}
            assert entry_sets(test)[u] == want, u
        assert abs(train + test - X).max() == 0


def test_split_on_a_client_matches_local(client):
    X = make_x(4)
    local = split_all(X, block_rows=13)
    dist = split_all(X, block_rows=13, client=client)
    assert (local[0] != dist[0]).nnz == 0 and (local[1] != dist[1]).nnz == 0


def test_split_errors():
    block = CSRBlock.from_scipy(make_x())
    with pytest.raises(MfsimError, match="holdout mode"):
        split_block(block, 0, "none", 0.2, 0)
    with pytest.raises(MfsimError, match="fraction"):
        split_block(block, 0, "random", 1.0, 0)
    with pytest.raises(MfsimError, match="timestamp"):
        split_block(block, 0, "temporal", 0.2, 0)
    with pytest.raises(MfsimError, match="one timestamp per entry"):
        split_block(block, 0, "temporal", 0.2, 0, ts=np.zeros(3, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# ranking metrics


def test_ranking_metrics_hand_computed():
    # cutoffs 1, 2, 5 over lists of width 3; d(j) = 1 / log2(j + 2) for 0-based rank j:
    # d(0) = 1, d(1) = 0.6309, d(2) = 0.5.
    # user 0: list [4, 2, 7], test {2, 9}: a hit at rank 1 only.
    #   @1: 0 hits / min(1, 2) = 0,   NDCG 0
    #   @2: 1 hit  / min(2, 2) = 1/2, NDCG d(1) / (d(0) + d(1)) = 0.6309 / 1.6309 = 0.3869
    #   @5: the list has 3 entries, 1 hit / min(5, 2) = 1/2, NDCG as @2
    # user 1: list [1, 3] (count 2), test {1, 3, 8}: hits at ranks 0 and 1.
    #   @1: 1 / min(1, 3) = 1, NDCG 1;  @2: 2 / 2 = 1, NDCG 1
    #   @5: 2 / min(5, 3) = 2/3, NDCG (d(0) + d(1)) / (d(0) + d(1) + d(2)) = 1.6309 / 2.1309 = 0.7654
    # user 2: empty list, test {0, 5}: 0 everywhere, still evaluated.
    # user 3: list [0, 5, 6], no test items: not evaluated.
    # means over 3 users: recall @1 1/3, @2 (1/2 + 1) / 3 = 1/2, @5 (1/2 + 2/3) / 3 = 7/18;
    # NDCG @1 1/3, @2 (0.3869 + 1) / 3 = 0.4623, @5 (0.3869 + 0.7654) / 3 = 0.3841.
    indices = np.array([[4, 2, 7], [1, 3, -1], [-1, -1, -1], [0, 5, 6]], dtype=np.int32)
    counts = np.array([3, 2, 0, 3], dtype=np.int32)
    test = sp.csr_matrix((np.ones(7), ([0, 0, 1, 1, 1, 2, 2], [2, 9, 1, 3, 8, 0, 5])), shape=(4, 10))
    got = ranking_metrics(indices, counts, test.indptr, test.indices, [5, 1, 2])
    d0, d1, d2 = 1.0, 1.0 / math.log2(3), 0.5
    u0 = d1 / (d0 + d1)
    ndcg2 = (u0 + 1.0) / 3
    ndcg5 = (u0 + (d0 + d1) / (d0 + d1 + d2)) / 3
    assert got["n_users"] == 3
    for n, want in {1: 1 / 3, 2: 1 / 2, 5: 7 / 18}.items():
        assert got["recall"][n] == pytest.approx(want, rel=1e-12)
    for n, want in {1: 1 / 3, 2: ndcg2, 5: ndcg5}.items():
        assert got["ndcg"][n] == pytest.approx(want, rel=1e-12)
    assert 0.4622 < ndcg2 < 0.4623 and 0.3840 < ndcg5 < 0.3841  # the numbers written out above


def loop_per_user(indices, counts, test, cutoffs):
    """Per-user recall@N and NDCG@N of the users with held-out items, by a Python loop: {N: (values, values)}."""
    out = {c: ([], []) for c in cutoffs}
    for u in range(indices.shape[0]):
        truth = set(test.indices[test.indptr[u] : test.indptr[u + 1]].tolist())
        if not truth:
            continue
        ranked = indices[u, : counts[u]].tolist()
        for c in cutoffs:
            hits = [j for j, i in enumerate(ranked[:c]) if i in truth]
            idcg = sum(1 / math.log2(j + 2) for j in range(min(c, len(truth))))
            out[c][0].append(len(hits) / min(c, len(truth)))
            out[c][1].append(sum(1 / math.log2(j + 2) for j in hits) / idcg)
    return out


def loop_reference(indices, counts, test, cutoffs):
    """Mean recall@N and NDCG@N over the users with held-out items (``loop_per_user``): ({N: recall}, {N: ndcg})."""
    per_user = loop_per_user(indices, counts, test, cutoffs)
    return {c: np.mean(v[0]) for c, v in per_user.items()}, {c: np.mean(v[1]) for c, v in per_user.items()}


def random_lists(seed, q=60, width=12, p=30):
    rng = np.random.default_rng(seed)
    indices = np.full((q, width), -1, dtype=np.int32)
    counts = rng.integers(0, width + 1, size=q).astype(np.int32)
    for u in range(q):
        indices[u, : counts[u]] = rng.choice(p, size=counts[u], replace=False)
    test = sp.csr_matrix((rng.random((q, p)) < 0.15).astype(np.float32))
    return indices, counts, test


def test_ranking_metrics_match_a_loop_and_stream_over_chunks():
    indices, counts, test = random_lists(5)
    cutoffs = [1, 3, 12, 20]  # 20 exceeds the list width
    got = ranking_metrics(indices, counts, test.indptr, test.indices, cutoffs)
    rec, nd = loop_reference(indices, counts, test, cutoffs)
    for c in cutoffs:
        assert got["recall"][c] == pytest.approx(rec[c], rel=1e-12)
        assert got["ndcg"][c] == pytest.approx(nd[c], rel=1e-12)
    assert got["n_users"] == int((np.diff(test.indptr) > 0).sum())
    # chunks of users, the test CSR passed as indptr slices of the whole matrix
    parts = [ranking_sums(indices[a:b], counts[a:b], test.indptr[a : b + 1], test.indices, cutoffs)
             for a, b in ((0, 17), (17, 18), (18, 60))]
    merged = merge_sums(parts)
    assert merged.count == got["n_users"]
    for name in ("recall", "ndcg"):
        for c in cutoffs:
            assert merged.finish()[name][c] == pytest.approx(got[name][c], rel=1e-12)


def test_standard_errors_are_sd_over_sqrt_n_and_stream_over_chunks():
    indices, counts, test = random_lists(8, q=80)
    cutoffs = [1, 3, 12]
    ref = loop_per_user(indices, counts, test, cutoffs)
    got = ranking_metrics(indices, counts, test.indptr, test.indices, cutoffs)
    parts = merge_sums(ranking_sums(indices[a:b], counts[a:b], test.indptr[a : b + 1], test.indices, cutoffs)
                       for a, b in ((0, 31), (31, 32), (32, 80))).standard_errors()
    for c in cutoffs:
        for k, name in enumerate(("recall", "ndcg")):
            values = np.array(ref[c][k])
            se = np.std(values, ddof=1) / np.sqrt(values.size)  # sample sd (ddof 1) / sqrt(n)
            assert se > 0
            assert got[f"{name}_se"][c] == pytest.approx(se, rel=1e-10)
            assert parts[name][c] == pytest.approx(se, rel=1e-10)
    # one user: no spread to estimate; equal values: 0; cluster sums keep no squares
    one = ranking_sums(indices[:1], counts[:1], test.indptr[:2], test.indices, cutoffs)
    assert np.isnan(one.standard_errors()["recall"][1])
    full = np.tile(np.arange(3, dtype=np.int32), (4, 1))
    same = sp.csr_matrix(np.tile([1.0, 1.0, 1.0, 0.0], (4, 1)))
    assert ranking_metrics(full, np.full(4, 3, np.int32), same.indptr, same.indices, [3])["recall_se"] == {3: 0.0}
    with pytest.raises(MfsimError, match="sums of squares"):
        cluster_sums(full, np.full(4, 3, np.int32), np.zeros(4, int), np.zeros(4, int), [1]).standard_errors()


def test_held_out_rows_and_the_users_sample(client):
    X = make_x(2)
    _, test = split_all(X, block_rows=13, fraction=0.4, seed=1)
    rows = held_out_rows(RowBlocks.from_scipy(test, block_rows=13))
    np.testing.assert_array_equal(rows, np.flatnonzero(np.diff(test.indptr) > 0))
    np.testing.assert_array_equal(held_out_rows(RowBlocks.from_scipy(test, block_rows=7, client=client)), rows)
    assert 40 < rows.size < N_USERS  # some users hold nothing out (0 or 1 items)
    np.testing.assert_array_equal(sample_users(rows, rows.size, 3), rows)  # all of them when they fit
    s = sample_users(rows, 25, 3)
    # the documented draw: 25 of the rows, uniformly without replacement from default_rng([seed, 1]), sorted
    np.testing.assert_array_equal(s, np.sort(rows[np.random.default_rng([3, 1]).choice(rows.size, 25, replace=False)]))
    assert s.size == 25 and (np.diff(s) > 0).all() and set(s) <= set(rows)
    np.testing.assert_array_equal(s, sample_users(rows, 25, 3))
    assert not np.array_equal(s, sample_users(rows, 25, 4))
    assert sample_users(rows, 25, -1).size == 25  # negative seeds, as the split takes them
    for bad in (0, True, 2.0):
        with pytest.raises(MfsimError, match="max_users"):
            sample_users(rows, bad, 0)


@pytest.mark.filterwarnings("ignore:OpenBLAS is configured:RuntimeWarning")
def test_ranking_metrics_match_implicit():
    # implicit 0.7 (evaluation.pyx, ranking_metrics_at_k), read from its source:
    #   "precision" = sum_u hits_u / sum_u min(K, |test_u|)  (a ratio of sums, not a mean of ratios)
    #   "ndcg"      = mean_u DCG_u / IDCG_u with IDCG over min(K, |test_u|)
    # over the users with >= 1 test item, recommending with filter_already_liked_items (the train
    # items excluded). Its lists come from the model's user_factors @ item_factors.T.
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.evaluation import ranking_metrics_at_k

    rng = np.random.default_rng(11)
    n_users, p, k, K = 80, 60, 6, 5  # K = 5 below most users' 3..9 held-out items: min(K, |test|) matters
    X = sp.csr_matrix((rng.random((n_users, p)) < 0.25).astype(np.float32))
    train, test = split_all(X, block_rows=16, fraction=0.4, seed=3)
    train, test = train.astype(np.float32), test.astype(np.float32)
    U = rng.standard_normal((n_users, k)).astype(np.float32)
    V = rng.standard_normal((p, k)).astype(np.float32)
    model = AlternatingLeastSquares(factors=k, num_threads=1, random_state=0)
    model.user_factors, model.item_factors = U, V
    ref = ranking_metrics_at_k(model, train, test, K=K, show_progress=False)

    lists = topn_blocked(U, V, K, metrics=("dot",), exclude_indptr=train.indptr, exclude_indices=train.indices)["dot"]
    # the same lists (scores of random normal factors are far apart relative to float32 rounding)
    ids, _ = model.recommend(np.arange(n_users), train, N=K)
    np.testing.assert_array_equal(lists.indices, ids)

    evaluated, n_test, recall, ndcg = ranking_per_user(lists.indices, lists.counts, test.indptr, test.indices, [K])
    denom = np.minimum(K, n_test[evaluated])
    micro = (recall[evaluated, 0] * denom).sum() / denom.sum()
    assert micro == pytest.approx(ref["precision"], rel=1e-9)
    got = ranking_metrics(lists.indices, lists.counts, test.indptr, test.indices, [K])
    assert got["ndcg"][K] == pytest.approx(ref["ndcg"], rel=1e-9)
    assert got["n_users"] == int((np.diff(test.indptr) > 0).sum()) > 50


def test_ranking_metrics_errors():
    indices, counts, test = random_lists(0, q=4)
    with pytest.raises(MfsimError, match="test_indptr"):
        ranking_metrics(indices, counts, test.indptr[:-1], test.indices, [5])
    with pytest.raises(MfsimError, match="cutoffs"):
        ranking_metrics(indices, counts, test.indptr, test.indices, [0])
    with pytest.raises(MfsimError, match="counts"):
        ranking_metrics(indices, counts[:-1], test.indptr, test.indices, [5])


# ---------------------------------------------------------------------------------------------
# cluster precision


def test_cluster_precision_hand_computed():
    # candidate clusters of items 0..5: [0, 0, 1, 1, 0, 2]
    # query 0 (cluster 0), list [1, 2, 4]: @1 1/1, @2 1/2, @5 over min(5, 3) = 3 entries: 2/3
    # query 1 (cluster 1), list [3, 0] (count 2): @1 1/1, @2 1/2, @5 over 2 entries: 1/2
    # query 2: empty list, skipped
    # means: @1 1, @2 1/2, @5 (2/3 + 1/2) / 2 = 7/12
    cand = np.array([0, 0, 1, 1, 0, 2])
    indices = np.array([[1, 2, 4], [3, 0, -1], [-1, -1, -1]], dtype=np.int32)
    counts = np.array([3, 2, 0], dtype=np.int32)
    got = cluster_precision(indices, counts, np.array([0, 1, 0]), cand, [1, 2, 5])
    assert got == pytest.approx({1: 1.0, 2: 0.5, 5: 7 / 12}, rel=1e-12)
    s = merge_sums([cluster_sums(indices[:1], counts[:1], [0], cand, [1, 2, 5]),
                    cluster_sums(indices[1:], counts[1:], [1, 0], cand, [1, 2, 5])])
    assert s.count == 2 and s.finish()["precision"] == pytest.approx(got, rel=1e-12)


def test_chance_level():
    # sizes 3, 2, 1 of 6 items: (3 * 2 + 2 * 1 + 0) / (6 * 5) = 8 / 30
    assert chance_level(np.array([0, 0, 1, 1, 0, 2])) == pytest.approx(8 / 30, rel=1e-12)
    labels = np.random.default_rng(0).integers(0, 4, size=25)
    pairs = [(i, j) for i in range(25) for j in range(25) if i != j]
    assert chance_level(labels) == pytest.approx(np.mean([labels[i] == labels[j] for i, j in pairs]), rel=1e-12)
    with pytest.raises(MfsimError, match="at least 2"):
        chance_level(np.array([1]))


# ---------------------------------------------------------------------------------------------
# raw cosine


def cosine_reference(Xd: np.ndarray, n: int):
    """Dense cosine of the columns (Gram in float64, then the kernels' float32 formula) + lexsort."""
    p = Xd.shape[1]
    gram = (Xd.T @ Xd).astype(np.float32)
    norms = np.linalg.norm(Xd, axis=0)
    inv = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)
    cos = gram * inv[:, None] * inv[None, :]
    idx = np.full((p, n), -1, dtype=np.int32)
    sc = np.full((p, n), -np.inf, dtype=np.float32)
    counts = np.zeros(p, dtype=np.int32)
    for i in range(p):
        if norms[i] == 0:
            continue
        cand = np.flatnonzero((norms > 0) & (np.arange(p) != i))
        order = np.lexsort((cand, -cos[i, cand]))[:n]
        counts[i] = order.size
        idx[i, : order.size] = cand[order]
        sc[i, : order.size] = cos[i, cand[order]]
    safe = np.where(norms > 0, norms, 1.0)
    exact = (Xd.T @ Xd) / np.outer(safe, safe)  # float64 cosine (0 for the empty column)
    return idx, sc, counts, exact


@pytest.mark.parametrize("n,item_chunk", [(4, 2048), (4, 3), (30, 5)])
def test_raw_cosine_topn_matches_dense(n, item_chunk):
    rng = np.random.default_rng(2)
    Xd = np.where(rng.random((50, 20)) < 0.2, rng.integers(1, 4, size=(50, 20)), 0).astype(np.float64)
    Xd[:, 4] = 0  # an empty column: no neighbours, never a neighbour
    Xd[:, 11] = Xd[:, 2]  # duplicate: cosine 1, ties broken by the smaller index
    Xd[:, 15] = 2 * Xd[:, 2]  # a multiple: cosine 1 as well
    Xd[:, 7] = 0
    Xd[3, 7] = 1  # a column seen by one user: many zero scores, which tie by index
    got = raw_cosine_topn(sp.csr_matrix(Xd), n, item_chunk=item_chunk)
    idx, sc, counts, exact = cosine_reference(Xd, n)
    np.testing.assert_array_equal(got.counts, counts)
    np.testing.assert_array_equal(got.indices, idx)
    np.testing.assert_array_equal(got.scores, sc)
    assert got.counts[4] == 0 and not np.any(got.indices == 4)
    assert list(got.indices[2, :2]) == [11, 15] and list(got.indices[11, :2]) == [2, 15]
    # float32 scores against float64 cosine: float32 rounding of a few operations, ~1e-7 relative
    rows, cols = np.nonzero(got.indices >= 0)
    np.testing.assert_allclose(got.scores[rows, cols], exact[rows, got.indices[rows, cols]], atol=1e-6)
    assert got.indices.dtype == np.int32 and got.scores.dtype == np.float32 and got.counts.dtype == np.int32


def test_raw_cosine_topn_errors():
    with pytest.raises(MfsimError, match="sparse"):
        raw_cosine_topn(np.ones((3, 3)), 2)
    with pytest.raises(MfsimError, match="n must"):
        raw_cosine_topn(sp.csr_matrix(np.ones((3, 3))), 0)
