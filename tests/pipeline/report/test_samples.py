"""The report's samples and statistics: item order and subset, pair samples, rank displacement, k-means order,
quantile limits and the lambda sweep against brute-force or NumPy references; the headline sentence."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics.pairwise import cosine_similarity

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.report.samples import (
    audit_jaccards,
    cluster_boundaries,
    cluster_order,
    kmeans_labels,
    cosine_matrix,
    displacement_bins,
    displacement_counts,
    headline,
    item_order,
    most_different,
    off_diagonal,
    pair_cosine,
    pair_model,
    pair_sample,
    pair_scores,
    quantile_limits,
    rank_displacement,
    rank_sample,
    rescaling_displacement,
    sampled_item_lists,
    select_items,
    shrinkage_weights,
    sweep_series,
)


# ---------------------------------------------------------------------------------------------
# item_order, select_items, cluster_boundaries


def test_item_order_cluster_then_popularity_hand_case():
    cluster = np.array([2, 0, 1, 0, 2, 1])
    pop = np.array([5, 1, 3, 7, 9, 3])
    # cluster 0: items 1 (pop 1), 3 (pop 7) -> 3, 1; cluster 1: 2, 5 tie at 3 -> index order;
    # cluster 2: 0 (pop 5), 4 (pop 9) -> 4, 0
    np.testing.assert_array_equal(item_order(cluster=cluster, popularity=pop), [3, 1, 2, 5, 4, 0])
    # without popularity: by cluster, ties in index order
    np.testing.assert_array_equal(item_order(cluster=cluster), [1, 3, 2, 5, 0, 4])


def test_item_order_matches_python_sort_with_ties():
    rng = np.random.default_rng(3)
    p = 300
    cluster = rng.integers(0, 5, p)
    pop = rng.integers(0, 8, p).astype(np.float32)  # many ties
    expect = sorted(range(p), key=lambda i: (cluster[i], -pop[i], i))
    got = item_order(cluster=cluster, popularity=pop)
    np.testing.assert_array_equal(got, expect)
    assert got.dtype == np.int64


def test_item_order_v1_seriation_is_sign_invariant():
    v1 = np.array([-0.1, -0.5, -0.3, -0.2, -0.3])
    # oriented so the largest |entry| is positive: [0.1, 0.5, 0.3, 0.2, 0.3]; descending, ties by index
    np.testing.assert_array_equal(item_order(v1=v1), [1, 2, 4, 3, 0])
    np.testing.assert_array_equal(item_order(v1=-v1), [1, 2, 4, 3, 0])
    mixed = np.array([0.2, -0.6, 0.1, 0.4])  # largest |entry| negative -> flipped: [-0.2, 0.6, -0.1, -0.4]
    np.testing.assert_array_equal(item_order(v1=mixed), [1, 2, 0, 3])


def test_item_order_identity_and_errors():
    np.testing.assert_array_equal(item_order(n_items=4), [0, 1, 2, 3])
    with pytest.raises(MfsimError, match="needs cluster, popularity, v1 or n_items"):
        item_order()
    with pytest.raises(MfsimError, match="cluster has 4 entries but 3 items"):
        item_order(cluster=np.zeros(4), popularity=np.ones(3))
    with pytest.raises(MfsimError, match="v1 has 3 entries but 5 items"):
        item_order(v1=np.ones(3), n_items=5)
    with pytest.raises(MfsimError, match="finite"):
        item_order(v1=np.array([0.1, np.nan]))


def test_select_items_keeps_order_and_size():
    rng = np.random.default_rng(1)
    order = rng.permutation(103)
    for seed in (0, 7, None):
        sub = select_items(order, 10, seed=seed)
        assert sub.shape == (10,)
        pos = np.argsort(order)[sub]  # positions of the kept items in the order
        assert np.all(np.diff(pos) > 0)  # a subsequence: strictly increasing positions
    np.testing.assert_array_equal(select_items(order, 10, seed=5), select_items(order, 10, seed=5))
    np.testing.assert_array_equal(select_items(order, 200), order)  # p <= m: all of them
    # seed=None: middle of each stride; p=10, m=4: t=2.5, u=1.25 -> floor(1.25, 3.75, 6.25, 8.75)
    np.testing.assert_array_equal(select_items(np.arange(10) * 10, 4, seed=None), [10, 30, 60, 80])
    with pytest.raises(MfsimError, match="max_items must be >= 1"):
        select_items(order, 0)


def test_select_items_equal_inclusion_and_cluster_shares():
    p, m = 10, 4
    counts = np.zeros(p)
    n_seeds = 2000
    for seed in range(n_seeds):
        counts[select_items(np.arange(p), m, seed=seed)] += 1
    # each item is kept with probability m/p = 0.4; binomial sd sqrt(0.24/2000) = 0.011, 0.05 is 4.5 sd
    np.testing.assert_allclose(counts / n_seeds, m / p, atol=0.05)
    # clusters of the order keep their share within one item (systematic sampling)
    cluster = np.repeat([0, 1, 2, 3, 4], [400, 50, 300, 7, 243])
    order = item_order(cluster=cluster)
    sub = select_items(order, 97, seed=3)
    share = np.bincount(cluster[sub], minlength=5)
    assert np.all(np.abs(share - 97 * np.bincount(cluster) / cluster.size) <= 1.0)


def test_cluster_boundaries_hand_case():
    np.testing.assert_array_equal(cluster_boundaries(np.array([0, 0, 1, 1, 1, 3, 4, 4])), [2, 5, 6])
    assert cluster_boundaries(np.array([2, 2, 2])).size == 0


# ---------------------------------------------------------------------------------------------
# numbers behind the pictures


def test_cosine_matrix_matches_sklearn_zero_rows_zero():
    rng = np.random.default_rng(2)
    B = rng.standard_normal((40, 6)).astype(np.float32)
    B[[3, 17]] = 0.0
    C = cosine_matrix(B)
    ref = cosine_similarity(B.astype(np.float64))  # sklearn: zero rows normalise to zero rows
    np.testing.assert_allclose(C, ref, atol=1e-12)  # both float64 of float32 inputs: round-off only
    assert np.all(C[3] == 0) and np.all(C[:, 17] == 0)
    assert C.min() >= -1 and C.max() <= 1
    # cosine is invariant to row scaling (not to column scaling D, the paper's point)
    np.testing.assert_allclose(cosine_matrix(B * rng.uniform(0.1, 10, (40, 1))), C, atol=1e-12)
    with pytest.raises(MfsimError, match="at most"):
        cosine_matrix(np.zeros((5000, 2)))


def test_shrinkage_weights_closed_forms():
    s = np.array([4.0, 2.0, 1.0, 0.0])
    w = shrinkage_weights(s, {"eq1": 4.0, "eq2": 2.0})
    # Eq. 1: s^2/(s^2+4) = 16/20, 4/8, 1/5, 0 (s=0 -> 0); 1/2 exactly at s = sqrt(lambda_1) = 2
    np.testing.assert_allclose(w["eq1"], [0.8, 0.5, 0.2, 0.0], rtol=1e-15)
    # Eq. 2: (1 - 2/s)_+ = 0.5, 0, 0, 0
    np.testing.assert_allclose(w["eq2"], [0.5, 0.0, 0.0, 0.0], rtol=1e-15)
    # Eq. 2 weight = product of the paper's A and B scales sqrt((1/s)(1-lam/s)_+) sqrt(s (1-lam/s)_+)
    rng = np.random.default_rng(0)
    s = np.sort(rng.uniform(0.1, 20, 30))[::-1]
    lam = 5.0
    a = np.sqrt((1 / s) * np.maximum(1 - lam / s, 0))
    b = np.sqrt(s * np.maximum(1 - lam / s, 0))
    np.testing.assert_allclose(shrinkage_weights(s, {"eq2": lam})["eq2"], a * b, rtol=1e-12, atol=1e-15)
    with pytest.raises(MfsimError, match="valid: eq1, eq2"):
        shrinkage_weights(s, {"eq3": 1.0})
    with pytest.raises(MfsimError, match=">= 0"):
        shrinkage_weights(s, {"eq1": -1.0})


# ---------------------------------------------------------------------------------------------
# samples and comparisons for data without cluster truth


def test_pair_sample_uniform_over_unordered_pairs():
    p, n = 4, 60_000
    i, j = pair_sample(p, n, seed=3)
    assert i.dtype == j.dtype == np.int64 and i.shape == j.shape == (n,)
    assert np.all((0 <= i) & (i < j) & (j < p))
    # 6 unordered pairs, each with probability 1/6; binomial sd sqrt(1/6 * 5/6 / 60000) = 0.0015, 0.008 is > 5 sd
    freq = np.bincount(i * p + j, minlength=p * p).reshape(p, p)[np.triu_indices(p, 1)] / n
    np.testing.assert_allclose(freq, 1 / 6, atol=0.008)
    a, b = pair_sample(10**9, 1000, seed=5)  # a catalogue far too large for p x p: O(n_pairs) only
    np.testing.assert_array_equal(a, pair_sample(10**9, 1000, seed=5)[0])
    assert not np.array_equal(a, pair_sample(10**9, 1000, seed=6)[0])
    assert np.all(a < b)
    with pytest.raises(MfsimError, match="p .* >= 2"):
        pair_sample(1, 10, 0)
    with pytest.raises(MfsimError, match="n_pairs"):
        pair_sample(5, 0, 0)


def test_rank_sample_sorted_unique_and_all_when_small():
    s = rank_sample(1000, 50, seed=2)
    assert s.shape == (50,) and np.all(np.diff(s) > 0) and s.min() >= 0 and s.max() < 1000
    np.testing.assert_array_equal(s, rank_sample(1000, 50, seed=2))
    np.testing.assert_array_equal(rank_sample(30, 50, seed=2), np.arange(30))


def test_pair_cosine_and_model_match_dense_references():
    rng = np.random.default_rng(11)
    p, k = 30, 5
    A = rng.standard_normal((p, k)).astype(np.float32)
    B = rng.standard_normal((p, k)).astype(np.float32)
    B[7] = 0.0
    i, j = pair_sample(p, 400, seed=1)
    C = cosine_similarity(B.astype(np.float64))  # zero row -> zero similarities
    M = A.astype(np.float64) @ B.astype(np.float64).T
    np.testing.assert_allclose(pair_cosine(B, i, j), C[i, j], atol=1e-12)
    np.testing.assert_allclose(pair_model(A, B, i, j), M[i, j], rtol=1e-12, atol=1e-12)
    assert np.all(pair_cosine(B, np.array([7]), np.array([3])) == 0)
    # the paper's point, on pairs: (A D, B D^-1) keeps every model score, not the cosines
    d = np.exp(rng.standard_normal(k))
    np.testing.assert_allclose(pair_model(A * d, B / d, i, j), M[i, j], rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(pair_cosine(B / d, i, j) - C[i, j])) > 0.1
    with pytest.raises(MfsimError, match=r"lie in 0..29"):
        pair_cosine(B, np.array([0]), np.array([30]))
    with pytest.raises(MfsimError, match="one length"):
        pair_cosine(B, np.array([0, 1]), np.array([2]))


def test_pair_scores_reads_each_solution_once():
    rng = np.random.default_rng(12)
    A, B = rng.standard_normal((20, 3)), rng.standard_normal((20, 3))
    reads = []

    class Lazy(dict):
        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)

    i, j = pair_sample(20, 50, seed=0)
    cos, model = pair_scores(Lazy(one=(A, B), two=(2 * A, B / 2)), i, j)
    assert reads == ["one", "two"]
    np.testing.assert_allclose(model["two"], model["one"], rtol=1e-12)
    np.testing.assert_allclose(cos["two"], cos["one"], atol=1e-12)  # a common scalar keeps cosines


def test_most_different_hand_case():
    v = {"a": np.array([0.0, 0.0]), "b": np.array([0.1, -0.1]), "c": np.array([1.0, 1.0])}
    # mean |diff|: a-b 0.1, a-c 1.0, b-c (0.9 + 1.1)/2 = 1.0: tie, the first pair in order wins
    assert most_different(v) == ("a", "c")
    assert most_different({"x": np.zeros(3), "y": np.ones(3)}) == ("x", "y")
    with pytest.raises(MfsimError, match="at least two"):
        most_different({"x": np.zeros(3)})


def _dense_lists(Q: np.ndarray, C: np.ndarray, rows: np.ndarray, n: int, metric: str) -> np.ndarray:
    """Top-n candidate ids of each query row in float64, its own item left out; score desc, then smaller id."""
    Q, C = Q.astype(np.float64), C.astype(np.float64)
    if metric == "cosine":
        Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        C = C / np.linalg.norm(C, axis=1, keepdims=True)
    S = Q @ C.T
    out = []
    for r, item in enumerate(rows):
        cand = [c for c in range(C.shape[0]) if c != item]
        out.append(sorted(cand, key=lambda c: (-S[r, c], c))[:n])
    return np.asarray(out)


def _reference_displacement(la, lb) -> np.ndarray:
    """rank_b - rank_a per entry of each list a, inf when absent from b (a plain dict per row)."""
    out = np.full((len(la), max((len(x) for x in la), default=0)), np.nan)
    for r, (a, b) in enumerate(zip(la, lb)):
        where = {}
        for pos, item in enumerate(b):
            where.setdefault(item, pos)
        for pos, item in enumerate(a):
            out[r, pos] = where[item] - pos if item in where else np.inf
    return out


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_sampled_item_lists_match_dense_reference(metric):
    rng = np.random.default_rng(13)
    p, k, n = 200, 8, 15
    B = rng.standard_normal((p, k)).astype(np.float32)
    rows = rank_sample(p, 40, seed=1)
    top = sampled_item_lists(B[rows], B, rows, n, metric)
    # well separated scores of Gaussian rows: float32 keeps the float64 order here (fixed seed)
    np.testing.assert_array_equal(top.indices, _dense_lists(B[rows], B, rows, n, metric))
    assert np.all(top.counts == n) and np.all(top.indices != rows[:, None])
    with pytest.raises(MfsimError, match="at least 201 items"):
        sampled_item_lists(B[rows], B, rows, 200, metric)


def test_rank_displacement_hand_case_and_dict_reference():
    idx_a = np.array([[5, 3, 9, -1], [1, 2, 3, 4]])
    cnt_a = np.array([3, 4])
    idx_b = np.array([[3, 5, 7, 7], [4, 3, 2, 1]])
    cnt_b = np.array([3, 2])  # row 1: only 4, 3 count
    got = rank_displacement(idx_a, cnt_a, idx_b, cnt_b)
    # row 0: 5 at 0 -> 1 (+1), 3 at 1 -> 0 (-1), 9 left (inf), padding NaN
    # row 1: 1 and 2 are beyond b's count (left), 3 at 2 -> 1 (-1), 4 at 3 -> 0 (-3)
    expect = np.array([[1, -1, np.inf, np.nan], [np.inf, np.inf, -1, -3]])
    np.testing.assert_array_equal(got, expect)
    rng = np.random.default_rng(14)
    q, n, p = 60, 12, 40
    la = [list(rng.choice(p, size=rng.integers(0, n + 1), replace=False)) for _ in range(q)]
    lb = [list(rng.choice(p, size=rng.integers(0, n + 1), replace=False)) for _ in range(q)]

    def pack(lists):
        idx = np.full((q, n), -1, np.int32)
        for r, x in enumerate(lists):
            idx[r, :len(x)] = x
        return idx, np.array([len(x) for x in lists], np.int32)

    got = rank_displacement(*pack(la), *pack(lb))
    ref = _reference_displacement(la, lb)
    np.testing.assert_array_equal(np.isnan(got[:, :ref.shape[1]]), np.isnan(ref))
    np.testing.assert_array_equal(np.nan_to_num(got[:, :ref.shape[1]], nan=-7), np.nan_to_num(ref, nan=-7))
    assert np.all(np.isnan(rank_displacement(np.zeros((2, 3), np.int64), np.zeros(2, np.int64),
                                             np.zeros((2, 3), np.int64), np.zeros(2, np.int64))))
    with pytest.raises(MfsimError, match="same rows"):
        rank_displacement(idx_a, cnt_a, idx_b[:1], cnt_b[:1])
    with pytest.raises(MfsimError, match="negative id"):
        rank_displacement(np.array([[-1]]), np.array([1]), np.array([[0]]), np.array([1]))


def test_displacement_bins_and_counts_hand_case():
    assert displacement_bins(100) == [(0, 0), (1, 1), (2, 4), (5, 9), (10, 19), (20, 49), (50, 99)]
    assert displacement_bins(7) == [(0, 0), (1, 1), (2, 4), (5, 6)]
    assert displacement_bins(1) == [(0, 0)]
    disp = np.array([[0, -1, 1, 3, np.inf], [-6, np.nan, np.inf, 0, 4]])
    labels, counts = displacement_counts(disp, 7)
    assert labels == ["0", "1", "2-4", "5-6", "left top-7"]
    np.testing.assert_array_equal(counts, [2, 2, 2, 1, 2])  # NaN (no entry) not counted
    with pytest.raises(MfsimError, match="does not fit"):
        displacement_counts(np.array([7.0]), 7)


def test_rescaling_displacement_model_lists_stay_cosine_lists_move():
    rng = np.random.default_rng(15)
    p, k, n = 150, 6, 10
    V = np.linalg.qr(rng.standard_normal((p, k)))[0]
    w = np.linspace(1.0, 0.2, k)
    A, B = (V * w).astype(np.float32), V.astype(np.float32)  # item_orthonormal: A = V W, B = V
    d = np.exp(rng.standard_normal(k))
    rows = rank_sample(p, 25, seed=0)
    got = rescaling_displacement(A, B, rows, d, n)
    # NumPy reference: float64 lists of the given and the rescaled solution, compared with a dict per row
    for metric, Q, C, Qd, Cd in (("cosine", B[rows], B, B[rows] / d, B / d),
                                 ("model", A[rows], B, A[rows] * d, B / d)):
        kern = "cosine" if metric == "cosine" else "dot"
        ref = _reference_displacement(_dense_lists(Q, C, rows, n, kern), _dense_lists(Qd, Cd, rows, n, kern))
        np.testing.assert_array_equal(got[metric], ref)
    assert np.all(got["model"] == 0)  # A D (B D^-1)^T = A B^T: the same lists
    assert np.mean(got["cosine"] != 0) > 0.3
    with pytest.raises(MfsimError, match="finite entries > 0"):
        rescaling_displacement(A, B, rows, -d, n)


def test_kmeans_labels_reach_scikit_learns_inertia():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(5)
    E = np.vstack([c + 0.6 * rng.standard_normal((n, 4)) for c, n in zip(2 * rng.standard_normal((6, 4)),
                                                                            [40, 25, 60, 10, 33, 50])])

    def inertia(labels):
        return sum(float(np.sum((E[labels == c] - E[labels == c].mean(axis=0)) ** 2)) for c in np.unique(labels))

    ours = kmeans_labels(E, 6, n_init=4, seed=0)
    theirs = KMeans(n_clusters=6, n_init=10, random_state=0).fit_predict(E)
    assert ours.dtype == np.int64 and set(ours.tolist()) == set(range(6))
    # Lloyd's algorithm stops at a local minimum: the best of 4 starts is within 2% of scikit-learn's best of 10
    assert inertia(ours) <= 1.02 * inertia(theirs)
    np.testing.assert_array_equal(ours, kmeans_labels(E, 6, n_init=4, seed=0))  # deterministic for a seed


def test_cluster_order_groups_blobs_largest_first():
    rng = np.random.default_rng(16)
    sizes = [50, 20, 35]
    centres = 5 * np.eye(6)[:3]
    truth = np.repeat([0, 1, 2], sizes)
    E = centres[truth] + 0.3 * rng.standard_normal((truth.size, 6))
    perm = rng.permutation(truth.size)
    E, truth = E[perm], truth[perm]
    order, labels = cluster_order(E, 3, seed=0)
    assert sorted(order.tolist()) == list(range(truth.size))  # a permutation
    # each true blob is one contiguous run, largest first: 50, 35, 20
    shown = truth[order]
    assert cluster_boundaries(shown).tolist() == [50, 85]
    assert shown[0] == 0 and shown[50] == 2 and shown[85] == 1
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], [50, 35, 20]))
    # within a cluster, cosine to its centroid (NumPy, from the returned grouping) is non-increasing
    En = E / np.linalg.norm(E, axis=1, keepdims=True)
    for c in range(3):
        members = order[labels == c]
        cen = En[members].mean(axis=0)
        cos = En[members] @ cen / np.linalg.norm(cen)
        assert np.all(np.diff(cos) <= 1e-12)
    np.testing.assert_array_equal(order, cluster_order(E, 3, seed=0)[0])
    # rows of different length but the same direction fall together; zero rows are their own direction
    F = np.vstack([np.ones((4, 2)), 3 * np.ones((2, 2)), np.zeros((3, 2))])
    order, labels = cluster_order(F, 5)
    assert cluster_boundaries(labels).tolist() == [6]  # two distinct directions: at most 2 clusters
    assert set(order[:6]) == set(range(6))
    assert cluster_order(np.zeros((0, 3)), 4)[0].size == 0
    with pytest.raises(MfsimError, match="NaN or inf"):
        cluster_order(np.array([[np.nan, 1.0]]), 2)


def test_quantile_limits_and_off_diagonal_match_numpy():
    rng = np.random.default_rng(17)
    v = rng.normal(0.2, 0.1, 5000)
    v[:10] = np.nan
    finite = v[np.isfinite(v)]
    lo, hi = quantile_limits(v)
    np.testing.assert_allclose((lo, hi), np.quantile(finite, [0.01, 0.99]), rtol=1e-15)
    lo, hi = quantile_limits(v, 0.05, 0.95, center=0.0)
    half = max(abs(q) for q in np.quantile(finite, [0.05, 0.95]))
    np.testing.assert_allclose((lo, hi), (-half, half), rtol=1e-15)
    assert quantile_limits(np.full(10, 0.3)) == (-0.7, 1.3)
    assert quantile_limits(np.array([np.nan]), center=0.0) == (-1.0, 1.0)
    with pytest.raises(MfsimError, match="lower < upper"):
        quantile_limits(v, 0.9, 0.1)
    C = np.arange(16.0).reshape(4, 4)
    np.testing.assert_array_equal(np.sort(off_diagonal(C)), np.sort(C[~np.eye(4, dtype=bool)]))
    assert off_diagonal(C).size == 12 and 0.0 not in off_diagonal(C) and 15.0 not in off_diagonal(C)


def test_audit_jaccards_groups_by_comparison_and_metric():
    detail = pa.table({
        "objective": ["eq1"] * 7 + ["external"],
        "kind": ["item_item"] * 8,
        "metric": ["model", "cosine", "cosine", "cosine", "cosine", "model", "cosine", "cosine"],
        "scaling_a": ["s", "s", "s", "t", "s", "s", "s", "s"],
        "scaling_b": ["t", "t", "t", "u", "random_sd=1.0", "random_sd=1.0", "random_sd=1.0", "t"],
        "index": [0, 0, 1, 0, 0, 0, 1, 0],
        "jaccard": [1.0, 0.5, 0.25, 0.75, 0.1, 1.0, 0.2, 0.9],
    })
    got = audit_jaccards(detail)
    assert list(got) == ["cosine, between named scalings (2 comparisons)", "model, between named scalings (1 comparison)",
                         "cosine, against random D (1 scaling)", "model, against random D (1 scaling)"]
    np.testing.assert_array_equal(got["cosine, between named scalings (2 comparisons)"], [0.5, 0.25, 0.75])
    np.testing.assert_array_equal(got["cosine, against random D (1 scaling)"], [0.1, 0.2])
    with pytest.raises(MfsimError, match="lacks the columns"):
        audit_jaccards(detail.drop(["jaccard"]))


def test_sweep_series_sorts_by_lambda_and_marks_the_chosen(sweep_table):
    got = sweep_series(sweep_table, "ndcg@20")
    assert list(got) == ["eq1", "eq2"]
    lam, val, chosen = got["eq1"]
    np.testing.assert_array_equal(lam, [10.0, 100.0, 1000.0])
    np.testing.assert_array_equal(val, [0.12, 0.25, 0.2])
    np.testing.assert_array_equal(chosen, [100.0])
    np.testing.assert_array_equal(got["eq2"][0], [0.0, 2.0])
    np.testing.assert_array_equal(got["eq2"][2], [0.0])
    with pytest.raises(MfsimError, match=r"lacks \['ndcg@10'\].*recall@20"):
        sweep_series(sweep_table, "ndcg@10")


def test_headline_states_the_finding_with_its_number():
    summary = {"top_n": 100, "trivial": False,
               "metrics": {"cosine": {"mean_jaccard_mean": 0.564, "min_jaccard_mean": 0.321, "comparisons": 10,
                                      "lowest": ["eq2_like", "random_sd=1.0"]}},
               "invariance": {"metrics": ["model", "projected_cosine"], "min_jaccard_mean": 1.0, "passed": True}}
    assert headline(summary) == (
        "Top-100 cosine lists of Eq. 1 have on average 56% of their items in common across equally good solutions "
        "(Jaccard@100, over 10 comparisons; lowest 32%, eq2_like vs random_sd=1.0); model and projected_cosine "
        "lists are identical.")
    near = {**summary, "invariance": {"metrics": ["model"], "min_jaccard_mean": 0.9994, "passed": True}}
    assert headline(near).endswith("model lists are the same but for float32 near-ties (Jaccard 0.999 or more).")
    failed = {**summary, "invariance": {"min_jaccard_mean": 0.93, "passed": False}}
    assert "Jaccard 0.930 (the audit's self-check failed" in headline(failed)
    assert headline({**summary, "trivial": True}) is None
    assert headline({"top_n": 10, "metrics": {}}) is None and headline(None) is None


def test_sweep_series_of_a_rank_sweep_draws_the_chosen_rank():
    table = pa.table({"objective": ["eq1"] * 4, "rank": [8, 8, 16, 16], "lambda": [1.0, 10.0, 1.0, 10.0],
                      "chosen": [False, False, False, True], "ndcg@20": [0.1, 0.2, 0.3, 0.4]})
    lam, val, chosen = sweep_series(table, "ndcg@20")["eq1"]
    np.testing.assert_array_equal(lam, [1.0, 10.0])
    np.testing.assert_array_equal(val, [0.3, 0.4])
    np.testing.assert_array_equal(chosen, [10.0])
