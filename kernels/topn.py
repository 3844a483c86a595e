"""Exact top-N neighbour lists: one float32 gemm tile per (query chunk, candidate block), numba selection.

Serves every neighbour list of the pipeline: item-item cosine and dot of B rows, "model" scores
``a_i . b_j`` (the product ``A B^T`` of Eq. 1, which is unique where the embeddings are not),
cosine of the rows of another embedding matrix, user-item ``p_u . b_i`` and ``cos(p_u, b_i)`` with
the user's own items excluded, and user-user lists.

For a chunk of queries ``Q`` (q x k) and a block of candidates ``C`` (c x k) the driver computes
``S = Q C^T`` with one BLAS sgemm (numpy ``matmul`` on float32) and hands the tile to
``select_tile`` (``kernels/select.py``, with the buffer state it updates), which keeps for every
query row the best N candidates seen so far in a buffer of 2 N slots. Cosine and dot come from the
same tile: ``cos_ij = s_ij * qinv_i * cinv_j`` with the inverse L2 norms applied at selection
time, so the gemm is done once for both lists. ``topn_blocked`` drives it: query rows split over
threads, a sampled floor that spares most buffer entries (``_topn_rows``), exact either way.
This module re-exports what callers use from ``kernels.select`` (``TopN``, ``select_tile``,
``empty_state``, ``finalize_state``, ``inverse_norms``).

Errors are ``ValueError`` (shapes, values, names, a malformed exclusion mask) and ``TypeError``
(an array of the wrong dtype kind); callers that pass user data translate them.

Order and rules, identical in the kernel and in ``topn_reference``:

* candidates are ranked by score descending, ties by candidate index ascending; the selected set is
  the N best under that total order, so it does not depend on block order or block sizes for
  given scores (the float32 gemm itself may round differently for different tile shapes, by at
  most about ``k * eps32 * |q| |c|``);
* a query is never its own neighbour when ``exclude_self`` is set (query row ``r`` is candidate
  ``query_offset + r``);
* zero-norm rows have no cosine: a zero-norm query gets an empty cosine list and a zero-norm
  candidate is never a cosine neighbour (no NaN is ever produced); with ``cosine_min_norm`` the
  same holds for every row whose L2 norm is below that floor (its direction is rounding noise);
* an optional exclusion mask (CSR over query rows, candidate ids as indices) removes candidates per
  query, e.g. the items a user already has;
* rows with fewer than N admissible candidates keep ``-1`` / ``-inf`` padding after their ``count``
  entries.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Sequence

import numba
import numpy as np

from mfsim.kernels.threads import blas_controller, blas_limit
from mfsim.kernels.select import (
    TopN,
    _row_sumsq,
    empty_state,
    finalize_state,
    floor_keys,
    inverse_norms,
    merge_packed,
    pack_state,
    select_tile,
    select_tile_columns,
    threshold_scores,
    tighten_state,
)

__all__ = [
    "METRICS",
    "TopN",
    "empty_state",
    "finalize_state",
    "floor_keys",
    "inverse_norms",
    "select_tile",
    "symmetric_pair",
    "tile_rows",
    "topn_blocked",
    "topn_reference",
    "topn_symmetric",
    "tournament",
]

METRICS = ("dot", "cosine")

_INT32_MAX = np.iinfo(np.int32).max


# ---------------------------------------------------------------------------------------------
# driver


def _as_float32_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 matrix; an error unless it is 2-D and real."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (rows x rank); received shape {x.shape}. Pass one row per vector."
        )
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must hold real numbers; received dtype {x.dtype}. Cast it to float32.")
    return np.ascontiguousarray(x, dtype=np.float32)


# |q . c| <= |q| |c| (Cauchy-Schwarz): below this bound no float32 score can overflow to inf
_SCORE_LIMIT = float(np.finfo(np.float32).max) / 2


def _check_no_overflow(q_sumsq: np.ndarray, c_sumsq: np.ndarray) -> None:
    """Raise when some dot product could overflow float32 (the selection must never see inf or NaN)."""
    if not q_sumsq.size or not c_sumsq.size:
        return
    bound = float(np.sqrt(q_sumsq.max()) * np.sqrt(c_sumsq.max()))
    if bound >= _SCORE_LIMIT:
        raise ValueError(
            f"scores could overflow float32: the largest query and candidate norms multiply to {bound:.3g} "
            f"(limit {_SCORE_LIMIT:.3g}); rescale the embeddings (e.g. divide both by a constant)."
        )


def _check_finite(sumsq: np.ndarray, name: str) -> None:
    """Raise when a row's float64 sum of squares is not finite, i.e. it holds NaN or inf."""
    bad = np.flatnonzero(~np.isfinite(sumsq))
    if bad.size:
        raise ValueError(
            f"{name} contains NaN or infinite values (after the cast to float32), first in row "
            f"{bad[0]} ({bad.size} rows); neighbour scores need finite embeddings. Check the "
            "factorisation output or drop those rows."
        )


def _check_min_norms(min_norms) -> tuple[float, float]:
    """``cosine_min_norm`` as two finite floats >= 0 (queries, candidates)."""
    try:
        q_min, c_min = (float(v) for v in min_norms)
    except (TypeError, ValueError):
        raise ValueError(
            f"cosine_min_norm must be a pair (query floor, candidate floor) of numbers; received {min_norms!r}."
        ) from None
    if not (np.isfinite(q_min) and np.isfinite(c_min) and q_min >= 0 and c_min >= 0):
        raise ValueError(f"cosine_min_norm must hold finite numbers >= 0; received {min_norms!r}.")
    return q_min, c_min


def _cosine_inverse_norms(x: np.ndarray, sumsq: np.ndarray, min_norm: float) -> np.ndarray:
    """``inverse_norms`` with 0 (the kernel's mark of a row without cosine) for rows whose norm is below ``min_norm``."""
    inv = inverse_norms(x, sumsq)
    if min_norm > 0:
        inv[np.sqrt(sumsq) < min_norm] = 0
    return inv


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The wanted metric names as a tuple (one name may be passed as a string)."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics or len(set(metrics)) != len(metrics):
        raise ValueError(
            f"metrics must be distinct names among {', '.join(METRICS)}; received {list(metrics)}. "
            "Name each wanted metric once."
        )
    return metrics


