"""Blocked top-N kernel against the dense NumPy reference, on exact and on tie-free data.

Two kinds of data:

* small-integer embeddings: every dot product is an integer far below 2^24, so every float32 gemm,
  whatever its blocking or summation order, returns it exactly; the kernel and the reference then
  see bit-identical scores and must agree bit for bit, ties included.
* gaussian embeddings built tie-free: float32 gemm results depend on the blocking, so kernel and
  reference can differ by the rounding bound below; the data is constructed so that the scores of
  different candidates for any query are further apart than twice that bound, which makes the
  order, and hence the indices, exact.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import mfsim.kernels.topn as topn_module
from mfsim.kernels.topn import (
    TopN,
    empty_state,
    finalize_state,
    floor_keys,
    inverse_norms,
    select_tile,
    tile_rows,
    topn_blocked,
    topn_reference,
)

EPS32 = float(np.finfo(np.float32).eps)


BLOCKINGS = [(7, 5), (16, 13), (64, 1000), (2048, 65536)]  # blocks below N, not dividing the counts, one tile


def _dot_tol(k: int) -> float:
    """Bound on |kernel - reference| for one dot product, relative to |q| |c|.

    A float32 sum of k products has error at most gamma_k sum |q_l c_l| <= ~k u |q||c|
    (u = eps32 / 2, Cauchy-Schwarz); two computations with different summation orders differ by at
    most twice that, k eps32 |q||c|, and the final rounding adds eps32. Doubled for slack.
    """
    return 2.0 * (k + 1) * EPS32


def _tie_free(nq: int, p: int, k: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian queries and candidates whose exact dot and cosine scores are separated per query.

    Candidates are drawn one at a time and kept only when, for every query, both exact scores
    (float64) differ from those of every kept candidate by more than twice the kernel-vs-reference
    bound: each computation then orders any two candidates as the exact scores do.
    """
    rng = np.random.default_rng(seed)
    queries = (scale * rng.standard_normal((nq, k))).astype(np.float32)
    qd = queries.astype(np.float64)
    qn = np.linalg.norm(qd, axis=1)
    kept, dots, coss, norms = [], [], [], []
    while len(kept) < p:
        c = (scale * rng.standard_normal(k)).astype(np.float32)
        cn = float(np.linalg.norm(c.astype(np.float64)))
        d = qd @ c.astype(np.float64)
        cos = d / (qn * cn)
        if kept:
            pair_norm = qn[None, :] * np.maximum(np.array(norms), cn)[:, None]  # (kept, nq)
            dot_close = np.abs(np.array(dots) - d) <= 2 * _dot_tol(k) * pair_norm
            cos_close = np.abs(np.array(coss) - cos) <= 2 * (_dot_tol(k) + 4 * EPS32)
            if dot_close.any() or cos_close.any():
                continue
        kept.append(c)
        dots.append(d)
        coss.append(cos)
        norms.append(cn)
    return queries, np.array(kept, dtype=np.float32)


def _integers(shape, seed: int, low: int = -3, high: int = 4) -> np.ndarray:
    """Small-integer float32 embeddings: exact gemm, many exact ties."""
    return np.random.default_rng(seed).integers(low, high, size=shape).astype(np.float32)


