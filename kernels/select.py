"""Top-N selection on score tiles: the running heap state and the numba kernel that updates it.

``select_tile`` merges one tile of scores ``S = Q C^T`` (q query rows x c candidates, float32) into
a running top-N state per query row and metric: a binary min-heap of (score, candidate id) whose
root is the current N-th best, updated in place across candidate blocks. The dot and the cosine
lists come from the same tile, ``cos_ij = s_ij * qinv_i * cinv_j`` with the inverse norms of
``inverse_norms``. ``empty_state`` makes a state and ``finalize_state`` sorts one into lists
(``TopN``).

The rules (score descending, ties by candidate index ascending; self and exclusion masks; no
cosine for zero-norm rows; ``-1`` / ``-inf`` padding) are those listed in ``kernels.topn``, whose
``topn_blocked`` drives this kernel tile by tile and whose ``topn_reference`` is its NumPy
reference. The held-out evaluation (``pipeline/lists/evaluate.py``) calls ``select_tile`` directly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_RUN = 64  # candidates compared per vectorised run: one uint64 bit mask, 4 AVX-512 / 8 AVX2 registers


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


# Comparisons of a run of ``_RUN`` float32 scores at once, written as LLVM vector operations: a vector load, the
# products, one ``fcmp oge`` giving ``<64 x i1>``, bit-cast to the uint64 mask (AVX-512: compares into mask
# registers; AVX2: movmsk). numba's own loop over the run vectorised only 4 lanes at a time and built the mask
# with a vector OR per lane group (0.19-0.34 ns per score against 0.15 for this, 2048 x 4096 tile, one thread).
# IEEE products without fast-math flags: the same rounding as the scalar ``(s * a) * b``, and NaN compares false
# as in Python. The arrays must be C-contiguous (unit stride); the kernels' wrappers make sure of it.


def _vector_type():
    return ir.VectorType(ir.FloatType(), _RUN)


def _load_run(context, builder, arytype, aryval, start):
    """``<_RUN x float>`` from ``ary[start : start + _RUN]`` (a C-contiguous float32 array)."""
    ary = context.make_array(arytype)(context, builder, aryval)
    ptr = builder.gep(ary.data, [start])
    return builder.load(builder.bitcast(ptr, _vector_type().as_pointer()), align=4)


def _splat(builder, value):
    vt = _vector_type()
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), _RUN), [0] * _RUN))


def _mask_of(builder, lhs, rhs):
    """Bit jj set where ``lhs[jj] >= rhs[jj]`` (ordered: false for NaN)."""
    return builder.bitcast(builder.fcmp_ordered(">=", lhs, rhs), ir.IntType(_RUN))


def _run_array(ty) -> bool:
    return isinstance(ty, types.Array) and ty.ndim == 1 and ty.dtype == types.float32 and ty.layout == "C"


@intrinsic
def _bits_ge(typingctx, x, x0, thr):
    """Mask of ``x[x0 + jj] >= thr`` over the run."""
    if not _run_array(x):
        return None
    sig = types.uint64(x, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        v = _load_run(context, builder, signature.args[0], args[0], args[1])
        return _mask_of(builder, v, _splat(builder, args[2]))

    return sig, codegen


@intrinsic
def _bits_scaled_ge(typingctx, x, x0, a, y, thr):
    """Mask of ``(x[x0 + jj] * a) * y[x0 + jj] >= thr`` over the run."""
    if not (_run_array(x) and _run_array(y)):
        return None
    sig = types.uint64(x, types.intp, types.float32, y, types.float32)

    def codegen(context, builder, signature, args):
        v = _load_run(context, builder, signature.args[0], args[0], args[1])
        w = _load_run(context, builder, signature.args[3], args[3], args[1])
        prod = builder.fmul(builder.fmul(v, _splat(builder, args[2])), w)
        return _mask_of(builder, prod, _splat(builder, args[4]))

    return sig, codegen


@intrinsic
def _bits_ge_each(typingctx, x, x0, t):
    """Mask of ``x[x0 + jj] >= t[x0 + jj]`` over the run (a threshold per position)."""
    if not (_run_array(x) and _run_array(t)):
        return None
    sig = types.uint64(x, types.intp, t)

    def codegen(context, builder, signature, args):
        v = _load_run(context, builder, signature.args[0], args[0], args[1])
        return _mask_of(builder, v, _load_run(context, builder, signature.args[2], args[2], args[1]))

    return sig, codegen


@intrinsic
def _bits_scaled_ge_each(typingctx, x, x0, y, b, t):
    """Mask of ``(x[x0 + jj] * y[x0 + jj]) * b >= t[x0 + jj]`` over the run."""
    if not (_run_array(x) and _run_array(y) and _run_array(t)):
        return None
    sig = types.uint64(x, types.intp, y, types.float32, t)

    def codegen(context, builder, signature, args):
        v = _load_run(context, builder, signature.args[0], args[0], args[1])
        w = _load_run(context, builder, signature.args[2], args[2], args[1])
        prod = builder.fmul(builder.fmul(v, w), _splat(builder, args[3]))
        return _mask_of(builder, prod, _load_run(context, builder, signature.args[4], args[4], args[1]))

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def _run_masks(row, cinv, c0, qi, thr_d, thr_c):
    """Bit masks of the ``_RUN`` candidates from ``c0`` that reach the dot / the cosine threshold; bit ``jj``
    stands for candidate ``c0 + jj`` (so ``_RUN`` is at most 64). ``cos = (s_ij * qinv_i) * cinv_j``."""
    return _bits_ge(row, c0, thr_d), _bits_scaled_ge(row, c0, qi, cinv, thr_c)


@njit(cache=True, nogil=True, inline="always")
def _offer(s, g, is_self, zero_norm, ex_indices, ex_lo, ex_hi, hs, hi):
    """Offer candidate id g with score s to one heap; True when it entered."""
    if is_self or zero_norm:
        return False
    if not _after(hs[0], hi[0], s, g):  # a tie with the N-th best enters only with a smaller id
        return False
    if ex_hi > ex_lo and _is_excluded(ex_indices, ex_lo, ex_hi, g):
        return False
    _replace_root(hs, hi, s, g)
    return True


_NO_IDS = _NO_EXCLUSIONS = np.zeros(0, dtype=np.int32)  # an empty int32 array: no candidate ids, no exclusions


def select_tile(tile, block_start, self_ids, qinv, cinv, ex_indptr, ex_indices, dot_s, dot_i, cos_s, cos_i,
                cand_ids=_NO_IDS):
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
    cand_ids : int32 (c,) or (0,), optional
        Global candidate id of each tile column, for candidates in another order than their ids (the
        norm-ordered scan of ``kernels.topn``); empty (the default): ``block_start + j``. Self, exclusion
        and tie rules apply to these ids.

    Notes
    -----
    Time O(q c) for the scan plus O(log N) per heap insertion. Each run of ``_RUN`` candidates is
    compared with both thresholds at once (vectorised) into two bit masks; only the candidates
    whose bit is set are looked at one by one (the threshold may have risen meanwhile, so the
    comparison is repeated exactly). A metric that is off, and the cosine list of a zero-norm
    query, get the threshold ``+inf``, which no score reaches. From empty slots at ``-inf``, a row sees about
    ``N (1 + ln(p / N))`` insertions over p candidates in random order (about 800 for p = 100k,
    N = 100); from a seeded floor (``topn_blocked``) about ``N (1 + ln 3)``. Either way most
    candidates cost one vectorised comparison per metric. Memory: none beyond the arguments.

    A binary heap rather than a sorted buffer: an insertion costs O(log N) moves instead of O(N)
    shifts, which keeps adversarial orders (scores rising with the index, where every candidate
    enters) at ``log2(100) ~ 7`` moves per insertion. Measured on random orders the two cost about
    the same (30-40 ns per insertion, most of it branch mispredictions).
    """
    _select_tile(np.ascontiguousarray(tile), block_start, self_ids, qinv, np.ascontiguousarray(cinv), ex_indptr,
                 ex_indices, dot_s, dot_i, cos_s, cos_i, cand_ids)