def _check_exclusions(indptr, indices, n_queries: int, n_candidates: int):
    """Validate the exclusion CSR and return (int64 indptr from 0, int32 indices sorted within rows).

    Rows whose ids are not sorted are sorted in a copy (the kernel binary-searches them); the
    caller's arrays are left as they are.
    """
    if (indptr is None) != (indices is None):
        raise ValueError(
            "exclude_indptr and exclude_indices go together; received only "
            f"{'exclude_indptr' if indices is None else 'exclude_indices'}. Pass both or neither."
        )
    if indptr is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices)
    if indptr.ndim != 1 or indptr.shape[0] != n_queries + 1:
        raise ValueError(
            f"exclude_indptr must have one entry per query row plus one ({n_queries + 1}); received "
            f"shape {indptr.shape}. Slice the CSR indptr as indptr[first:last + 1] for the query rows."
        )
    if n_queries and (np.any(np.diff(indptr) < 0) or indptr[0] < 0 or indptr[-1] > indices.shape[0]):
        raise ValueError(
            f"exclude_indptr must be non-decreasing within [0, {indices.shape[0]}] (the length of "
            f"exclude_indices); received values from {indptr.min()} to {indptr.max()}."
        )
    lo = int(indptr[0]) if n_queries else 0
    hi = int(indptr[-1]) if n_queries else 0
    used = indices[lo:hi]
    if used.size and (used.min() < 0 or used.max() >= n_candidates):
        raise ValueError(
            f"exclude_indices must be candidate ids in [0, {n_candidates}); received values from "
            f"{used.min()} to {used.max()}. Map them to candidate row numbers first."
        )
    used = used.astype(np.int32, copy=False)
    rows = np.repeat(np.arange(n_queries, dtype=np.int64), np.diff(indptr))
    step = np.diff(used.astype(np.int64))
    same_row = rows[1:] == rows[:-1]
    if np.any(step[same_row] < 0):
        used = used[np.lexsort((used, rows))]
    return indptr - lo, np.ascontiguousarray(used, dtype=np.int32)