def _assert_exact(got: TopN, ref: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    counts, idx, sc = ref
    np.testing.assert_array_equal(got.counts, counts)
    np.testing.assert_array_equal(got.indices, idx)
    np.testing.assert_array_equal(got.scores, sc)


def _assert_close(got: TopN, ref, queries, candidates, metric) -> None:
    counts, idx, sc = ref
    np.testing.assert_array_equal(got.counts, counts)
    np.testing.assert_array_equal(got.indices, idx)
    k = queries.shape[1]
    real = idx >= 0
    if metric == "dot":
        qn = np.linalg.norm(queries.astype(np.float64), axis=1)
        cn = np.linalg.norm(candidates.astype(np.float64), axis=1)
        bound = _dot_tol(k) * qn[:, None] * cn[np.where(real, idx, 0)]
    else:
        bound = np.full(idx.shape, _dot_tol(k) + 4 * EPS32)  # + the two multiplications by 1/|q|, 1/|c|
    assert np.all(np.abs(got.scores[real] - sc[real]) <= bound[real])
    assert np.all(np.isneginf(got.scores[~real]))


# ---------------------------------------------------------------------------------------------
# against the reference


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("blocking", BLOCKINGS)
@pytest.mark.parametrize("n", [1, 10, 500])
def test_tie_free_gaussian_matches_reference(metric, blocking, n, seeding):
    queries, candidates = _tie_free(23, 150, 16, seed=1)
    got = topn_blocked(queries, candidates, n, metrics=(metric,), query_chunk=blocking[0], candidate_block=blocking[1])
    assert set(got) == {metric}
    _assert_close(got[metric], topn_reference(queries, candidates, n, metric), queries, candidates, metric)
    assert got[metric].indices.dtype == np.int32 and got[metric].scores.dtype == np.float32
    expected_counts = np.full(23, min(n, 150))
    np.testing.assert_array_equal(got[metric].counts, expected_counts)


@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_fused_call_equals_one_metric_calls(blocking):
    queries, candidates = _tie_free(19, 120, 8, seed=2)
    qc, cb = blocking
    both = topn_blocked(queries, candidates, 17, query_chunk=qc, candidate_block=cb)
    for metric in ("dot", "cosine"):
        alone = topn_blocked(queries, candidates, 17, metrics=[metric], query_chunk=qc, candidate_block=cb)[metric]
        # same gemm tiles, separate running states: bit-identical lists
        for a, b in zip(both[metric], alone):
            np.testing.assert_array_equal(a, b)


def test_cosine_equals_dot_of_normalised_vectors():
    queries, candidates = _tie_free(31, 140, 12, seed=3, scale=3.0)
    got = topn_blocked(queries, candidates, 20, metrics=("cosine",), query_chunk=9, candidate_block=37)["cosine"]

    def unit(x):
        x = x.astype(np.float64)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    dot = topn_blocked(unit(queries), unit(candidates), 20, metrics=("dot",), query_chunk=9, candidate_block=37)["dot"]
    np.testing.assert_array_equal(got.indices, dot.indices)
    np.testing.assert_array_equal(got.counts, dot.counts)
    # each side is within ~(k + 2) eps32 / 2 of the exact cosine: the gemm's k u, plus two roundings
    # (the multiplications by 1/|q|, 1/|c| here; the coordinates' rounding to unit length there)
    assert np.max(np.abs(got.scores - dot.scores)) <= 2 * _dot_tol(12) + 2 * EPS32


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_exact_ties_go_to_smaller_index_for_any_blocking(metric, blocking, seeding):
    queries = _integers((40, 3), seed=4)
    base = _integers((60, 3), seed=5)
    # duplicated candidate rows (3 copies of rows 0..9, far apart) give exact ties
    candidates = np.vstack([base, base[:10], base[:10]])
    got = topn_blocked(queries, candidates, 25, metrics=(metric,), query_chunk=blocking[0], candidate_block=blocking[1])
    ref = topn_reference(queries, candidates, 25, metric)
    _assert_exact(got[metric], ref)
    # by hand: wherever copies j, j + 60, j + 70 are all listed they come in that order
    for row in got[metric].indices:
        pos = {int(v): i for i, v in enumerate(row) if v >= 0}
        for j in range(10):
            listed = [pos[c] for c in (j, j + 60, j + 70) if c in pos]
            assert listed == sorted(listed)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("n", [12, 100])
def test_zero_rows(metric, n, seeding):
    queries = _integers((30, 4), seed=6)
    candidates = _integers((150, 4), seed=7)
    queries[[0, 7, 29]] = 0
    candidates[[0, 3, 70, 149]] = 0
    got = topn_blocked(queries, candidates, n, metrics=(metric,), query_chunk=8, candidate_block=75)[metric]
    _assert_exact(got, topn_reference(queries, candidates, n, metric))
    assert not np.isnan(got.scores).any()
    if metric == "cosine":
        assert np.all(got.counts[[0, 7, 29]] == 0)
        assert not np.isin(got.indices, [0, 3, 70, 149]).any()
        if n == 100:
            assert np.all(np.delete(got.counts, [0, 7, 29]) == 100)  # 146 non-zero candidates
    else:
        # a zero query scores 0 with every candidate: the n smallest ids
        np.testing.assert_array_equal(got.indices[0], np.arange(n))


def _tiny_rows(x: np.ndarray, rows: list[int]) -> np.ndarray:
    """``x`` with ``rows`` scaled by 2^-12: exact in float32, so every gemm stays exact (multiples of 2^-24)."""
    x = x.copy()
    x[rows] *= np.float32(2.0**-12)
    return x


@pytest.mark.parametrize("blocking", BLOCKINGS)
@pytest.mark.parametrize("n", [12, 100])
def test_cosine_norm_floor(blocking, n, seeding):
    """Rows whose norm is below ``cosine_min_norm`` take no part in cosine lists, exactly as zero rows; dot lists
    are unaffected. Against the dense reference and by hand: integer rows have norm >= 1, the scaled rows at most
    sqrt(4 x 9) 2^-12 < 1.5e-3, so a floor of 0.01 removes exactly the scaled rows."""
    small_q, small_c = [1, 8, 29], [2, 5, 71, 148]
    queries = _tiny_rows(_integers((30, 4), seed=23), small_q)
    candidates = _tiny_rows(_integers((150, 4), seed=24), small_c)
    floors = (0.01, 0.01)
    got = topn_blocked(queries, candidates, n, query_chunk=blocking[0], candidate_block=blocking[1],
                       cosine_min_norm=floors)
    _assert_exact(got["cosine"], topn_reference(queries, candidates, n, "cosine", cosine_min_norm=floors))
    nonzero = np.linalg.norm(queries, axis=1) > 0
    assert np.all(got["cosine"].counts[small_q] == 0)
    assert not np.isin(got["cosine"].indices, small_c).any()
    kept = np.setdiff1d(np.flatnonzero(nonzero), small_q)
    expected = min(n, 150 - len(small_c) - int((np.linalg.norm(candidates, axis=1) == 0).sum()))
    assert np.all(got["cosine"].counts[kept] == expected)
    # the same lists as a cosine with those rows zeroed; the dot lists as without a floor
    q0, c0 = queries.copy(), candidates.copy()
    q0[small_q], c0[small_c] = 0, 0
    zeroed = topn_blocked(q0, c0, n, metrics=("cosine",))["cosine"]
    _assert_exact(got["cosine"], (zeroed.counts, zeroed.indices, zeroed.scores))
    plain = topn_blocked(queries, candidates, n, query_chunk=blocking[0], candidate_block=blocking[1])
    for a, b in zip(got["dot"], plain["dot"]):
        np.testing.assert_array_equal(a, b)
    # one floor per side: only the candidates' floor leaves the small queries their lists
    cand_only = topn_blocked(queries, candidates, n, metrics=("cosine",), cosine_min_norm=(0.0, 0.01))["cosine"]
    _assert_exact(cand_only, topn_reference(queries, candidates, n, "cosine", cosine_min_norm=(0.0, 0.01)))
    assert np.all(cand_only.counts[small_q] == expected)


def test_cosine_norm_floor_of_the_symmetric_driver(seeding):
    """``topn_symmetric(E, cosine_min_norm=m)`` equals ``topn_blocked(E, E, exclude_self, (m, m))`` bit for bit."""
    from mfsim.kernels.topn import topn_symmetric

    e = _tiny_rows(_integers((300, 5), seed=25), [0, 7, 150, 299])
    got = topn_symmetric(e, 20, tile=64, n_threads=2, cosine_min_norm=0.01)
    ref = topn_blocked(e, e, 20, exclude_self=True, cosine_min_norm=(0.01, 0.01))
    for m in ("dot", "cosine"):
        for a, b in zip(got[m], ref[m]):
            np.testing.assert_array_equal(a, b)
    assert np.all(got["cosine"].counts[[0, 7, 150, 299]] == 0)
    assert not np.isin(got["cosine"].indices, [0, 7, 150, 299]).any()


@pytest.mark.parametrize("bad", [(-1.0, 0.0), (0.0, np.nan), (0.1,), "x"])
def test_cosine_norm_floor_errors(bad):
    x = _integers((6, 3), seed=26)
    with pytest.raises(ValueError, match="cosine_min_norm"):
        topn_blocked(x, x, 3, cosine_min_norm=bad)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_exclusion_mask(metric, seeding):
    rng = np.random.default_rng(8)
    queries = _integers((25, 5), seed=9)
    candidates = _integers((70, 5), seed=10)
    # a larger CSR whose rows 3..27 are the queries' masks: empty rows, unsorted ids, a full row
    sizes = rng.integers(0, 12, size=40)
    sizes[[3, 10, 11]] = 0
    rows = [rng.choice(70, size=s, replace=False).astype(np.int32) for s in sizes]
    rows[20] = np.arange(70, dtype=np.int32)[::-1].copy()
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int32)
    sub_ptr = indptr[3:29]  # query r is row 3 + r
    kept = indices.copy()
    got = topn_blocked(
        queries, candidates, 15, metrics=(metric,), exclude_indptr=sub_ptr, exclude_indices=indices,
        query_chunk=6, candidate_block=16,
    )[metric]
    ref = topn_reference(
        queries, candidates, 15, metric, exclude_indptr=sub_ptr - sub_ptr[0], exclude_indices=indices[sub_ptr[0] :]
    )
    _assert_exact(got, ref)
    np.testing.assert_array_equal(indices, kept)  # the caller's arrays are not sorted in place
    for r in range(25):
        banned = indices[sub_ptr[r] : sub_ptr[r + 1]]
        assert not np.isin(got.indices[r, : got.counts[r]], banned).any()
    assert got.counts[17] == 0  # row 20 of the larger CSR excludes every candidate