# Every argument required: numba types an omitted argument by its default's object, which differs from one process to
# the next for an array, so a default here was a cache miss (a ~2.5 s compile) in every new process and worker.
@njit(cache=True, nogil=True, parallel=True)
def _select_tile(tile, block_start, self_ids, qinv, cinv, ex_indptr, ex_indices, dot_s, dot_i, cos_s, cos_i, cand_ids):
    """``select_tile``'s kernel."""
    nq, nc = tile.shape
    do_dot = dot_s.shape[0] > 0
    do_cos = cos_s.shape[0] > 0
    has_ex = ex_indptr.shape[0] > 0
    has_ids = cand_ids.shape[0] > 0
    n_full = nc - nc % _RUN
    all_bits = ~np.uint64(0)
    for r in prange(nq):
        row = tile[r]
        qi = qinv[r]
        thr_d = dot_s[r, 0] if do_dot else np.float32(np.inf)
        thr_c = cos_s[r, 0] if do_cos and qi > 0 else np.float32(np.inf)
        me = self_ids[r]  # candidate id of the query itself (-1: none)
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
                g = np.int64(cand_ids[j]) if has_ids else block_start + j
                if s >= thr_d and _offer(s, g, g == me, False, ex_indices, ex_lo, ex_hi, dot_s[r], dot_i[r]):
                    thr_d = dot_s[r, 0]
            while mc:
                j = c0 + np.int64(_lowest_bit(mc))
                mc &= mc - np.uint64(1)
                c = row[j] * qi * cinv[j]  # same rounding as the reference: (s_ij * qinv_i) * cinv_j
                g = np.int64(cand_ids[j]) if has_ids else block_start + j
                if c >= thr_c and _offer(c, g, g == me, cinv[j] == 0, ex_indices, ex_lo, ex_hi, cos_s[r], cos_i[r]):
                    thr_c = cos_s[r, 0]


