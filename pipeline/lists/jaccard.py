"""Jaccard@N of two top-N lists of the same query rows, plain and tie-aware: how the cosine audit compares lists.

``jaccard_rows`` is the Jaccard index of the two top-N sets per row. ``tie_aware_jaccard`` counts two lists as
agreeing when they differ only by candidates whose score lies within float32 rounding of the best candidate
left out (the (N+1)-th), for such a candidate could as well have been left out: items that are copies of each
other (the same users, so the same row of V) tie exactly, and which of them makes a list is rounding. The
swaps it counts as agreement are its boundary ties. ``score_bound`` is the float32 error of one kernel score
that the rule is measured in.

Both are vectorised over rows (keys ``row * stride + id``, sorted, one binary search per entry) in chunks of
``_JACCARD_CHUNK`` rows: O(q N log(q N)) time, O(c N) memory, never O(q p).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mfsim.kernels.sets import has_repeated_ids, row_members
from mfsim.kernels.topn import TopN
from mfsim.pipeline.errors import MfsimError

#: Unit roundoff of float32.
EPS32 = 2.0**-24

# Rows compared at once by ``jaccard_rows``: keys of 65536 rows x N = 100 ids take 52 MB per side.
_JACCARD_CHUNK = 65536


def jaccard_rows(idx_a: np.ndarray, cnt_a: np.ndarray, idx_b: np.ndarray, cnt_b: np.ndarray) -> np.ndarray:
    """Per row, the Jaccard index ``|A ∩ B| / |A ∪ B|`` of two top-N sets.

    Parameters
    ----------
    idx_a, idx_b : int (q, N_a), (q, N_b)
        Candidate ids per row (``TopN.indices``); only the first ``cnt`` entries of a row count,
        whatever follows them is ignored. Repeated ids count once (set semantics).
    cnt_a, cnt_b : int (q,)
        Valid entries per row (``TopN.counts``), ``0 <= cnt <= N``.

    Returns
    -------
    (q,) float64
        1.0 where both sets are empty.

    Notes
    -----
    Vectorised over rows: each row's valid ids are sorted within the row and made unique, and
    become keys ``row * stride + id``, sorted overall; the intersection is found by a binary
    search of one side's keys in the other's (``np.searchsorted``); per-row sizes are bincounts
    of the key's row. Time O(q N log N) for the row sorts plus O(q N log(q N)) for the search
    (1-2 s per 100k rows at N = 100 on 2 cores); memory O(c N) int64 for chunks of c = 65536 rows
    (52 MB per array at N = 100), never O(q p).
    """
    idx_a, cnt_a = _check_lists(idx_a, cnt_a, "a")
    idx_b, cnt_b = _check_lists(idx_b, cnt_b, "b")
    q = idx_a.shape[0]
    if idx_b.shape[0] != q:
        raise MfsimError(
            f"both lists must have the same rows; received {q} and {idx_b.shape[0]} rows. "
            "Compare lists of the same query rows."
        )
    out = np.empty(q, dtype=np.float64)
    for r0 in range(0, q, _JACCARD_CHUNK):
        r1 = min(r0 + _JACCARD_CHUNK, q)
        ia, ca, ib, cb = idx_a[r0:r1], cnt_a[r0:r1], idx_b[r0:r1], cnt_b[r0:r1]
        stride = 1 + max(_max_valid(ia, ca), _max_valid(ib, cb))  # ids < 2^31, rows < 2^16: no overflow
        ka, kb = _row_keys(ia, ca, stride), _row_keys(ib, cb, stride)
        nr = r1 - r0
        na = np.bincount(ka // stride, minlength=nr)
        nb = np.bincount(kb // stride, minlength=nr)
        ni = _count_common(ka, kb, stride, nr)
        union = na + nb - ni  # |A ∪ B| = |A| + |B| - |A ∩ B|
        res = np.ones(nr, dtype=np.float64)
        np.divide(ni, union, out=res, where=union > 0)
        out[r0:r1] = res
    return out


def _check_lists(idx: np.ndarray, cnt: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    idx = np.asarray(idx)
    cnt = np.asarray(cnt)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise MfsimError(f"idx_{name} must be a 2-D integer array (rows x N); received {idx.dtype} {idx.shape}.")
    if cnt.shape != (idx.shape[0],) or not np.issubdtype(cnt.dtype, np.integer):
        raise MfsimError(
            f"cnt_{name} must be an integer array with one count per row ({idx.shape[0]}); received "
            f"{cnt.dtype} {cnt.shape}. Pass TopN.counts with TopN.indices."
        )
    if cnt.size and (cnt.min() < 0 or cnt.max() > idx.shape[1]):
        raise MfsimError(
            f"cnt_{name} must lie in [0, {idx.shape[1]}] (the list width); received values from "
            f"{cnt.min()} to {cnt.max()}."
        )
    return idx, cnt.astype(np.int64)


def valid_mask(idx: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """Per entry of the lists ``idx``, whether it is among its row's first ``cnt`` (the row's valid entries)."""
    return np.arange(idx.shape[1])[None, :] < cnt[:, None]


def _max_valid(idx: np.ndarray, cnt: np.ndarray) -> int:
    vals = idx[valid_mask(idx, cnt)]
    if vals.size == 0:
        return 0
    if vals.min() < 0:
        raise MfsimError(
            f"list entries within the counts must be candidate ids >= 0; received {int(vals.min())}. "
            "Check that the counts match the lists (-1 marks padding after the count)."
        )
    return int(vals.max())


def _row_keys(idx: np.ndarray, cnt: np.ndarray, stride: int) -> np.ndarray:
    """Sorted unique ``row * stride + id`` of the valid entries.

    Each row is sorted on its own with the padding replaced by ``stride`` (larger than any id, so
    it sorts last); repeated ids are dropped; the keys then come out sorted in row-major order.
    """
    valid = valid_mask(idx, cnt)
    vals = np.where(valid, idx.astype(np.int64), np.int64(stride))
    vals.sort(axis=1)
    keep = valid.copy()  # the first cnt entries of a sorted row are its valid ids
    keep[:, 1:] &= vals[:, 1:] != vals[:, :-1]  # set semantics: a repeated id counts once
    rows = np.nonzero(keep)[0].astype(np.int64)
    return rows * stride + vals[keep]


def _count_common(ka: np.ndarray, kb: np.ndarray, stride: int, n_rows: int) -> np.ndarray:
    """Per row, the keys present in both sorted unique key arrays (a binary search of each key of ka)."""
    if ka.size == 0 or kb.size == 0:
        return np.zeros(n_rows, dtype=np.int64)
    pos = np.minimum(np.searchsorted(kb, ka), kb.size - 1)
    return np.bincount(ka[kb[pos] == ka] // stride, minlength=n_rows)


def score_bound(metric: str, k: int) -> float:
    """The float32 error bound of one kernel score, relative: ``(k + 8) 2^-24`` for a cosine, ``(k + 4) 2^-24``
    for a dot product (times ``|q| |c|``).

    Dot: the sgemm's float32 sum of k products is within ``gamma_k sum_l |q_l c_l| <= ~k 2^-24 |q| |c|``
    of the exact sum (any summation order; Cauchy-Schwarz); each entry of both factors carries one
    rounding from float64 and, when rescaled by D, one more: ``2 x 2`` roundings of 2^-24 relative.
    Cosine: that dot relative to ``|q| |c|``, plus the float32 rounding of the two inverse norms and
    of the two products by them (``cos = (s qinv) cinv``, ``kernels.select.select_tile``).
    """
    if metric not in ("dot", "cosine"):
        raise MfsimError(f"metric must be 'dot' or 'cosine' (a kernel metric); received {metric!r}.")
    return float((int(k) + (8 if metric == "cosine" else 4)) * EPS32)


def tie_aware_jaccard(x: TopN, y: TopN, n: int, bound: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the Jaccard@n of two top-n lists with swaps at a float32 tie counted as agreement, and those swaps.

    Parameters
    ----------
    x, y : TopN with at least n + 1 columns
        Lists of the same query rows, score descending, ids distinct within a row (``topn_blocked``
        asked for ``n + 1``). A row's top-n set is its first ``min(count, n)`` entries; entry n
        (0-based) is the best candidate left out, the cut. A row without it (count <= n: every
        admissible candidate listed) has no ties.
    n : int
        The list length N compared, >= 1.
    bound : float or (q,) array
        The float32 error bound ``d`` of one score of either list: ``score_bound("cosine", k)``, or
        for dot products per row ``score_bound("dot", k) |q| max_j |c_j|``.

    Returns
    -------
    jaccard : (q,) float64
        ``(|X & Y| + t) / (|X | Y| - t)`` for the top-n sets X, Y and the row's boundary ties t;
        1.0 where both sets are empty.
    ties : (q,) int64
        ``t = min(t_x, t_y)``: t_x counts the entries of X - Y whose score in x is within ``4 d`` of
        x's cut, t_y those of Y - X in y. Each of the t pairs is a swap rounding alone can explain.

    Notes
    -----
    Why ``4 d``: let x and y rank the same exact scores f, each score computed within d. If c is in
    X but not in Y, y lists n candidates at least as high as c, so each has ``f >= f(c) - 2 d``;
    X holds at most n - 1 of them besides c, so one of them is left out of x and scores at most x's
    cut there, which is then ``>= f(c) - 3 d >=`` (x's score of c) ``- 4 d``. So when two lists of
    the same scores differ, every candidate in one and not the other is within ``4 d`` of that list's
    cut, and they agree here (Jaccard 1). Lists of different scores (the cosines of two scalings) get
    the same rule: a candidate that close to the cut is tied, within rounding, with one left out,
    and which of the two is listed says nothing about the scaling.
    Membership by ``kernels.sets.row_members`` (one stamp per id, per row): O(q n) time, O(p + c n) memory for
    chunks of c = 65536 rows.
    """
    check_int(n, "n", 1)
    n = int(n)
    ix, sx, cx = _cut_lists(x, n, "x")
    iy, sy, cy = _cut_lists(y, n, "y")
    q = ix.shape[0]
    if iy.shape[0] != q:
        raise MfsimError(
            f"both lists must have the same rows; received {q} and {iy.shape[0]} rows. "
            "Compare lists of the same query rows."
        )
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), (q,))
    if not (np.isfinite(bound).all() and (bound >= 0).all()):
        raise MfsimError("bound (the float32 error of one score) must be finite and >= 0; see score_bound.")
    jac, ties = np.empty(q, dtype=np.float64), np.empty(q, dtype=np.int64)
    for r0 in range(0, q, _JACCARD_CHUNK):
        r1 = min(r0 + _JACCARD_CHUNK, q)
        ax, bx = ix[r0:r1, :n], np.minimum(cx[r0:r1], n)
        ay, by = iy[r0:r1, :n], np.minimum(cy[r0:r1], n)
        stride = 1 + max(_max_valid(ax, bx), _max_valid(ay, by))  # ids < 2^31, rows < 2^16: no overflow
        in_y, in_x = _members(ax, bx, ay, by, stride), _members(ay, by, ax, bx, stride)
        vx, vy = valid_mask(ax, bx), valid_mask(ay, by)
        common = (vx & in_y).sum(axis=1)
        b = bound[r0:r1]
        t_x = (vx & ~in_y & near_cut(sx[r0:r1], cx[r0:r1], n, b)).sum(axis=1)
        t_y = (vy & ~in_x & near_cut(sy[r0:r1], cy[r0:r1], n, b)).sum(axis=1)
        t = np.minimum(t_x, t_y)
        union = bx + by - common - t
        res = np.ones(r1 - r0, dtype=np.float64)
        np.divide(common + t, union, out=res, where=union > 0)
        jac[r0:r1], ties[r0:r1] = res, t
    return jac, ties


