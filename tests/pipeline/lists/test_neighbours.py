"""Neighbour-list planning, the k-dimensional projected cosine, and Dask tasks on 1 and 2 workers."""

from __future__ import annotations

import numpy as np
import pytest

from mfsim.kernels.topn import topn_reference
from mfsim.pipeline.model.factors import eq1_factors, eq2_factors
from mfsim.pipeline.registry import EQ1_SCALINGS, INVARIANT
from mfsim.pipeline.lists.neighbours import QuerySet, plan_lists, projected, query_ranges, run_topn


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
    # neighbours.eq1_scalings: the lists of the named Eq. 1 scalings only; the invariant ones whatever it names
    for named in ([], ["eq2_like"]):
        some = plan_lists(pairs, ["cosine", "dot", "model", "projected_cosine"], ["dot", "cosine"],
                          ["cosine", "projected_cosine"], named)
        kept = [(lab.kind, lab.objective, lab.scaling, lab.metric) for g in some for lab in g.outputs.values()]
        assert kept == [lab for lab in labels if lab[1] != "eq1" or lab[2] in (INVARIANT, *named)]
        assert len(kept) == 4 * len(named) + 4 + 8


def test_query_ranges_cover_each_part_in_order():
    r = query_ranges([5, 0, 3], [0, 5, 5], 2)
    assert [(x.part, x.start, x.stop, x.first_id) for x in r] == [
        (0, 0, 2, 0), (0, 2, 4, 2), (0, 4, 5, 4), (2, 0, 2, 5), (2, 2, 3, 7)]


def test_tasks_give_identical_lists_on_one_and_two_workers_and_in_this_process(client, client1, monkeypatch):
    """Ranges as tasks on 1 or 2 workers, or in this process (side by side on a thread pool, or one after the other on
    one thread): the same lists, scores bit for bit, in range order."""
    import mfsim.pipeline.lists.neighbours as neighbours_module

    rng = np.random.default_rng(1)
    E = rng.standard_normal((300, 6)).astype(np.float32)
    E[7] = 0  # a zero row: no cosine neighbours

    def lists(c):
        cand = c.scatter(E, broadcast=True, hash=False) if c is not None else E
        out = {m: [] for m in ("dot", "cosine")}
        firsts = []
        for r, res in run_topn(c, QuerySet.whole(cand, len(E), exclude_self=True), cand, 10, ("dot", "cosine"),
                               rows_per_task=37, candidate_block=50):
            firsts.append(r.first_id)
            for m in out:
                out[m].append(res[m])
        assert firsts == sorted(firsts)
        return {m: tuple(np.concatenate([getattr(t, f) for t in v]) for f in ("indices", "counts", "scores"))
                for m, v in out.items()}

    one, two, pooled = lists(client1), lists(client), lists(None)
    monkeypatch.setattr(neighbours_module, "local_threads", lambda: 1)
    serial = lists(None)
    for m in ("dot", "cosine"):
        for other in (one, pooled, serial):
            for a, b in zip(other[m], two[m]):
                np.testing.assert_array_equal(a, b)
        _, ref_indices, _ = topn_reference(E, E, 10, m, exclude_self=True)  # (counts, indices, scores)
        np.testing.assert_array_equal(two[m][0], ref_indices)
    assert two["cosine"][1][7] == 0 and two["dot"][1][7] == 10


@pytest.mark.parametrize("objective", ["eq1", "eq2"])
def test_gram_factor_gives_the_model_scores(objective):
    # G G^T = A B^T for the closed forms (V orthonormal; Eq. 1 any diagonal rescaling, Eq. 2 with a column cut to 0)
    from mfsim.pipeline.lists.neighbours import gram_factor

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


