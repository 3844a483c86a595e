"""kernels.sets against its NumPy references: membership between list rows, repeated ids."""

import numpy as np
import pytest

from mfsim.kernels.sets import has_repeated_ids, has_repeated_ids_reference, row_members, row_members_reference


def _lists(rng, q, width, p, distinct=True):
    idx = np.full((q, width), -1, dtype=np.int32)  # padding after the count, as TopN has it
    cnt = rng.integers(0, width + 1, q)
    for r in range(q):
        idx[r, : cnt[r]] = rng.choice(p, cnt[r], replace=not distinct)
    return idx, cnt


@pytest.mark.parametrize("seed", range(4))
def test_row_members_match_isin_row_by_row(seed):
    rng = np.random.default_rng(seed)
    p = 30  # few ids: many common ones
    ia, ca = _lists(rng, 50, 12, p)
    ib, cb = _lists(rng, 50, 9, p)
    ib[:, -1] = rng.integers(0, p, 50)  # ids after the count of b's row do not count
    np.testing.assert_array_equal(row_members(ia, ca, ib, cb, p), row_members_reference(ia, ca, ib, cb))


def test_row_members_hand_computed():
    ia = np.array([[3, 1, 4], [1, 5, -1], [2, -1, -1]])
    ib = np.array([[4, 9, 3], [5, 1, 2], [7, 2, -1]])
    got = row_members(ia, np.array([3, 2, 0]), ib, np.array([2, 3, 2]), 10)
    np.testing.assert_array_equal(got, [[False, False, True], [True, True, False], [False, False, False]])


def test_repeated_ids_found_only_within_a_rows_count():
    idx = np.array([[1, 2, 3, 2], [4, 4, -1, -1], [5, 6, 7, 8]])
    assert has_repeated_ids(idx, np.array([4, 1, 4]), 9)  # row 0 lists 2 twice
    assert not has_repeated_ids(idx, np.array([3, 1, 4]), 9)  # the second 2 and 4 lie after their rows' counts
    assert has_repeated_ids(idx, np.array([3, 2, 4]), 9)
    rng = np.random.default_rng(9)
    for distinct in (True, False):
        i, c = _lists(rng, 40, 8, 20, distinct=distinct)
        assert has_repeated_ids(i, c, 20) == has_repeated_ids_reference(i, c)
