"""Where held-out items stand in top-N dot-product and cosine lists, without building the lists.

Held-out recall@N and NDCG@N read only the positions of a user's held-out items in the user's top-N list. The
position of item i in user u's list is the number of admissible candidates ranked before it, in the lists' order
(score descending, ties by the smaller candidate id)::

    rank(u, i) = #{j admissible for u : s_uj > s_ui  or  (s_uj == s_ui and j < i)}

and i is in the list at that position exactly when ``rank < N`` (the list holds the N best admissible
candidates). ``held_out_ranks`` computes it from the same float32 sgemm tiles as ``topn.topn_blocked`` (the same
row tiles and candidate blocks, so the same scores bit for bit; the cosine as ``(s_ij * qinv_i) * cinv_j``, as
``select.select_tile`` rounds it, rows below their norm floor in no cosine list) with one comparison per score and
held-out item, instead of a selection: on 1,000 items at N = 100 the selection costs 7x the gemm, the count
about as much as it. ``held_out_ranks_reference`` is the same in plain NumPy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numba import njit

from mfsim.kernels.select import _row_sumsq
from mfsim.kernels.topn import _as_float32_matrix, _check_exclusions, _check_finite, _check_metrics, \
    _check_min_norms, _check_no_overflow, _cosine_inverse_norms, tile_rows

#: Rank of a held-out item in no list of its user (excluded for the user, or without a cosine).
NOT_LISTED = np.iinfo(np.int64).max


@njit(nogil=True, cache=True)
def _target_scores(tile, r0, c0, qinv, cinv, cosine, t_indptr, t_indices, t_scores):
    """Scores of the held-out items of tile rows ``r0 ..`` that fall in candidates ``c0 .. c0 + tile width``."""
    nr, nb = tile.shape
    for r in range(nr):
        for e in range(t_indptr[r0 + r], t_indptr[r0 + r + 1]):
            j = t_indices[e] - c0
            if 0 <= j < nb:
                t_scores[e] = tile[r, j] * qinv[r0 + r] * cinv[c0 + j] if cosine else tile[r, j]


@njit(nogil=True, cache=True)
def _before(s, j, ts, t):
    """Whether a candidate (score s, id j) comes before the target (score ts, id t) in a list."""
    return s > ts or (s == ts and j < t)


@njit(nogil=True, cache=True)
def _count_before(tile, r0, c0, qinv, cinv, cosine, ex_indptr, ex_indices, t_indptr, t_indices, t_scores, ranks,
                  scratch):
    """``ranks[e] +=`` the admissible candidates of this tile ranked before held-out entry e (rows ``r0 ..``): those
    scoring above it (one vectorisable pass over the row per entry) and those tying it at a smaller id (a pass over
    the ids below it), less the row's excluded ones. For the cosine the row's cosines are computed once into
    ``scratch`` (float32, >= the tile's width), as ``select_tile`` rounds them (``(s_ij * qinv_i) * cinv_j``), and a
    candidate without a cosine (``cinv`` 0) is -inf there: before no entry."""
    nr, nb = tile.shape
    has_ex = ex_indptr.shape[0] > 0
    cseg = cinv[c0 : c0 + nb]
    vals = scratch[:nb]
    for r in range(nr):
        a, b = t_indptr[r0 + r], t_indptr[r0 + r + 1]
        if a == b:
            continue
        row = tile[r]
        if cosine:
            qi = qinv[r0 + r]
            for jj in range(nb):
                vals[jj] = row[jj] * qi * cseg[jj] if cseg[jj] != 0 else -np.inf
        else:
            for jj in range(nb):
                vals[jj] = row[jj]
        for e in range(a, b):
            ts, t = t_scores[e], t_indices[e] - c0
            count = 0
            for jj in range(nb):
                count += 1 if vals[jj] > ts else 0
            for jj in range(min(max(t, 0), nb)):  # a tie counts before the entry when its id is smaller
                count += 1 if vals[jj] == ts else 0
            if has_ex:
                for x in range(ex_indptr[r0 + r], ex_indptr[r0 + r + 1]):
                    jj = ex_indices[x] - c0
                    if 0 <= jj < nb and _before(vals[jj], jj, ts, t):
                        count -= 1
            ranks[e] += count


@njit(nogil=True, cache=True)
def _excluded(ex_indptr, ex_indices, t_indptr, t_indices):
    """Per held-out entry: whether its item is excluded for its row (and so in no list)."""
    out = np.zeros(t_indices.shape[0], dtype=np.bool_)
    if ex_indptr.shape[0] == 0:
        return out
    for r in range(t_indptr.shape[0] - 1):
        lo, hi = ex_indptr[r], ex_indptr[r + 1]
        for e in range(t_indptr[r], t_indptr[r + 1]):
            pos = lo + np.searchsorted(ex_indices[lo:hi], t_indices[e])
            out[e] = pos < hi and ex_indices[pos] == t_indices[e]
    return out


def held_out_ranks(queries: np.ndarray, candidates: np.ndarray, target_indptr: np.ndarray,
                   target_indices: np.ndarray, *, metrics: Sequence[str] = ("dot",),
                   exclude_indptr: np.ndarray | None = None, exclude_indices: np.ndarray | None = None,
                   query_chunk: int = 2048, candidate_block: int = 65536,
                   cosine_min_norm: tuple[float, float] = (0.0, 0.0)) -> dict[str, np.ndarray]:
    """``{metric: ranks}``: the position of each target in its query row's list of that metric (``topn_blocked``'s
    order and scores), int64, aligned with ``target_indices``.

    ``target_indptr`` (q + 1,), ``target_indices``: per query row, the candidate ids whose positions are wanted
    (a user's held-out items; a slice ``indptr[a:b + 1]`` of a larger CSR is read from its start). Exclusions,
    ``cosine_min_norm`` and validation as ``topn_blocked``'s; a target in no list (excluded for its row; for the
    cosine, its row or itself below the norm floor) gets ``NOT_LISTED``. One thread (as a worker's task); tiles as
    ``topn_blocked`` on one thread: ``tile_rows(q, query_chunk, candidate_block, 1)`` rows against blocks of
    ``candidate_block`` candidates, one sgemm each (twice when there is more than one block: the targets' scores
    first). Time O(q p k) gemm + O(t p) comparisons per metric for t targets; memory one tile.
    """
    q_mat = _as_float32_matrix(queries, "queries")
    c_mat = _as_float32_matrix(candidates, "candidates")
    metrics = _check_metrics(metrics)
    if q_mat.shape[1] != c_mat.shape[1]:
        raise ValueError(f"queries and candidates must have the same rank; received {q_mat.shape[1]} and "
                         f"{c_mat.shape[1]} columns. Use embeddings from the same factorisation.")
    nq, p = q_mat.shape[0], c_mat.shape[0]
    q_sumsq, c_sumsq = _row_sumsq(q_mat), _row_sumsq(c_mat)
    _check_finite(q_sumsq, "queries")
    _check_finite(c_sumsq, "candidates")
    _check_no_overflow(q_sumsq, c_sumsq)
    q_min, c_min = _check_min_norms(cosine_min_norm)
    cosine = "cosine" in metrics
    qinv = _cosine_inverse_norms(q_mat, q_sumsq, q_min) if cosine else np.zeros(nq, dtype=np.float32)
    cinv = _cosine_inverse_norms(c_mat, c_sumsq, c_min) if cosine else np.zeros(p, dtype=np.float32)
    ex_indptr, ex_indices = _check_exclusions(exclude_indptr, exclude_indices, nq, p)
    t_indptr = np.ascontiguousarray(target_indptr, dtype=np.int64)
    if t_indptr.shape != (nq + 1,) or np.any(np.diff(t_indptr) < 0):
        raise ValueError(f"target_indptr must be non-decreasing with one entry per query row plus one ({nq + 1})")
    t_indices = np.ascontiguousarray(np.asarray(target_indices)[int(t_indptr[0]) : int(t_indptr[-1])], np.int64)
    t_indptr = t_indptr - t_indptr[0]
    if t_indices.size and (t_indices.min() < 0 or t_indices.max() >= p):
        raise ValueError(f"target_indices must be candidate ids in [0, {p})")
    ranks = {m: np.zeros(t_indices.shape[0], dtype=np.int64) for m in metrics}
    t_scores = {m: np.zeros(t_indices.shape[0], dtype=np.float32) for m in metrics}
    cb = min(int(candidate_block), max(p, 1))
    rows = tile_rows(nq, query_chunk, cb, 1)
    buf = np.empty(rows * cb, dtype=np.float32)
    scratch = np.empty(cb, dtype=np.float32)  # a row's cosines (``_count_before``)
    blocks = [(c0, min(c0 + cb, p)) for c0 in range(0, p, cb)]

    def tile_of(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        tile = buf[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
        np.matmul(q_mat[r0:r1], c_mat[c0:c1].T, out=tile)  # S = Q C^T, one sgemm, as topn_blocked's
        return tile

    def targets(tile, r0, c0):
        for m in metrics:
            _target_scores(tile, r0, c0, qinv, cinv, m == "cosine", t_indptr, t_indices, t_scores[m])

    def count(tile, r0, c0):
        for m in metrics:
            _count_before(tile, r0, c0, qinv, cinv, m == "cosine", ex_indptr, ex_indices, t_indptr, t_indices,
                          t_scores[m], ranks[m], scratch)

    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        if t_indptr[r0] == t_indptr[r1]:
            continue
        if len(blocks) == 1:
            tile = tile_of(r0, r1, 0, p)
            targets(tile, r0, 0)
            count(tile, r0, 0)
            continue
        for c0, c1 in blocks:
            targets(tile_of(r0, r1, c0, c1), r0, c0)
        for c0, c1 in blocks:
            count(tile_of(r0, r1, c0, c1), r0, c0)
    unlisted = _excluded(ex_indptr, ex_indices, t_indptr, t_indices)
    for m in metrics:
        out = unlisted.copy()
        if m == "cosine":  # a query or a target without a cosine: in no cosine list
            rows_of = np.repeat(np.arange(nq), np.diff(t_indptr))
            out |= (qinv[rows_of] == 0) | (cinv[t_indices] == 0)
        ranks[m][out] = NOT_LISTED
    return ranks


def held_out_ranks_reference(queries: np.ndarray, candidates: np.ndarray, target_indptr: np.ndarray,
                             target_indices: np.ndarray, exclude_indptr: np.ndarray | None = None,
                             exclude_indices: np.ndarray | None = None, metric: str = "dot",
                             cosine_min_norm: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """``held_out_ranks`` of one metric in plain NumPy, from the full score matrix (one float32 matmul; for tests)."""
    Q, C = np.asarray(queries, np.float32), np.asarray(candidates, np.float32)
    S = Q @ C.T
    p = S.shape[1]
    if metric == "cosine":
        qn, cn = np.linalg.norm(Q.astype(np.float64), axis=1), np.linalg.norm(C.astype(np.float64), axis=1)
        qinv = np.where(qn >= max(cosine_min_norm[0], 1e-300), 1.0 / np.where(qn > 0, qn, 1.0), 0.0)
        cinv = np.where(cn >= max(cosine_min_norm[1], 1e-300), 1.0 / np.where(cn > 0, cn, 1.0), 0.0)
        S = S * qinv.astype(np.float32)[:, None] * cinv.astype(np.float32)[None, :]
    ranks = np.zeros(len(target_indices), dtype=np.int64)
    for r in range(S.shape[0]):
        admissible = np.ones(p, dtype=bool)
        if exclude_indptr is not None:
            admissible[exclude_indices[exclude_indptr[r] : exclude_indptr[r + 1]]] = False
        if metric == "cosine":
            admissible &= cinv > 0
        ids = np.arange(p)
        for e in range(target_indptr[r], target_indptr[r + 1]):
            i = target_indices[e]
            if not admissible[i] or (metric == "cosine" and qinv[r] == 0):
                ranks[e] = NOT_LISTED
                continue
            s = S[r, i]
            ranks[e] = int(np.sum(admissible & ((S[r] > s) | ((S[r] == s) & (ids < i)))))
    return ranks
