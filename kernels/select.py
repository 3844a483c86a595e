"""Top-N selection on score tiles: the running buffer state and the numba kernels that update it.

``select_tile`` merges one tile of scores ``S = Q C^T`` (q query rows x c candidates, float32) into
a running top-N state per query row and metric: a buffer of 2 N int64 keys, one per candidate that
entered, and a threshold key a candidate must rank before to enter; a full buffer is cut back to
its N best (quickselect) and the N-th best becomes the threshold. A key orders (score, id) pairs
as the lists do, score descending then id ascending, in one integer comparison: the float's bits
mapped to an integer of the same order, negated, in the high word, the id in the low word
(``_key``). The dot and the cosine lists come from the same tile, ``cos_ij = s_ij * qinv_i *
cinv_j`` with the inverse norms of ``inverse_norms``. ``empty_state`` makes a state,
``floor_keys`` turns floors into thresholds, and ``finalize_state`` sorts one into lists (``TopN``).

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
# keys


@intrinsic
def _float_bits(typingctx, x):
    """The bits of a float32 as an int32 (LLVM ``bitcast``)."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _bits_float(typingctx, b):
    """The float32 whose bits are the int32 ``b``."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


_ID_BITS = 0xFFFFFFFF  # the low word of a key: a candidate id, or all ones for a threshold of "any id"


@njit(cache=True, nogil=True, inline="always")
def _key(s, g):
    """The int64 key of candidate id g (>= 0) with float32 score s: smaller keys rank first (score descending,
    then id ascending). -0.0 and 0.0 get the same key (they tie); NaN never reaches here (checked upstream)."""
    b = np.int64(_float_bits(s + np.float32(0.0)))  # -0.0 + 0.0 = +0.0
    ordered = b ^ ((b >> 31) & 0x7FFFFFFF)  # an integer in the floats' order (negative floats: magnitude flipped)
    return ((-ordered) << 32) | (np.int64(g) & _ID_BITS)


@njit(cache=True, nogil=True, inline="always")
def _key_score(key):
    """The float32 score of a key (``_key``'s inverse on its high word)."""
    ordered = -(key >> 32)
    return _bits_float(np.int32(ordered ^ ((ordered >> 31) & 0x7FFFFFFF)))


#: The threshold of an empty state: score -inf, any id; every finite score's key is smaller.
_NO_THRESHOLD = ((0x7F800001) << 32) | _ID_BITS  # -(ordered bits of -inf) = 0x7F800001 in the high word
#: Past a buffer's fill and in the padding of sorted keys: after every real key.
_NO_KEY = np.iinfo(np.int64).max


def floor_keys(floors: np.ndarray) -> np.ndarray:
    """Thresholds (int64 keys) admitting exactly the candidates whose score is at or above each floor (float32;
    -inf admits every one): ``_key`` of the floor's score with the largest id, so any real id of that score ranks
    before."""
    floors = np.ascontiguousarray(floors, dtype=np.float32).reshape(-1)
    out = np.empty(floors.shape[0], dtype=np.int64)
    _floor_keys(floors, out)
    return out


@njit(cache=True, nogil=True)
def _floor_keys(floors, out):
    for r in range(floors.shape[0]):
        out[r] = _key(floors[r], _ID_BITS)


def threshold_scores(thresholds: np.ndarray) -> np.ndarray:
    """The float32 scores of threshold keys (``_key_score``; ``floor_keys``' inverse): at or above it, a candidate
    may enter."""
    thresholds = np.ascontiguousarray(thresholds, dtype=np.int64).reshape(-1)
    out = np.empty(thresholds.shape[0], dtype=np.float32)
    _threshold_scores(thresholds, out)
    return out


@njit(cache=True, nogil=True)
def _threshold_scores(thresholds, out):
    for r in range(thresholds.shape[0]):
        out[r] = _key_score(thresholds[r])


# ---------------------------------------------------------------------------------------------
# numba kernels


@njit(cache=True, nogil=True)
def _keep_smallest(keys, end, k):
    """Quickselect: reorder ``keys[:end]`` in place so that its ``k`` smallest come first, the k-th smallest at
    ``k - 1``; ``0 < k <= end``. Keys are distinct (one per candidate).

    Median-of-three pivots, a Lomuto partition written without a branch (each entry is swapped with the
    partition's boundary whether or not it moves the boundary); expected O(end).
    """
    target = k - 1
    left = 0
    right = end - 1
    while left < right:
        if right - left == 1:  # two keys: put them in order (the median of three needs three places)
            a, b = keys[left], keys[right]
            keys[left] = min(a, b)
            keys[right] = max(a, b)
            return
        mid = left + ((right - left) >> 1)
        a, b, c = keys[left], keys[mid], keys[right]
        lo_ab, hi_ab = min(a, b), max(a, b)
        pivot = max(lo_ab, min(hi_ab, c))  # the median of the three, the pivot, at ``right``
        keys[left] = min(lo_ab, c)
        keys[mid] = max(hi_ab, c)
        keys[right] = pivot
        store = left
        for t in range(left, right):
            v = keys[t]
            keys[t] = keys[store]
            keys[store] = v
            store += np.int64(v < pivot)
        keys[right] = keys[store]
        keys[store] = pivot
        if store == target:
            return
        if store < target:
            left = store + 1
        else:
            right = store - 1


@njit(cache=True, nogil=True)
def _compact(keys, r, fill):
    """Keep the N smallest (N = capacity / 2) of row r's ``fill`` (>= N) keys in its first N slots; returns the
    new threshold, the N-th smallest (still an entry: later keys must be smaller to enter)."""
    n = keys.shape[1] // 2
    row = keys[r]
    if fill > n:
        _keep_smallest(row, fill, n)
        return row[n - 1]
    best = row[0]
    for t in range(1, n):
        best = max(best, row[t])
    return best


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


_NO_IDS = _NO_EXCLUSIONS = np.zeros(0, dtype=np.int32)  # an empty int32 array: no candidate ids, no exclusions


def select_tile(tile, block_start, self_ids, qinv, cinv, ex_indptr, ex_indices, dot_k, dot_t, dot_f, cos_k, cos_t,
                cos_f, cand_ids=_NO_IDS):
    """Merge one score tile into the running top-N buffers of the dot and the cosine lists.

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
    dot_k, dot_t, dot_f : int64 (q, 2 N), int64 (q,), int32 (q,), or 0 rows
        Running state of the dot list (``empty_state``): per row a buffer of ``2 N`` keys (``_key``: score
        and candidate id in one int64, smaller ranks first) filled up to ``dot_f[r]``, and the threshold key
        ``dot_t[r]``: a candidate enters only when its key is smaller (higher score, or equal score and smaller
        id). The threshold starts at ``-inf`` or at a floor known to be at most the final N-th best score
        (``floor_keys``); when the buffer is full, its N smallest keys are kept (quickselect) and the N-th
        becomes the threshold. A state with 0 rows switches the metric off.
    cos_k, cos_t, cos_f : the same for the cosine list, ``cos_ij = s_ij * qinv_i * cinv_j``.
    cand_ids : int32 (c,) or (0,), optional
        Global candidate id of each tile column, for candidates in another order than their ids (the
        norm-ordered scan of ``kernels.topn``); empty (the default): ``block_start + j``. Self, exclusion
        and tie rules apply to these ids.

    Notes
    -----
    Time O(q c) for the scan plus O(1) amortised per candidate that enters. Each run of ``_RUN``
    candidates is compared with both thresholds' scores at once (vectorised) into two bit masks; only the
    candidates whose bit is set are looked at one by one, by key (ties at the threshold's score go by id).
    A metric that is off, and the cosine list of a zero-norm query, get the threshold score ``+inf``, which
    no score reaches. Memory: none beyond the arguments.

    A buffer rather than a heap (faiss's "reservoir"): an entry costs an append instead of a sift through
    ``log2 N`` levels, most of whose steps are branch mispredictions and, in the column pass, dependent loads
    (measured ~40 ns per heap insertion, p = 40k, k = 64, N = 100). Keys rather than (score, id) pairs: an
    entry is one store and one comparison, the thresholds sit in one compact array, and the lists' final
    sort is NumPy's on the keys themselves. The threshold rises only at a compaction, so more candidates
    enter: from a seeded floor (``topn_blocked``) about 2.5 N per row, one or two compactions of 2 N keys;
    in adversarial orders (scores rising with the index, every candidate enters) a compaction per N
    candidates, O(1) each amortised.
    """
    _select_tile(np.ascontiguousarray(tile), block_start, self_ids, qinv, np.ascontiguousarray(cinv), ex_indptr,
                 ex_indices, dot_k, dot_t, dot_f, cos_k, cos_t, cos_f, cand_ids)


# Every argument required: numba types an omitted argument by its default's object, which differs from one process to
# the next for an array, so a default here was a cache miss (a ~2.5 s compile) in every new process and worker.
@njit(cache=True, nogil=True, parallel=True)
def _select_tile(tile, block_start, self_ids, qinv, cinv, ex_indptr, ex_indices, dot_k, dot_t, dot_f, cos_k, cos_t,
                 cos_f, cand_ids):
    """``select_tile``'s kernel."""
    nq, nc = tile.shape
    do_dot = dot_k.shape[0] > 0
    do_cos = cos_k.shape[0] > 0
    cap_d = dot_k.shape[1]
    cap_c = cos_k.shape[1]
    has_ex = ex_indptr.shape[0] > 0
    has_ids = cand_ids.shape[0] > 0
    n_full = nc - nc % _RUN
    all_bits = ~np.uint64(0)
    inf = np.float32(np.inf)
    for r in prange(nq):
        row = tile[r]
        qi = qinv[r]
        tk_d = dot_t[r] if do_dot else np.int64(0)
        tk_c = cos_t[r] if do_cos else np.int64(0)
        thr_d = _key_score(tk_d) if do_dot else inf
        thr_c = _key_score(tk_c) if do_cos and qi > 0 else inf
        fd = dot_f[r] if do_dot else 0
        fc = cos_f[r] if do_cos else 0
        me = self_ids[r]  # candidate id of the query itself (-1: none)
        ex_lo = ex_indptr[r] if has_ex else 0
        ex_hi = ex_indptr[r + 1] if has_ex else 0
        for c0 in range(0, nc, _RUN):
            if c0 < n_full:
                md, mc = _run_masks(row, cinv, c0, qi, thr_d, thr_c)
                if (md | mc) == 0:
                    continue
            else:  # the last, partial run: every candidate is looked at
                md = all_bits if thr_d < inf else np.uint64(0)
                mc = all_bits if thr_c < inf else np.uint64(0)
                width = np.uint64(nc - c0)
                md &= (np.uint64(1) << width) - np.uint64(1)
                mc &= (np.uint64(1) << width) - np.uint64(1)
            while md:
                j = c0 + np.int64(_lowest_bit(md))
                md &= md - np.uint64(1)
                g = np.int64(cand_ids[j]) if has_ids else block_start + j
                key = _key(row[j], g)
                if key < tk_d and g != me and not (ex_hi > ex_lo and _is_excluded(ex_indices, ex_lo, ex_hi, g)):
                    dot_k[r, fd] = key
                    fd += 1
                    if fd == cap_d:
                        tk_d = _compact(dot_k, r, fd)
                        fd = cap_d // 2
                        thr_d = _key_score(tk_d)
            while mc:
                j = c0 + np.int64(_lowest_bit(mc))
                mc &= mc - np.uint64(1)
                if cinv[j] == 0:
                    continue
                g = np.int64(cand_ids[j]) if has_ids else block_start + j
                key = _key(row[j] * qi * cinv[j], g)  # same rounding as the reference: (s_ij * qinv_i) * cinv_j
                if key < tk_c and g != me and not (ex_hi > ex_lo and _is_excluded(ex_indices, ex_lo, ex_hi, g)):
                    cos_k[r, fc] = key
                    fc += 1
                    if fc == cap_c:
                        tk_c = _compact(cos_k, r, fc)
                        fc = cap_c // 2
                        thr_c = _key_score(tk_c)
        if do_dot:
            dot_f[r] = fd
            dot_t[r] = tk_d
        if do_cos:
            cos_f[r] = fc
            cos_t[r] = tk_c


@njit(cache=True, nogil=True, inline="always")
def _run_masks_columns(row, thr_d, thr_c, qinv, c0, ci):
    """Bit masks of the ``_RUN`` tile columns from ``c0`` whose score in this tile row reaches their own dot / cosine
    threshold: ``_run_masks`` with a threshold per column; ``cos_ji = (s_ij * qinv_j) * cinv_i``."""
    return _bits_ge_each(row, c0, thr_d), _bits_scaled_ge_each(row, c0, qinv, ci, thr_c)


#: Columns of a tile walked down together by ``select_tile_columns``: their threshold scores (2 x 512 x 4 bytes)
#: stay in L1 while the strip's rows stream past. Measured with heaps at p = 50k, k = 64, N = 100, one thread,
#: the column selection over the run: 256 -> 1.90 s, 512 -> 1.82 s, 1024 -> 1.99 s; buffering the hits of a
#: whole tile and offering them column by column instead took 2.1 s (with each hit's score kept) and 2.87 s
#: (scores read back from the tile, a cache miss per hit).
_STRIP = 512


def select_tile_columns(tile, row_start, col_qinv, row_cinv, dot_k, dot_t, dot_f, cos_k, cos_t, cos_f):
    """Merge the mirror of a score tile into the running top-N buffers of its columns.

    For a symmetric score matrix (the Gram matrix of one embedding, ``S = E E^T``) a tile
    ``S_IJ = E_I E_J^T`` is also ``S_JI^T``: column j of the tile holds query row ``J_j``'s scores
    against the candidates ``row_start + i``. This kernel offers them to the columns' buffers as
    ``select_tile`` would offer the rows of the transposed tile, without transposing it: it walks
    the tile in strips of ``_STRIP`` columns, each strip row by row, comparing each run of ``_RUN``
    scores with those columns' own threshold scores (kept in a per-column float array; vectorised
    like ``select_tile``) and appending each key that passes to its column's buffer at once (compacted
    when full, which raises the column's threshold, as a row's). Same order and rules as
    ``select_tile`` (within a column the rows come in ascending order; ties to the smaller id;
    ``cos_ji = (s_ij * qinv_j) * cinv_i``, the same rounding; zero-norm rows take no part in cosine
    lists), for tiles without self pairs or exclusions (off the diagonal): the states equal
    ``select_tile``'s on the transposed tile slot for slot.

    Parameters
    ----------
    tile : float32 (r, c)
        Scores; column j belongs to state row j, row i to candidate ``row_start + i``.
    row_start : int
        Global candidate id of tile row 0.
    col_qinv, row_cinv : float32 (c,), (r,)
        Inverse L2 norms of the columns' query rows and of the rows' candidates (0: zero norm).
    dot_k, dot_t, dot_f, cos_k, cos_t, cos_f : (c, 2 N), (c,), (c,) or 0 rows
        Running states of the c query rows (see ``select_tile``); 0 rows switch a metric off.

    Notes
    -----
    Time O(r c) for the scan plus O(1) amortised per entry; memory: the threshold scores (2 c float32).
    """
    _select_tile_columns(np.ascontiguousarray(tile), row_start, np.ascontiguousarray(col_qinv), row_cinv, dot_k, dot_t,
                         dot_f, cos_k, cos_t, cos_f)


@njit(cache=True, nogil=True)
def _select_tile_columns(tile, row_start, col_qinv, row_cinv, dot_k, dot_t, dot_f, cos_k, cos_t, cos_f):
    """``select_tile_columns``'s kernel."""
    nr, nc = tile.shape
    do_dot = dot_k.shape[0] > 0
    do_cos = cos_k.shape[0] > 0
    inf = np.float32(np.inf)
    thr_d = np.empty(nc, dtype=np.float32)
    thr_c = np.empty(nc, dtype=np.float32)
    for j in range(nc):
        thr_d[j] = _key_score(dot_t[j]) if do_dot else inf
        thr_c[j] = _key_score(cos_t[j]) if do_cos and col_qinv[j] > 0 else inf
    n_full = nc - nc % _RUN
    all_bits = ~np.uint64(0)
    for s0 in range(0, nc, _STRIP):
        s1 = min(s0 + _STRIP, nc)
        for i in range(nr):
            row = tile[i]
            ci = row_cinv[i]
            g = row_start + i
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
                    if thr_d[j] == inf:  # dot off (the partial run looks at every column)
                        continue
                    key = _key(row[j], g)
                    if key < dot_t[j]:  # written out twice, not a helper: numba's inlined helper cost 50% more here
                        f = dot_f[j]
                        dot_k[j, f] = key
                        f += 1
                        if f == dot_k.shape[1]:
                            dot_t[j] = _compact(dot_k, j, f)
                            f = dot_k.shape[1] // 2
                            thr_d[j] = _key_score(dot_t[j])
                        dot_f[j] = f
                if ci == 0:  # a zero-norm candidate is nobody's cosine neighbour
                    continue
                while mc:
                    j = c0 + np.int64(_lowest_bit(mc))
                    mc &= mc - np.uint64(1)
                    if thr_c[j] == inf:  # cosine off, or a zero-norm column
                        continue
                    key = _key(row[j] * col_qinv[j] * ci, g)  # the rounding of select_tile's (s_ji * qinv_j) * cinv_i
                    if key < cos_t[j]:
                        f = cos_f[j]
                        cos_k[j, f] = key
                        f += 1
                        if f == cos_k.shape[1]:
                            cos_t[j] = _compact(cos_k, j, f)
                            f = cos_k.shape[1] // 2
                            thr_c[j] = _key_score(cos_t[j])
                        cos_f[j] = f


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


def empty_state(n_rows: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A running top-``n`` state of ``n_rows`` rows (see ``select_tile``): ``(keys, thresholds, fill)``, buffers
    of ``2 n`` int64 keys (left uninitialised: nothing reads a slot past its row's fill), int64 thresholds at -inf
    (every finite score enters) and int32 fills 0. ``thresholds[:] = floor_keys(floors)`` admits only candidates
    at or above each row's floor."""
    return (np.empty((n_rows, 2 * int(n)), dtype=np.int64), np.full(n_rows, _NO_THRESHOLD, dtype=np.int64),
            np.zeros(n_rows, dtype=np.int32))


_FINAL_ROWS = 8192  # rows of keys sorted at once by finalize_state (16 MiB at N = 100)


def finalize_state(keys: np.ndarray, thresholds: np.ndarray, fill: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn a running state (``empty_state``, ``select_tile``) into sorted lists of ``N = capacity / 2``.

    Returns
    -------
    counts : int32 (q,)
        Number of entries per row (at most N).
    indices : int32 (q, N)
        Sorted by score descending then index ascending; ``-1`` after ``counts[r]``.
    scores : float32 (q, N)
        Matching scores (-0.0 as 0.0); ``-inf`` after ``counts[r]``.

    Notes
    -----
    Per row, the filled keys sorted by NumPy (its vectorised sort: 80,000 rows of 200 keys in ~0.03 s, where a
    quickselect to N per row took 0.12 s and a per-row numba sort ~0.15 s), the first N kept and decoded.
    Time O(q N log N); memory O(q N) and the keys of ``_FINAL_ROWS`` rows at a time. The state is left as it is.
    """
    rows, n = keys.shape[0], keys.shape[1] // 2
    counts = np.empty(rows, dtype=np.int32)
    idx = np.empty((rows, n), dtype=np.int32)
    sc = np.empty((rows, n), dtype=np.float32)
    past = np.arange(keys.shape[1])
    for a in range(0, rows, _FINAL_ROWS):
        b = min(a + _FINAL_ROWS, rows)
        chunk = np.where(past[None, :] < fill[a:b, None], keys[a:b], _NO_KEY)
        chunk.sort(axis=1)
        _decode_keys(chunk[:, :n], counts[a:b], idx[a:b], sc[a:b])
    return counts, idx, sc


@njit(cache=True, nogil=True)
def _decode_keys(keys, counts, out_i, out_s):
    """Sorted keys back to ids and scores; -1 / -inf after a row's count (``_NO_KEY``)."""
    for r in range(keys.shape[0]):
        k = 0
        for t in range(keys.shape[1]):
            key = keys[r, t]
            if key == _NO_KEY:
                out_i[r, t] = -1
                out_s[r, t] = -np.inf
            else:
                k += 1
                out_i[r, t] = np.int32(key & _ID_BITS)
                out_s[r, t] = _key_score(key)
        counts[r] = k


def tighten_state(keys: np.ndarray, thresholds: np.ndarray, fill: np.ndarray) -> None:
    """Make, in place, every threshold of a state the row's current N-th best where it holds at least N keys
    (``select_tile`` raises it only when a buffer is full), cutting the row to its N best. For bounds checked
    against the threshold (``kernels.topn._scan``)."""
    if keys.shape[0]:
        _tighten(keys, thresholds, fill)


@njit(cache=True, nogil=True)
def _tighten(keys, thresholds, fill):
    n = keys.shape[1] // 2
    for r in range(keys.shape[0]):
        if fill[r] >= n:
            thresholds[r] = _compact(keys, r, fill[r])
            fill[r] = n


def pack_state(keys: np.ndarray, thresholds: np.ndarray, fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A state's filled keys only, ``(keys in row order, fill)``: a partial state to send between tasks (a row of a
    pair's partial holds the few keys of that pair's candidates above the floor, not 2 N slots)."""
    return keys[np.arange(keys.shape[1])[None, :] < fill[:, None]], fill.copy()


def merge_packed(keys: np.ndarray, thresholds: np.ndarray, fill: np.ndarray, packed: tuple[np.ndarray, np.ndarray]
                 ) -> None:
    """Offer a packed state's keys (``pack_state``; the same rows and list length) to a running state, in place, as
    ``select_tile`` offers a tile's: each key that ranks before its row's threshold enters, a full buffer keeps its
    N best. Merging every partial state of a row's candidates, each from the same floor, gives the state one scan
    over all of them would: the N best keys above the floor."""
    if keys.shape[0]:
        _merge_packed(keys, thresholds, fill, packed[0], packed[1])


@njit(cache=True, nogil=True)
def _merge_packed(keys, thresholds, fill, src, src_fill):
    cap = keys.shape[1]
    at = 0
    for r in range(keys.shape[0]):
        f = fill[r]
        t = thresholds[r]
        for u in range(at, at + src_fill[r]):
            key = src[u]
            if key < t:
                keys[r, f] = key
                f += 1
                if f == cap:
                    t = _compact(keys, r, f)
                    f = cap // 2
        at += src_fill[r]
        fill[r] = f
        thresholds[r] = t