@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_exclude_self(blocking, seeding):
    candidates = _integers((80, 3), seed=11)
    candidates[40] = candidates[41]  # a duplicate of the query is still a neighbour, only self goes
    candidates[60] = 0
    offset, nq = 33, 30
    got = topn_blocked(
        candidates[offset : offset + nq], candidates, 10, query_offset=offset, exclude_self=True,
        query_chunk=blocking[0], candidate_block=blocking[1],
    )
    for metric in ("dot", "cosine"):
        ref = topn_reference(
            candidates[offset : offset + nq], candidates, 10, metric, query_offset=offset, exclude_self=True
        )
        _assert_exact(got[metric], ref)
        assert not np.any(got[metric].indices == np.arange(offset, offset + nq)[:, None])
    assert 40 in got["cosine"].indices[41 - offset]


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_rank_one(metric, seeding):
    # k = 1: cosine is +-1 for every pair, all ties
    queries = _integers((12, 1), seed=12)
    candidates = _integers((33, 1), seed=13)
    got = topn_blocked(queries, candidates, 9, metrics=(metric,), query_chunk=5, candidate_block=4)[metric]
    _assert_exact(got, topn_reference(queries, candidates, 9, metric))


def test_n_larger_than_candidates_pads():
    candidates = _integers((9, 4), seed=15)
    got = topn_blocked(candidates[:6], candidates, 20, query_offset=0, exclude_self=True, candidate_block=4)
    for metric in ("dot", "cosine"):
        _assert_exact(got[metric], topn_reference(candidates[:6], candidates, 20, metric, exclude_self=True))
    assert got["dot"].indices.shape == (6, 20)
    np.testing.assert_array_equal(got["dot"].counts, 8)
    assert np.all(got["dot"].indices[:, 8:] == -1) and np.all(np.isneginf(got["dot"].scores[:, 8:]))


