"""Neighbour-list planning, the k-dimensional projected cosine, and Dask tasks on 1 and 2 workers."""

from __future__ import annotations

import numpy as np
import pytest

from mfsim.kernels.topn import topn_reference
from mfsim.pipeline.factors import eq1_factors, eq2_factors
from mfsim.pipeline.registry import EQ1_SCALINGS, INVARIANT
from mfsim.pipeline.neighbours import QuerySet, plan_lists, projected, query_ranges, run_topn


def _cos_rows(M: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(M, axis=1)
    Mn = M / np.where(n > 0, n, 1)[:, None]
    return Mn @ Mn.T


@pytest.fixture(scope="module")
def svd():
    rng = np.random.default_rng(0)
    X = (rng.random((60, 25)) < 0.2).astype(np.float64)
    _, s, vt = np.linalg.svd(X, full_matrices=False)
    return X, s[:8], vt[:8].T


@pytest.mark.parametrize("scaling", [n for n in EQ1_SCALINGS if n != "custom"] + ["eq2"])
def test_projected_cosine_equals_cosine_of_the_rows_of_AB(svd, scaling):
    """Rows of A B^T (p x p) and rows of A diag(|b|) (p x k) have the same cosines; so do X A B^T and P diag(|b|)."""
    X, s, V = svd
    if scaling == "eq2":
        A, B, _ = eq2_factors(s, V, 1.0, dtype=np.float64)
    else:
        A, B = eq1_factors(s, V, 3.0, *EQ1_SCALINGS[scaling], dtype=np.float64)
    np.testing.assert_allclose(_cos_rows(projected(A, B).astype(np.float64)), _cos_rows(A @ B.T), atol=1e-5)
    P = X @ A
    np.testing.assert_allclose(_cos_rows(projected(P, B).astype(np.float64)), _cos_rows(P @ B.T), atol=1e-5)


def test_plan_writes_scaling_invariant_lists_once():
    pairs = [("eq1", "symmetric"), ("eq1", "eq2_like"), ("eq2", "unique")]
    groups = plan_lists(pairs, ["cosine", "dot", "model", "projected_cosine"], ["dot", "cosine"],
                        ["cosine", "projected_cosine"])
    labels = [(lab.kind, lab.objective, lab.scaling, lab.metric) for g in groups for lab in g.outputs.values()]
    assert len(labels) == len(set(labels))
    for kind, metric in [("item_item", "model"), ("item_item", "projected_cosine"), ("user_item", "dot"),
                         ("user_user", "projected_cosine")]:
        assert (kind, "eq1", INVARIANT, metric) in labels
        assert (kind, "eq1", "symmetric", metric) not in labels
        assert (kind, "eq2", "unique", metric) in labels
    assert ("item_item", "eq1", "eq2_like", "cosine") in labels
    # cosine and dot of B share one gemm group
    fused = [g for g in groups if g.kind == "item_item" and g.scaling == "symmetric" and g.queries == "B"]
    assert len(fused) == 1 and set(fused[0].outputs) == {"cosine", "dot"}
    assert len(labels) == 2 * 4 + 4 + 8  # per-scaling lists, invariant lists once, eq2's eight


def test_query_ranges_cover_each_part_in_order():
    r = query_ranges([5, 0, 3], [0, 5, 5], 2)
    assert [(x.part, x.start, x.stop, x.first_id) for x in r] == [
        (0, 0, 2, 0), (0, 2, 4, 2), (0, 4, 5, 4), (2, 0, 2, 5), (2, 2, 3, 7)]


def test_tasks_give_identical_lists_on_one_and_two_workers(client, client1):
    rng = np.random.default_rng(1)
    E = rng.standard_normal((300, 6)).astype(np.float32)
    E[7] = 0  # a zero row: no cosine neighbours

    def lists(c):
        cand = c.scatter(E, broadcast=True, hash=False)
        out = {m: [] for m in ("dot", "cosine")}
        for _, res in run_topn(c, QuerySet.whole(cand, len(E), exclude_self=True), cand, 10, ("dot", "cosine"),
                               rows_per_task=37, candidate_block=50):
            for m in out:
                out[m].append(res[m])
        return {m: (np.concatenate([t.indices for t in v]), np.concatenate([t.counts for t in v])) for m, v in out.items()}

    one, two = lists(client1), lists(client)
    for m in ("dot", "cosine"):
        np.testing.assert_array_equal(one[m][0], two[m][0])
        _, ref_indices, _ = topn_reference(E, E, 10, m, exclude_self=True)  # (counts, indices, scores)
        np.testing.assert_array_equal(two[m][0], ref_indices)
    assert two["cosine"][1][7] == 0 and two["dot"][1][7] == 10


@pytest.mark.parametrize("objective", ["eq1", "eq2"])
def test_gram_factor_gives_the_model_scores(objective):
    # G G^T = A B^T for the closed forms (V orthonormal; Eq. 1 any diagonal rescaling, Eq. 2 with a column cut to 0)
    from mfsim.pipeline.neighbours import gram_factor

    rng = np.random.default_rng(3)
    v = np.linalg.qr(rng.standard_normal((60, 6)))[0]
    if objective == "eq1":
        w, d = rng.uniform(0.2, 1, 6), rng.lognormal(0, 1, 6)
        a, b = w**0.5 * d, w**0.5 / d
    else:
        s, lam = np.array([9.0, 5, 3, 2, 1.5, 0.5]), 1.0
        keep = np.clip(1 - lam / s, 0, None)
        a, b = np.sqrt(keep / s), np.sqrt(s * keep)
    A, B = (v * a).astype(np.float32), (v * b).astype(np.float32)
    G = gram_factor(A, B)
    dense = A.astype(np.float64) @ B.astype(np.float64).T
    np.testing.assert_allclose(G.astype(np.float64) @ G.astype(np.float64).T, dense, atol=1e-5 * np.abs(dense).max())