def topn_blocked(
    queries: np.ndarray,
    candidates: np.ndarray,
    n: int,
    *,
    metrics: Sequence[str] = ("dot", "cosine"),
    query_offset: int | None = None,
    exclude_self: bool = False,
    exclude_indptr: np.ndarray | None = None,
    exclude_indices: np.ndarray | None = None,
    query_chunk: int = 2048,
    candidate_block: int = 1280,
    n_threads: int | None = None,
    cosine_min_norm: tuple[float, float] = (0.0, 0.0),
    norm_order: bool = True,
    stats: dict | None = None,
) -> dict[str, TopN]:
    """Exact top-N candidates of every query row by dot product and/or cosine, in bounded memory.

    Parameters
    ----------
    queries : (q, k) float32
        Query embeddings (item rows of B for item-item lists, user rows for user-item lists, rows of
        A for the model scores ``a_i . b_j`` of Eq. 1). Other real dtypes are cast to float32.
    candidates : (p, k) float32
        Candidate embeddings; candidate ids are row numbers ``0 .. p-1``.
    n : int
        List length N (the pipeline default is 100). Rows with fewer admissible candidates get
        fewer entries.
    metrics : sequence of {"dot", "cosine"}, default both
        Lists to build. Both come from the same gemm tiles; asking for both costs the gemm once.
    query_offset : int, optional
        Candidate id of query row 0 when the queries are rows ``query_offset .. query_offset + q``
        of the candidates (a chunk of the same embedding). Used by ``exclude_self``; default 0.
    exclude_self : bool, default False
        Never list query row r as a neighbour of itself (candidate ``query_offset + r``).
    exclude_indptr, exclude_indices : int64 (q + 1,), int32 (nnz,), optional
        Exclusion mask as CSR over the query rows: row r excludes the candidate ids
        ``exclude_indices[exclude_indptr[r]:exclude_indptr[r + 1]]`` (for user-item lists, the
        user's row of X). A slice ``indptr[a:b + 1]`` of a larger CSR can be passed as is.
    query_chunk : int, default 2048
        Query rows in flight at once, split evenly among the threads. Each thread works through
        its rows in tiles of ``tile_rows(...)`` rows (its share, cut to a tile of about 4 MiB but
        at least 256 rows).
    candidate_block : int, default 1280
        Candidate rows per gemm tile. Measured at p = 60k, k = 64, N = 100 on 2 cores, cosine + dot
        (dot alone): 1024 -> 4.0 s, 1280 -> 3.4 s (1.44 s), 2048 -> 4.1 s (1.67 s), 4096 -> 4.3 s
        (1.88 s); the gemm itself runs faster on narrow blocks at k = 64, and the tile (819 x 1280
        rows, 4 MiB) stays in cache between the gemm that writes it and the selection that reads it.
    n_threads : int, optional
        Threads to use; default the smaller of ``numba.get_num_threads()`` and the BLAS thread
        count (1 inside a Dask worker, whose nanny sets ``OPENBLAS_NUM_THREADS=1``). Each thread
        runs its own query rows through single-threaded gemm and selection, so BLAS is limited to
        one thread during the call (restored after).
    cosine_min_norm : (float, float), default (0, 0)
        Absolute L2 norms below which a query row, resp. a candidate row, takes no part in the
        cosine lists, exactly as a zero row: the query's cosine list is empty and the candidate is
        nobody's cosine neighbour. Dot lists are unaffected. The pipeline sets them relative to the
        largest row norm of each embedding (``neighbours.cosine_norm_floor``).
    norm_order : bool, default True
        For dot lists alone: scan the candidates in blocks sorted by norm, descending, and leave out of a
        block's gemm the query rows whose bound ``|q| max|c|`` cannot reach their current N-th best score
        (``_scan``); the same lists (ties still by candidate id). False: every tile in id order.
    stats : dict, optional
        Filled with ``scores`` (query rows x candidates, the seeding sample left out) and ``scores_computed``
        (those the gemm computed).

    Returns
    -------
    dict metric -> TopN(indices int32 (q, N), scores float32 (q, N), counts int32 (q,))
        Each row sorted by score descending, ties by smaller candidate index; ``-1`` / ``-inf``
        after ``counts[r]`` entries.

    Raises
    ------
    ValueError
        On shapes, non-finite values, scores that could overflow float32, unknown metrics, invalid
        sizes or a malformed exclusion mask.
    TypeError
        When ``queries`` or ``candidates`` do not hold real numbers.

    Notes
    -----
    Time: ``2 q p k (1 + 1/32)`` flops of sgemm (the 1/32 is the seeding sample, below), an O(q p)
    selection scan (one vectorised comparison per score and metric) and a few hundred buffer
    entries per row and metric at O(1) each (amortised).

    Memory, never O(p^2) nor O(q p): the tiles ``n_threads x tile_rows x candidate_block x 4``
    bytes, at most ``query_chunk x candidate_block x 4``; per thread the running state
    ``tile_rows x (2 N x 8 + 12)`` bytes per metric (int64 keys, threshold, fill) and its sorted keys;
    ``4 (p + q)`` bytes of inverse norms; the seeding sample ``p / 32 x k x 4`` bytes; the outputs
    ``q x N x (4 + 4 + 4 / N)`` bytes per metric. The candidate blocks are views of
    ``candidates``. With the defaults (2048, 1280, N = 100) on 2 threads: tiles 2 x 819 x 1280 x 4
    = 8 MiB, state 1.3 MiB per metric per thread.

    Threads: BLAS and numba each keep a pool of spinning threads; alternating a multi-threaded gemm
    with a multi-threaded selection on the same cores makes each pool wait for the other's spinning
    threads (measured 2-5x slower on 2 cores). Splitting the query rows among threads, each running
    both steps single-threaded, avoids that and needs no synchronisation until the end.

    Scores are float32 sgemm results; two computations of the same dot product with different
    blockings can differ by about ``k * eps32 * |q| |c|``, so lists are exact for the scores as
    computed here, and candidates closer than that to the N-th score may swap with another
    computation.

    Seeding: each row's buffer starts from a floor read off a sample of every 32nd candidate (see
    ``_topn_rows``); rows where the floor proves too high are recomputed without it, so the
    result is exact either way.
    """
    q_mat = _as_float32_matrix(queries, "queries")
    c_mat = _as_float32_matrix(candidates, "candidates")
    metrics = _check_metrics(metrics)
    if q_mat.shape[1] != c_mat.shape[1]:
        raise ValueError(
            f"queries and candidates must have the same rank; received {q_mat.shape[1]} and "
            f"{c_mat.shape[1]} columns. Use embeddings from the same factorisation."
        )
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (the list length) must be an integer >= 1; received {n!r}.")
    for name, value in (("query_chunk", query_chunk), ("candidate_block", candidate_block), ("n_threads", n_threads)):
        if value is None and name == "n_threads":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; received {value!r}.")
    n = int(n)
    nq, p = q_mat.shape[0], c_mat.shape[0]
    if p > _INT32_MAX:
        raise ValueError(f"at most {_INT32_MAX} candidates are supported (int32 ids); received {p}. Split the catalog.")
    offset = 0 if query_offset is None else int(query_offset)
    if exclude_self and (offset < 0 or offset + nq > p):
        raise ValueError(
            f"with exclude_self the queries must be candidate rows query_offset .. query_offset + q; "
            f"received query_offset={offset}, q={nq}, p={p}. Pass the chunk's first row as query_offset."
        )
    ex_indptr, ex_indices = _check_exclusions(exclude_indptr, exclude_indices, nq, p)

    want = {m: m in metrics for m in METRICS}
    q_sumsq, c_sumsq = _row_sumsq(q_mat), _row_sumsq(c_mat)
    _check_finite(q_sumsq, "queries")
    _check_finite(c_sumsq, "candidates")
    _check_no_overflow(q_sumsq, c_sumsq)
    q_min, c_min = _check_min_norms(cosine_min_norm)
    qinv = _cosine_inverse_norms(q_mat, q_sumsq, q_min) if want["cosine"] else np.zeros(nq, dtype=np.float32)
    cinv = _cosine_inverse_norms(c_mat, c_sumsq, c_min) if want["cosine"] else np.zeros(p, dtype=np.float32)
    self_ids = np.arange(offset, offset + nq, dtype=np.int64) if exclude_self else np.full(nq, -1, dtype=np.int64)
    cb = min(int(candidate_block), max(p, 1))
    full = _Candidates(c_mat, cinv, cb)
    width = _seed_width(n)
    # dot lists alone: blocks in norm order, skipped by the bound; not where the norms hardly differ (measured: equal
    # norms cost the ordered scan 1.05x the plain one for nothing skipped)
    c_norm = np.sqrt(c_sumsq) if metrics == ("dot",) and p > cb and norm_order else None
    if c_norm is not None and c_norm.min() < _NORM_ORDER_MIN_SPREAD * c_norm.max():
        order = np.argsort(-c_norm, kind="stable")
        full = _Candidates(c_mat[order], cinv[order], cb, order.astype(np.int32), c_norm[order])
    sample = None
    if p >= _SEED_MIN_SAMPLE * width * _SEED_STRIDE:
        ids = np.arange(0, p, _SEED_STRIDE)
        sample = _Candidates(full.c[ids], full.cinv[ids], cb, full.ids[ids] if full.ids.shape[0] else full.ids)

    out = {m: TopN(np.full((nq, n), -1, dtype=np.int32), np.full((nq, n), -np.inf, dtype=np.float32),
                   np.zeros(nq, dtype=np.int32)) for m in metrics}
    workers = _default_threads() if n_threads is None else int(n_threads)
    rows_per_task = tile_rows(nq, query_chunk, cb, workers)
    local = threading.local()
    stats_lock = threading.Lock()

    def task(a: int) -> None:
        numba.set_num_threads(1)  # thread-local: this thread's selection runs serially
        b = min(a + rows_per_task, nq)
        if getattr(local, "buf", None) is None:
            local.buf = np.empty(rows_per_task * cb, dtype=np.float32)
        rows = _QueryRows(q_mat[a:b], qinv[a:b], self_ids[a:b], *_csr_rows(ex_indptr, ex_indices, a, b))
        part: dict = {}
        for m, (counts, idx, sc) in _topn_rows(rows, full, sample, n, width, want, local.buf, part).items():
            out[m].indices[a:b] = idx
            out[m].scores[a:b] = sc
            out[m].counts[a:b] = counts
        if stats is not None:
            with stats_lock:
                for key, v in part.items():
                    stats[key] = stats.get(key, 0) + v

    starts = range(0, nq, rows_per_task)
    caller_threads = numba.get_num_threads()
    try:
        with blas_limit(1):
            if workers == 1 or len(starts) <= 1:
                for a in starts:
                    task(a)
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    list(pool.map(task, starts))  # list() re-raises a task's exception here
    finally:
        numba.set_num_threads(caller_threads)
    return out