@pytest.mark.parametrize("subset", [None, np.array([0, 3, 4, 20, 39])], ids=["all-users", "subset"])
def test_cosine_norm_floor_reaches_every_cosine_list(client, subset):
    """``cosine_norm_floor`` on every list group, as the neighbours stage runs them (``group_inputs``, then
    ``run_symmetric`` for item-item and ``run_topn`` otherwise), against dense NumPy lists of the same embeddings:
    rows whose norm is below the floor times the largest row norm of their embedding have no cosine list and are
    nobody's cosine neighbour; dot lists do not change."""
    import scipy.sparse as sp

    from mfsim.pipeline.blocks import RowBlocks
    from mfsim.pipeline.model.factors import user_embeddings_blocks
    from mfsim.pipeline.lists.neighbours import gram_factor, group_inputs, run_symmetric
    import pyarrow as pa

    rng = np.random.default_rng(4)
    n, p, k, top, floor = 40, 60, 5, 7, 1e-4
    tiny = [2, 11, 30, 59]  # items whose rows of V are 1e-6 of the others: below the floor in A, B and A B^T
    V = np.linalg.qr(rng.standard_normal((p, k)))[0]
    V[tiny] *= 1e-6
    w, d = rng.uniform(0.3, 1.0, k), rng.lognormal(0, 0.5, k)
    A, B = (V * (w**0.5 * d)).astype(np.float32), (V * (w**0.5 / d)).astype(np.float32)
    dense_x = (rng.random((n, p)) < 0.15).astype(np.float32)
    dense_x[0] = 0
    dense_x[0, tiny[:2]] = 1  # user 0 has only tiny items: its row of P = X A is below the floor too
    X = sp.csr_matrix(dense_x)
    blocks = RowBlocks.from_scipy(X, 16, client=client)
    user_parts = user_embeddings_blocks(blocks, A)
    P = np.concatenate(client.gather(user_parts))
    queries_of = np.arange(n) if subset is None else subset
    mats = {"B": B, "G": gram_factor(A, B), "A_proj": projected(A, B), "P": P, "P_proj": projected(P, B)}
    user_ids, item_ids = pa.array(np.arange(n) + 1000), pa.array(np.arange(p) + 5000)

    def dense(kind, qname, cname, metric):
        Q, C = mats[qname], mats[cname]
        mins = (floor * np.linalg.norm(Q.astype(np.float64), axis=1).max(),
                floor * np.linalg.norm(C.astype(np.float64), axis=1).max())
        rows = np.arange(len(Q)) if kind == "item_item" else queries_of
        kw = {"cosine_min_norm": mins, "exclude_self": kind == "item_item"}
        if kind == "user_item":
            kw.update(exclude_indptr=X[rows].indptr, exclude_indices=X[rows].indices)
        if kind == "user_user":  # each user's own row, as an exclusion mask
            kw.update(exclude_indptr=np.arange(len(rows) + 1), exclude_indices=rows.astype(np.int32))
        return topn_reference(Q[rows], C, top, metric, **kw)

    groups = plan_lists([("eq1", "symmetric")], ["cosine", "dot", "model", "projected_cosine"], ["dot", "cosine"],
                        ["cosine", "projected_cosine"])
    floored_queries = {"item_item": tiny, "user_item": [0], "user_user": [0]}
    floored_candidates = {"item_item": tiny, "user_item": tiny, "user_user": [0]}
    checked = 0
    for g in groups:
        inputs = group_inputs(client, g, A, B, user_parts, blocks, user_ids, item_ids, subset,
                              cosine_norm_floor=floor)
        if g.kind == "item_item":
            parts = [res for _, res in run_symmetric(client, inputs.candidates, p, top, tuple(g.outputs),
                                                     candidate_block=16, cosine_norm_floor=floor)]
        else:
            parts = [res for _, res in run_topn(client, inputs.queries, inputs.candidates, top, tuple(g.outputs),
                                                rows_per_task=9, candidate_block=16, scale=inputs.scale)]
        for metric in g.outputs:
            counts = np.concatenate([r[metric].counts for r in parts])
            indices = np.concatenate([r[metric].indices for r in parts])
            ref_counts, ref_indices, _ = dense(g.kind, g.queries, g.candidates, metric)
            np.testing.assert_array_equal(counts, ref_counts)
            np.testing.assert_array_equal(indices, ref_indices)
            rows = np.arange(p) if g.kind == "item_item" else queries_of
            low = np.isin(rows, floored_queries[g.kind])
            if metric == "cosine":  # by hand: the floored rows, and only they, have no list and no place in one
                assert (counts[low] == 0).all() and (counts[~low] > 0).all()
                assert not np.isin(indices, floored_candidates[g.kind]).any()
            else:
                assert (counts > 0).all()
            checked += 1
    assert checked == 8  # item_item cosine, dot, model, projected_cosine; user_item dot, cosine; user_user both