def test_adversarial_orders_every_candidate_enters():
    # scores rising with the candidate id: every candidate replaces the heap root
    queries = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    candidates = np.stack([np.arange(500), np.zeros(500)], axis=1).astype(np.float32)
    got = topn_blocked(queries, candidates, 7, metrics=("dot",), candidate_block=64)["dot"]
    np.testing.assert_array_equal(got.indices[0], np.arange(499, 492, -1))
    np.testing.assert_array_equal(got.indices[1], np.arange(7))
    np.testing.assert_array_equal(got.indices[2], np.arange(7))  # all scores 0: smallest ids
    np.testing.assert_array_equal(got.scores[0], np.arange(499, 492, -1).astype(np.float32))


@pytest.mark.parametrize("block", [10, 70, 128])
def test_block_order_does_not_matter(block):
    """Merging the candidate blocks in reverse order gives the same lists, ties included.

    Reversed, a candidate tying the current N-th best arrives with a smaller index and must enter;
    blocks of 70 and 128 send it through the vectorised run test (runs of 64) as well.
    """
    queries = _integers((20, 3), seed=16)
    candidates = np.vstack([_integers((90, 3), seed=17)] * 3)
    qinv, cinv = inverse_norms(queries), inverse_norms(candidates)
    no_self = np.full(20, -1, dtype=np.int64)
    no_ex = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32))
    dot, cos = empty_state(20, 8), empty_state(20, 8)
    for c0 in reversed(range(0, 270, block)):
        c1 = min(c0 + block, 270)
        tile = queries @ candidates[c0:c1].T
        select_tile(tile, c0, no_self, qinv, cinv[c0:c1], *no_ex, *dot, *cos)
    for state, metric in ((dot, "dot"), (cos, "cosine")):
        counts, idx, sc = finalize_state(*state)
        ref = topn_reference(queries, candidates, 8, metric)
        np.testing.assert_array_equal(counts, ref[0])
        np.testing.assert_array_equal(idx, ref[1])
        np.testing.assert_array_equal(sc, ref[2])


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_reverse_order_all_equal_scores_by_hand(metric):
    """300 identical candidates seen last block first: the 8 smallest ids must displace the others.

    Every run of 64 holds only candidates tying the current N-th best, so only the ``>=`` of the
    vectorised run test lets them in (one metric at a time, so the other cannot open the run).
    """
    queries = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    candidates = np.ones((300, 2), dtype=np.float32)
    qinv, cinv = inverse_norms(queries), inverse_norms(candidates)
    on, off = empty_state(2, 8), empty_state(0, 8)
    states = (on, off) if metric == "dot" else (off, on)
    for c0 in (256, 128, 0):
        tile = queries @ candidates[c0 : c0 + 128].T
        select_tile(tile, c0, np.full(2, -1, dtype=np.int64), qinv, cinv[c0 : c0 + 128],
                    np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32), *states[0], *states[1])
    counts, idx, sc = finalize_state(*on)
    np.testing.assert_array_equal(counts, [8, 8])
    np.testing.assert_array_equal(idx, np.tile(np.arange(8), (2, 1)))
    expected = [1.0, 2.0] if metric == "dot" else [(np.float32(1.0) * qinv[0]) * cinv[0]] * 2
    np.testing.assert_array_equal(sc[:, 0], np.array(expected, dtype=np.float32))


