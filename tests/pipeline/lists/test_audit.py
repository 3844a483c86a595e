"""The cosine audit against independent references: Python sets, dense top-N, the Eq. 1 closed form.

Steck, Ekanadham & Kallus (2024), Section 2: all (A D, B D^-1) minimize Eq. 1 equally well, the
item-item cosine of B changes with D while ``a_i . b_j`` and the cosine of the rows of A B^T do
not. The audit must report exactly that: Jaccard 1 for the invariant lists and below 1 for the
cosine lists, comparing lists tie-aware (swaps within float32 rounding of the cut are agreement).
"""

from __future__ import annotations

import io
import json
import logging
import sys
from itertools import combinations
from math import comb

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from mfsim.jobs.audit_cmd import run_audit_command
from mfsim.kernels.topn import TopN, topn_reference
from mfsim.pipeline.lists.audit import (
    audit_embedding_pair,
    audit_item_lists,
    default_item_lists,
    random_diagonals,
    sample_rows,
    without_self,
)
from mfsim.pipeline.lists.jaccard import jaccard_rows, score_bound, tie_aware_jaccard
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.model.factors import eq1_factors, eq2_factors
from mfsim.pipeline.lists.neighbours import gram_factor, projected
from mfsim.pipeline.outputs import embedding_table
from mfsim.pipeline.registry import AUDIT_METRICS, EQ1_SCALINGS, INVARIANT_METRICS

STABILITY_COLUMNS = ["objective", "kind", "metric", "scaling_a", "scaling_b", "top_n", "n_items", "draws",
                     "jaccard_mean", "jaccard_se", "jaccard_p10", "jaccard_p50", "jaccard_p90", "jaccard_min",
                     "boundary_ties", "product_deviation"]
SCALINGS = ["symmetric", "item_orthonormal", "user_orthonormal", "eq2_like"]
N_USERS, P, K, TOP_N, DRAWS, SPREAD, SEED = 300, 400, 16, 20, 3, 1.0, 7
EPS32 = 2.0**-24


def set_jaccard(a_idx, a_cnt, b_idx, b_cnt):
    """Python-set reference of jaccard_rows."""
    out = []
    for ia, ca, ib, cb in zip(a_idx, a_cnt, b_idx, b_cnt):
        sa, sb = set(ia[:ca].tolist()), set(ib[:cb].tolist())
        out.append(1.0 if not (sa or sb) else len(sa & sb) / len(sa | sb))
    return np.array(out)


def tie_reference(x, y, n, bound):
    """Python-set reference of tie_aware_jaccard: (Jaccard, ties) per row of two TopN lists of n + 1 columns."""
    out_j, out_t = [], []
    for r in range(len(x.counts)):
        b = float(bound[r]) if np.ndim(bound) else float(bound)
        sets, near = [], []
        for top in (x, y):
            ids = top.indices[r, : min(top.counts[r], n)].tolist()
            cut = float(top.scores[r, n]) if top.counts[r] > n else None
            sets.append(set(ids))
            near.append({i for i, s in zip(ids, top.scores[r].tolist()) if cut is not None and s - cut <= 4 * b})
        X, Y = sets
        t = min(len((X - Y) & near[0]), len((Y - X) & near[1]))
        union = len(X | Y) - t
        out_j.append(1.0 if union == 0 else (len(X & Y) + t) / union)
        out_t.append(t)
    return np.array(out_j), np.array(out_t)


def dense_lists(Q, C, metric, exclude_self, n=TOP_N + 1, **kw):
    """Dense NumPy top-(N + 1) lists, the cut included, as a TopN."""
    counts, idx, sc = topn_reference(Q, C, n, metric, exclude_self=exclude_self, **kw)
    return TopN(idx, sc, counts)


COS_BOUND = (K + 8) * 2.0**-24  # score_bound("cosine", K): see its derivation


# ---------------------------------------------------------------------------------------------
# jaccard_rows


def test_jaccard_rows_matches_python_sets():
    rng = np.random.default_rng(0)
    q, na, nb = 200, 12, 9
    a = np.stack([rng.permutation(30)[:na] for _ in range(q)]).astype(np.int32)
    b = np.stack([rng.permutation(30)[:nb] for _ in range(q)]).astype(np.int32)
    ca = rng.integers(0, na + 1, q).astype(np.int32)
    cb = rng.integers(0, nb + 1, q).astype(np.int32)
    # hand-made rows: both empty, one empty, identical lists, disjoint, duplicates, garbage after count
    ca[0] = cb[0] = 0
    ca[1], cb[1] = 0, 3
    a[2, :9], ca[2], cb[2] = b[2], 9, 9
    a[3, :4], b[3, :4], ca[3], cb[3] = [1, 2, 3, 4], [5, 6, 7, 8], 4, 4
    a[4, :4], b[4, :2], ca[4], cb[4] = [1, 1, 2, 2], [2, 3], 4, 2
    a[5, :3], a[5, 3:], b[5, :3], ca[5], cb[5] = [0, 1, 2], -1, [2, 1, 0], 3, 3
    a[6, 2:], b[6, 2:], ca[6], cb[6] = 99999, -5, 2, 2
    got = jaccard_rows(a, ca, b, cb)
    ref = set_jaccard(a, ca, b, cb)
    np.testing.assert_array_equal(got, ref)  # same rational numbers, both computed as int / int
    assert got.dtype == np.float64 and got[0] == 1.0 and got[1] == 0.0 and got[2] == 1.0 and got[3] == 0.0
    assert got[4] == pytest.approx(1 / 3) and got[5] == 1.0
    assert jaccard_rows(np.zeros((0, 3), np.int32), np.zeros(0, np.int32),
                        np.zeros((0, 3), np.int32), np.zeros(0, np.int32)).shape == (0,)


def test_jaccard_rows_on_topn_lists():
    rng = np.random.default_rng(1)
    Q, C = rng.standard_normal((50, 4)), rng.standard_normal((80, 4))
    x = default_item_lists(Q, C, 10, "cosine", exclude_self=False)
    y = default_item_lists(Q, C * [1.0, 2.0, 0.5, 3.0], 10, "cosine", exclude_self=False)
    np.testing.assert_array_equal(jaccard_rows(x.indices, x.counts, y.indices, y.counts),
                                  set_jaccard(x.indices, x.counts, y.indices, y.counts))


@pytest.mark.parametrize("bad", ["count_high", "count_negative", "negative_id", "rows"])
def test_jaccard_rows_rejects_malformed_lists(bad):
    idx = np.arange(12, dtype=np.int32).reshape(3, 4)
    cnt = np.array([4, 2, 0], dtype=np.int32)
    idx_b, cnt_b = idx.copy(), cnt.copy()
    if bad == "count_high":
        cnt_b[0] = 5
    elif bad == "count_negative":
        cnt_b[2] = -1
    elif bad == "negative_id":
        idx_b[1, 1] = -1
    else:
        idx_b, cnt_b = idx_b[:2], cnt_b[:2]
    with pytest.raises(MfsimError):
        jaccard_rows(idx, cnt, idx_b, cnt_b)


# ---------------------------------------------------------------------------------------------
# tie_aware_jaccard


