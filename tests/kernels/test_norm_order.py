"""Dot lists from candidates scanned in norm order, with blocks skipped by the bound ``|q . c| <= |q| |c|``
(``kernels.topn._scan``), against the dense NumPy ``topn_reference`` and the plain id-order scan.

Small-integer embeddings make every float32 gemm exact whatever its blocking, so the lists must equal the
reference bit for bit, ties (to the smaller candidate id) included, on data built to break the bound: equal
norms (nothing to skip), one candidate of huge norm, zero rows, exact ties at the N-th score, N above the
catalog, heavy exclusion lists, and random data over many seeds.
"""

from __future__ import annotations

import numpy as np
import pytest

from mfsim.kernels.topn import topn_blocked, topn_reference


def _assert_reference(queries, candidates, n, *, block=16, **kw) -> dict:
    """The norm-ordered dot lists equal the reference and the id-order scan; returns the scan's stats."""
    stats: dict = {}
    got = topn_blocked(queries, candidates, n, metrics=("dot",), candidate_block=block, query_chunk=64,
                       n_threads=1, stats=stats, **kw)["dot"]
    plain = topn_blocked(queries, candidates, n, metrics=("dot",), candidate_block=block, query_chunk=64,
                         n_threads=1, norm_order=False, **kw)["dot"]
    ref = topn_reference(queries, candidates, n, "dot", **kw)
    for a, b in ((got.counts, ref[0]), (got.indices, ref[1]), (got.scores, ref[2])):
        np.testing.assert_array_equal(a, b)
    for a, b in ((got.counts, plain.counts), (got.indices, plain.indices), (got.scores, plain.scores)):
        np.testing.assert_array_equal(a, b)
    return stats


def _power_law_integers(n_rows: int, k: int, seed: int) -> np.ndarray:
    """Small integers scaled by a per-row integer 1..12 (norms spread like popularity): exact float32 products."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (n_rows, k)) * rng.zipf(1.6, n_rows).clip(1, 12)[:, None]
    return x.astype(np.float32)


def test_spread_norms_skip_work_and_keep_the_lists():
    q, c = _power_law_integers(120, 6, 1), _power_law_integers(700, 6, 2)
    stats = _assert_reference(q, c, 10)
    assert stats["scores"] == 120 * 700
    assert stats["scores_computed"] < 0.8 * stats["scores"], stats  # the bound leaves some blocks out


def test_equal_norms_nothing_to_skip():
    rng = np.random.default_rng(3)
    c = rng.choice([-1.0, 1.0], (300, 4)).astype(np.float32)  # every norm 2: each block's bound is every row's max
    q = rng.choice([-1.0, 1.0], (50, 4)).astype(np.float32)
    _assert_reference(q, c, 7)  # norms within 10% of each other: the plain scan (topn._NORM_ORDER_MIN_SPREAD)
    c[::2] *= 2  # two levels of equal norms, 4 and 2: the ordered scan, whose blocks within a level tie
    stats = _assert_reference(q, c, 7)
    assert stats["scores_computed"] <= stats["scores"]


def test_one_huge_candidate_zero_rows_and_ties_at_the_nth_score():
    c = np.random.default_rng(4).integers(-1, 2, (400, 3)).astype(np.float32)  # 27 distinct rows: ties everywhere
    c[123] = 1000.0  # first in norm order, top of every list that likes it
    c[[5, 77, 300]] = 0.0
    q = np.random.default_rng(5).integers(-1, 2, (40, 3)).astype(np.float32)
    q[0] = 0.0  # a zero query: every score 0, ties all the way, ids ascending
    _assert_reference(q, c, 25)


def test_more_wanted_than_candidates_and_self_exclusion():
    c = _power_law_integers(60, 5, 6)
    _assert_reference(c, c, 80, query_offset=0, exclude_self=True)  # N > p - 1: every other candidate, in order
    _assert_reference(c[10:30], c, 15, query_offset=10, exclude_self=True)


def test_heavy_exclusion_lists():
    q, c = _power_law_integers(30, 5, 7), _power_law_integers(500, 5, 8)
    rng = np.random.default_rng(9)
    # the first rows exclude most of the catalog, the highest-norm candidates among them
    order = np.argsort(-np.linalg.norm(c, axis=1), kind="stable")
    rows = [np.sort(order[: 480 - 15 * r]) if r < 10 else np.sort(rng.choice(500, 20, replace=False))
            for r in range(30)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int32)
    _assert_reference(q, c, 40, exclude_indptr=indptr, exclude_indices=indices)


@pytest.mark.parametrize("seed", range(12))
def test_no_true_neighbour_is_ever_pruned(seed):
    """Random shapes, norms and list lengths: every true top-N candidate is found (the lists equal the reference)."""
    rng = np.random.default_rng(100 + seed)
    p, nq, k = int(rng.integers(50, 900)), int(rng.integers(1, 90)), int(rng.integers(1, 9))
    c, q = _power_law_integers(p, k, seed), _power_law_integers(nq, k, seed + 50)
    _assert_reference(q, c, int(rng.integers(1, 120)), block=int(rng.integers(8, 200)))