def _seed_redo_data():
    """Every 3rd candidate (the seeding sample) scores far above the rest for every query."""
    rng = np.random.default_rng(22)
    queries = rng.standard_normal((12, 5)).astype(np.float32)
    queries[:, 0] = 5 + np.abs(queries[:, 0])
    candidates = rng.standard_normal((150, 5)).astype(np.float32)
    candidates[::3, 0] += 10
    return queries, candidates


def test_seed_floor_too_high_rows_are_recomputed(monkeypatch):
    # sample of 50 (every 3rd), n = 30, seed width ceil(2 * 30 / 3) + 3 = 23 < 30: the floor is the
    # 23rd best sample score, above all but 23 candidates, so every row must be redone
    monkeypatch.setattr(topn_module, "_SEED_STRIDE", 3)
    monkeypatch.setattr(topn_module, "_SEED_MIN_SAMPLE", 1)
    scans = []
    real_scan = topn_module._scan

    def counting_scan(rows, cands, n, want, buf, floors=None, stats=None):
        scans.append((rows.q.shape[0], cands.c.shape[0], n))
        return real_scan(rows, cands, n, want, buf, floors, stats)

    monkeypatch.setattr(topn_module, "_scan", counting_scan)
    queries, candidates = _seed_redo_data()
    indptr = np.array([0, 0, 3, 3, 40, 41, 41, 41, 41, 41, 41, 41, 45], dtype=np.int64)
    indices = np.random.default_rng(23).integers(0, 150, size=45).astype(np.int32)
    for r in range(12):  # sorted, distinct ids within each row
        row = np.unique(indices[indptr[r] : indptr[r + 1]])
        indices[indptr[r] : indptr[r] + row.size] = row
        indices[indptr[r] + row.size : indptr[r + 1]] = row[-1] if row.size else 0
    got = topn_blocked(queries, candidates, 30, exclude_indptr=indptr, exclude_indices=indices, n_threads=1)
    assert scans == [(12, 50, 23), (12, 150, 30), (12, 150, 30)]  # sample, floored pass, redo of all rows
    for metric in ("dot", "cosine"):
        ref = topn_reference(queries, candidates, 30, metric, exclude_indptr=indptr, exclude_indices=indices)
        np.testing.assert_array_equal(got[metric].counts, ref[0])
        np.testing.assert_array_equal(got[metric].indices, ref[1])


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_threads_give_the_same_lists(n_threads, seeding):
    queries = _integers((50, 4), seed=24)
    candidates = _integers((200, 4), seed=25)
    got = topn_blocked(queries, candidates, 15, query_chunk=16, candidate_block=70, n_threads=n_threads)
    for metric in ("dot", "cosine"):
        _assert_exact(got[metric], topn_reference(queries, candidates, 15, metric))


def test_tile_rows_by_hand():
    # 2 threads share 2048 rows; a 4096-wide tile of 4 MiB holds 4 MiB / (4 x 4096) = 256 rows
    assert tile_rows(100_000, 2048, 4096, 2) == 256
    assert tile_rows(100_000, 2048, 1024, 2) == 1024  # 1024 x 1024 x 4 = 4 MiB
    assert tile_rows(100_000, 2048, 65536, 2) == 256  # never below 256 rows
    assert tile_rows(100_000, 300, 4096, 2) == 150  # the thread's share of query_chunk
    assert tile_rows(7, 2048, 4096, 2) == 4  # small inputs still split over the threads


def _keys(scores, ids):
    """Keys of (score, id) pairs built by the kernel's own ``_key``, element by element."""
    from mfsim.kernels.select import _key

    return np.array([_key(np.float32(s), int(i)) for s, i in zip(scores, ids)], dtype=np.int64)


