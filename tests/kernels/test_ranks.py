"""``kernels.ranks.held_out_ranks``: the positions of held-out items in the dot-product lists, against a NumPy
reference and against the lists ``topn_blocked`` builds; ``evaluate.rank_sums`` against ``ranking_sums``."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mfsim.kernels.ranks import NOT_LISTED, held_out_ranks, held_out_ranks_reference
from mfsim.kernels.threads import on_one_thread
from mfsim.kernels.topn import topn_blocked
from mfsim.pipeline.lists.evaluate import rank_sums, ranking_sums


def _case(seed: int, q: int, p: int, k: int, ties: bool):
    """Embeddings (small integers when ``ties``: every score exact in float32 whatever the order of the sums, and
    many equal), a random exclusion CSR and held-out targets disjoint from it, one excluded target on purpose."""
    rng = np.random.default_rng(seed)
    if ties:
        Q = rng.integers(-2, 3, (q, k)).astype(np.float32)
        C = rng.integers(-2, 3, (p, k)).astype(np.float32)
    else:
        Q = rng.standard_normal((q, k)).astype(np.float32)
        C = rng.standard_normal((p, k)).astype(np.float32)
    X = sp.random(q, p, density=0.2, random_state=seed, format="csr")
    X.sort_indices()
    T = sp.random(q, p, density=0.05, random_state=seed + 1, format="csr")
    T = sp.csr_matrix(T - T.multiply(X != 0))  # held out: not among the user's own items
    T.eliminate_zeros()
    T.sort_indices()
    return Q, C, X, T


@pytest.mark.parametrize("ties", [False, True], ids=["gaussian", "integer-ties"])
@pytest.mark.parametrize("block", [4096, 37], ids=["one-block", "blocks"])
def test_ranks_are_the_positions_in_the_lists(ties, block):
    """Each target's rank is where ``topn_blocked`` lists it (score descending, ties by the smaller id), absent
    from the list exactly when rank >= N, for the dot and the cosine lists (with a norm floor that drops a few
    queries and candidates from the cosine lists); the NumPy reference gives the same dot ranks."""
    Q, C, X, T = _case(3, 70, 150, 6, ties)
    floors = tuple(float(np.quantile(np.linalg.norm(M, axis=1), 0.05)) for M in (Q, C))
    ranks = on_one_thread(held_out_ranks, Q, C, T.indptr, T.indices, metrics=("dot", "cosine"),
                          exclude_indptr=X.indptr, exclude_indices=X.indices, query_chunk=32, candidate_block=block,
                          cosine_min_norm=floors)
    if ties:  # exact scores: the reference's one matmul agrees bit for bit
        np.testing.assert_array_equal(ranks["dot"], held_out_ranks_reference(Q, C, T.indptr, T.indices, X.indptr,
                                                                             X.indices))
    n = 40
    lists = on_one_thread(topn_blocked, Q, C, n, metrics=("dot", "cosine"), exclude_indptr=X.indptr,
                          exclude_indices=X.indices, query_chunk=32, candidate_block=block, cosine_min_norm=floors)
    for metric in ("dot", "cosine"):
        top, r = lists[metric], ranks[metric]
        for u in range(Q.shape[0]):
            listed = list(top.indices[u, : top.counts[u]])
            for e in range(T.indptr[u], T.indptr[u + 1]):
                i = T.indices[e]
                assert (listed.index(i) if i in listed else None) == (r[e] if r[e] < n else None), (metric, u, i)
        assert (r < n).any() and (r >= n).any()
    assert (ranks["cosine"] == NOT_LISTED).sum() > (ranks["dot"] == NOT_LISTED).sum()  # the floors took some out


def test_an_excluded_target_is_not_listed_and_a_slice_of_a_csr_is_read_from_its_start():
    Q, C, X, T = _case(5, 20, 30, 4, ties=True)
    T = T.tolil()
    T[2, X.indices[X.indptr[2]]] = 1.0  # a target among the user's own items: in no list
    T = T.tocsr()
    ranks = held_out_ranks(Q, C, T.indptr, T.indices, exclude_indptr=X.indptr, exclude_indices=X.indices)["dot"]
    ref = held_out_ranks_reference(Q, C, T.indptr, T.indices, X.indptr, X.indices)
    np.testing.assert_array_equal(ranks, ref)
    assert (ranks == NOT_LISTED).sum() == 1
    part = held_out_ranks(Q[5:12], C, T.indptr[5:13], T.indices, exclude_indptr=X.indptr[5:13],
                          exclude_indices=X.indices)["dot"]
    np.testing.assert_array_equal(part, ref[T.indptr[5] : T.indptr[12]])


def test_rank_sums_equal_the_sums_of_the_lists():
    """``rank_sums`` from the ranks and ``ranking_sums`` from the lists: the same hits, so the same sums bit for bit
    (recall and NDCG at cutoffs below, at and above the list length; dot and cosine)."""
    Q, C, X, T = _case(7, 90, 200, 8, ties=False)
    n, cutoffs = 50, (5, 20, 50, 80)
    lists = on_one_thread(topn_blocked, Q, C, n, metrics=("dot", "cosine"), exclude_indptr=X.indptr,
                          exclude_indices=X.indices, query_chunk=64, candidate_block=4096)
    ranks = on_one_thread(held_out_ranks, Q, C, T.indptr, T.indices, metrics=("dot", "cosine"),
                          exclude_indptr=X.indptr, exclude_indices=X.indices, query_chunk=64, candidate_block=4096)
    for metric in ("dot", "cosine"):
        top = lists[metric]
        a = ranking_sums(top.indices, top.counts, T.indptr, T.indices, cutoffs)
        b = rank_sums(ranks[metric], T.indptr, T.indices, n, cutoffs)
        assert a.count == b.count > 0 and a.cutoffs == b.cutoffs
        for name in ("recall", "ndcg"):
            np.testing.assert_array_equal(a.totals[name], b.totals[name])
            np.testing.assert_array_equal(a.squares[name], b.squares[name])
        assert b.totals["recall"][0] > 0


def test_bad_input_is_one_clear_error():
    Q, C, X, T = _case(1, 5, 10, 3, ties=True)
    Q[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        held_out_ranks(Q, C, T.indptr, T.indices)
    with pytest.raises(ValueError, match="target_indices must be candidate ids"):
        held_out_ranks(C[:5], C, T.indptr, T.indices + 10)
