"""Exact top-N neighbour lists: one float32 gemm tile per (query chunk, candidate block), numba selection.

Serves every neighbour list of the pipeline: item-item cosine and dot of B rows, "model" scores
``a_i . b_j`` (the product ``A B^T`` of Eq. 1, which is unique where the embeddings are not),
cosine of the rows of another embedding matrix, user-item ``p_u . b_i`` and ``cos(p_u, b_i)`` with
the user's own items excluded, and user-user lists.

For a chunk of queries ``Q`` (q x k) and a block of candidates ``C`` (c x k) the driver computes
``S = Q C^T`` with one BLAS sgemm (numpy ``matmul`` on float32) and hands the tile to
``select_tile``, which keeps for every query row the best N candidates seen so far as a binary
min-heap (scores and indices, updated in place across candidate blocks). Cosine and dot come from
the same tile: ``cos_ij = s_ij * qinv_i * cinv_j`` with the inverse L2 norms applied at selection
time, so the gemm is done once for both lists. ``topn_blocked`` drives it: query rows split over
threads, a sampled floor that spares most heap insertions, exact either way.

Order and rules, identical in the kernel and in ``topn_reference``:

* candidates are ranked by score descending, ties by candidate index ascending; the selected set is
  the N best under that total order, so it does not depend on block order or block sizes for
  given scores (the float32 gemm itself may round differently for different tile shapes, by at
  most about ``k * eps32 * |q| |c|``);
* a query is never its own neighbour when ``exclude_self`` is set (query row ``r`` is candidate
  ``query_offset + r``);
* zero-norm rows have no cosine: a zero-norm query gets an empty cosine list and a zero-norm
  candidate is never a cosine neighbour (no NaN is ever produced);
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
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from threadpoolctl import ThreadpoolController

from mfsim.pipeline.errors import MfsimError

METRICS = ("dot", "cosine")

# Width of the run of candidates tested at once against the current N-th best score: the test over
# a run is a branch-free compare-and-or that LLVM vectorises (4 AVX-512 / 8 AVX2 registers for 64
# float32), and a run is re-scanned scalar only when one of its candidates may enter the heap.
_RUN = 64

_INT32_MAX = np.iinfo(np.int32).max


class TopN(NamedTuple):
    """One metric's neighbour lists for q query rows, sorted by score desc then index asc."""

    indices: np.ndarray  # int32, (q, N); -1 after counts[r]
    scores: np.ndarray  # float32, (q, N); -inf after counts[r]
    counts: np.ndarray  # int32, (q,)


# ---------------------------------------------------------------------------------------------
# numba kernels


@njit(cache=True, nogil=True, inline="always")
def _after(s_a, i_a, s_b, i_b):
    """True when (s_a, i_a) ranks after (s_b, i_b): lower score, or equal score and larger index.

    Index -1 marks an empty heap slot; as uint32 it is the largest index, so it ranks after every
    real candidate of equal score (empty slots hold -inf).
    """
    return s_a < s_b or (s_a == s_b and np.uint32(i_a) > np.uint32(i_b))


@njit(cache=True, nogil=True, inline="always")
def _replace_root(hs, hi, s, j):
    """Put (s, j) at the root of the min-heap (hs, hi) in place of its worst entry and sift down.

    The worse of two children is picked without a branch (which child it is, is a coin flip for
    the branch predictor); only the stop test branches.
    """
    n = hs.shape[0]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= n:
            break
        if child + 1 < n:
            ls = hs[child]
            rs = hs[child + 1]
            right_worse = (rs < ls) | ((rs == ls) & (np.uint32(hi[child + 1]) > np.uint32(hi[child])))
            child += np.int64(right_worse)
        cs = hs[child]
        ci = hi[child]
        if not _after(cs, ci, s, j):
            break
        hs[pos] = cs
        hi[pos] = ci
        pos = child
    hs[pos] = s
    hi[pos] = j


@njit(cache=True, nogil=True, inline="always")
def _is_excluded(ex_indices, lo, hi, j):
    """Binary search of candidate id j in the sorted slice ex_indices[lo:hi]."""
    while lo < hi:
        mid = (lo + hi) >> 1
        v = ex_indices[mid]
        if v < j:
            lo = mid + 1
        elif v > j:
            hi = mid
        else:
            return True
    return False