def _lists(rows):
    """A TopN of n + 1 = 4 columns from (ids, scores) per row; fewer ids than 4: that many valid entries."""
    idx = np.full((len(rows), 4), -1, np.int32)
    sc = np.full((len(rows), 4), -np.inf, np.float32)
    cnt = np.zeros(len(rows), np.int32)
    for r, (ids, scores) in enumerate(rows):
        idx[r, : len(ids)], sc[r, : len(ids)], cnt[r] = ids, scores, len(ids)
    return TopN(idx, sc, cnt)


def test_tie_aware_jaccard_by_hand():
    """N = 3, one cut per row; the bound b = 2^-10 (exact in float32): a swap within 4 b of the cut is a tie."""
    b = 2.0**-10
    x = _lists([([1, 2, 3, 4], [0.9, 0.8, 0.5, 0.5]),  # 3 and 4 tie at the cut, swapped in y: agreement
                ([1, 2, 3, 4], [0.9, 0.8, 0.7, 0.5]),  # the same swap, 0.2 above the cut: a change
                ([1, 2, 3, 4], [0.9, 0.8, 0.5, 0.5]),  # x's swap is at its cut, y's (5) is not: a change
                ([1, 2], [0.9, 0.8]),  # every candidate listed: no cut, plain sets
                ([], []),  # both empty
                ([7, 8, 9, 1], [0.4, 0.3, 0.2, 0.1]),  # identical lists
                ([1, 2, 3, 4], [0.9, 0.8, 0.5 + 3 * b, 0.5]),  # 3 b above the cut: within 4 b
                ([1, 2, 3, 4], [0.9, 0.8, 0.5 + 5 * b, 0.5])])  # 5 b above it: not
    y = _lists([([1, 2, 4, 3], [0.9, 0.8, 0.5, 0.5]),
                ([1, 2, 4, 3], [0.9, 0.8, 0.7, 0.5]),
                ([1, 2, 5, 3], [0.9, 0.8, 0.7, 0.5]),
                ([1, 3], [0.9, 0.8]),
                ([], []),
                ([7, 8, 9, 1], [0.4, 0.3, 0.2, 0.1]),
                ([1, 2, 4, 3], [0.9, 0.8, 0.5 + 3 * b, 0.5]),
                ([1, 2, 4, 3], [0.9, 0.8, 0.5 + 5 * b, 0.5])])
    jac, ties = tie_aware_jaccard(x, y, 3, b)
    np.testing.assert_array_equal(jac, [1.0, 2 / 4, 2 / 4, 1 / 3, 1.0, 1.0, 1.0, 2 / 4])
    np.testing.assert_array_equal(ties, [1, 0, 0, 0, 0, 0, 1, 0])
    assert jac.dtype == np.float64 and ties.dtype == np.int64
    # strict sets where nothing ties: the same as jaccard_rows of the top 3
    np.testing.assert_array_equal(jac[[1, 2, 3, 5, 7]], jaccard_rows(x.indices[:, :3], np.minimum(x.counts, 3),
                                                                     y.indices[:, :3], np.minimum(y.counts, 3))[
        [1, 2, 3, 5, 7]])
    # a bound per row: row 0 with b = 0 still ties (equal scores), row 7 with 2 b ties
    per_row = np.full(8, b)
    per_row[[0, 7]] = [0.0, 2 * b]
    jac, ties = tie_aware_jaccard(x, y, 3, per_row)
    assert (jac[0], ties[0], jac[7], ties[7]) == (1.0, 1, 1.0, 1)


