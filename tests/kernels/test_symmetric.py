"""Item-item top-N from half the gemm (``topn_symmetric``, ``run_symmetric``) against the full kernel and NumPy.

On small-integer embeddings every float32 gemm is exact whatever its blocking, so the symmetric
lists must equal ``topn_blocked(E, E, exclude_self=True)`` and the dense ``topn_reference`` bit for
bit, ties (to the smaller index) included. Zero rows get no cosine neighbours and are no one's.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mfsim.kernels.select import (
    empty_state,
    finalize_state,
    floor_keys,
    inverse_norms,
    pack_state,
    select_tile,
    select_tile_columns,
)
from mfsim.kernels.topn import topn_blocked, topn_reference, topn_symmetric, tournament
from mfsim.pipeline.lists.neighbours import run_symmetric, symmetric_blocks


def _integers(p: int, k: int, seed: int, zero_rows=(3, 17)) -> np.ndarray:
    e = np.random.default_rng(seed).integers(-2, 3, (p, k)).astype(np.float32)  # few values: many exact ties
    e[[r for r in zero_rows if r < p]] = 0
    return e


def _assert_equal(got, ref) -> None:
    """``got`` a TopN, ``ref`` a TopN or (counts, indices, scores)."""
    counts, idx, sc = (ref.counts, ref.indices, ref.scores) if hasattr(ref, "counts") else ref
    np.testing.assert_array_equal(got.counts, counts)
    np.testing.assert_array_equal(got.indices, idx)
    np.testing.assert_array_equal(got.scores, sc)


def test_tournament_pairs_every_block_once_disjoint_per_round():
    for m in range(0, 12):
        rounds = tournament(m)
        seen = [pair for rnd in rounds for pair in rnd]
        assert sorted(seen) == sorted(itertools.combinations_with_replacement(range(m), 2))
        for rnd in rounds:
            blocks = [b for u, v in rnd for b in ({u, v})]
            assert len(blocks) == len(set(blocks))  # a block at most once per round


@pytest.mark.parametrize("n_cols", [70, 1100], ids=["one-strip", "three-strips"])
def test_columns_kernel_equals_rows_kernel_on_the_transpose(n_cols):
    """1100 columns: strips of 512, 512 and 76 (``select._STRIP``), the last with a partial run of 12 columns."""
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(-3, 4, (150, 6)).astype(np.float32), rng.integers(-3, 4, (n_cols, 6)).astype(np.float32)
    cols[5] = 0
    rows[7] = 0  # a zero-norm candidate: in no cosine list
    tile = rows @ cols.T
    qinv, cinv = inverse_norms(cols), inverse_norms(rows)
    none = np.full(n_cols, -1, dtype=np.int64)
    want = [empty_state(n_cols, 9) + empty_state(n_cols, 9), empty_state(n_cols, 9) + empty_state(n_cols, 9)]
    for st in want:  # a floor on some rows, as the seeded states have
        st[1][::4] = floor_keys(np.ones(1, dtype=np.float32))[0]
    select_tile(np.ascontiguousarray(tile.T), 1000, none, qinv, cinv, np.zeros(0, np.int64), np.zeros(0, np.int32),
                *want[0])
    select_tile_columns(tile, 1000, qinv, cinv, *want[1])
    for m in (0, 3):  # the buffers themselves, slot for slot up to each row's fill, their thresholds and fills
        for a, b in zip(pack_state(*want[0][m:m + 3]), pack_state(*want[1][m:m + 3])):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(want[0][m + 1], want[1][m + 1])
    for m in (0, 3):
        np.testing.assert_array_equal(finalize_state(*want[0][m:m + 3])[1], finalize_state(*want[1][m:m + 3])[1])


@pytest.mark.parametrize("p, tile, n", [(1, 4, 3), (40, 7, 5), (300, 64, 20), (301, 1024, 100), (500, 33, 600)])
def test_equals_full_kernel_and_reference_on_exact_data(p, tile, n, seeding):
    e = _integers(p, 5, seed=p)
    for metrics in (("dot", "cosine"), ("cosine",), ("dot",)):
        got = topn_symmetric(e, n, metrics=metrics, tile=tile, n_threads=2)
        full = topn_blocked(e, e, n, metrics=metrics, exclude_self=True, candidate_block=37)
        assert list(got) == list(metrics)
        for m in metrics:
            _assert_equal(got[m], full[m])
            _assert_equal(got[m], topn_reference(e, e, n, m, exclude_self=True))
    if p > 17:  # zero rows: no cosine list, in no one's cosine list, still in dot lists
        cos = topn_symmetric(e, n, metrics="cosine", tile=tile)["cosine"]
        assert cos.counts[3] == 0 and cos.counts[17] == 0 and not np.isin(cos.indices, [3, 17]).any()


@pytest.mark.parametrize("n_threads", [2, 3])
def test_threads_and_tiles_give_the_same_lists(n_threads, seeding):
    """Threads split the tiles, never a score: bit for bit the one-thread lists of the same tile size. Another
    tile size gives each score from an sgemm of another shape, and OpenBLAS's result for one entry can depend
    on the call's shape (its Haswell kernels, seen on AMD EPYC: 50 x 50 x 16 and 64 x 64 x 16 products differ
    in the last bit): the same lists up to the float32 rounding of one k-term dot product."""
    rng = np.random.default_rng(4)
    e = rng.standard_normal((700, 16)).astype(np.float32)
    k = e.shape[1]
    base = topn_symmetric(e, 30, tile=128, n_threads=1)
    for tile in (50, 128, 700):
        one = topn_symmetric(e, 30, tile=tile, n_threads=1)
        got = topn_symmetric(e, 30, tile=tile, n_threads=n_threads)
        for m in base:
            _assert_equal(got[m], one[m])
            # one dot product of k float32 terms: |error| <= k eps |x||y| (summation) + rounding of the inputs
            tol = 2 * (k + 2) * np.finfo(np.float32).eps * (np.linalg.norm(e, axis=1).max() ** 2 if m == "dot" else 1)
            np.testing.assert_array_equal(one[m].counts, base[m].counts)
            np.testing.assert_allclose(one[m].scores, base[m].scores, atol=tol, rtol=0)
            differ = one[m].indices != base[m].indices
            # a different neighbour only where two candidates' scores are within that rounding of each other
            gaps = np.abs(np.diff(base[m].scores, axis=1))
            near_tie = np.zeros_like(differ)
            near_tie[:, 1:] |= gaps <= 2 * tol
            near_tie[:, :-1] |= gaps <= 2 * tol
            near_tie[:, -1] = True  # the last place may go to the first candidate left out; its score is checked above
            assert not (differ & ~near_tie).any(), (tile, m)


def test_gaussian_data_matches_full_kernel():
    # each score S_ij = S_ji is one sgemm dot product either way: the lists agree with the full kernel
    # wherever two candidates' scores differ by more than the float32 rounding of a k-term sum
    rng = np.random.default_rng(9)
    e = rng.standard_normal((3000, 32)).astype(np.float32)
    got = topn_symmetric(e, 50)
    full = topn_blocked(e, e, 50, exclude_self=True)
    for m in got:
        same = np.mean(got[m].indices == full[m].indices)
        assert same >= 0.9999, (m, same)
        tol = 2 * 33 * np.finfo(np.float32).eps * (np.linalg.norm(e, axis=1).max() ** 2 if m == "dot" else 1)
        np.testing.assert_allclose(got[m].scores, full[m].scores, atol=tol, rtol=0)


def test_bad_input_is_one_clear_error():
    e = np.ones((10, 3), np.float32)
    e[4, 1] = np.nan
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        topn_symmetric(e, 3)
    with pytest.raises(ValueError, match="metrics must be distinct names"):
        topn_symmetric(np.ones((4, 2)), 3, metrics=("dot", "l2"))


def test_blocks_cover_the_rows_evenly():
    assert symmetric_blocks(10) == [(0, 10)]  # small catalogs: one task
    assert symmetric_blocks(20_000) == [(0, 6666), (6666, 13333), (13333, 20000)]
    assert len(symmetric_blocks(100_000)) == 8
    blocks = symmetric_blocks(1_000_000, 65536)
    assert len(blocks) == 16 and blocks[0][0] == 0 and blocks[-1][1] == 1_000_000
    assert max(b - a for a, b in blocks) <= 65536
    assert symmetric_blocks(10, max_rows=3) == [(0, 2), (2, 5), (5, 7), (7, 10)]


@pytest.fixture(scope="module")
def client4():
    """4 single-threaded workers in this process (threads, not processes: quick to start; the tasks are the same)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=4, threads_per_worker=1, processes=False, dashboard_address=None)  # inproc://
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.mark.parametrize("max_rows", [50, 1000])
def test_dask_equals_in_process_on_one_two_and_four_workers(client1, client, client4, max_rows):
    """8 blocks of 50 rows: 36 pair tasks, each block's 8 partial states merged 4 at a time and then by its
    finishing task; 1000 rows: one block, one pair."""
    e = _integers(400, 6, seed=1)
    want = topn_symmetric(e, 25)
    for c in (client1, client, client4):
        parts = list(run_symmetric(c, c.scatter(e), len(e), 25, ("dot", "cosine"), candidate_block=64,
                                   max_block_rows=max_rows, tile=32))
        assert [r.number for r, _ in parts] == list(range(len(parts)))
        assert parts[0][0].start == 0 and parts[-1][0].stop == len(e)
        for m in ("dot", "cosine"):
            got = [lists[m] for _, lists in parts]
            np.testing.assert_array_equal(np.concatenate([g.indices for g in got]), want[m].indices)
            np.testing.assert_array_equal(np.concatenate([g.scores for g in got]), want[m].scores)
            np.testing.assert_array_equal(np.concatenate([g.counts for g in got]), want[m].counts)