@intrinsic
def _lowest_bit(typingctx, mask):
    """Index of the lowest set bit of a uint64 (LLVM ``cttz``; ``mask`` must be non-zero)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def _run_masks(row, cinv, c0, qi, thr_d, thr_c):
    """Bit masks of the ``_RUN`` candidates from ``c0`` that reach the dot / the cosine threshold.

    One comparison per candidate and metric, branch-free over a run of constant length so that it
    vectorises; bit ``jj`` stands for candidate ``c0 + jj``.
    """
    # slices and indices from 0 rather than row[c0 + jj]: no negative-index wraparound, which
    # would otherwise keep LLVM from vectorising (about 10x slower)
    seg = row[c0 : c0 + _RUN]
    cseg = cinv[c0 : c0 + _RUN]
    md = np.uint64(0)
    mc = np.uint64(0)
    for jj in range(_RUN):
        s = seg[jj]
        md |= np.uint64(s >= thr_d) << np.uint64(jj)
        mc |= np.uint64(s * qi * cseg[jj] >= thr_c) << np.uint64(jj)  # cos = s_ij * qinv_i * cinv_j
    return md, mc


@njit(cache=True, nogil=True, inline="always")
def _offer(s, j, block_start, me, zero_norm, ex_indices, ex_lo, ex_hi, hs, hi):
    """Offer candidate j (tile column) with score s to one heap; True when it entered."""
    if j == me or zero_norm:
        return False
    g = block_start + j
    if not _after(hs[0], hi[0], s, g):  # a tie with the N-th best enters only with a smaller id
        return False
    if ex_hi > ex_lo and _is_excluded(ex_indices, ex_lo, ex_hi, g):
        return False
    _replace_root(hs, hi, s, g)
    return True


@njit(cache=True, nogil=True, parallel=True)
def select_tile(tile, block_start, self_ids, qinv, cinv, ex_indptr, ex_indices, dot_s, dot_i, cos_s, cos_i):
    """Merge one score tile into the running top-N heaps of the dot and the cosine lists.

    Parameters
    ----------
    tile : float32 (q, c)
        ``S = Q C^T`` for q query rows and the candidates ``block_start .. block_start + c``.
    block_start : int
        Global candidate id of tile column 0.
    self_ids : int64 (q,)
        Global candidate id of each query row, skipped as a neighbour; -1 for none.
    qinv, cinv : float32 (q,), (c,)
        Inverse L2 norms of the query rows and of the block's candidates; 0 marks a zero-norm row,
        which takes no part in the cosine list.
    ex_indptr : int64 (q + 1,) or (0,)
        Per query row, the slice of ``ex_indices`` holding its excluded candidate ids (sorted);
        an empty array means no exclusions.
    ex_indices : int32 (nnz,)
    dot_s, dot_i : float32, int32 (q, N) or (0, N)
        Running state of the dot list: a binary min-heap per row whose root ``[r, 0]`` is the
        current N-th best (lowest score, largest index among equal scores). Empty slots have index
        -1 and score ``-inf`` (``empty_state``) or a floor known to be at most the final N-th best
        score (then only candidates at or above the floor enter). A state with 0 rows switches the
        metric off.
    cos_s, cos_i : float32, int32 (q, N) or (0, N)
        The same for the cosine list, ``cos_ij = s_ij * qinv_i * cinv_j``.

    Notes
    -----
    Time O(q c) for the scan plus O(log N) per heap insertion. Each run of ``_RUN`` candidates is
    compared with both thresholds at once (vectorised) into two bit masks; only the candidates
    whose bit is set are looked at one by one (the threshold may have risen meanwhile, so the
    comparison is repeated exactly). From empty slots at ``-inf``, a row sees about
    ``N (1 + ln(p / N))`` insertions over p candidates in random order (about 800 for p = 100k,
    N = 100); from a seeded floor (``topn_blocked``) about ``N (1 + ln 3)``. Either way most
    candidates cost one vectorised comparison per metric. Memory: none beyond the arguments.

    A binary heap rather than a sorted buffer: an insertion costs O(log N) moves instead of O(N)
    shifts, which keeps adversarial orders (scores rising with the index, where every candidate
    enters) at ``log2(100) ~ 7`` moves per insertion. Measured on random orders the two cost about
    the same (30-40 ns per insertion, most of it branch mispredictions).
    """
    nq, nc = tile.shape
    do_dot = dot_s.shape[0] > 0
    do_cos = cos_s.shape[0] > 0
    has_ex = ex_indptr.shape[0] > 0
    n_full = nc - nc % _RUN
    all_bits = ~np.uint64(0)
    for r in prange(nq):
        row = tile[r]
        qi = qinv[r]
        # a metric that is off (or a zero-norm query for cosine) gets threshold +inf: nothing
        # compares >= +inf, so it is never looked at
        thr_d = dot_s[r, 0] if do_dot else np.float32(np.inf)
        thr_c = cos_s[r, 0] if do_cos and qi > 0 else np.float32(np.inf)
        me = self_ids[r] - block_start  # tile column of the query itself (outside 0..c-1 if absent)
        ex_lo = ex_indptr[r] if has_ex else 0
        ex_hi = ex_indptr[r + 1] if has_ex else 0
        for c0 in range(0, nc, _RUN):
            if c0 < n_full:
                md, mc = _run_masks(row, cinv, c0, qi, thr_d, thr_c)
                if (md | mc) == 0:
                    continue
            else:  # the last, partial run: every candidate is looked at
                md = all_bits if thr_d < np.inf else np.uint64(0)
                mc = all_bits if thr_c < np.inf else np.uint64(0)
                width = np.uint64(nc - c0)
                md &= (np.uint64(1) << width) - np.uint64(1)
                mc &= (np.uint64(1) << width) - np.uint64(1)
            while md:
                j = c0 + np.int64(_lowest_bit(md))
                md &= md - np.uint64(1)
                s = row[j]
                if s >= thr_d and _offer(s, j, block_start, me, False, ex_indices, ex_lo, ex_hi, dot_s[r], dot_i[r]):
                    thr_d = dot_s[r, 0]
            while mc:
                j = c0 + np.int64(_lowest_bit(mc))
                mc &= mc - np.uint64(1)
                c = row[j] * qi * cinv[j]  # same rounding as the reference: (s_ij * qinv_i) * cinv_j
                if c >= thr_c and _offer(c, j, block_start, me, cinv[j] == 0, ex_indices, ex_lo, ex_hi,
                                         cos_s[r], cos_i[r]):
                    thr_c = cos_s[r, 0]


# ---------------------------------------------------------------------------------------------
# state helpers


@njit(cache=True, nogil=True, parallel=True)
def _row_sumsq(x):
    """Per row, the sum of squares accumulated in float64 (non-finite iff the row holds NaN or inf)."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for r in prange(x.shape[0]):
        acc = 0.0
        for v in x[r]:
            acc += np.float64(v) * np.float64(v)
        out[r] = acc
    return out