_TILE_BYTES = 4 << 20  # a gemm tile the selection reads back from cache; 16 MiB measured 30% slower (tile_rows)
_MIN_TILE_ROWS = 256  # rows per tile, enough to pay for the gemm packing the candidate block once per tile


def tile_rows(n_queries: int, query_chunk: int, candidate_block: int, n_threads: int) -> int:
    """Query rows per gemm tile (and per thread task) that ``topn_blocked`` uses.

    The thread's share of ``query_chunk``, cut down to a tile of about ``_TILE_BYTES`` so that the
    selection reads it back from cache, but not below ``_MIN_TILE_ROWS``: the gemm packs the
    candidate block once per tile and needs enough rows to pay for that. Measured on a 2-core
    Zen 5 (1 MiB L2 per core, 32 MiB L3): a 1024 x 4096 tile (16 MiB) costs the selection 30% more
    time than 256 x 4096 (4 MiB), at the same gemm speed.
    """
    cache_rows = max(_MIN_TILE_ROWS, _TILE_BYTES // (4 * max(int(candidate_block), 1)))
    return max(1, min(-(-int(query_chunk) // n_threads), -(-int(n_queries) // n_threads), cache_rows))


def _default_threads() -> int:
    """The smaller of numba's and BLAS's thread counts: both are ways to say how many cores to use
    (a Dask worker's nanny sets OPENBLAS_NUM_THREADS=1 by default, numba's count stays all cores)."""
    blas = [lib["num_threads"] for lib in blas_controller().select(user_api="blas").info()]
    return max(1, min([numba.get_num_threads(), *blas]))


_SEED_STRIDE = 32  # every 32nd candidate is scored for the floor: 1/32 more gemm (see _topn_rows)
_SEED_SLACK = 2.0  # about 2 N candidates above the floor: 210 insertions, 21 of 20,000 rows redone (benchmark)
_SEED_MIN_SAMPLE = 4  # seed only when the sample holds at least 4 x the seed width


def _seed_width(n: int) -> int:
    """Rank in the sample whose score is the floor: about ``_SEED_SLACK * n`` candidates lie above it.

    The ``+ 3``: with a sample of 1/32 a row's best n put about n/32 candidates in the sample, and
    the floor is too high only when ``width`` of them land there (Poisson(3.1) >= 10: 0.13% for
    n = 100).
    """
    return int(np.ceil(_SEED_SLACK * n / _SEED_STRIDE)) + 3


class _Candidates(NamedTuple):
    """A candidate matrix with its inverse norms, scanned in blocks of ``block`` rows.

    ``ids``: the candidate id of each row when the rows are not in id order (int32; empty: row r is id r).
    ``norms``: float64 L2 norms of the rows, sorted descending, when the scan may skip blocks by the norm bound
    (``_scan``); empty: every block is scanned.
    """

    c: np.ndarray  # float32 (p, k)
    cinv: np.ndarray  # float32 (p,)
    block: int
    ids: np.ndarray = np.zeros(0, dtype=np.int32)
    norms: np.ndarray = np.zeros(0)


class _QueryRows(NamedTuple):
    """Query rows with what the kernel needs to know about each."""

    q: np.ndarray  # float32 (r, k)
    qinv: np.ndarray  # float32 (r,)
    self_ids: np.ndarray  # int64 (r,), -1 for none
    ex_indptr: np.ndarray  # int64 (r + 1,) from 0, or (0,) for no exclusions
    ex_indices: np.ndarray  # int32, sorted within rows

    def subset(self, keep: np.ndarray) -> "_QueryRows":
        """The rows at positions ``keep`` (sorted), exclusions included."""
        ptr, idx = self.ex_indptr, self.ex_indices
        if ptr.shape[0]:
            starts, lens = ptr[keep], np.diff(ptr)[keep]
            take = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
            ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            idx = idx[take]
        return _QueryRows(self.q[keep], self.qinv[keep], self.self_ids[keep], ptr, idx)

    def sampled(self, stride: int) -> "_QueryRows":
        """The same rows with candidate ids mapped to columns of the sample ``0, stride, 2 stride, ..``."""
        ids = self.self_ids
        self_ids = np.where((ids >= 0) & (ids % stride == 0), ids // stride, -1)
        ptr, idx = self.ex_indptr, self.ex_indices
        if ptr.shape[0]:
            keep = idx % stride == 0
            row_of = np.repeat(np.arange(ptr.shape[0] - 1), np.diff(ptr))
            counts = np.bincount(row_of[keep], minlength=ptr.shape[0] - 1)
            ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            idx = (idx[keep] // stride).astype(np.int32)  # the map is increasing: rows stay sorted
        return _QueryRows(self.q, self.qinv, self_ids, ptr, idx)


def _csr_rows(indptr: np.ndarray, indices: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows a..b of an exclusion CSR as (indptr from 0, indices); empty arrays stay empty."""
    if indptr.shape[0] == 0:
        return indptr, indices
    lo, hi = int(indptr[a]), int(indptr[b])
    return indptr[a : b + 1] - lo, indices[lo:hi]


#: Relative slack of the norm bound ``|q . c| <= |q| |c|`` for float32 scores: an sgemm dot product of k terms is
#: within ``gamma_k |q| |c|`` of the exact one (``gamma_k ~ k eps32 / 2``), so a block is skipped only when
#: ``|q| max|c| (1 + _BOUND_SLACK_PER_TERM (k + 2))`` is below the row's threshold (twice the worst case).
_BOUND_SLACK_PER_TERM = float(np.finfo(np.float32).eps)
#: The norm-ordered scan is used only when the smallest candidate norm is below this fraction of the largest: with
#: norms within 10% of each other a block's bound is within 10% of every other block's, and scores of a top-N list
#: are rarely that far below the largest possible.
_NORM_ORDER_MIN_SPREAD = 0.9


def _nth_best(state: tuple) -> np.ndarray:
    """Per row of a running state of list length n, its n-th best score; ``-inf`` where it holds fewer than n."""
    counts, _, scores = finalize_state(*state)
    n = scores.shape[1]
    return np.where(counts >= n, scores[:, n - 1], np.float32(-np.inf))


def _scan(rows: _QueryRows, cands: _Candidates, n: int, want: dict, buf: np.ndarray, floors: dict | None = None,
          stats: dict | None = None):
    """Running top-n states of ``rows`` over all of ``cands``: per block one sgemm, one selection.

    Thresholds start at ``floors[metric]`` (per row) instead of -inf when given. With ``cands.norms`` (dot lists
    only, candidates sorted by norm descending) a block is computed only for the rows whose bound
    ``|q| max|c|`` can still reach their current N-th best (the threshold after ``tighten_state``;
    ``_BOUND_SLACK_PER_TERM``): the rest of each block's rows are left out of its sgemm, and the scan ends
    when no row is left, since later blocks' norms are smaller and thresholds only rise. Exact: a skipped
    score is below the row's final N-th best.
    ``stats``: adds ``scores`` (rows x candidates) and ``scores_computed``.
    """
    nr = rows.q.shape[0]
    both = seeded_state(nr, n, want, floors)  # a metric that is off: 0 rows
    dot, cos = both[0:3], both[3:6]
    states = {m: state for m, state in zip(METRICS, (dot, cos)) if want[m]}
    p = cands.c.shape[0]
    prune = cands.norms.shape[0] > 0 and not want["cosine"]
    if prune:
        q_norm = np.sqrt(_row_sumsq(rows.q)) * (1.0 + _BOUND_SLACK_PER_TERM * (rows.q.shape[1] + 2))
    computed = 0
    for c0 in range(0, p, cands.block):
        c1 = min(c0 + cands.block, p)
        ids = cands.ids[c0:c1] if cands.ids.shape[0] else cands.ids
        live = None  # every row
        if prune:
            tighten_state(*dot)  # the thresholds: each row's current N-th best
            live = np.flatnonzero(q_norm * cands.norms[c0] >= threshold_scores(dot[1]))
            if live.size == 0:
                break  # no row can gain from this block, nor from any later one (smaller norms)
            if live.size == nr:
                live = None
        block_rows = rows if live is None else rows.subset(live)
        d_state = dot if live is None else tuple(a[live] for a in dot)  # cosine is off where live is set
        tile = buf[: block_rows.q.shape[0] * (c1 - c0)].reshape(block_rows.q.shape[0], c1 - c0)
        np.matmul(block_rows.q, cands.c[c0:c1].T, out=tile)  # S = Q C^T, one sgemm
        select_tile(tile, c0, block_rows.self_ids, block_rows.qinv, cands.cinv[c0:c1], block_rows.ex_indptr,
                    block_rows.ex_indices, *d_state, *cos, ids)
        if live is not None:
            for a, part in zip(dot, d_state):
                a[live] = part
        computed += tile.size
    if stats is not None:
        stats["scores"] = stats.get("scores", 0) + nr * p
        stats["scores_computed"] = stats.get("scores_computed", 0) + computed
    return states


def _topn_rows(rows: _QueryRows, full: _Candidates, sample: _Candidates | None, n: int, width: int, want: dict,
               buf: np.ndarray, stats: dict | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sorted (counts, indices, scores) per wanted metric for one range of query rows.

    Seeding: from a threshold at ``-inf`` a row's buffer takes the first 2 N candidates and then those that beat
    its N-th best so far, more than ``N (1 + ln(p / N))`` (about 800 for p = 100k, N = 100) over p candidates in
    random order, each a scalar step after the vectorised comparison. When ``sample`` (every
    ``_SEED_STRIDE``-th candidate) is given it is scanned first, and each row's ``width``-th best admissible
    sample score becomes the floor its threshold starts at: only the ~``width * _SEED_STRIDE`` (~3 N) candidates
    above it can enter (measured at p = 40k, k = 64, N = 100, one thread, item-item lists: 3.0 s seeded, 3.9 s
    not). The floor is exact when
    the full scan finds n admissible candidates at or above it, as the counts show; the other rows
    (the sample caught more than its share of their best, or they have fewer than n admissible
    candidates) are scanned again without a floor.
    """
    nr = rows.q.shape[0]
    floors = {m: np.full(nr, -np.inf, dtype=np.float32) for m in METRICS}
    if sample is not None:
        # a sample with its own ids (norm order) is offered in candidate ids; one in id order, in its columns
        seed_rows = rows if sample.ids.shape[0] else rows.sampled(_SEED_STRIDE)
        for m, state in _scan(seed_rows, sample, width, want, buf).items():
            floors[m] = _nth_best(state)
    results = {m: finalize_state(*st) for m, st in _scan(rows, full, n, want, buf, floors, stats).items()}
    redo = np.zeros(nr, dtype=bool)
    for m, (counts, _, _) in results.items():
        redo |= (counts < n) & (floors[m] > -np.inf)
    if redo.any():
        keep = np.flatnonzero(redo)
        for m, state in _scan(rows.subset(keep), full, n, want, buf, stats=stats).items():
            counts, idx, sc = finalize_state(*state)
            results[m][0][keep], results[m][1][keep], results[m][2][keep] = counts, idx, sc
    return results


# ---------------------------------------------------------------------------------------------
# symmetric scores: half the gemm


#: Rows of one square tile of the symmetric driver: 1280 x 1280 float32 = 6.25 MiB per thread, read twice (rows,
#: then columns) after its gemm. Measured with the buffer selection at p = 100k, k = 64, N = 100 on 2 cores (two
#: runs each): 1024 -> 8.0 / 8.0 s, 1152 -> 7.1 / 7.2 s, 1280 -> 7.0 / 7.1 s, 1536 -> 7.2 / 7.3 s, 2048 -> 8.0 /
#: 8.3 s (with heaps, at p = 50k: 512 -> 3.6 s, 1024 -> 3.0 s, 2048 -> 2.8 s, 3072 -> 3.4 s).
SYMMETRIC_TILE = 1280


def tournament(m: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint block pairs ``(u, v)``, ``u <= v``, that cover every pair ``u < v`` and every ``(u, u)``
    exactly once (the circle method; a block's turn against the odd one out is its pair with itself).

    Within a round no two pairs share a block, so their selections write disjoint running states and
    can run at once. ``m`` or ``m + 1`` rounds of about ``m / 2`` pairs.
    """
    players: list[int | None] = list(range(m)) + ([None] if m % 2 else [])
    k = len(players)
    rounds = []
    for _ in range(k - 1):
        pairs = []
        for i in range(k // 2):
            x, y = players[i], players[k - 1 - i]
            if x is None or y is None:
                u = y if x is None else x
                pairs.append((u, u))
            else:
                pairs.append((min(x, y), max(x, y)))
        rounds.append(pairs)
        players = [players[0], players[-1], *players[1:-1]]
    if m % 2 == 0 and m:
        rounds.append([(u, u) for u in range(m)])
    return rounds


def _state_rows(states: tuple, lo: int, hi: int) -> tuple:
    """Rows ``lo:hi`` (views) of a ``(dot_s, dot_i, cos_s, cos_i)`` state; a metric's (0, N) arrays stay as they are."""
    return tuple(a[lo:hi] if a.shape[0] else a for a in states)


def symmetric_pair(emb: np.ndarray, inv: np.ndarray, a: tuple[int, int], b: tuple[int, int], states_a: tuple,
                   states_b: tuple, tile: int, buf: np.ndarray) -> None:
    """Offer every score between the rows ``a`` and the rows ``b`` of ``emb`` to both sides' running top-N states.

    The scores ``S = E E^T`` of one embedding are symmetric, so each square tile ``S_uv = E_u E_v^T``
    (u, v: sub-blocks of ``tile`` rows) is computed once and read twice: by rows for u's lists
    (``select_tile``) and by columns for v's (``select_tile_columns``). With ``a == b`` only tiles on
    and above the diagonal are computed; a diagonal tile holds both directions and is read by rows,
    with each row's own column skipped (no self-neighbour). ``states_a`` / ``states_b``:
    ``(dot_s, dot_i, cos_s, cos_i)`` over the rows of ``a`` / ``b`` (the same arrays when ``a == b``),
    updated in place. ``inv``: inverse norms of every row (zeros when cosine is off). ``buf``:
    float32 of at least ``tile * tile``. Time ``2 |a| |b| k`` flops (half that for ``a == b``) plus the
    selections; memory: the tile.
    """
    a0, a1 = a
    b0, b1 = b
    same = a == b
    no_ptr, no_idx = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    for u0 in range(a0, a1, tile):
        u1 = min(u0 + tile, a1)
        su = _state_rows(states_a, u0 - a0, u1 - a0)
        for v0 in range(u0 if same else b0, b1, tile):
            v1 = min(v0 + tile, b1)
            t = buf[: (u1 - u0) * (v1 - v0)].reshape(u1 - u0, v1 - v0)
            # S_uv, one sgemm. A diagonal tile's operands are one buffer, for which numpy calls ssyrk, and
            # OpenBLAS's ssyrk rounds differently from its sgemm (0.3.30 and 0.3.31, Haswell kernels on AMD
            # EPYC): the copy keeps every score an sgemm result, whichever tile it falls in
            right = emb[v0:v1].copy() if u0 == v0 else emb[v0:v1]
            np.matmul(emb[u0:u1], right.T, out=t)
            if same and u0 == v0:
                self_ids = np.arange(u0, u1, dtype=np.int64)
                select_tile(t, v0, self_ids, inv[u0:u1], inv[v0:v1], no_ptr, no_idx, *su)
            else:
                select_tile(t, v0, np.full(u1 - u0, -1, dtype=np.int64), inv[u0:u1], inv[v0:v1], no_ptr, no_idx, *su)
                select_tile_columns(t, u0, inv[v0:v1], inv[u0:u1], *_state_rows(states_b, v0 - b0, v1 - b0))


def symmetric_floors(emb: np.ndarray, inv: np.ndarray, lo: int, hi: int, n: int, want: dict,
                     buf: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """Seeded floors (per wanted metric, float32 per row) of rows ``lo:hi`` of ``emb`` against all its rows, read
    off every ``_SEED_STRIDE``-th row as in ``_topn_rows``; None when the catalog is too small to seed."""
    p = emb.shape[0]
    width = _seed_width(n)
    if p < _SEED_MIN_SAMPLE * width * _SEED_STRIDE:
        return None
    ids = np.arange(0, p, _SEED_STRIDE)
    cb = min(4096, len(ids))
    sample = _Candidates(emb[ids], inv[ids], cb)
    nr = hi - lo
    no_ptr, no_idx = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    rows = _QueryRows(emb[lo:hi], inv[lo:hi], np.arange(lo, hi, dtype=np.int64), no_ptr, no_idx)
    floors = {}
    step = max(1, (4 << 20) // (4 * cb))
    states: dict[str, list] = {m: [] for m in METRICS if want[m]}
    buf = np.empty(step * cb, dtype=np.float32) if buf is None or buf.size < step * cb else buf
    for r0 in range(0, nr, step):
        keep = np.arange(r0, min(r0 + step, nr))
        for m, state in _scan(rows.subset(keep).sampled(_SEED_STRIDE), sample, width, want, buf).items():
            states[m].append(_nth_best(state))
    for m, parts in states.items():
        floors[m] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return floors


def seeded_state(n_rows: int, n: int, want: dict, floors: dict | None) -> tuple:
    """An empty ``(dot_k, dot_t, dot_f, cos_k, cos_t, cos_f)`` state of ``n_rows`` rows (a metric not wanted: 0 rows),
    thresholds at the rows' floors when given."""
    out: list[np.ndarray] = []
    for m in METRICS:
        state = empty_state(n_rows if want[m] else 0, n)
        if want[m] and floors is not None:
            state[1][:] = floor_keys(floors[m])
        out += state
    return tuple(out)


def pack_states(states: tuple) -> tuple:
    """``(dot pack, cosine pack)`` of a ``(dot_k, dot_t, dot_f, cos_k, cos_t, cos_f)`` state (``select.pack_state``;
    a metric that is off packs to empty arrays): a partial state as it travels between tasks."""
    return tuple(pack_state(*states[i:i + 3]) for i in (0, 3))


def merge_states(states: tuple, parts) -> tuple:
    """Merge packed partial states (``pack_states``, each over some of the rows' candidates, from the same floors)
    into ``states`` (``seeded_state``), in place; returns it."""
    for packs in parts:
        for i, pack in zip((0, 3), packs):
            merge_packed(*states[i:i + 3], pack)
    return states


def finish_symmetric(emb: np.ndarray, inv: np.ndarray, lo: int, hi: int, n: int, want: dict, states: tuple,
                     floors: dict | None, candidate_block: int = 1280) -> dict[str, TopN]:
    """Sorted lists of rows ``lo:hi`` from their running states; rows whose floor proved too high (fewer than n
    entries above it) are scanned again against every row without a floor, as ``_topn_rows`` does."""
    nr = hi - lo
    results = {}
    redo = np.zeros(nr, dtype=bool)
    for m, state in zip(METRICS, (states[0:3], states[3:6])):
        if want[m]:
            counts, ids, scores = finalize_state(*state)
            results[m] = [counts, ids, scores]
            if floors is not None:
                redo |= (counts < n) & (floors[m] > -np.inf)
    if redo.any():
        keep = np.flatnonzero(redo)
        no_ptr, no_idx = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        rows = _QueryRows(emb[lo:hi], inv[lo:hi], np.arange(lo, hi, dtype=np.int64), no_ptr, no_idx).subset(keep)
        cb = min(int(candidate_block), emb.shape[0])
        buf = np.empty(len(keep) * cb, dtype=np.float32)
        for m, state in _scan(rows, _Candidates(emb, inv, cb), n, want, buf).items():
            counts, ids, scores = finalize_state(*state)
            results[m][0][keep], results[m][1][keep], results[m][2][keep] = counts, ids, scores
    return {m: TopN(ids, scores, counts) for m, (counts, ids, scores) in results.items()}


def prepare_symmetric(embeddings: np.ndarray, metrics: Sequence[str], cosine_min_norm: float = 0.0
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(E, inv, want)``: the embedding as C-contiguous float32, its inverse norms (zeros without cosine, and for
    rows whose norm is below ``cosine_min_norm``) and the wanted metrics; the same checks as ``topn_blocked``
    (finite values, scores that cannot overflow)."""
    emb = _as_float32_matrix(embeddings, "embeddings")
    metrics = _check_metrics(metrics)
    if emb.shape[0] > _INT32_MAX:
        raise ValueError(f"at most {_INT32_MAX} rows are supported (int32 ids); received {emb.shape[0]}.")
    sumsq = _row_sumsq(emb)
    _check_finite(sumsq, "embeddings")
    _check_no_overflow(sumsq, sumsq)
    want = {m: m in metrics for m in METRICS}
    min_norm, _ = _check_min_norms((cosine_min_norm, 0.0))
    inv = _cosine_inverse_norms(emb, sumsq, min_norm) if want["cosine"] else np.zeros(emb.shape[0], dtype=np.float32)
    return emb, inv, want


def topn_symmetric(
    embeddings: np.ndarray,
    n: int,
    *,
    metrics: Sequence[str] = ("dot", "cosine"),
    tile: int = SYMMETRIC_TILE,
    n_threads: int | None = None,
    cosine_min_norm: float = 0.0,
) -> dict[str, TopN]:
    """Item-item top-N of every row of one embedding against all its rows (no self-neighbour), from half the gemm.

    Equal to ``topn_blocked(E, E, n, exclude_self=True, cosine_min_norm=(m, m))`` for ``m = cosine_min_norm``
    (same order, ties, zero-norm and norm-floor rules): the
    scores ``E E^T`` are symmetric, so only the tiles on and above the diagonal are computed
    (``symmetric_pair``) and each feeds the running top-N of both its row block and its column
    block. Blocks of ``tile`` rows are paired in ``tournament`` order; ``n_threads`` threads each take the
    next pair whose two blocks no other thread holds (pairs run at once touch disjoint rows; single-threaded
    gemm and selection each, as in ``topn_blocked``). Each row's buffer starts at a floor seeded from every
    32nd row, and rows whose floor proves too high are rescanned, so the lists are exact either way.

    Time ``p^2 k`` flops of sgemm (half of ``topn_blocked``'s ``2 p^2 k``), the same O(p^2) selection
    scans, a ``1/32`` seeding gemm. Memory: the states ``p x 2 N x 8`` bytes per metric (O(p N)), one
    ``tile x tile`` float32 buffer per thread; never O(p^2).
    """
    emb, inv, want = prepare_symmetric(embeddings, metrics, cosine_min_norm)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (the list length) must be an integer >= 1; received {n!r}.")
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile must be an integer >= 1; received {tile!r}.")
    n, tile, p = int(n), int(tile), emb.shape[0]
    workers = _default_threads() if n_threads is None else int(n_threads)
    blocks = [(s, min(s + tile, p)) for s in range(0, p, tile)] or [(0, 0)]
    caller_threads = numba.get_num_threads()
    local = threading.local()

    def buffer() -> np.ndarray:
        if getattr(local, "buf", None) is None:
            local.buf = np.empty(tile * tile, dtype=np.float32)
        return local.buf

    def floors_of(block: tuple[int, int]):
        numba.set_num_threads(1)
        return symmetric_floors(emb, inv, *block, n, want, buffer())

    try:
        with blas_limit(1), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            parts = list(pool.map(floors_of, blocks))
            floors = None if not parts or parts[0] is None else {
                m: np.concatenate([f[m] for f in parts]) for m in parts[0]}
            states = seeded_state(p, n, want, floors)

            pending = [uv for rnd in tournament(len(blocks)) for uv in rnd]
            busy: set[int] = set()
            ready = threading.Condition()

            def take() -> tuple[int, int] | None:
                """The first pending pair (in tournament order) neither of whose blocks is in use, marked in use;
                None when none is left. Waits while every pending pair has a block in use."""
                with ready:
                    while pending:
                        for at, (u, v) in enumerate(pending):
                            if u not in busy and v not in busy:
                                busy.update((u, v))
                                return pending.pop(at)
                        ready.wait()
                    return None

            def pairs() -> None:
                numba.set_num_threads(1)
                while (uv := take()) is not None:
                    try:
                        a, b = blocks[uv[0]], blocks[uv[1]]
                        symmetric_pair(emb, inv, a, b, _state_rows(states, *a), _state_rows(states, *b), tile,
                                       buffer())
                    except BaseException:
                        with ready:
                            pending.clear()  # the other threads stop after their current pair
                            ready.notify_all()
                        raise
                    finally:
                        with ready:
                            busy.difference_update(uv)
                            ready.notify_all()

            # each thread takes the next pair whose two blocks are free, rather than a round at a time: no thread
            # waits at the end of a round (measured 4.4% of the pairs' thread time idle at p = 100k, 2 threads)
            for f in [pool.submit(pairs) for _ in range(max(1, workers))]:
                f.result()  # re-raises a pair's exception here

            # each block's lists written into the outputs by its own thread (concatenating them after took 0.33 of
            # 6.9 s at p = 100k, 2 threads)
            out = {m: TopN(np.empty((p, n), dtype=np.int32), np.empty((p, n), dtype=np.float32),
                           np.empty(p, dtype=np.int32)) for m in _check_metrics(metrics)}

            def finish(block: tuple[int, int]) -> None:
                numba.set_num_threads(1)
                fl = None if floors is None else {m: f[block[0]:block[1]] for m, f in floors.items()}
                done = finish_symmetric(emb, inv, *block, n, want, _state_rows(states, *block), fl)
                for m, lists in out.items():
                    for field, part in zip(lists, done[m]):
                        field[block[0]:block[1]] = part

            list(pool.map(finish, blocks))
    finally:
        numba.set_num_threads(caller_threads)
    return out


# ---------------------------------------------------------------------------------------------
# reference


def topn_reference(
    queries: np.ndarray,
    candidates: np.ndarray,
    n: int,
    metric: str,
    *,
    query_offset: int = 0,
    exclude_self: bool = False,
    exclude_indptr: np.ndarray | None = None,
    exclude_indices: np.ndarray | None = None,
    cosine_min_norm: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense NumPy top-N for small data: all q x p scores, then a stable sort per row.

    Same rules as ``topn_blocked``; ``cos_ij = s_ij * qinv_i * cinv_j`` with ``S = Q C^T`` from one
    float32 matmul and inverse norms from float64 norms. Returns ``(counts, indices, scores)`` like
    ``finalize_state``. Time O(q p (k + log p)), memory O(q p): tests only.

    Agreement with ``topn_blocked``: its gemm tiles have other shapes than this one matmul, so a
    score may be summed in another order; each float32 dot product is within ``gamma_k sum_l
    |q_l c_l| <= ~k u |q| |c|`` of the exact value (``u = eps32 / 2``), so the two differ by at most
    ``~k eps32 |q| |c|`` (cosine: ``~k eps32`` plus two roundings). On data whose exact scores are
    further apart than twice that, the lists are identical and the scores agree within it. On
    small-integer data every gemm is exact and the two agree bit for bit, ties included.
    """
    qm = np.asarray(queries, dtype=np.float32)
    cm = np.asarray(candidates, dtype=np.float32)
    nq, p = qm.shape[0], cm.shape[0]
    scores = qm @ cm.T
    valid = np.ones((nq, p), dtype=bool)
    if metric == "cosine":
        qn = np.linalg.norm(qm.astype(np.float64), axis=1)
        cn = np.linalg.norm(cm.astype(np.float64), axis=1)
        qinv = np.where(qn > 0, 1.0 / np.where(qn > 0, qn, 1.0), 0.0).astype(np.float32)
        cinv = np.where(cn > 0, 1.0 / np.where(cn > 0, cn, 1.0), 0.0).astype(np.float32)
        scores = scores * qinv[:, None] * cinv[None, :]
        q_min, c_min = cosine_min_norm
        valid &= ((qn > 0) & (qn >= q_min))[:, None] & ((cn > 0) & (cn >= c_min))[None, :]
    elif metric != "dot":
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; received {metric!r}.")
    if exclude_self:
        rows = np.arange(nq)
        valid[rows, query_offset + rows] = False
    if exclude_indptr is not None:
        for r in range(nq):
            valid[r, exclude_indices[exclude_indptr[r] : exclude_indptr[r + 1]]] = False
    counts = np.zeros(nq, dtype=np.int32)
    idx = np.full((nq, n), -1, dtype=np.int32)
    sc = np.full((nq, n), -np.inf, dtype=np.float32)
    for r in range(nq):
        cand = np.flatnonzero(valid[r])
        order = np.lexsort((cand, -scores[r, cand]))[:n]  # score desc, then index asc
        counts[r] = order.size
        idx[r, : order.size] = cand[order]
        sc[r, : order.size] = scores[r, cand[order]]
    return counts, idx, sc