def test_tie_aware_jaccard_matches_python_sets_on_lists_with_copies():
    """Lists of items with exact copies (many ties at every cut) and of their slightly rescaled copies."""
    rng = np.random.default_rng(2)
    base = rng.integers(-2, 3, (60, 4)).astype(np.float32)
    E = np.vstack([base, base[:20], base[:20]])  # 3 copies of 20 rows: exact ties
    n = 12
    x = default_item_lists(E, E, n + 1, "cosine")
    perm = np.arange(len(E))[::-1]  # the same items in reverse order: equal scores go to other copies
    rev = default_item_lists(E[perm], E[perm], n + 1, "cosine")
    back = np.argsort(perm)
    y = TopN(np.where(rev.indices >= 0, perm[np.maximum(rev.indices, 0)], -1)[back].astype(np.int32),
             rev.scores[back], rev.counts[back])
    for other, bound in ((y, COS_BOUND), (default_item_lists(E * np.float32(1.5), E, n + 1, "cosine",
                                                             exclude_self=True), 1e-3)):
        jac, ties = tie_aware_jaccard(x, other, n, bound)
        ref_j, ref_t = tie_reference(x, other, n, bound)
        np.testing.assert_allclose(jac, ref_j, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(ties, ref_t)
    jac, ties = tie_aware_jaccard(x, y, n, COS_BOUND)
    strict = jaccard_rows(x.indices[:, :n], np.minimum(x.counts, n), y.indices[:, :n], np.minimum(y.counts, n))
    assert strict.min() < 1 and ties.sum() > 0  # the copies do swap
    np.testing.assert_array_equal(jac, 1.0)  # and only at ties


def test_tie_aware_jaccard_rejects_malformed_lists():
    x = _lists([([1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1])])
    with pytest.raises(MfsimError, match=r"n \+ 1 = 5 columns"):
        tie_aware_jaccard(x, x, 4, 0.0)
    dup = _lists([([1, 2, 2, 4], [0.4, 0.3, 0.2, 0.1])])
    with pytest.raises(MfsimError, match="twice"):
        tie_aware_jaccard(x, dup, 3, 0.0)
    with pytest.raises(MfsimError, match="same rows"):
        tie_aware_jaccard(x, _lists([([1], [0.1]), ([2], [0.2])]), 3, 0.0)
    with pytest.raises(MfsimError, match="bound"):
        tie_aware_jaccard(x, x, 3, -1.0)


def test_score_bound():
    assert score_bound("cosine", 64) == 72 * 2.0**-24 and score_bound("dot", 16) == 20 * 2.0**-24
    with pytest.raises(MfsimError, match="kernel metric"):
        score_bound("model", 4)


# ---------------------------------------------------------------------------------------------
# random_diagonals


def test_random_diagonals_is_seeded_log_normal():
    d = random_diagonals(50, 200, 0.7, 3)
    assert d.shape == (200, 50) and d.dtype == np.float64 and (d > 0).all()
    np.testing.assert_array_equal(d, random_diagonals(50, 200, 0.7, 3))
    assert not np.array_equal(d, random_diagonals(50, 200, 0.7, 4))
    # the definition: d = exp(spread z), z the standard normals of default_rng(seed)
    np.testing.assert_allclose(d, np.exp(0.7 * np.random.default_rng(3).standard_normal((200, 50))), rtol=1e-15)
    # log d ~ N(0, 0.7^2) over 10000 values: the mean has sd 0.7/100 and the sd about 0.7/sqrt(2e4);
    # 5 of those sds bound a false failure at ~1e-6
    z = np.log(d)
    assert abs(z.mean()) < 5 * 0.7 / 100
    assert abs(z.std() - 0.7) < 5 * 0.7 / np.sqrt(2 * z.size)
    assert random_diagonals(4, 0, 1.0, 0).shape == (0, 4)
    for kwargs in ({"spread": 0.0}, {"spread": np.nan}, {"draws": -1}, {"seed": -1}, {"k": 0}):
        args = {"k": 4, "draws": 2, "spread": 1.0, "seed": 0} | kwargs
        with pytest.raises(MfsimError):
            random_diagonals(**args)


def test_sample_rows():
    np.testing.assert_array_equal(sample_rows(5, 10, 0), np.arange(5))
    s = sample_rows(1000, 100, 3)
    assert s.size == 100 and np.unique(s).size == 100 and (np.diff(s) > 0).all() and s.max() < 1000
    np.testing.assert_array_equal(s, sample_rows(1000, 100, 3))


# ---------------------------------------------------------------------------------------------
# Eq. 1 audit


@pytest.fixture(scope="module")
def eq1():
    """Eq. 1 factors of every named scaling from the SVD of a random sparse-ish X (300 x 400, 6%)."""
    rng = np.random.default_rng(11)
    X = sp.random(N_USERS, P, density=0.06, random_state=rng, data_rvs=lambda n: rng.uniform(1, 5, n)).toarray()
    _, s, Vt = np.linalg.svd(X, full_matrices=False)
    s, V = s[:K], Vt[:K].T
    lam = float(s[K // 2] ** 2)  # weights w = s^2/(s^2+lam) from ~0.9 to ~0.4: the scalings differ
    factors = {name: eq1_factors(s, V, lam, *EQ1_SCALINGS[name]) for name in SCALINGS}
    T = (V * (s**2 / (s**2 + lam))) @ V.T  # A B^T = V W V^T in float64
    return {"factors": factors, "s": s, "V": V, "lam": lam, "T": T}


@pytest.fixture(scope="module")
def audit(eq1):
    calls = []

    def counting(queries, candidates, n, metric, exclude_self=True, cosine_min_norm=(0.0, 0.0)):
        calls.append((queries.shape, candidates.shape, n, metric, exclude_self, cosine_min_norm))
        return default_item_lists(queries, candidates, n, metric, exclude_self=exclude_self,
                                  cosine_min_norm=cosine_min_norm)

    result = audit_item_lists(eq1["factors"], top_n=TOP_N, draws=DRAWS, spread=SPREAD, seed=SEED,
                              least_stable=10, item_lists_fn=counting)
    return result, calls


def rows_of(result, **where):
    return [r for r in result.stability.to_pylist() if all(r[k] == v for k, v in where.items())]


def detail_of(result, metric, a, b, column="jaccard"):
    d = result.detail.to_pandas()
    d = d[(d.metric == metric) & (d.scaling_a == a) & (d.scaling_b == b)]
    return d["index"].to_numpy(), d[column].to_numpy()


def test_stability_table_layout(audit):
    result, _ = audit
    assert result.stability.column_names == STABILITY_COLUMNS
    n_pairs = comb(len(SCALINGS), 2)
    assert result.stability.num_rows == len(AUDIT_METRICS) * (n_pairs + len(SCALINGS))
    for metric in AUDIT_METRICS:
        pairs = [(r["scaling_a"], r["scaling_b"]) for r in rows_of(result, metric=metric, draws=1)]
        assert pairs == list(combinations(SCALINGS, 2))
        rand = rows_of(result, metric=metric, scaling_b="random_sd=1.0")
        assert [r["scaling_a"] for r in rand] == SCALINGS and all(r["draws"] == DRAWS for r in rand)
    for r in result.stability.to_pylist():
        assert (r["objective"], r["kind"], r["top_n"], r["n_items"]) == ("eq1", "item_item", TOP_N, P)
        assert r["jaccard_min"] <= r["jaccard_p10"] <= r["jaccard_p50"] <= r["jaccard_p90"] <= 1.0
    assert result.detail.num_rows == result.stability.num_rows * P
    assert result.detail.column_names == ["objective", "kind", "metric", "scaling_a", "scaling_b", "index", "jaccard",
                                          "boundary_ties"]
    # jaccard_se: sample sd (ddof 1) of the per-item Jaccards over sqrt(items), beside jaccard_mean;
    # boundary_ties: the per-item ties (their mean over the draws) summed over items and draws
    for r in result.stability.to_pylist():
        _, jac = detail_of(result, r["metric"], r["scaling_a"], r["scaling_b"])
        _, ties = detail_of(result, r["metric"], r["scaling_a"], r["scaling_b"], "boundary_ties")
        assert r["jaccard_se"] == pytest.approx(np.std(jac, ddof=1) / np.sqrt(P), rel=1e-12, abs=1e-15)
        assert r["boundary_ties"] == round(ties.sum() * r["draws"])
    assert min(r["jaccard_se"] for r in rows_of(result, metric="cosine")) > 0
    json.dumps(result.summary)


def test_product_deviation_against_float64_products(audit, eq1):
    """``product_deviation``: max |P_a - P_b| / sum_l |a_il b_jl|, here over every entry (p = 400 < the sample's
    1000 rows and columns), from float64 products of the float32 factors; for random rescalings the largest over
    the draws of (A D, B D^-1) against (A, B). Equally good solutions: at most 6 roundings of 2^-24 (one per
    factor entry, two for a rescaled one, see ``_product_deviations``)."""
    result, _ = audit
    f = {s: tuple(x.astype(np.float64) for x in ab) for s, ab in eq1["factors"].items()}
    A0, B0 = f[SCALINGS[0]]
    denom = np.abs(A0) @ np.abs(B0).T
    prod = {s: A @ B.T for s, (A, B) in f.items()}
    for a, b in combinations(SCALINGS, 2):
        want = (np.abs(prod[a] - prod[b]) / denom).max()
        for r in rows_of(result, scaling_a=a, scaling_b=b):
            assert r["product_deviation"] == pytest.approx(want, rel=1e-12)
    diags = random_diagonals(K, DRAWS, SPREAD, SEED)
    for s, (A, B) in eq1["factors"].items():
        want = max((np.abs((A * d).astype(np.float32).astype(np.float64) @ (B / d).astype(np.float32).astype(
            np.float64).T - prod[s]) / denom).max() for d in diags)
        for r in rows_of(result, scaling_a=s, scaling_b="random_sd=1.0"):
            assert r["product_deviation"] == pytest.approx(want, rel=1e-12)
    assert 0 < max(r["product_deviation"] for r in result.stability.to_pylist()) <= 6 * 2.0**-24
    assert result.summary["product_max_rel_deviation"] == max(r["product_deviation"]
                                                              for r in result.stability.to_pylist())


def canonical_lists(factors, n):
    """Dense top-(n + 1) model and projected_cosine lists of the canonical form: G and A_proj of the first scaling."""
    A, B = factors[SCALINGS[0]]
    G, Ap = gram_factor(A, B), projected(A, B)
    return {"model": (dense_lists(G, G, "dot", True, n + 1), G), "projected_cosine": (dense_lists(Ap, Ap, "cosine", True,
                                                                                                  n + 1), Ap)}


def tied_at_cut(top, n, bound):
    """Entries of the top n within 4 bound of the (n + 1)-th score, by a loop."""
    count = 0
    for r in range(len(top.counts)):
        if top.counts[r] > n:
            b = bound[r] if np.ndim(bound) else bound
            count += sum(1 for s in top.scores[r, :n].tolist() if s - float(top.scores[r, n]) <= 4 * b)
    return count


def test_invariant_lists_are_identical(audit, eq1):
    """model and projected_cosine: computed once from the canonical form, Jaccard 1 for every solution."""
    result, calls = audit
    for metric in INVARIANT_METRICS:
        for r in rows_of(result, metric=metric):
            assert (r["jaccard_mean"], r["jaccard_min"], r["boundary_ties"]) == (1.0, 1.0, 0), r
    inv = result.summary["invariance"]
    assert inv["passed"] is True and inv["min_jaccard_min"] == 1.0 and inv["canonical"] == SCALINGS[0]
    # one list call each, of the canonical G and A_proj (the others are the cosine lists of B)
    dense = canonical_lists(eq1["factors"], TOP_N)
    for metric, kernel in (("model", "dot"), ("projected_cosine", "cosine")):
        top, E = dense[metric]
        bound = COS_BOUND if kernel == "cosine" else (
            (K + 4) * 2.0**-24 * np.linalg.norm(E.astype(np.float64), axis=1) * np.linalg.norm(E, axis=1).max())
        assert inv["tied_at_cut"][metric] == tied_at_cut(top, TOP_N, bound)
    assert sum(1 for c in calls if c[3] == "dot") == 1


def test_invariant_lists_of_every_solution_agree_up_to_boundary_ties():
    """Near-duplicate items (columns scaled by 1 + 1e-7) tie within float32 rounding: lists computed from each
    solution's own factors then differ from the canonical ones, but only by swaps at the cut, which
    ``tie_aware_jaccard`` counts as agreement; the audit reports the invariant lists as identical."""
    rng = np.random.default_rng(3)
    base = sp.random(N_USERS, P // 2, density=0.08, random_state=rng,
                     data_rvs=lambda n: rng.uniform(1, 5, n)).toarray()
    X = np.hstack([base, base * (1 + 1e-7 * rng.standard_normal(P // 2))])
    _, s, Vt = np.linalg.svd(X, full_matrices=False)
    s, V = s[:K], Vt[:K].T
    lam = float(s[K // 2] ** 2)
    factors = {name: eq1_factors(s, V, lam, *EQ1_SCALINGS[name]) for name in SCALINGS}
    canonical = canonical_lists(factors, TOP_N)
    # each solution's own G = A diag(sqrt(|b|/|a|)) and A_proj = A diag(|b|): every entry is 3 roundings of 2^-24
    # (the factor's, the scale's, the product's), 6 per product term against 4 in score_bound's dot; a cosine adds
    # the 4 of score_bound and 2 more for the column norms' rounding inside the scale
    bounds = {"model": lambda E: (K + 8) * 2.0**-24 * np.linalg.norm(E.astype(np.float64), axis=1)
              * np.linalg.norm(E.astype(np.float64), axis=1).max(),
              "projected_cosine": lambda E: (K + 12) * 2.0**-24}
    strict_min = 1.0
    for name, (A, B) in factors.items():
        for metric, build, kernel in (("model", gram_factor, "dot"), ("projected_cosine", projected, "cosine")):
            E = build(A, B)
            own = default_item_lists(E, E, TOP_N + 1, kernel)
            ref, _ = canonical[metric]
            jac, ties = tie_aware_jaccard(ref, own, TOP_N, bounds[metric](E))
            strict = jaccard_rows(ref.indices[:, :TOP_N], np.minimum(ref.counts, TOP_N), own.indices[:, :TOP_N],
                                  np.minimum(own.counts, TOP_N))
            np.testing.assert_array_equal(jac, 1.0)
            assert ties.sum() == np.round(((1 - strict) / (1 + strict)) * TOP_N).sum()  # every swap a tie
            strict_min = min(strict_min, strict.min())
    assert strict_min < 1.0  # swaps happened: the check above was exercised
    result = audit_item_lists(factors, top_n=TOP_N, draws=DRAWS, spread=SPREAD, seed=SEED)
    for metric in INVARIANT_METRICS:
        assert all(r["jaccard_min"] == 1.0 and r["boundary_ties"] == 0 for r in rows_of(result, metric=metric))
    assert result.summary["invariance"]["tied_at_cut"]["projected_cosine"] > 0
    assert "lists are identical (1.000, lowest 1.000)" in result.summary["verdict"]


def test_cosine_lists_move_and_match_dense_reference(audit, eq1):
    result, _ = audit
    cos = rows_of(result, metric="cosine")
    assert min(r["jaccard_mean"] for r in cos) < 0.9  # the paper's point
    assert all(r["jaccard_mean"] < 1.0 for r in cos if r["draws"] == DRAWS)
    f = eq1["factors"]
    # a pair of named scalings, from dense top-(N + 1) lists and the Python-set tie rule
    idx, jac = detail_of(result, "cosine", "symmetric", "eq2_like")
    _, ties = detail_of(result, "cosine", "symmetric", "eq2_like", "boundary_ties")
    a, b = f["symmetric"][1], f["eq2_like"][1]
    ref, ref_ties = tie_reference(dense_lists(a, a, "cosine", True), dense_lists(b, b, "cosine", True), TOP_N,
                                  COS_BOUND)
    np.testing.assert_array_equal(idx, np.arange(P))
    np.testing.assert_allclose(jac, ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ties, ref_ties)
    row = rows_of(result, metric="cosine", scaling_a="symmetric", scaling_b="eq2_like")[0]
    assert row["jaccard_mean"] == pytest.approx(ref.mean(), abs=1e-12)
    assert row["jaccard_p10"] == pytest.approx(np.quantile(ref, 0.1), abs=1e-12)
    assert row["jaccard_min"] == pytest.approx(ref.min(), abs=1e-12)
    assert row["boundary_ties"] == ref_ties.sum()
    # random rescalings (A D, B D^-1) of one scaling: per-item mean over the draws, pooled stats
    A, B = f["item_orthonormal"]
    base = dense_lists(B, B, "cosine", True)
    per_draw = [tie_reference(base, dense_lists((B / dd).astype(np.float32), (B / dd).astype(np.float32),
                                                "cosine", True), TOP_N, COS_BOUND)[0]
                for dd in random_diagonals(K, DRAWS, SPREAD, SEED)]
    idx, jac = detail_of(result, "cosine", "item_orthonormal", "random_sd=1.0")
    np.testing.assert_allclose(jac, np.mean(per_draw, axis=0), rtol=0, atol=1e-12)
    row = rows_of(result, metric="cosine", scaling_a="item_orthonormal", scaling_b="random_sd=1.0")[0]
    pooled = np.concatenate(per_draw)
    assert row["jaccard_mean"] == pytest.approx(pooled.mean(), abs=1e-12)
    assert row["jaccard_p90"] == pytest.approx(np.quantile(pooled, 0.9), abs=1e-12)


def test_cosine_norm_floor_in_the_audit(eq1):
    """``cosine_norm_floor``: items whose row is below the floor times the largest row norm of the embedding (B of
    each solution, A_proj) have no cosine list and are no one's cosine neighbour; against dense lists with the
    floors computed here, and the floors the list function receives."""
    s, V, lam = eq1["s"], eq1["V"].copy(), eq1["lam"]
    tiny = [3, 50, 222]
    V[tiny] *= 1e-6  # below a floor of 1e-4 in every scaling and rescaling (spread 1: d within e^+-4)
    factors = {name: eq1_factors(s, V, lam, *EQ1_SCALINGS[name]) for name in SCALINGS[:2]}
    floor = 1e-4
    calls = []

    def keep(queries, candidates, n, metric, exclude_self=True, cosine_min_norm=(0.0, 0.0)):
        calls.append((metric, tuple(cosine_min_norm), np.linalg.norm(candidates.astype(np.float64), axis=1).max()))
        return default_item_lists(queries, candidates, n, metric, exclude_self=exclude_self,
                                  cosine_min_norm=cosine_min_norm)

    res = audit_item_lists(factors, top_n=TOP_N, draws=2, spread=SPREAD, seed=SEED, cosine_norm_floor=floor,
                           item_lists_fn=keep)
    for metric, mins, top_norm in calls:  # float64 norms summed in another order: equal to ~k 2^-53, within 1e-12
        assert mins == pytest.approx((floor * top_norm,) * 2 if metric == "cosine" else (0.0, 0.0), rel=1e-12)
    assert len([c for c in calls if c[0] == "cosine"]) == 2 * 3 + 1  # B of 2 scalings x (1 + 2 draws), A_proj
    a, b = (f[1] for f in factors.values())

    def floored(E):
        m = floor * np.linalg.norm(E.astype(np.float64), axis=1).max()
        return dense_lists(E, E, "cosine", True, cosine_min_norm=(m, m))

    la, lb = floored(a), floored(b)
    assert (la.counts[tiny] == 0).all() and not np.isin(la.indices, tiny).any()
    ref, _ = tie_reference(la, lb, TOP_N, COS_BOUND)
    idx, jac = detail_of(res, "cosine", *SCALINGS[:2])
    np.testing.assert_allclose(jac, ref, rtol=0, atol=1e-12)
    assert (jac[tiny] == 1.0).all()  # no list under either solution: the same (empty) set
    assert res.summary["cosine_norm_floor"] == floor
    assert res.summary["without_cosine_list"] == {"cosine symmetric": 3, "cosine item_orthonormal": 3,
                                                  "projected_cosine": 3}
    assert f"3 of the {P} items have no cosine list" in res.summary["verdict"]
    with pytest.raises(MfsimError, match="cosine_norm_floor"):
        audit_item_lists(factors, top_n=5, draws=0, spread=1.0, seed=0, cosine_norm_floor=1.5)


def test_least_stable_and_summary(audit):
    result, _ = audit
    ls = result.least_stable.to_pandas()
    assert set(ls.metric) == {"cosine"}
    n_comparisons = comb(len(SCALINGS), 2) + len(SCALINGS)
    assert len(ls) == 10 * n_comparisons
    idx, jac = detail_of(result, "cosine", "user_orthonormal", "eq2_like")
    order = np.lexsort((idx, jac))[:10]
    got = ls[(ls.scaling_a == "user_orthonormal") & (ls.scaling_b == "eq2_like")]
    np.testing.assert_array_equal(got["index"].to_numpy(), idx[order])
    np.testing.assert_array_equal(got["rank"].to_numpy(), np.arange(1, 11))
    s = result.summary
    assert s["invariance"]["passed"] is True and s["comparisons"] == n_comparisons
    cos_rows = rows_of(result, metric="cosine")
    cos_means = [r["jaccard_mean"] for r in cos_rows]
    assert s["metrics"]["cosine"]["min_jaccard_mean"] == min(cos_means)
    assert s["boundary_ties"]["cosine"] == sum(r["boundary_ties"] for r in cos_rows)
    assert s["verdict"].startswith("item-item cosine lists of Eq. 1 change with the arbitrary scaling")
    assert f"{np.mean(cos_means):.2f}" in s["verdict"] and "lists are identical (1.000" in s["verdict"]
    assert f"{s['boundary_ties']['cosine']} boundary ties" in s["verdict"]


def test_each_list_is_computed_once_with_the_injected_function(audit, eq1):
    """The cosine lists of every solution and draw, and one list per invariant metric, each N + 1 long."""
    result, calls = audit
    assert len(calls) == len(SCALINGS) * (1 + DRAWS) + len(INVARIANT_METRICS)
    assert {c[3] for c in calls} == {"dot", "cosine"} and all(c[4] is True and c[2] == TOP_N + 1 for c in calls)
    plain = audit_item_lists(eq1["factors"], top_n=TOP_N, draws=DRAWS, spread=SPREAD, seed=SEED, least_stable=10)
    assert plain.stability.equals(result.stability)


def test_eq1_audit_rejects_bad_factors(eq1):
    f = eq1["factors"]
    A2, B2, _ = eq2_factors(eq1["s"], eq1["V"], float(eq1["s"][K // 2]))
    with pytest.raises(MfsimError, match="one Eq. 1 problem"):
        audit_item_lists({"symmetric": f["symmetric"], "eq2": (A2, B2)}, top_n=5, draws=0, spread=1.0, seed=0)
    with pytest.raises(MfsimError, match="same shape"):
        audit_item_lists({"a": f["symmetric"], "b": (f["symmetric"][0][:, :4], f["symmetric"][1][:, :4])},
                         top_n=5, draws=0, spread=1.0, seed=0)
    with pytest.raises(MfsimError, match="float32 range"):  # exp(60 z) is beyond float32 for |z| > 1.5
        audit_item_lists({"symmetric": f["symmetric"]}, top_n=5, draws=2, spread=60.0, seed=0)
    with pytest.raises(MfsimError):
        audit_item_lists({}, top_n=5, draws=1, spread=1.0, seed=0)


def test_eq1_audit_with_lists_of_every_item_is_flagged_trivial(eq1):
    small = {n: (a[:12], b[:12]) for n, (a, b) in eq1["factors"].items()}  # 12 items: A B^T still one family
    res = audit_item_lists(small, top_n=11, draws=1, spread=1.0, seed=0)
    assert all(r["jaccard_mean"] == 1.0 for r in res.stability.to_pylist())
    assert res.summary["trivial"] and "cannot show a change" in res.summary["verdict"]


def test_sampled_items_have_exactly_the_unsampled_rows(audit, eq1):
    """max_items < p: a seeded sample of query items against all items as candidates; each sampled
    item's Jaccard (hence list) is the one the unsampled audit gives it, and the stability rows are
    the statistics of the sampled rows."""
    full, _ = audit
    m = 57
    res = audit_item_lists(eq1["factors"], top_n=TOP_N, draws=DRAWS, spread=SPREAD, seed=SEED, least_stable=10,
                           max_items=m)
    assert res.stability.column_names == STABILITY_COLUMNS
    assert res.stability.num_rows == full.stability.num_rows
    sample = None
    for r in res.stability.to_pylist():
        idx, jac = detail_of(res, r["metric"], r["scaling_a"], r["scaling_b"])
        ref_idx, ref_jac = detail_of(full, r["metric"], r["scaling_a"], r["scaling_b"])
        np.testing.assert_array_equal(ref_idx, np.arange(P))
        sample = idx if sample is None else sample
        np.testing.assert_array_equal(idx, sample)  # one sample for every comparison
        np.testing.assert_array_equal(jac, ref_jac[idx])  # the unsampled rows, bit for bit
        assert r["n_items"] == m
        assert r["jaccard_mean"] == pytest.approx(ref_jac[idx].mean(), rel=1e-12)
        assert r["jaccard_se"] == pytest.approx(np.std(ref_jac[idx], ddof=1) / np.sqrt(m), rel=1e-12, abs=1e-15)
        if r["draws"] == 1:  # a pair of named scalings: the quantiles are those of the sampled items
            q = np.quantile(ref_jac[idx], [0.1, 0.5, 0.9])
            np.testing.assert_allclose([r["jaccard_p10"], r["jaccard_p50"], r["jaccard_p90"], r["jaccard_min"]],
                                       [*q, ref_jac[idx].min()], rtol=1e-12)
    assert sample.size == m and (np.diff(sample) > 0).all() and 0 <= sample[0] and sample[-1] < P
    assert min(r["jaccard_mean"] for r in rows_of(res, metric="cosine")) < 0.9  # the sample still shows the point
    # least stable: the sampled items only, ranked as in the unsampled rule
    ls = res.least_stable.to_pandas()
    assert set(ls["index"]) <= set(sample.tolist())
    idx, jac = detail_of(res, "cosine", "symmetric", "eq2_like")
    got = ls[(ls.scaling_a == "symmetric") & (ls.scaling_b == "eq2_like")]
    np.testing.assert_array_equal(got["index"].to_numpy(), idx[np.lexsort((idx, jac))[:10]])
    s = res.summary
    assert (s["n_items"], s["n_items_sampled"], s["sampled"]) == (P, m, True)
    assert f"of a seeded sample of {m} of the {P} items" in s["verdict"] and s["invariance"]["passed"]
    # deterministic for a seed, another seed samples other items; max_items >= p is the unsampled audit
    again = audit_item_lists(eq1["factors"], top_n=TOP_N, draws=DRAWS, spread=SPREAD, seed=SEED, least_stable=10,
                             max_items=m)
    assert again.detail.equals(res.detail) and again.stability.equals(res.stability)
    other = audit_item_lists({"symmetric": eq1["factors"]["symmetric"]}, top_n=TOP_N, draws=1, spread=SPREAD,
                             seed=SEED + 1, max_items=m)
    assert not np.array_equal(detail_of(other, "cosine", "symmetric", "random_sd=1.0")[0], sample)
    whole = audit_item_lists(eq1["factors"], top_n=TOP_N, draws=DRAWS, spread=SPREAD, seed=SEED, least_stable=10,
                             max_items=P)
    assert whole.stability.equals(full.stability) and whole.detail.equals(full.detail)
    assert whole.summary["sampled"] is False and "sample" not in whole.summary["verdict"]
    with pytest.raises(MfsimError, match="max_items must be an integer >= 1"):
        audit_item_lists(eq1["factors"], top_n=TOP_N, draws=0, spread=SPREAD, seed=SEED, max_items=0)


def test_sampled_lists_exclude_only_the_item_itself(eq1):
    """A sampled item's list is its top N of the p - 1 other items: the lists the injected function
    returns for the sampled queries (N + 2 long: the cut and the item itself a candidate) without the item,
    against a dense float64 reference; also when N + 2 exceeds the candidates (12 items, N = 11)."""
    B = eq1["factors"]["user_orthonormal"][1]
    calls = []

    def keep(queries, candidates, n, metric, exclude_self=True, cosine_min_norm=(0.0, 0.0)):
        top = default_item_lists(queries, candidates, n, metric, exclude_self=exclude_self,
                                 cosine_min_norm=cosine_min_norm)
        calls.append((queries, candidates, n, metric, exclude_self, top))
        return top

    res = audit_item_lists({"user_orthonormal": eq1["factors"]["user_orthonormal"]}, top_n=TOP_N, draws=1,
                           spread=SPREAD, seed=SEED, max_items=40, item_lists_fn=keep)
    sample, _ = detail_of(res, "cosine", "user_orthonormal", "random_sd=1.0")
    queries, candidates, n, metric, exclude_self, top = calls[0]  # the first list: cosine of the given B
    assert (n, metric, exclude_self) == (TOP_N + 2, "cosine", False)
    np.testing.assert_array_equal(queries, B[sample])
    np.testing.assert_array_equal(candidates, B)  # every item a candidate
    lists = without_self(top, sample, TOP_N)
    Bn = B.astype(np.float64) / np.linalg.norm(B.astype(np.float64), axis=1, keepdims=True)
    S = Bn[sample] @ Bn.T
    S[np.arange(sample.size), sample] = -np.inf  # the item itself is no neighbour
    assert lists.indices.shape == (40, TOP_N) and (lists.counts == TOP_N).all()
    np.testing.assert_array_equal(lists.indices, np.argsort(-S, axis=1, kind="stable")[:, :TOP_N])
    np.testing.assert_allclose(lists.scores, np.take_along_axis(S, lists.indices.astype(np.int64), 1), atol=1e-6)
    # 12 items, N = 11: asked for 13, each of the 5 sampled items lists all 11 others
    small = {"symmetric": tuple(x[:12] for x in eq1["factors"]["symmetric"])}
    calls.clear()
    res = audit_item_lists(small, top_n=11, draws=1, spread=SPREAD, seed=SEED, max_items=5, item_lists_fn=keep)
    sample, _ = detail_of(res, "cosine", "symmetric", "random_sd=1.0")
    lists = without_self(calls[0][-1], sample, 11)
    assert (lists.counts == 11).all()
    assert [sorted(row) for row in lists.indices.tolist()] == [sorted(set(range(12)) - {i}) for i in sample]
    assert all(r["jaccard_mean"] == 1.0 and r["n_items"] == 5 for r in res.stability.to_pylist())


# ---------------------------------------------------------------------------------------------
# any (user, item) embedding pair


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(5)
    U = rng.standard_normal((500, 8)).astype(np.float32)
    I = (rng.standard_normal((300, 8)) * rng.uniform(0.2, 3.0, 8)).astype(np.float32)
    return U, I


def test_embedding_pair_dot_stable_cosine_moves(pair):
    U, I = pair
    res = audit_embedding_pair(U, I, top_n=TOP_N, draws=DRAWS, spread=SPREAD, seed=SEED, max_users=100)
    assert res.stability.column_names == STABILITY_COLUMNS
    rows = {(r["kind"], r["metric"]): r for r in res.stability.to_pylist()}
    assert set(rows) == {("item_item", "cosine"), ("user_item", "cosine"), ("user_item", "dot")}
    for r in rows.values():
        assert (r["objective"], r["scaling_a"], r["scaling_b"], r["draws"]) == ("external", "given",
                                                                               "random_sd=1.0", DRAWS)
    assert rows[("item_item", "cosine")]["n_items"] == 300 and rows[("user_item", "dot")]["n_items"] == 100
    # dot scores do not change: their lists agree up to boundary ties (tie_aware_jaccard, Notes)
    assert rows[("user_item", "dot")]["jaccard_min"] == 1.0
    assert rows[("item_item", "cosine")]["jaccard_mean"] < 0.9 and rows[("user_item", "cosine")]["jaccard_mean"] < 0.9
    # score change: every (user, item) pair is in the check sample here (100 x 300 < 1000 x 1000)
    users = sample_rows(500, 100, SEED)
    diags = random_diagonals(8, DRAWS, SPREAD, SEED)
    u64, i64 = U[users].astype(np.float64), I.astype(np.float64)
    changes = [np.abs((U[users] * d).astype(np.float32).astype(np.float64)
                      @ (I / d).astype(np.float32).astype(np.float64).T - u64 @ i64.T).max() for d in diags]
    assert res.summary["score_change_max_abs"] == pytest.approx(max(changes), rel=1e-12)
    assert res.summary["score_change_max_rel"] <= 2.0**-23 * 1.01 and res.summary["scores_unchanged"]
    # user-item cosine per sampled user against dense lists and the Python-set tie rule (k = 8)
    base = dense_lists(U[users], I, "cosine", False)
    per_draw = [tie_reference(base, dense_lists((U[users] * d).astype(np.float32), (I / d).astype(np.float32),
                                                "cosine", False), TOP_N, (8 + 8) * 2.0**-24)[0] for d in diags]
    d = res.detail.to_pandas()
    d = d[(d.kind == "user_item") & (d.metric == "cosine")]
    np.testing.assert_array_equal(d["index"].to_numpy(), users)
    np.testing.assert_allclose(d["jaccard"].to_numpy(), np.mean(per_draw, axis=0), rtol=0, atol=1e-12)
    assert "moves cosine lists" in res.summary["verdict"] and "dot lists are stable" in res.summary["verdict"]


def test_embedding_pair_on_a_presampled_matrix_is_the_same(pair):
    """What the command does: sample the users first, pass their row numbers."""
    U, I = pair
    full = audit_embedding_pair(U, I, top_n=10, draws=2, spread=0.5, seed=1, max_users=50)
    rows = sample_rows(500, 50, 1)
    pre = audit_embedding_pair(U[rows], I, top_n=10, draws=2, spread=0.5, seed=1, max_users=50, user_index=rows)
    assert full.stability.equals(pre.stability) and full.detail.equals(pre.detail)


def test_embedding_pair_rejects_bad_input(pair):
    U, I = pair
    with pytest.raises(MfsimError, match="same k"):
        audit_embedding_pair(U, I[:, :4], top_n=5, draws=1, spread=1.0, seed=0)
    bad = U.copy()
    bad[3, 2] = np.nan
    with pytest.raises(MfsimError, match="NaN"):
        audit_embedding_pair(bad, I, top_n=5, draws=1, spread=1.0, seed=0)
    with pytest.raises(MfsimError, match="draws"):
        audit_embedding_pair(U, I, top_n=5, draws=0, spread=1.0, seed=0)
    # finite embeddings whose dot products can overflow float32: |u| |i| up to ~5e37 x 11 > 1e38
    with pytest.raises(MfsimError, match="overflow float32"):
        audit_embedding_pair(U * np.float32(1e37), I, top_n=5, draws=1, spread=1.0, seed=0)
    # a rescaling that pushes entries below the normal float32 range
    with pytest.raises(MfsimError, match="float32 range"):
        audit_embedding_pair(U * np.float32(1e-35), I, top_n=5, draws=1, spread=3.0, seed=0)


# ---------------------------------------------------------------------------------------------
# mfsim audit


def write_pair(tmp_path, U, I, *, list_type=False):
    users, items = tmp_path / "users.parquet", tmp_path / "items.parquet"
    pq.write_table(embedding_table(pa.array([f"u{j}" for j in range(len(U))]), "user_id", U), users)
    if list_type:  # list<double> instead of fixed_size_list<float32>
        t = pa.table({"item_id": pa.array(np.arange(len(I)) + 1000),
                      "embedding": pa.array([row.astype(np.float64).tolist() for row in I],
                                            type=pa.list_(pa.float64()))})
        pq.write_table(t, items)
    else:
        pq.write_table(embedding_table(pa.array([f"i{j}" for j in range(len(I))]), "item_id", I), items)
    return users, items


@pytest.mark.parametrize("list_type", [False, True])
def test_audit_command_round_trip(tmp_path, pair, capsys, list_type):
    U, I = pair
    users, items = write_pair(tmp_path, U, I, list_type=list_type)
    out = tmp_path / "res" / "stability.parquet"
    assert run_audit_command(users, items, top_n=10, draws=2, spread=1.0, seed=3, out=out) == 0
    expected = audit_embedding_pair(U, I, top_n=10, draws=2, spread=1.0, seed=3)
    assert pq.read_table(out).equals(expected.stability)
    text = capsys.readouterr().out
    assert text.split("\n")[0].split() == ["kind", "metric", "scaling_b", "rows", "mean", "p10", "p50", "p90", "min"]
    assert expected.summary["verdict"] in text
    assert text.count("random_sd=1.0") == 3 and "least stable items" in text


def test_audit_command_passes_the_norm_floor_on(tmp_path, pair):
    U, I = pair
    I = I.copy()
    I[:6] *= 1e-6  # six items far below a floor of 1e-4 of the largest row norm
    users, items = write_pair(tmp_path, U, I)
    out = tmp_path / "floor.parquet"
    run_audit_command(users, items, top_n=5, draws=1, seed=2, out=out, cosine_norm_floor=1e-4)
    expected = audit_embedding_pair(U, I, top_n=5, draws=1, spread=1.0, seed=2, cosine_norm_floor=1e-4)
    assert pq.read_table(out).equals(expected.stability)
    assert not expected.stability.equals(audit_embedding_pair(U, I, top_n=5, draws=1, spread=1.0, seed=2).stability)


def test_audit_command_samples_users_like_the_library(tmp_path, pair, capsys):
    U, I = pair
    users, items = write_pair(tmp_path, U, I)
    out = tmp_path / "s.parquet"
    run_audit_command(users, items, top_n=5, draws=1, seed=2, out=out, max_users=60)
    expected = audit_embedding_pair(U, I, top_n=5, draws=1, spread=1.0, seed=2, max_users=60)
    assert pq.read_table(out).equals(expected.stability)
    assert "(60 of 500 users sampled)" in capsys.readouterr().out


def test_audit_command_rejects_bad_files(tmp_path, pair):
    U, I = pair
    users, items = write_pair(tmp_path, U, I)

    def fails(u, i, match):
        with pytest.raises(MfsimError, match=match):
            run_audit_command(u, i, top_n=5, draws=1)

    fails(tmp_path / "nope.parquet", items, "nope.parquet")
    text = tmp_path / "text.parquet"
    text.write_text("not parquet")
    fails(users, text, "text.parquet")
    no_emb = tmp_path / "no_emb.parquet"
    pq.write_table(pa.table({"item_id": [1, 2]}), no_emb)
    fails(users, no_emb, "no_emb.parquet.*'embedding'")
    no_id = tmp_path / "no_id.parquet"
    pq.write_table(pa.table({"embedding": pa.array([[1.0, 2.0]], pa.list_(pa.float32()))}), no_id)
    fails(no_id, items, "no_id.parquet.*id column")
    small_k = tmp_path / "k4.parquet"
    pq.write_table(embedding_table(pa.array(["a", "b"]), "item_id", I[:2, :4]), small_k)
    fails(users, small_k, "k4.parquet")
    nan = I.copy()
    nan[7, 1] = np.inf
    nan_file = tmp_path / "nan.parquet"
    pq.write_table(embedding_table(pa.array([f"i{j}" for j in range(len(I))]), "item_id", nan), nan_file)
    fails(users, nan_file, r"nan.parquet: NaN or infinite .* row 7 \(id 'i7'\)")
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"item_id": [1, 2], "embedding": pa.array([[1.0] * 8, [1.0] * 7])}), ragged)
    fails(users, ragged, "ragged.parquet.*row 1")
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"item_id": [1, 2], "embedding": pa.array([[1.0] * 8, None])}), nulls)
    fails(users, nulls, "nulls.parquet.*null embedding at row 1")
    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"item_id": [1], "embedding": ["x"]}), strings)
    fails(users, strings, "strings.parquet")


# ---------------------------------------------------------------------------------------------
# progress


def test_both_audits_report_one_progress_step_per_list(eq1, pair, caplog, monkeypatch):
    """``audit lists``: ``s (1 + draws) + 2`` steps for the Eq. 1 audit (the cosine lists of every solution, the
    two canonical invariant lists), ``3 (1 + draws)`` for a pair, every one done."""
    import mfsim.pipeline.progress as progress_module

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, whatever runs the tests
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)  # a line at every tenth, however fast
    calls = []

    def counting(queries, candidates, n, metric, exclude_self=True, cosine_min_norm=(0.0, 0.0)):
        calls.append(metric)
        return default_item_lists(queries, candidates, n, metric, exclude_self=exclude_self,
                                  cosine_min_norm=cosine_min_norm)

    small = {n: (a[:40], b[:40]) for n, (a, b) in list(eq1["factors"].items())[:2]}
    U, I = pair
    last = []
    with caplog.at_level(logging.INFO, logger="mfsim.progress"):
        for audit_fn in (lambda: audit_item_lists(small, top_n=5, draws=2, spread=1.0, seed=0, item_lists_fn=counting),
                         lambda: audit_embedding_pair(U[:50], I[:40], top_n=5, draws=2, spread=1.0, seed=0,
                                                      item_lists_fn=counting)):
            calls.clear()
            caplog.clear()
            audit_fn()
            counts = [r.getMessage().split(": ")[1].split()[0] for r in caplog.records
                      if r.getMessage().startswith("audit lists: ")]
            last.append((counts[-1], len(calls)))
    assert last == [(f"{2 * 3 + 2}/{2 * 3 + 2}", 2 * 3 + 2), ("9/9", 9)]


@pytest.mark.parametrize("max_items,at_once", [(None, 1), (57, 1), (None, 3), (57, 3)],
                         ids=["all-items", "sampled", "all-items-3-at-once", "sampled-3-at-once"])
def test_audit_of_factors_built_on_the_workers_equals_the_in_process_audit(eq1, client, max_items, at_once):
    """The pipeline's audit reads each scaling's (A, B) as futures built on the workers from V
    (``Factors.of("eq1", client)``), derives G, A_proj and the rescalings there too, and gets the
    same tables, bit for bit, as the audit of the same factors as arrays in process; with a norm floor
    (0.2 of the largest row: 5-10% of the rows of B here) that reaches the list tasks. Lists computed 3 at a
    time (``lists_at_once``) give the same tables."""
    from mfsim.pipeline.config import ObjectivesSection
    from mfsim.pipeline.model.factors import build_embeddings
    from mfsim.pipeline.lists.neighbours import client_item_lists

    cfg = ObjectivesSection.model_validate({"eq1": {"lambda": eq1["lam"], "scalings": SCALINGS}, "eq2": None})
    factors = build_embeddings(eq1["s"], eq1["V"].astype(np.float32), cfg)["factors"]
    kw = dict(top_n=TOP_N, draws=DRAWS, spread=SPREAD, seed=SEED, least_stable=10, max_items=max_items,
              cosine_norm_floor=0.2)
    local = audit_item_lists({s: factors[("eq1", s)] for s in SCALINGS}, **kw)
    remote = audit_item_lists(factors.of("eq1", client), **kw, lists_at_once=at_once,
                              item_lists_fn=client_item_lists(client, rows_per_task=64, candidate_block=128))
    assert remote.stability.equals(local.stability)
    assert remote.detail.equals(local.detail) and remote.least_stable.equals(local.least_stable)
    assert remote.summary == local.summary
    with pytest.raises(MfsimError, match="leaves the float32 range"):  # by the product check on a sample
        audit_item_lists(factors.of("eq1", client), **{**kw, "spread": 200.0},
                         item_lists_fn=client_item_lists(client, rows_per_task=64, candidate_block=128))


def test_in_order_runs_jobs_side_by_side_and_gives_them_in_order():
    """``in_order`` with 3 threads: results in the jobs' order, 3 jobs running at once at some moment, never more,
    and never more than 6 started ahead of the one taken."""
    import threading
    import time

    from mfsim.pipeline.lists.audit import in_order

    running, most, started, lock = [0], [0], [0], threading.Lock()

    def job(i):
        def run():
            with lock:
                running[0] += 1
                started[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.02 * (1 + i % 3))
            with lock:
                running[0] -= 1
            return i
        return run

    taken = []
    for i, out in enumerate(in_order([job(i) for i in range(12)], 3)):
        assert started[0] <= i + 1 + 6
        taken.append(out)
    assert taken == list(range(12)) and most[0] == 3
    assert list(in_order([job(i) for i in range(4)], 1)) == [0, 1, 2, 3]
    # started when made (the audit's product check runs beside the first lists); close() cancels the rest
    started[0] = 0
    early = in_order([job(i) for i in range(10)], 2)
    deadline = time.monotonic() + 10
    while started[0] < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert started[0] == 4  # 2 x 2 started ahead, none taken
    early.close()
    assert started[0] == 4 and list(early) == []


def test_ranked_lists_run_their_ranges_in_order_after_their_inputs():
    """``ranked``: job j submits its list's ranges at priority ``len(jobs) - j`` (earlier lists first) and every
    other task at ``first``, above every range, sent to the given workers at once; the jobs' own results are kept."""
    import dask

    from mfsim.pipeline.lists.audit import ranked
    from mfsim.pipeline.shared import _RANGE_PRIORITY, _SENT_AT_ONCE

    def job(i):
        return lambda: (i, dask.get_annotations().get("priority"), _RANGE_PRIORITY.get(), _SENT_AT_ONCE.get())

    jobs, first = ranked([job(i) for i in range(3)], ["tcp://127.0.0.1:1"])
    assert first == 4
    assert [j() for j in jobs] == [(i, 4, 3 - i, ["tcp://127.0.0.1:1"]) for i in range(3)]
    assert dask.get_annotations().get("priority") is None and _RANGE_PRIORITY.get() is None  # restored after each