def test_keys_order_pairs_as_the_lists_do():
    """Smaller key first <=> higher score, then smaller id; -0.0 ties 0.0; a floor's threshold admits its own score
    with any id and nothing below; the scores come back bit for bit."""
    from mfsim.kernels.select import _NO_THRESHOLD, threshold_scores

    scores = np.float32([3.5, 3.5, 0.0, -0.0, -1e-30, -2.0, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                         1e-45, 7.0])
    ids = np.array([4, 2, 9, 1, 0, 5, 3, 8, 7, 2**31 - 1])
    keys = _keys(scores, ids)
    want = np.lexsort((ids, -(scores + np.float32(0.0))))
    np.testing.assert_array_equal(np.argsort(keys, kind="stable"), want)
    assert len(set(keys)) == len(keys)
    floor = floor_keys(np.float32([3.5, -np.inf]))
    assert floor[1] == _NO_THRESHOLD
    np.testing.assert_array_equal(keys < floor[0], scores >= 3.5)
    assert np.all(keys < floor[1])
    np.testing.assert_array_equal(threshold_scores(keys), scores + np.float32(0.0))
    np.testing.assert_array_equal(threshold_scores(floor), np.float32([3.5, -np.inf]))


def test_finalize_state_by_hand():
    """Buffers of 2 N = 8 keys filled up to ``fill``: slots past the fill (here keys that would top every list) are
    left out, a buffer holding more than N keeps its N best, -0.0 ties 0.0 and is reported as 0.0."""
    keys, thresholds, fill = empty_state(3, 4)
    junk = _keys([9.0] * 8, range(8))
    keys[:] = junk
    keys[0, :3] = _keys([1.0, 3.0, 3.0], [5, 9, 2])
    keys[2, :6] = _keys([0.0, -0.0, 0.0, 2.0, 5.0, -1.0], [7, 3, 5, 8, 4, 0])
    fill[:] = [3, 0, 6]
    counts, idx, sc = finalize_state(keys, thresholds, fill)
    np.testing.assert_array_equal(counts, [3, 0, 4])
    np.testing.assert_array_equal(idx, [[2, 9, 5, -1], [-1] * 4, [4, 8, 3, 5]])
    np.testing.assert_array_equal(sc, [[3.0, 3.0, 1.0, -np.inf], [-np.inf] * 4, [5.0, 2.0, 0.0, 0.0]])
    assert not np.signbit(sc[2, 2:]).any()


@pytest.mark.parametrize("n", [1, 3, 8, 40, 300])
def test_select_tile_batches_equal_a_sort_of_every_admissible_candidate(n):
    """``select_tile`` appends candidates ranking before a row's threshold to its buffer and keeps the N best of a
    full buffer (2 N slots; rising scores fill it every N candidates): over several tiles, with ties (-0.0 among
    them), floors, the query itself and exclusions, each row's list is the N best admissible candidates by
    (score desc, index asc), as a plain NumPy sort of all of them gives it."""
    rng = np.random.default_rng(n)
    q, p = 37, 2000
    scores = rng.integers(-6, 7, (q, p)).astype(np.float32) / 2  # ~25 distinct values: ties everywhere
    scores[scores == 0] = rng.choice(np.float32([0.0, -0.0]), int((scores == 0).sum()))
    scores[5] = np.arange(p, dtype=np.float32)  # rising: every candidate beats the threshold
    scores[6] = -np.arange(p, dtype=np.float32)
    self_ids = np.where(np.arange(q) % 3 == 0, np.arange(q) * 7, -1).astype(np.int64)
    ex = [np.sort(rng.choice(p, int(rng.integers(0, 50)), replace=False)) for _ in range(q)]
    ex_indptr = np.concatenate([[0], np.cumsum([len(e) for e in ex])]).astype(np.int64)
    ex_indices = np.concatenate(ex).astype(np.int32)
    floors = np.where(np.arange(q) % 4 == 1, np.float32(1.0), np.float32(-np.inf))
    dot = empty_state(q, n)
    dot[1][:] = floor_keys(floors)
    off = empty_state(0, n)
    qinv, cinv = np.zeros(q, np.float32), np.zeros(p, np.float32)
    for c0, c1 in ((0, 700), (700, 701), (701, 2000)):  # tiles of several widths, one of a single candidate
        select_tile(np.ascontiguousarray(scores[:, c0:c1]), c0, self_ids, qinv, cinv[c0:c1], ex_indptr, ex_indices,
                    *dot, *off)
    counts, idx, sc = finalize_state(*dot)
    for r in range(q):
        keep = np.ones(p, bool)
        keep[ex[r]] = False
        if self_ids[r] >= 0:
            keep[self_ids[r]] = False
        keep &= scores[r] >= floors[r]
        ids = np.flatnonzero(keep)
        order = np.lexsort((ids, -(scores[r, ids] + np.float32(0.0))))[:n]
        want = ids[order]
        assert counts[r] == len(want)
        np.testing.assert_array_equal(idx[r, :len(want)], want)
        np.testing.assert_array_equal(sc[r, :len(want)], scores[r, want] + np.float32(0.0))
        assert np.all(idx[r, len(want):] == -1)