@njit(cache=True, nogil=True, inline="always")
def _run_masks_columns(row, thr_d, thr_c, qinv, c0, ci):
    """Bit masks of the ``_RUN`` tile columns from ``c0`` whose score in this tile row reaches their own dot / cosine
    threshold: ``_run_masks`` with a threshold per column; ``cos_ji = (s_ij * qinv_j) * cinv_i``."""
    return _bits_ge_each(row, c0, thr_d), _bits_scaled_ge_each(row, c0, qinv, ci, thr_c)


#: Columns of a tile walked down together by ``select_tile_columns``: their heaps (512 x N x 8 bytes per metric,
#: 800 KiB for both at N = 100) stay in L2 while the strip's rows stream past. Measured at p = 50k, k = 64, N = 100,
#: one thread, the column selection over the run: 256 -> 1.90 s, 512 -> 1.82 s, 1024 -> 1.99 s; buffering the hits
#: of a whole tile and offering them column by column instead took 2.1 s (with each hit's score kept) and 2.87 s
#: (scores read back from the tile, a cache miss per hit).
_STRIP = 512


def select_tile_columns(tile, row_start, col_qinv, row_cinv, dot_s, dot_i, cos_s, cos_i):
    """Merge the mirror of a score tile into the running top-N heaps of its columns.

    For a symmetric score matrix (the Gram matrix of one embedding, ``S = E E^T``) a tile
    ``S_IJ = E_I E_J^T`` is also ``S_JI^T``: column j of the tile holds query row ``J_j``'s scores
    against the candidates ``row_start + i``. This kernel offers them to the column's heaps as
    ``select_tile`` would offer the rows of the transposed tile, without transposing it: it walks
    the tile in strips of ``_STRIP`` columns, each strip row by row, comparing each run of ``_RUN``
    scores with those columns' own thresholds (their heaps' roots, kept in a per-column array;
    vectorised like ``select_tile``) and offering each score that reaches one to its column's heap
    at once (so a column's threshold rises with every insertion, as a row's does). Same order and
    rules as ``select_tile`` (within a column the rows come in ascending order; ties to the smaller
    id; ``cos_ji = (s_ij * qinv_j) * cinv_i``, the same rounding; zero-norm rows take no part in
    cosine lists), for tiles without self pairs or exclusions (off the diagonal).

    Parameters
    ----------
    tile : float32 (r, c)
        Scores; column j belongs to state row j, row i to candidate ``row_start + i``.
    row_start : int
        Global candidate id of tile row 0.
    col_qinv, row_cinv : float32 (c,), (r,)
        Inverse L2 norms of the columns' query rows and of the rows' candidates (0: zero norm).
    dot_s, dot_i, cos_s, cos_i : float32, int32 (c, N) or (0, N)
        Running heap states of the c query rows (see ``select_tile``); 0 rows switch a metric off.

    Notes
    -----
    Time O(r c) for the scan plus O(log N) per insertion; memory: the thresholds (2 c float32).
    """
    _select_tile_columns(np.ascontiguousarray(tile), row_start, np.ascontiguousarray(col_qinv), row_cinv, dot_s, dot_i,
                         cos_s, cos_i)