def inverse_norms(x: np.ndarray, sumsq: np.ndarray | None = None) -> np.ndarray:
    """``1 / ||x_r||`` per row as float32, 0 for zero rows (norms accumulated in float64)."""
    norms = np.sqrt(_row_sumsq(x) if sumsq is None else sumsq)
    out = np.zeros(x.shape[0], dtype=np.float32)
    nz = norms > 0
    out[nz] = (1.0 / norms[nz]).astype(np.float32)
    return out


def empty_state(n_rows: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A running top-N state of ``n_rows`` rows: scores ``-inf`` (float32), indices ``-1`` (int32)."""
    return np.full((n_rows, n), -np.inf, dtype=np.float32), np.full((n_rows, n), -1, dtype=np.int32)


def finalize_state(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn a running heap state into sorted lists.

    Parameters
    ----------
    scores : float32 (q, N)
    indices : int32 (q, N)
        Heap state from ``select_tile``; ``-1`` marks an empty slot.

    Returns
    -------
    counts : int32 (q,)
        Number of real entries per row.
    indices : int32 (q, N)
        Sorted by score descending then index ascending; ``-1`` after ``counts[r]``.
    scores : float32 (q, N)
        Matching scores; ``-inf`` after ``counts[r]``.

    Notes
    -----
    One int64 sort per row of keys ``(-score, index)``: the float's bits mapped to an integer of
    the same order in the high word, the index as unsigned (so -1, an empty slot, comes last) in
    the low word. Time O(q N log N), memory O(q N).
    """
    sc = scores + np.float32(0.0)  # -0.0 -> +0.0: equal scores must tie, whatever their sign bit
    bits = sc.view(np.int32).astype(np.int64)
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # same order as the floats
    key = ((-ordered) << 32) | (indices.astype(np.int64) & 0xFFFFFFFF)
    key.sort(axis=1)
    idx = (key & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    ordered = -(key >> 32)
    sc = np.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).astype(np.int32).view(np.float32)
    real = idx >= 0
    idx[~real] = -1
    counts = real.sum(axis=1).astype(np.int32)
    sc = np.where(real, sc, np.float32(-np.inf))
    return counts, idx, sc


# ---------------------------------------------------------------------------------------------
# driver


def _as_float32_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise MfsimError(
            f"{name} must be a 2-D array (rows x rank); received shape {x.shape}. Pass one row per vector."
        )
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise MfsimError(f"{name} must hold real numbers; received dtype {x.dtype}. Cast it to float32.")
    return np.ascontiguousarray(x, dtype=np.float32)


# |q . c| <= |q| |c| (Cauchy-Schwarz): below this bound no float32 score can overflow to inf
_SCORE_LIMIT = float(np.finfo(np.float32).max) / 2


def _check_no_overflow(q_sumsq: np.ndarray, c_sumsq: np.ndarray) -> None:
    """Raise when some dot product could overflow float32 (the selection must never see inf or NaN)."""
    if not q_sumsq.size or not c_sumsq.size:
        return
    bound = float(np.sqrt(q_sumsq.max()) * np.sqrt(c_sumsq.max()))
    if bound >= _SCORE_LIMIT:
        raise MfsimError(
            f"scores could overflow float32: the largest query and candidate norms multiply to {bound:.3g} "
            f"(limit {_SCORE_LIMIT:.3g}); rescale the embeddings (e.g. divide both by a constant)."
        )


def _check_finite(sumsq: np.ndarray, name: str) -> None:
    """Raise when a row's float64 sum of squares is not finite, i.e. it holds NaN or inf."""
    bad = np.flatnonzero(~np.isfinite(sumsq))
    if bad.size:
        raise MfsimError(
            f"{name} contains NaN or infinite values (after the cast to float32), first in row "
            f"{bad[0]} ({bad.size} rows); neighbour scores need finite embeddings. Check the "
            "factorisation output or drop those rows."
        )


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics or len(set(metrics)) != len(metrics):
        raise MfsimError(
            f"metrics must be distinct names among {', '.join(METRICS)}; received {list(metrics)}. "
            "Name each wanted metric once."
        )
    return metrics


def _check_exclusions(indptr, indices, n_queries: int, n_candidates: int):
    """Validate the exclusion CSR and return (int64 indptr, int32 indices sorted within rows)."""
    if (indptr is None) != (indices is None):
        raise MfsimError(
            "exclude_indptr and exclude_indices go together; received only "
            f"{'exclude_indptr' if indices is None else 'exclude_indices'}. Pass both or neither."
        )
    if indptr is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices)
    if indptr.ndim != 1 or indptr.shape[0] != n_queries + 1:
        raise MfsimError(
            f"exclude_indptr must have one entry per query row plus one ({n_queries + 1}); received "
            f"shape {indptr.shape}. Slice the CSR indptr as indptr[first:last + 1] for the query rows."
        )
    if n_queries and (np.any(np.diff(indptr) < 0) or indptr[0] < 0 or indptr[-1] > indices.shape[0]):
        raise MfsimError(
            f"exclude_indptr must be non-decreasing within [0, {indices.shape[0]}] (the length of "
            f"exclude_indices); received values from {indptr.min()} to {indptr.max()}."
        )
    lo = int(indptr[0]) if n_queries else 0
    hi = int(indptr[-1]) if n_queries else 0
    used = indices[lo:hi]
    if used.size and (used.min() < 0 or used.max() >= n_candidates):
        raise MfsimError(
            f"exclude_indices must be candidate ids in [0, {n_candidates}); received values from "
            f"{used.min()} to {used.max()}. Map them to candidate row numbers first."
        )
    used = used.astype(np.int32, copy=False)
    rows = np.repeat(np.arange(n_queries, dtype=np.int64), np.diff(indptr))
    step = np.diff(used.astype(np.int64))
    same_row = rows[1:] == rows[:-1]
    if np.any(step[same_row] < 0):
        # the kernel binary-searches each row's ids: sort them within rows (a copy, the caller's
        # arrays are left as they are)
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
    candidate_block: int = 65536,
    n_threads: int | None = None,
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
    candidate_block : int, default 65536
        Candidate rows per gemm tile. 2048-8192 is fastest: with 256 query rows the tile
        (2-8 MiB) stays in cache between the gemm that writes it and the selection that reads it.
        65536 makes 64 MiB tiles, read back from memory (about 15% slower on 2 cores).
    n_threads : int, optional
        Threads to use; default the smaller of ``numba.get_num_threads()`` and the BLAS thread
        count (1 inside a Dask worker, whose nanny sets ``OPENBLAS_NUM_THREADS=1``). Each thread
        runs its own query rows through single-threaded gemm and selection, so BLAS is limited to
        one thread during the call (restored after).

    Returns
    -------
    dict metric -> TopN(indices int32 (q, N), scores float32 (q, N), counts int32 (q,))
        Each row sorted by score descending, ties by smaller candidate index; ``-1`` / ``-inf``
        after ``counts[r]`` entries.

    Raises
    ------
    MfsimError
        On shapes, dtypes, non-finite values, unknown metrics or a malformed exclusion mask.

    Notes
    -----
    Time: ``2 q p k (1 + 1/32)`` flops of sgemm (the 1/32 is the seeding sample, below), an O(q p)
    selection scan (one vectorised comparison per score and metric) and a few hundred heap
    insertions per row and metric at O(log N) each.

    Memory, never O(p^2) nor O(q p): the tiles ``n_threads x tile_rows x candidate_block x 4``
    bytes, at most ``query_chunk x candidate_block x 4``; per thread the running state
    ``tile_rows x N x (4 + 4)`` bytes per metric (float32 scores, int32 ids) and its sorted copy;
    ``4 (p + q)`` bytes of inverse norms; the seeding sample ``p / 32 x k x 4`` bytes; the outputs
    ``q x N x (4 + 4 + 4 / N)`` bytes per metric. The candidate blocks are views of
    ``candidates``. With the defaults (2048, 65536, N = 100) on 2 threads: tiles 2 x 256 x 65536 x 4
    = 128 MiB, state 0.4 MiB per metric; with ``candidate_block = 4096``, tiles of 8 MiB.

    Threads: BLAS and numba each keep a pool of spinning threads; alternating a multi-threaded gemm
    with a multi-threaded selection on the same cores makes each pool wait for the other's spinning
    threads (measured 2-5x slower on 2 cores). Splitting the query rows among threads, each running
    both steps single-threaded, avoids that and needs no synchronisation until the end.

    Scores are float32 sgemm results; two computations of the same dot product with different
    blockings can differ by about ``k * eps32 * |q| |c|``, so lists are exact for the scores as
    computed here, and candidates closer than that to the N-th score may swap with another
    computation.

    Seeding: each row's heap starts from a floor read off a sample of every 32nd candidate (see
    ``_SEED_STRIDE``); rows where the floor proves too high are recomputed without it, so the
    result is exact either way.
    """
    q_mat = _as_float32_matrix(queries, "queries")
    c_mat = _as_float32_matrix(candidates, "candidates")
    metrics = _check_metrics(metrics)
    if q_mat.shape[1] != c_mat.shape[1]:
        raise MfsimError(
            f"queries and candidates must have the same rank; received {q_mat.shape[1]} and "
            f"{c_mat.shape[1]} columns. Use embeddings from the same factorisation."
        )
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise MfsimError(f"n (the list length) must be an integer >= 1; received {n!r}.")
    for name, value in (("query_chunk", query_chunk), ("candidate_block", candidate_block), ("n_threads", n_threads)):
        if value is None and name == "n_threads":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise MfsimError(f"{name} must be an integer >= 1; received {value!r}.")
    n = int(n)
    nq, p = q_mat.shape[0], c_mat.shape[0]
    if p > _INT32_MAX:
        raise MfsimError(f"at most {_INT32_MAX} candidates are supported (int32 ids); received {p}. Split the catalog.")
    offset = 0 if query_offset is None else int(query_offset)
    if exclude_self and (offset < 0 or offset + nq > p):
        raise MfsimError(
            f"with exclude_self the queries must be candidate rows query_offset .. query_offset + q; "
            f"received query_offset={offset}, q={nq}, p={p}. Pass the chunk's first row as query_offset."
        )
    ex_indptr, ex_indices = _check_exclusions(exclude_indptr, exclude_indices, nq, p)

    want = {m: m in metrics for m in METRICS}
    q_sumsq, c_sumsq = _row_sumsq(q_mat), _row_sumsq(c_mat)
    _check_finite(q_sumsq, "queries")
    _check_finite(c_sumsq, "candidates")
    _check_no_overflow(q_sumsq, c_sumsq)
    qinv = inverse_norms(q_mat, q_sumsq) if want["cosine"] else np.zeros(nq, dtype=np.float32)
    cinv = inverse_norms(c_mat, c_sumsq) if want["cosine"] else np.zeros(p, dtype=np.float32)
    self_ids = np.arange(offset, offset + nq, dtype=np.int64) if exclude_self else np.full(nq, -1, dtype=np.int64)
    cb = min(int(candidate_block), max(p, 1))
    full = _Candidates(c_mat, cinv, cb)
    width = _seed_width(n)
    sample = None
    if p >= _SEED_MIN_SAMPLE * width * _SEED_STRIDE:
        ids = np.arange(0, p, _SEED_STRIDE)
        sample = _Candidates(c_mat[ids], cinv[ids], cb)

    out = {}
    for m in metrics:
        scores, indices = empty_state(nq, n)
        out[m] = TopN(indices, scores, np.zeros(nq, dtype=np.int32))
    workers = _default_threads() if n_threads is None else int(n_threads)
    rows_per_task = tile_rows(nq, query_chunk, cb, workers)
    local = threading.local()

    def task(a: int) -> None:
        numba.set_num_threads(1)  # thread-local: this thread's selection runs serially
        b = min(a + rows_per_task, nq)
        if getattr(local, "buf", None) is None:
            local.buf = np.empty(rows_per_task * cb, dtype=np.float32)
        rows = _QueryRows(q_mat[a:b], qinv[a:b], self_ids[a:b], *_csr_rows(ex_indptr, ex_indices, a, b))
        for m, (counts, idx, sc) in _topn_rows(rows, full, sample, n, width, want, local.buf).items():
            out[m].indices[a:b] = idx
            out[m].scores[a:b] = sc
            out[m].counts[a:b] = counts

    starts = range(0, nq, rows_per_task)
    caller_threads = numba.get_num_threads()
    try:
        with _blas_limit(1):
            if workers == 1 or len(starts) <= 1:
                for a in starts:
                    task(a)
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    list(pool.map(task, starts))  # list() re-raises a task's exception here
    finally:
        numba.set_num_threads(caller_threads)
    return out


# Tiles of about 4 MiB: measured on a 2-core Zen 5 (1 MiB L2 per core, 32 MiB L3), a 1024 x 4096
# tile (16 MiB) costs the selection 30% more time than 256 x 4096, at the same gemm speed.
_TILE_BYTES = 4 << 20
_MIN_TILE_ROWS = 256


def tile_rows(n_queries: int, query_chunk: int, candidate_block: int, n_threads: int) -> int:
    """Query rows per gemm tile (and per thread task) that ``topn_blocked`` uses.

    The thread's share of ``query_chunk``, cut down to a tile of about ``_TILE_BYTES`` so that the
    selection reads it back from cache, but not below ``_MIN_TILE_ROWS``: the gemm packs the
    candidate block once per tile and needs enough rows to pay for that.
    """
    cache_rows = max(_MIN_TILE_ROWS, _TILE_BYTES // (4 * max(int(candidate_block), 1)))
    return max(1, min(-(-int(query_chunk) // n_threads), -(-int(n_queries) // n_threads), cache_rows))


_BLAS_CONTROLLER = None


def _blas() -> ThreadpoolController:
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()  # inspects the loaded libraries once
    return _BLAS_CONTROLLER


def _blas_limit(n_threads: int):
    """Context limiting BLAS to ``n_threads`` threads (threadpoolctl), restored on exit."""
    return _blas().limit(limits=n_threads, user_api="blas")


def _default_threads() -> int:
    """The smaller of numba's and BLAS's thread counts: both are ways to say how many cores to use
    (a Dask worker's nanny sets OPENBLAS_NUM_THREADS=1 by default, numba's count stays all cores)."""
    blas = [lib["num_threads"] for lib in _blas().select(user_api="blas").info()]
    return max(1, min([numba.get_num_threads(), *blas]))


# Seeding the running threshold. A row's heap starts with N empty slots at score -inf, and with
# candidates in random order it takes about N (1 + ln(p / N)) insertions (about 800 for p = 100k,
# N = 100) to reach its final N-th best, most of them in the first blocks; at ~40 ns each (with
# the hit that finds them) they cost about half the gemm. Instead every _SEED_STRIDE-th candidate
# is scored first and the _seed_width(N)-th best admissible sample score becomes the floor: the
# empty slots start at that score, so only candidates at or above it are offered (about
# _seed_width(N) * _SEED_STRIDE ~ 3 N of them for N = 100, hence about N (1 + ln 3) ~ 210
# insertions; measured 210 per metric at p = 100k). The sample costs 1/_SEED_STRIDE of the gemm.
# The floor is exact whenever the full set has N admissible candidates at or above it, which the
# final count shows; the rows where it does not (the sample caught more than its share of the
# row's best, or the row has fewer than N admissible candidates) are recomputed without a floor:
# 21 of 20,000 rows in the benchmark's clustered data.
_SEED_STRIDE = 32
_SEED_SLACK = 2.0
_SEED_MIN_SAMPLE = 4  # seed only when the sample holds at least 4 x the seed width


def _seed_width(n: int) -> int:
    """Rank in the sample whose score is the floor: about _SEED_SLACK * n candidates lie above it."""
    # + 3: with a sample of 1/32 a row's best N put about N/32 candidates in the sample; the floor
    # is too high only when at least ``width`` of them land there (Poisson(3.1) >= 10: 0.13% for
    # N = 100)
    return int(np.ceil(_SEED_SLACK * n / _SEED_STRIDE)) + 3


class _Candidates(NamedTuple):
    """A candidate matrix with its inverse norms, scanned in blocks of ``block`` rows."""

    c: np.ndarray  # float32 (p, k)
    cinv: np.ndarray  # float32 (p,)
    block: int


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


def _scan(rows: _QueryRows, cands: _Candidates, n: int, want: dict, buf: np.ndarray, floors: dict | None = None):
    """Running top-n states of ``rows`` over all of ``cands``: per block one sgemm, one selection.

    Empty slots start at ``floors[metric]`` (per row) instead of -inf when given.
    """
    nr = rows.q.shape[0]
    states = {}
    for m in METRICS:
        if want[m]:
            sc, idx = empty_state(nr, n)
            if floors is not None:
                sc[:] = floors[m][:, None]
            states[m] = (sc, idx)
    off = empty_state(0, n)
    dot, cos = states.get("dot", off), states.get("cosine", off)
    p = cands.c.shape[0]
    for c0 in range(0, p, cands.block):
        c1 = min(c0 + cands.block, p)
        tile = buf[: nr * (c1 - c0)].reshape(nr, c1 - c0)
        np.matmul(rows.q, cands.c[c0:c1].T, out=tile)  # S = Q C^T, one sgemm
        select_tile(tile, c0, rows.self_ids, rows.qinv, cands.cinv[c0:c1], rows.ex_indptr, rows.ex_indices, *dot, *cos)
    return states


def _topn_rows(rows: _QueryRows, full: _Candidates, sample: _Candidates | None, n: int, width: int, want: dict,
               buf: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sorted (counts, indices, scores) per wanted metric for one range of query rows."""
    nr = rows.q.shape[0]
    floors = {m: np.full(nr, -np.inf, dtype=np.float32) for m in METRICS}
    if sample is not None:
        # the width-th best admissible sample score: a floor for the row's n-th best whenever the
        # full set holds n admissible candidates at or above it (checked below)
        for m, (sc, idx) in _scan(rows.sampled(_SEED_STRIDE), sample, width, want, buf).items():
            floors[m] = np.where(idx[:, 0] >= 0, sc[:, 0], np.float32(-np.inf))
    results = {m: finalize_state(*st) for m, st in _scan(rows, full, n, want, buf, floors).items()}
    redo = np.zeros(nr, dtype=bool)
    for m, (counts, _, _) in results.items():
        redo |= (counts < n) & (floors[m] > -np.inf)
    if redo.any():
        keep = np.flatnonzero(redo)
        for m, state in _scan(rows.subset(keep), full, n, want, buf).items():
            counts, idx, sc = finalize_state(*state)
            results[m][0][keep], results[m][1][keep], results[m][2][keep] = counts, idx, sc
    return results


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
        valid &= (qn > 0)[:, None] & (cn > 0)[None, :]
    elif metric != "dot":
        raise MfsimError(f"metric must be one of {', '.join(METRICS)}; received {metric!r}.")
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