@pytest.mark.parametrize("seed", range(6))
def test_keep_smallest_puts_the_k_smallest_keys_first(seed):
    """The buffer's quickselect (``select._keep_smallest``) against a sort, for any k and fill: the first k keys
    are the k smallest, the k-th smallest at k - 1, and the keys past the fill stay put."""
    from mfsim.kernels.select import _keep_smallest

    rng = np.random.default_rng(seed)
    m = int(rng.integers(2, 300))
    keys = rng.choice(2**62, m, replace=False).astype(np.int64)
    end = int(rng.integers(1, m + 1))
    for k in sorted({1, end, int(rng.integers(1, end + 1))}):
        got = keys.copy()
        _keep_smallest(got, end, k)
        want = np.sort(keys[:end])
        np.testing.assert_array_equal(np.sort(got[:k]), want[:k])
        assert got[k - 1] == want[k - 1]
        np.testing.assert_array_equal(np.sort(got[:end]), want)
        np.testing.assert_array_equal(got[end:], keys[end:])


def test_tighten_state_makes_the_threshold_the_nth_best_and_keeps_the_lists():
    """Rows holding N or more keys are cut to their N best, the N-th best their threshold; a row with fewer keeps
    its threshold (the floor); the lists do not change."""
    from mfsim.kernels.select import tighten_state

    rng = np.random.default_rng(3)
    n = 6
    keys, thresholds, fill = empty_state(4, n)
    thresholds[:] = floor_keys(np.float32([-np.inf, 0.5, -np.inf, -1.0]))
    for r, count in enumerate([11, 3, 6, 7]):  # > N, < N, = N, > N
        keys[r, :count] = _keys(rng.integers(1, 4, count), rng.permutation(50)[:count])
        fill[r] = count
    before = finalize_state(keys, thresholds, fill)
    floor = thresholds.copy()
    tighten_state(keys, thresholds, fill)
    np.testing.assert_array_equal(fill, [n, 3, n, n])
    for part_before, part_after in zip(before, finalize_state(keys, thresholds, fill)):
        np.testing.assert_array_equal(part_before, part_after)
    for r in (0, 2, 3):  # the threshold is the sixth of the sorted list
        np.testing.assert_array_equal(thresholds[r], _keys([before[2][r, n - 1]], [before[1][r, n - 1]])[0])
    assert thresholds[1] == floor[1]


def test_sample_rows_map_ids_to_sample_columns():
    """The seeding sample (every 3rd candidate) sees self and exclusions in its own column numbers."""
    rows = topn_module._QueryRows(
        q=np.zeros((3, 2), dtype=np.float32),
        qinv=np.zeros(3, dtype=np.float32),
        self_ids=np.array([6, 7, -1], dtype=np.int64),
        ex_indptr=np.array([0, 4, 4, 7], dtype=np.int64),
        ex_indices=np.array([0, 2, 3, 9, 1, 6, 12], dtype=np.int32),
    )
    sampled = rows.sampled(3)
    np.testing.assert_array_equal(sampled.self_ids, [2, -1, -1])  # 6 = column 2; 7 is not sampled
    np.testing.assert_array_equal(sampled.ex_indptr, [0, 3, 3, 5])
    np.testing.assert_array_equal(sampled.ex_indices, [0, 1, 3, 2, 4])  # ids 0, 3, 9 | - | 6, 12
    sub = rows.subset(np.array([0, 2]))
    np.testing.assert_array_equal(sub.ex_indptr, [0, 4, 7])
    np.testing.assert_array_equal(sub.ex_indices, [0, 2, 3, 9, 1, 6, 12])
    np.testing.assert_array_equal(sub.self_ids, [6, -1])
    sub = rows.subset(np.array([2]))
    np.testing.assert_array_equal(sub.ex_indptr, [0, 3])
    np.testing.assert_array_equal(sub.ex_indices, [1, 6, 12])


def test_float64_input_is_cast():
    queries, candidates = _tie_free(10, 60, 6, seed=18)
    a = topn_blocked(queries.astype(np.float64), candidates.astype(np.float64), 5, candidate_block=7)
    b = topn_blocked(queries, candidates, 5, candidate_block=7)
    for metric in ("dot", "cosine"):
        for x, y in zip(a[metric], b[metric]):
            np.testing.assert_array_equal(x, y)