@njit(cache=True, nogil=True)
def _select_tile_columns(tile, row_start, col_qinv, row_cinv, dot_s, dot_i, cos_s, cos_i):
    """``select_tile_columns``'s kernel."""
    nr, nc = tile.shape
    do_dot = dot_s.shape[0] > 0
    do_cos = cos_s.shape[0] > 0
    inf = np.float32(np.inf)
    thr_d = np.empty(nc, dtype=np.float32)
    thr_c = np.empty(nc, dtype=np.float32)
    for j in range(nc):
        thr_d[j] = dot_s[j, 0] if do_dot else inf
        thr_c[j] = cos_s[j, 0] if do_cos and col_qinv[j] > 0 else inf
    n_full = nc - nc % _RUN
    all_bits = ~np.uint64(0)
    for s0 in range(0, nc, _STRIP):
        s1 = min(s0 + _STRIP, nc)
        for i in range(nr):
            row = tile[i]
            ci = row_cinv[i]
            for c0 in range(s0, s1, _RUN):
                if c0 < n_full:
                    md, mc = _run_masks_columns(row, thr_d, thr_c, col_qinv, c0, ci)
                    if (md | mc) == 0:
                        continue
                else:  # the last, partial run: every column is looked at
                    width = np.uint64(nc - c0)
                    md = all_bits & ((np.uint64(1) << width) - np.uint64(1))
                    mc = md
                while md:
                    j = c0 + np.int64(_lowest_bit(md))
                    md &= md - np.uint64(1)
                    s = row[j]
                    if s >= thr_d[j] and _offer(s, row_start + i, False, False, _NO_EXCLUSIONS, 0, 0, dot_s[j],
                                                dot_i[j]):
                        thr_d[j] = dot_s[j, 0]
                if ci == 0:  # a zero-norm candidate is nobody's cosine neighbour
                    continue
                while mc:
                    j = c0 + np.int64(_lowest_bit(mc))
                    mc &= mc - np.uint64(1)
                    c = row[j] * col_qinv[j] * ci  # same rounding as select_tile's (s_ji * qinv_j) * cinv_i
                    if c >= thr_c[j] and _offer(c, row_start + i, False, False, _NO_EXCLUSIONS, 0, 0, cos_s[j],
                                                cos_i[j]):
                        thr_c[j] = cos_s[j, 0]


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