def _cut_lists(top: TopN, n: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, scores, counts) of a list with its cut: at least n + 1 columns, distinct ids per row."""
    idx, cnt = _check_lists(top.indices, top.counts, name)
    scores = np.asarray(top.scores)
    if idx.shape[1] < n + 1 or scores.shape != idx.shape:
        raise MfsimError(
            f"{name} must have at least n + 1 = {n + 1} columns (the top n and the best candidate left out) and "
            f"scores of the same shape; received indices {idx.shape}, scores {scores.shape}. Ask the top-N for n + 1."
        )
    if has_repeated_ids(idx, cnt, 1 + _max_valid(idx, cnt)):
        raise MfsimError(f"{name} lists a candidate twice in one row; pass top-N lists (distinct ids per row).")
    return idx, scores, cnt


def _members(ia: np.ndarray, ca: np.ndarray, ib: np.ndarray, cb: np.ndarray, stride: int) -> np.ndarray:
    """Per entry of a (the first ``ca`` of each row), whether its id is among the first ``cb`` of b's row (ids below
    ``stride``; ``kernels.sets.row_members``)."""
    return row_members(ia, ca, ib, cb, stride)


def near_cut(scores: np.ndarray, counts: np.ndarray, n: int, bound: np.ndarray) -> np.ndarray:
    """Per top-n entry, whether its score is within ``4 bound`` of the row's cut (entry n); False without a cut."""
    cut = np.where(counts > n, scores[:, n].astype(np.float64), np.nan)  # no cut: NaN, near nothing
    with np.errstate(invalid="ignore"):  # -inf padding (masked by the caller) and NaN compare False
        return scores[:, :n].astype(np.float64) - cut[:, None] <= 4.0 * bound[:, None]


def check_int(value: Any, name: str, low: int) -> None:
    """An ``MfsimError`` unless ``value`` is an integer (not a bool) >= ``low``; ``name`` names it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise MfsimError(f"{name} must be an integer >= {low}; received {value!r}.")