def test_empty_queries_and_candidates():
    x = _integers((5, 3), seed=19)
    none = topn_blocked(x[:0], x, 4)
    assert none["dot"].indices.shape == (0, 4) and none["cosine"].counts.shape == (0,)
    empty = topn_blocked(x, x[:0], 4)
    np.testing.assert_array_equal(empty["dot"].counts, 0)
    assert np.all(empty["cosine"].indices == -1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metrics": ("dot", "euclid")}, "metrics"),
        ({"metrics": ()}, "metrics"),
        ({"exclude_indptr": np.zeros(3, dtype=np.int64)}, "go together"),
        (
            {"exclude_indptr": np.zeros(3, dtype=np.int64), "exclude_indices": np.zeros(0, np.int32)},
            "one entry per query",
        ),
        ({"exclude_indptr": np.array([0, 2, 1, 3, 3, 3]), "exclude_indices": np.zeros(3, np.int32)}, "non-decreasing"),
        ({"exclude_indptr": np.array([0, 1, 1, 1, 1, 1]), "exclude_indices": np.array([9], np.int32)}, r"\[0, 6\)"),
        ({"exclude_self": True, "query_offset": 3}, "query_offset"),
        ({"query_chunk": 0}, "query_chunk"),
    ],
)
def test_user_errors(kwargs, match):
    x = _integers((6, 3), seed=20)
    with pytest.raises(ValueError, match=match):
        topn_blocked(x[:5], x, 3, **kwargs)


def test_shape_and_value_errors():
    x = _integers((6, 3), seed=21)
    with pytest.raises(ValueError, match="same rank"):
        topn_blocked(x, x[:, :2], 3)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        topn_blocked(bad, x, 3)
    with pytest.raises(ValueError, match="n \\(the list length\\)"):
        topn_blocked(x, x, 0)
    with pytest.raises(TypeError, match="must hold real numbers"):
        topn_blocked(x.astype(np.complex64), x, 3)
    with pytest.raises(ValueError, match="2-D array"):
        topn_blocked(x[0], x, 3)


def test_reference_refuses_unknown_metric():
    x = _integers((4, 3), seed=22)
    with pytest.raises(ValueError, match="metric must be one of dot, cosine"):
        topn_reference(x, x, 2, "euclid")


def test_scores_that_could_overflow_float32_are_refused():
    # rows of norm ~1e20 are finite in float32, but their dot products (~1e40) are not
    q = np.full((3, 4), 5e19, np.float32)
    with pytest.raises(ValueError, match="overflow float32"):
        topn_blocked(q, q, 2)


def test_kernels_import_nothing_from_pipeline_or_jobs():
    """Layering: kernels work on plain arrays and raise ValueError/TypeError, never MfsimError."""
    code = (
        "import sys, mfsim.kernels.topn, mfsim.kernels.select, mfsim.kernels.sparse, mfsim.kernels.coo; "
        "print(sorted(m for m in sys.modules if m.startswith(('mfsim.pipeline', 'mfsim.jobs'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("seed", range(8))
def test_merged_partial_states_equal_one_scan(seed):
    """Partial states over disjoint slices of the candidates, each from the same floors, packed and merged
    (``merge_states``, as the item-item pair tasks' partials are) give the lists of one scan over all of them:
    ties everywhere, a floor on some rows (one too high for a few of them: those rows come out short in both),
    slices of every size down to one candidate."""
    from mfsim.kernels.topn import METRICS, merge_states, pack_states, seeded_state

    rng = np.random.default_rng(seed)
    q, p, n = 23, 500, int(rng.integers(1, 40))
    queries, candidates = _integers((q, 3), seed=100 + seed), _integers((p, 3), seed=200 + seed)
    qinv, cinv = inverse_norms(queries), inverse_norms(candidates)
    scores = queries @ candidates.T
    floors = {m: np.where(rng.random(q) < 0.5, np.float32(rng.integers(-3, 4)), np.float32(-np.inf))
              for m in METRICS}
    want = {m: True for m in METRICS}
    no_self, no_ex = np.full(q, -1, dtype=np.int64), (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32))
    one = seeded_state(q, n, want, floors)
    select_tile(scores, 0, no_self, qinv, cinv, *no_ex, *one)
    cuts = np.unique(np.concatenate([[0, p], rng.integers(0, p, int(rng.integers(1, 12)))]))
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        part = seeded_state(q, n, want, floors)
        select_tile(np.ascontiguousarray(scores[:, a:b]), int(a), no_self, qinv, cinv[a:b], *no_ex, *part)
        parts.append(pack_states(part))
    merged = merge_states(seeded_state(q, n, want, floors), parts[: len(parts) // 2])
    merged = merge_states(seeded_state(q, n, want, floors), [pack_states(merged), *parts[len(parts) // 2:]])
    for i in (0, 3):
        for got, ref in zip(finalize_state(*merged[i:i + 3]), finalize_state(*one[i:i + 3])):
            np.testing.assert_array_equal(got, ref)
