"""The Krylov SVD's basis Q (p x W): in this process, or in row chunks on the Dask workers.

``krylov_svd`` grows an orthonormal basis of the item-side Krylov space block by block; each new
block is orthogonalized against every earlier one (block Gram-Schmidt twice, ``extend_basis``)
and at the end ``V = Q y`` combines it with the Ritz vectors. The basis is the largest thing the
SVD holds: 12 p W bytes (float64, and a float32 copy for the first Gram-Schmidt pass), 3.3 GB at
p = 1M and W = 272.

Both bases have one interface (``KrylovBasis``: ``start``, ``last32``, ``extend``, ``combine``,
``release``), and ``new_basis`` picks one for where the SVD runs (``pipeline.shared.runner``).
``LocalBasis`` keeps it in this process, column-major and preallocated (no copy per block).
``ChunkedBasis`` keeps it on the Dask workers, in row chunks (``chunk_bounds``: about p / 8 rows
each, fixed by p alone), every block of a chunk a future beside the chunk's earlier blocks.
Each Gram-Schmidt pass is one task per chunk over the rows it holds; only W x b coefficients
and b x b Gram matrices come to the driver, which sums them in chunk order (so the result does
not depend on how many workers hold the chunks) and holds no p-sized array while the space
grows. A new block takes one round trip to the driver where Y is well conditioned against the
basis (``ChunkedBasis.extend_later``: each pass's coefficients and Gram matrix from one reduction, a
Cholesky QR per pass, the factors computed on a worker, so that the passes, the block and the next
product are one graph of tasks; the driver reads only the factors, to build T), else the explicit passes' four
or five (``_extend_explicit``), ending in CholeskyQR2 on the summed Gram matrices.
Futures keep their lineage, so a chunk lost with its worker is recomputed (back to the
products that made it) like any other task.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from scipy.linalg.blas import dtrsm

from mfsim.kernels.threads import available_cores, blas_limit
from mfsim.pipeline.shared import Here, OnCluster, is_future, value

#: Row chunks of a ``ChunkedBasis``: at most ``CHUNKS`` of them, none below ``MIN_CHUNK_ROWS`` rows (each chunk costs
#: ~6 small tasks per block, ~1 ms each of scheduling; a chunk's pass over 16,384 rows of a 272-column basis takes
#: ~10 ms: fewer, larger chunks below p = 128k); ``chunk_bounds``.
CHUNKS = 8
MIN_CHUNK_ROWS = 1 << 14
#: Rows per tile of ``pip_second``, whose two products (``Y - Q C``, then ``Q^T Y1``) read the same rows of Q: a tile's
#: rows of a 272-column basis (4.4 MB) stay in the 32 MB L3 between them. Measured on one 25,000-row chunk of a
#: 272-column basis: 23.5 ms untiled, 18.1 / 16.8 / 16.2 / 24.4 ms in tiles of 512 / 1,024 / 2,048 / 4,096 rows; two
#: chunks at once on 2 cores 40.1 -> 27.9 ms (the passes are bound by memory bandwidth).
GS_TILE_ROWS = 2048
#: The one-reduction Gram-Schmidt pass (``pip_first``, ``pip_second``: the Gram matrix of the part of Y outside the
#: basis by Pythagoras, ``Y^T Y - C^T C``, from the same reduction as ``C = Q^T Y``) is taken when that Gram
#: matrix's smallest eigenvalue is at least ``PIP_MIN_RATIO`` times Y's largest squared column norm. Its rounding is
#: ~W eps ||Y||^2 (W <= 1,100 columns: < 3e-13 ||Y||^2), so at 1e-8 the Cholesky factor is exact to < 3e-5 and the
#: second pass starts from a block orthonormal to that; below it (Y nearly inside the basis, or rank-deficient) the
#: explicit passes run (``gs_first``, ``gs_second``, ``gs_subtract``: two more reductions).
PIP_MIN_RATIO = 1e-8
#: After the second one-reduction pass the block's Gram matrix is I up to the first pass's rounding (< 3e-5 by the
#: ratio above); further from I than this, the explicit passes run instead (a safeguard, not seen in practice).
PIP_MAX_DEVIATION = 1e-3
#: A column whose norm after Gram-Schmidt is below this fraction of its norm before has vanished
#: against the basis (1e-6 after a float32 first pass: that pass leaves ~6e-8 of the basis).
LOST_FLOOR = 1e-10
LOST_FLOOR_F32 = 1e-6


# ---------------------------------------------------------------------------------------------
# dense steps shared by both bases


def cholesky_qr(y: np.ndarray) -> np.ndarray | None:
    """Q = Y R^-1 with R^T R = Y^T Y (Cholesky QR); None when Y^T Y is not numerically positive definite."""
    r = cholesky_r(y.T @ y)
    return None if r is None else r_inverse(y, r)


def cholesky_r(gram: np.ndarray) -> np.ndarray | None:
    """Upper triangular R with ``R^T R = gram``; None when gram is not numerically positive definite."""
    try:
        r = np.linalg.cholesky(gram).T
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(r)) or np.any(np.diag(r) <= 0):
        return None
    return r


def r_inverse(y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``Y R^-1`` for upper triangular R: a triangular solve on the (l x p) Fortran view of C-ordered Y, no copy."""
    return dtrsm(1.0, r, np.ascontiguousarray(y).T, side=0, lower=0, trans_a=1).T


def orthonormalize(y: np.ndarray) -> np.ndarray:
    """An orthonormal basis (p x l, float64) of the columns of y.

    CholeskyQR2 (Fukaya et al. 2014: Cholesky QR applied twice) costs two Gram matrices and two
    triangular solves, O(p l^2) in level-3 BLAS, several times faster than Householder QR for
    p >> l; it is accurate while cond(y) < ~1e8 (u^-1/2). When the Cholesky factorization fails
    or the result is not orthonormal to 1e-10 (rank-deficient or ill-conditioned y), Householder
    QR, whose Q is orthonormal for any y, is used instead. Either gives a basis of the same span,
    which is all the subspace iteration needs.
    """
    q = cholesky_qr(y)
    if q is not None:
        q = cholesky_qr(q)
    if q is not None and np.abs(q.T @ q - np.eye(q.shape[1])).max() < 1e-10:
        return np.ascontiguousarray(q)
    return np.linalg.qr(y, mode="reduced")[0]


def flip_signs(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(v * sign, sign)``: each column of v (p x k) times the sign of its largest-magnitude entry.

    Singular vectors are unique only up to sign (``u_j s_j v_j^T = (-u_j) s_j (-v_j)^T``); this
    makes the sign a function of the vector alone. ``sign`` (k,) holds +1 or -1 (+1 for a zero
    column; the first entry wins a tie in magnitude); multiply the paired U columns by it too.
    O(p k).
    """
    _, signed = column_peaks(v)
    sign = np.sign(signed)
    sign[sign == 0] = 1
    return v * sign, sign


def column_peaks(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of v: the largest magnitude and the (signed) value of its first entry of that magnitude."""
    a = np.abs(v)
    peak = a.max(axis=0, initial=0.0)
    first_max = (a == peak).argmax(axis=0)  # = argmax(|v|, axis=0), 2x faster for C-order v
    return peak, v[first_max, np.arange(v.shape[1])] if len(v) else np.zeros(v.shape[1])


def ill_conditioned(gram: np.ndarray) -> bool:
    """Whether Y^T Y (b x b) is so ill-conditioned that K = Y R^-1 may lose Y's orthogonality to the basis."""
    ev = np.linalg.eigvalsh(gram) if gram.shape[0] else np.ones(1)
    return bool(ev[0] <= 1e-12 * max(ev[-1], np.finfo(float).tiny))


def extend_basis(
    basis: np.ndarray | None, y: np.ndarray, seed: int, step: int, basis32: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(K, H)``: an orthonormal block K (p x b, float64) orthogonal to ``basis`` with span(basis, K) ⊇ span(y),
    and ``H = basis^T y`` (the coefficients, for the projected matrix).

    Block classical Gram-Schmidt twice ("twice is enough": Giraud et al. 2005; the second pass
    removes what rounding left of the first, so K is orthogonal to the basis to ~1e-16 whatever
    the angle), then ``orthonormalize`` within the block. With ``basis32`` (the basis rounded to
    float32) the first pass runs in float32 at half the cost: it leaves ~6e-8 ||y|| of the basis in
    y, which the float64 second pass removes, and H = the sum of both passes' coefficients is exact
    to ~6e-8 ||y||, the rounding every product over X already carries (Z = X K is float32).
    A column that vanishes against the basis (below ``LOST_FLOOR`` of its norm, ``LOST_FLOOR_F32``
    after a float32 pass: X of rank below the space width, or an exhausted Krylov space) is
    replaced by a seeded random direction, orthogonalized the same way, so the space keeps its
    width and its orthonormality; such directions get zero Ritz values.
    """
    h = np.zeros((0, y.shape[1])) if basis is None else np.zeros((basis.shape[1], y.shape[1]))
    norms = np.linalg.norm(y, axis=0)
    floor = LOST_FLOOR
    if basis is not None:
        if basis32 is not None:
            y32 = y.astype(np.float32)
            c32 = basis32.T @ y32
            y32 -= basis32 @ c32
            y, h = y32.astype(np.float64), h + c32
            floor = LOST_FLOOR_F32
        else:
            c = basis.T @ y
            y, h = y - basis @ c, h + c
        c = basis.T @ y
        y, h = y - basis @ c, h + c
    lost = np.linalg.norm(y, axis=0) <= floor * np.maximum(norms, np.finfo(float).tiny)
    if lost.any():
        rng = np.random.default_rng([seed, 7919, step])
        y[:, lost] = rng.standard_normal((y.shape[0], int(lost.sum())))
        for _ in range(2):
            if basis is not None:
                y[:, lost] -= basis @ (basis.T @ y[:, lost])
    # K = Y R^-1 keeps Y's orthogonality to the basis up to ~eps cond(Y): one more pass (and re-normalization)
    # only where that can matter, a replaced column or an ill-conditioned block (eigenvalues of Y^T Y, b x b)
    ill = ill_conditioned(y.T @ y) if y.shape[1] else False
    k = orthonormalize(y)
    if basis is not None and (lost.any() or ill):
        k = k - basis @ (basis.T @ k)
        k = orthonormalize(k)
    return k, h


def signed_v32(v: np.ndarray, live: int, seed: int, step: int) -> np.ndarray:
    """``flip_signs(V)`` in float32 from ``v = Q vr`` (p x k, float64, changed in place), its columns from ``live`` on
    (zero where vr is: a space narrower than k) first completed to an orthonormal set by ``extend_basis``."""
    p, k = v.shape
    if live < k:
        v[:, live:] = extend_basis(v[:, :live], np.zeros((p, k - live)), seed, step)[0]
    v, _ = flip_signs(v)
    return np.ascontiguousarray(v, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# the interface


class KrylovBasis(ABC):
    """The orthonormal basis Q of the Krylov space, grown block by block (``krylov_svd``).

    ``width``: its columns so far; ``widths``: each block's; ``kind``: where it lives ("local" or "chunked",
    the SVD's ``diagnostics["basis"]``). A ``y`` is p x b float64: an array, or on a client also a future of one
    (a product's result).
    """

    kind: str
    width: int
    widths: list[int]

    @abstractmethod
    def start(self, y: Any, seed: int) -> None:
        """The first block: an orthonormal basis of y's columns (lost columns replaced, ``extend_basis``)."""

    @abstractmethod
    def last32(self) -> Any:
        """The newest block in float32, C-ordered (p x ``widths[-1]``; the kernels read it by rows): an array, or
        a future where the basis lives on the workers."""

    @abstractmethod
    def extend(self, y: Any, seed: int, step: int, room: int) -> np.ndarray:
        """``basis^T y`` (float64, ``width`` x b); and, when ``room`` > 0, y's new orthonormal block (at most
        ``room`` columns) appended, as ``extend_basis`` makes it."""

    def extend_later(self, y: Any, seed: int, step: int, room: int) -> Callable[[], np.ndarray]:
        """``extend``, its H read by the function returned; the new block is appended (``last32``) before H is
        read, so the next product can be submitted first. Here: ``extend`` now."""
        h = self.extend(y, seed, step, room)
        return lambda: h

    @abstractmethod
    def combine(self, vr: np.ndarray, live: int, seed: int, step: int) -> tuple[np.ndarray, Any]:
        """``(V, V on the workers)``: ``V = signed_v32(Q vr, live, seed, step)`` (p x k float32) over the first
        ``len(vr)`` columns of the basis, and the same V as a future where the basis built it on the workers (None
        otherwise). The basis may not be extended after."""

    @abstractmethod
    def release(self) -> None:
        """Forget the basis (its memory, here or on the workers)."""


def new_basis(run: Here | OnCluster, p: int, cap: int, workers: list[str | None], chunked: bool | None = None
              ) -> KrylovBasis:
    """A basis of p rows with room for ``cap`` columns where ``run`` runs its calls: a ``LocalBasis`` in this
    process, a ``ChunkedBasis`` on a client's workers (its chunks spread over ``workers``). ``chunked=True`` makes
    the chunked basis in this process too (its chunk functions called at once): an SVD moved here from a client
    (``blocks.rounds_where``) then gets the workers' V and sigma bit for bit, where the local basis would differ
    in the order of its sums (~1e-6 in V, within the SVD's tolerance)."""
    if chunked is None:
        chunked = run.client is not None
    return ChunkedBasis(run, p, workers) if chunked else LocalBasis(p, cap)


# ---------------------------------------------------------------------------------------------
# the basis in this process


class LocalBasis(KrylovBasis):
    """The basis in this process: float64 and float32 copies, column-major, with room for ``cap`` columns.

    Adding a block copies nothing (pages are touched only as columns are filled); the first
    Gram-Schmidt pass reads the float32 copy, the second the float64 one.
    """

    kind = "local"

    def __init__(self, p: int, cap: int):
        self.p, self.cap = p, cap
        self.store64 = np.empty((p, cap), order="F")
        self.store32 = np.empty((p, cap), np.float32, order="F")
        self.width = 0
        self.widths: list[int] = []

    def _add(self, k: np.ndarray) -> None:
        last = slice(self.width, self.width + k.shape[1])
        self.store64[:, last], self.store32[:, last] = k, k
        self.last = last
        self.width += k.shape[1]
        self.widths.append(k.shape[1])

    def start(self, y: np.ndarray, seed: int) -> None:
        """The first block: ``extend_basis`` of y against nothing."""
        self._add(extend_basis(None, y, seed, 0)[0])

    def last32(self) -> np.ndarray:
        """The newest block in float32, C-ordered (the kernels read it by rows)."""
        return np.ascontiguousarray(self.store32[:, self.last])

    def extend(self, y: np.ndarray, seed: int, step: int, room: int) -> np.ndarray:
        """``basis^T y``; and, when ``room`` > 0, the block ``extend_basis`` makes of y (at most ``room`` columns)."""
        basis = self.store64[:, : self.width]
        if room <= 0:
            return basis.T @ y
        new, h = extend_basis(basis, y, seed, step, self.store32[:, : self.width])
        self._add(new[:, :room])
        return h

    def combine(self, vr: np.ndarray, live: int, seed: int, step: int) -> tuple[np.ndarray, None]:
        """``Q vr`` with BLAS on every core (no kernel runs beside this one p x W x k product), after freeing the
        float32 copy; then ``signed_v32``."""
        self.store32 = None
        m = vr.shape[0]
        with blas_limit(available_cores()):
            v = (vr.T @ self.store64[:, :m].T).T  # as V^T = V_r^T Q^T: the column-major basis read by rows, 3x faster
        return signed_v32(v, live, seed, step), None

    def release(self) -> None:
        """Drop both copies."""
        self.store64 = self.store32 = None


# ---------------------------------------------------------------------------------------------
# the basis in row chunks on the workers: the tasks


def chunk_bounds(p: int) -> np.ndarray:
    """Row bounds of the basis' chunks (int64, ``n_chunks + 1``): the most of 1, 2, 4, .. ``CHUNKS`` chunks that keeps
    each at ``MIN_CHUNK_ROWS`` rows or more, of equal rows (to one). A power of two, so that 2, 4 or 8 threads or
    workers take equal shares of every pass (p = 50,000 was 3 chunks of 16,384 rows and one of 848: two rounds of
    two threads, the second pass at 32,768 rows a thread where 25,000 now); fixed by p alone, so the sums (in chunk
    order) are the same on any number of workers."""
    n = 1
    while n < CHUNKS and p // (2 * n) >= MIN_CHUNK_ROWS:
        n *= 2
    return (np.arange(n + 1, dtype=np.int64) * p) // n


def rows_of(y: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of y, a copy (a view would keep all of y alive on the worker)."""
    return np.array(y[lo:hi])


def gs_first(y: np.ndarray, *blocks: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``(Q32_c^T y_c, column sums of y_c^2)`` for one chunk c (float32 coefficients, W x b)."""
    y32 = y.astype(np.float32)
    c = np.concatenate([q32.T @ y32 for _, q32 in blocks]) if blocks else np.zeros((0, y.shape[1]), np.float32)
    return c, np.einsum("ij,ij->j", y, y)


def _subtract(y: np.ndarray, c: np.ndarray, blocks: tuple, which: int) -> np.ndarray:
    """``y -= Q c`` in place, Q the blocks' float64 (which = 0) or float32 (1) copies."""
    row = 0
    for pair in blocks:
        q = pair[which]
        y -= q @ c[row : row + q.shape[1]]
        row += q.shape[1]
    return y


def gs_second(y: np.ndarray, c32: np.ndarray, *blocks: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The float32 pass's ``y - Q32 c32`` (in float64), and its float64 coefficients ``Q^T y`` (W x b)."""
    y32 = _subtract(y.astype(np.float32), c32, blocks, 1)
    y = y32.astype(np.float64)
    return y, gs_coefficients(y, *blocks)


def gs_coefficients(y: np.ndarray, *blocks: tuple) -> np.ndarray:
    """``Q_c^T y_c`` in float64 (W x b) for one chunk."""
    return np.concatenate([q.T @ y for q, _ in blocks]) if blocks else np.zeros((0, y.shape[1]))


def gs_subtract(y: np.ndarray, c: np.ndarray, *blocks: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``(y - Q c, its Gram matrix)`` for one chunk, float64 (y is a task input: copied, not changed)."""
    y = _subtract(np.array(y, dtype=np.float64), c, blocks, 0)
    return y, y.T @ y


def pip_first(y: np.ndarray, lo: int, hi: int, *blocks: tuple) -> np.ndarray:
    """One chunk's summands of the one-reduction pass over rows ``lo:hi`` of y, stacked: ``Q_c^T y_c`` (W x b) over
    ``y_c^T y_c`` (b x b), float64."""
    return _pip_summands(np.ascontiguousarray(y[lo:hi], dtype=np.float64), blocks)


def _pip_summands(y: np.ndarray, blocks: tuple) -> np.ndarray:
    return np.concatenate([gs_coefficients(y, *blocks), y.T @ y])


def pip_second(y: np.ndarray, lo: int, hi: int, c: np.ndarray, r: np.ndarray, *blocks: tuple
               ) -> tuple[np.ndarray, np.ndarray]:
    """One chunk (rows ``lo:hi`` of y) of ``Y1 = (Y - Q C) R^-1`` (the first pass's block, nearly orthonormal) and
    its summands for the second pass, stacked as in ``pip_first``; in tiles of ``GS_TILE_ROWS`` rows, each tile's
    summands added in order, so that each tile of Q is read from memory once for both products."""
    y1 = np.array(y[lo:hi], dtype=np.float64)
    summands = np.zeros((c.shape[0] + y1.shape[1], y1.shape[1]))
    for t0 in range(0, len(y1), GS_TILE_ROWS):
        tile = y1[t0 : t0 + GS_TILE_ROWS]
        rows = tuple((q[t0 : t0 + GS_TILE_ROWS], None) for q, _ in blocks)
        tile[:] = r_inverse(_subtract(tile, c, rows, 0), r)
        summands += _pip_summands(tile, rows)
    return y1, summands


def pip_block(y1: np.ndarray, c: np.ndarray, r: np.ndarray, width: int, *blocks: tuple
              ) -> tuple[np.ndarray, np.ndarray]:
    """One chunk of the new basis block ``K = (Y1 - Q C) R^-1``, its first ``width`` columns stored as
    ``stored_block`` stores them."""
    return stored_block(r_inverse(_subtract(np.array(y1, dtype=np.float64), c, blocks, 0), r), width)


def pip_factor_task(w: int, scale: float | None, max_deviation: float | None, min_ratio: float,
                    *parts: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``pip_factor`` as a task on the chunks' summands (``(None, None)`` after a failed first pass: its summands
    are None), so the next pass needs no round trip to the driver; ``min_ratio``: the driver's ``PIP_MIN_RATIO``."""
    if any(part is None for part in parts):
        return None, None
    return pip_factor(list(parts), w, scale, max_deviation, min_ratio)


def pip_second_after(y: np.ndarray, lo: int, hi: int, factor: tuple, *blocks: tuple
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``pip_second`` with the first pass's ``(C, R)`` from ``pip_factor_task``; ``(None, None)`` when it failed."""
    c, r = factor
    return (None, None) if r is None else pip_second(y, lo, hi, c, r, *blocks)


def pip_block_after(y1: np.ndarray | None, factor: tuple, width: int, *blocks: tuple) -> tuple | None:
    """``pip_block`` with the second pass's ``(C, R)`` from ``pip_factor_task``; None when a pass failed."""
    c, r = factor
    return None if r is None or y1 is None else pip_block(y1, c, r, width, *blocks)


def pip_factor(parts: list, w: int, scale: float | None = None, max_deviation: float | None = None,
               min_ratio: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(C, R)`` from the chunks' stacked summands (``pip_first``), summed in chunk order: ``C = Q^T Y`` and R
    with ``R^T R = Y^T Y - C^T C``; R is None when that Gram matrix's smallest eigenvalue is below ``min_ratio``
    (default ``PIP_MIN_RATIO``) times ``scale`` (default: Y's largest squared column norm) or, with
    ``max_deviation``, when it is further than that from the identity (entrywise)."""
    total = _total(parts)
    c, gram_y = total[:w], total[w:]
    gram = gram_y - c.T @ c
    gram = (gram + gram.T) / 2
    scale = float(np.max(np.diag(gram_y), initial=0.0)) if scale is None else scale
    if max_deviation is not None and np.abs(gram - np.eye(len(gram))).max(initial=0.0) > max_deviation:
        return c, None
    ev = np.linalg.eigvalsh(gram) if len(gram) else np.ones(1)
    if not scale > 0 or ev[0] < (PIP_MIN_RATIO if min_ratio is None else min_ratio) * scale:
        return c, None
    return c, cholesky_r(gram)


def gram_of(y: np.ndarray) -> np.ndarray:
    """``y^T y`` of one chunk."""
    return y.T @ y


def replace_columns(y: np.ndarray, lost: np.ndarray, seed: int, step: int, chunk: int) -> np.ndarray:
    """y with its ``lost`` columns replaced by seeded Gaussian rows (stream ``[seed, 7919, step, chunk]``)."""
    y = np.array(y, dtype=np.float64)
    y[:, lost] = np.random.default_rng([seed, 7919, step, chunk]).standard_normal((y.shape[0], int(lost.sum())))
    return y


def times_r_inverse(y: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(y R^-1, its Gram matrix)`` for one chunk (a CholeskyQR step)."""
    k = r_inverse(y, r)
    return k, k.T @ k


def stored_block(k: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One chunk's new basis block: its first ``width`` columns in float64 and float32, C-ordered."""
    k = np.ascontiguousarray(k[:, :width])
    return k, k.astype(np.float32)


def float32_part(pair: tuple | None) -> np.ndarray | None:
    """The float32 copy of one chunk of a block (``stored_block``'s pair; None for a block whose one-reduction pass
    failed: ``ChunkedBasis.extend_later`` then drops it)."""
    return None if pair is None else pair[1]


def stacked32(*chunks: np.ndarray | None) -> np.ndarray | None:
    """One block's float32 chunks (``float32_part``), stacked (p x b): the next product's K (None for a dropped
    block)."""
    if any(chunk is None for chunk in chunks):
        return None
    return np.ascontiguousarray(np.concatenate(chunks))


def combined_rows(vr: np.ndarray, *blocks: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunk of ``V = Q vr``: its rows in float32, and the float64 rows' ``column_peaks``."""
    rows = blocks[0][0].shape[0]
    v = np.zeros((rows, vr.shape[1]))
    col = 0
    for q, _ in blocks:
        if col >= vr.shape[0]:
            break
        w = min(q.shape[1], vr.shape[0] - col)
        v += q[:, :w] @ vr[col : col + w]
        col += w
    return (v.astype(np.float32), *column_peaks(v))


def signed_stack(sign: np.ndarray, *chunks: tuple) -> np.ndarray:
    """V from its chunks' float32 rows (``combined_rows``), each column times its sign (exact in float32)."""
    v = np.concatenate([rows for rows, _, _ in chunks])
    v *= sign.astype(np.float32)
    return v


def chunk_of(y: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of a driver-side array, copied (a chunk shared from the driver)."""
    return np.ascontiguousarray(y[lo:hi], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# the basis in row chunks on the workers: the driver's side


def _total(parts) -> np.ndarray:
    """The float64 sum of the chunks' parts, in chunk order (the same bits however the chunks are computed)."""
    total = None
    for part in parts:
        part = np.asarray(part, np.float64)
        total = part.copy() if total is None else total + part
    return total


class ChunkedBasis(KrylovBasis):
    """The basis on the Dask workers, in row chunks (``chunk_bounds``); one future per (chunk, block).

    Chunk c's tasks go to worker ``c mod n_workers`` of the workers given (loosely:
    ``allow_other_workers``), so the chunks and their Gram-Schmidt work spread over the workers.
    ``y`` arguments are futures of p x b float64 arrays (the products' results); the driver
    sees only coefficients and Gram matrices.
    """

    kind = "chunked"

    def __init__(self, run: OnCluster, p: int, workers: list[str | None]):
        self.run, self.p = run, p
        self.bounds = chunk_bounds(p)
        self.n_chunks = len(self.bounds) - 1
        self.rows = [(int(self.bounds[c]), int(self.bounds[c + 1])) for c in range(self.n_chunks)]  # (lo, hi) each
        self.workers = workers or [None]
        self.blocks: list[list[Any]] = [[] for _ in range(self.n_chunks)]
        self.widths: list[int] = []
        self.width = 0
        self._last32: Any = None
        self.explicit_steps = 0  # blocks made by the explicit passes (y ill-conditioned against the basis)
        self._pool: ThreadPoolExecutor | None = None  # here (no client): the chunks' threads

    # -- plumbing

    def _submit(self, c: int, fn, *args):
        return self.run.submit(fn, *args, worker=self.workers[c % len(self.workers)])

    def _map(self, fn, args_of) -> list:
        """``fn(*args_of(c))`` for every chunk c: a task per chunk on a client; here, the chunks on a pool of threads
        (the chunks' BLAS calls run one thread each and release the GIL), each result the same as one call's."""
        if self.run.client is not None or self.n_chunks == 1:
            return [self._submit(c, fn, *args_of(c)) for c in range(self.n_chunks)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(min(self.n_chunks, available_cores()), thread_name_prefix="svd-chunks")
        return list(self._pool.map(lambda c: fn(*args_of(c)), range(self.n_chunks)))

    def _each(self, fn, per_chunk, *args, blocks: bool = True):
        """``fn(per_chunk[c], *args, *blocks of c)`` per chunk c (without the blocks: ``blocks=False``), as
        futures."""
        return self._map(fn, lambda c: (per_chunk[c], *args, *(self.blocks[c] if blocks else ())))

    def _each_pair(self, fn, per_chunk, *args, blocks: bool = True) -> tuple[list, list]:
        """``_each`` of a function returning (a chunk's array, a small summand), both items as futures submitted
        with it: the items run as soon as their task does, so reading the summands and using the arrays later
        costs no round trip of its own (a task submitted after the driver's wait starts a new round)."""
        futures = self._each(fn, per_chunk, *args, blocks=blocks)
        return self._items(futures, 0), self._items(futures, 1)

    def _sum(self, futures) -> np.ndarray:
        """The float64 sum, in chunk order, of the futures' results."""
        return _total(self.run.gather(futures))

    @property
    def chunk_workers(self) -> list[str | None]:
        """The worker of each chunk's tasks, in chunk order (``_submit``'s)."""
        return [self.workers[c % len(self.workers)] for c in range(self.n_chunks)]

    def _rows_args(self, y, c: int) -> tuple:
        """``(y, lo, hi)`` for chunk c's rows of y: a whole y sliced by the task, or y's own chunk c (a list of
        chunks, ``_BlockTasks.product_rows``) whole."""
        if isinstance(y, list):
            return y[c], 0, self.rows[c][1] - self.rows[c][0]
        return (y, *self.rows[c])

    def _chunks(self, y) -> list:
        """The row chunks of y: a future (a product's result), a driver-side array, or y's chunks already (a list,
        ``_BlockTasks.product_rows``)."""
        if isinstance(y, list):
            return y
        if not is_future(y):
            y = self.run.share(np.ascontiguousarray(y, np.float64), "svd-y")
        return [self._submit(c, rows_of, y, *self.rows[c])
                for c in range(self.n_chunks)]

    def _items(self, futures, index: int) -> list:
        return [self._submit(c, operator.itemgetter(index), f) for c, f in enumerate(futures)]

    # -- the basis

    def start(self, y, seed: int) -> None:
        """The first block: an orthonormal basis of y's columns (lost columns replaced)."""
        ys = self._chunks(y)
        gram = self._gram(ys)
        self._finish_block(ys, np.sqrt(np.clip(np.diag(gram), 0, None)), LOST_FLOOR, seed, 0, len(gram), gram=gram,
                           first=True)

    def _gram(self, ys: list) -> np.ndarray:
        """``y^T y`` summed over the chunks."""
        return self._sum([self._submit(c, gram_of, ys[c]) for c in range(self.n_chunks)])

    def extend(self, y, seed: int, step: int, room: int) -> np.ndarray:
        """``basis^T y``; and, when ``room`` > 0, y's new orthonormal block (at most ``room`` columns) appended
        (``extend_later``, its H read at once)."""
        if room > 0:
            return self.extend_later(y, seed, step, room)()
        return self._sum(self._each(gs_coefficients, self._chunks(y)))

    def extend_later(self, y, seed: int, step: int, room: int) -> Callable[[], np.ndarray]:
        """y's new block by block classical Gram-Schmidt with one reduction per pass, twice, each pass ending in a
        Cholesky QR (BCGS-PIP+, Carson, Lund & Rozloznik 2021): ``C1 = Q^T Y``, ``R1^T R1 = Y^T Y - C1^T C1``,
        ``Y1 = (Y - Q C1) R1^-1``; then the same on Y1 gives C2, R2 and the block ``K = (Y1 - Q C2) R2^-1``,
        orthonormal and orthogonal to the basis to O(eps) while Y is well conditioned against it
        (``PIP_MIN_RATIO``); ``Y = Q (C1 + C2 R1) + K R2 R1``, and the function returned gives ``H = C1 + C2 R1``.

        The passes are one graph of tasks, their factors (``pip_factor_task``) computed on a worker: the block is
        stored and its ``last32`` submitted at once, and reading H is the step's only round trip (here every call
        runs at once). Where a pass was not well conditioned the block is dropped and made again by
        ``extend_basis``'s explicit passes (``_extend_explicit``; ``last32`` is then the new one's). Either block
        spans y's part outside the basis, orthonormal to O(eps) (R's diagonal positive in both: they differ by
        rounding). Without room for a block: ``extend`` now."""
        if room <= 0:
            return super().extend_later(y, seed, step, room)
        if not (is_future(y) or isinstance(y, list)):
            y = self.run.share(np.ascontiguousarray(y, np.float64), "svd-y")
        w, width = self.width, min(room, self.widths[-1])  # y has the newest block's width
        f1 = self._submit(0, pip_factor_task, w, None, None, PIP_MIN_RATIO, *self._map(
            pip_first, lambda c: (*self._rows_args(y, c), *self.blocks[c])))
        pairs = self._map(pip_second_after, lambda c: (*self._rows_args(y, c), f1, *self.blocks[c]))
        ys1, parts = self._items(pairs, 0), self._items(pairs, 1)
        f2 = self._submit(0, pip_factor_task, w, 1.0, PIP_MAX_DEVIATION, PIP_MIN_RATIO, *parts)
        self._store(self._map(pip_block_after, lambda c: (ys1[c], f2, width, *self.blocks[c])), width)

        def h() -> np.ndarray:
            (c1, r1), (c2, r2) = self.run.gather([f1, f2])
            if r1 is not None and r2 is not None:
                return c1 + c2 @ r1
            self._unstore()
            self.explicit_steps += 1
            return self._extend_explicit(self._chunks(y), seed, step, room)
        return h

    def _unstore(self) -> None:
        """Drop the newest block (and its ``last32``; futures released)."""
        dropped = [blocks.pop() for blocks in self.blocks]
        dropped += self._last32 if isinstance(self._last32, list) else []
        for f in dropped:
            if is_future(f):
                f.release()
        self.width -= self.widths.pop()
        self._last32 = None

    def _extend_explicit(self, ys: list, seed: int, step: int, room: int) -> np.ndarray:
        """``extend_basis``'s steps over the chunks: a float32 and a float64 Gram-Schmidt pass, lost columns replaced,
        then CholeskyQR2 (one more float64 pass when a column was replaced or Y is ill-conditioned); returns the
        coefficients of both passes (H)."""
        first = self.run.gather(self._each(gs_first, ys))  # both items small: one round trip
        c32 = _total([c for c, _ in first]).astype(np.float32)
        norms = np.sqrt(_total([sq for _, sq in first]))
        second, c64_parts = self._each_pair(gs_second, ys, c32)
        c64 = self._sum(c64_parts)
        third, grams = self._each_pair(gs_subtract, second, c64)
        self._finish_block(third, norms, LOST_FLOOR_F32, seed, step, room, gram=self._sum(grams))
        return c32.astype(np.float64) + c64

    def _project_out(self, ys: list) -> tuple[list, np.ndarray]:
        """ys minus their projection on the basis (one float64 pass), and the result's Gram matrix."""
        c = self._sum(self._each(gs_coefficients, ys))
        out, grams = self._each_pair(gs_subtract, ys, c)
        return out, self._sum(grams)

    def _finish_block(self, ys: list, norms: np.ndarray, floor: float, seed: int, step: int, room: int,
                      gram: np.ndarray, first: bool = False) -> None:
        """Lost columns replaced, CholeskyQR2, the block's first ``room`` columns stored (``extend_basis``'s end)."""
        lost = np.sqrt(np.clip(np.diag(gram), 0, None)) <= floor * np.maximum(norms, np.finfo(float).tiny)
        if lost.any():
            ys = [self._submit(c, replace_columns, ys[c], lost, seed, step, c) for c in range(self.n_chunks)]
            for _ in range(0 if first else 2):
                ys, gram = self._project_out(ys)
            if first:
                gram = self._gram(ys)
        ill = ill_conditioned(gram)
        again = not first and (lost.any() or ill)
        ks = self._orthonormalize(ys, gram, check=ill)
        if again:
            ks, gram = self._project_out(ks)
            ks = self._orthonormalize(ks, gram, check=True)
        width = min(room, len(norms))
        self._store([self._submit(c, stored_block, ks[c], width) for c in range(self.n_chunks)], width)

    def _store(self, chunks: list, width: int) -> None:
        """Append a block (one future of ``stored_block``'s pair per chunk) of ``width`` columns."""
        for c in range(self.n_chunks):
            self.blocks[c].append(chunks[c])
        self.widths.append(width)
        self.width += width
        # the next product's K, submitted with the block (not after the driver's Ritz step: no round of its own); on a
        # client stacked on each worker of the products from the chunks' float32 copies (the only part that travels)
        if self.run.client is None:
            self._last32 = stacked32(*[float32_part(blocks[-1]) for blocks in self.blocks])
            return
        parts = [self._submit(c, float32_part, blocks[-1]) for c, blocks in enumerate(self.blocks)]
        self._last32 = [self.run.submit(stacked32, *parts, worker=w) for w in self.workers]

    def _orthonormalize(self, ys: list, gram: np.ndarray, check: bool) -> list:
        """CholeskyQR2 over the chunks (``orthonormalize``'s first choice); Householder QR of y on the driver
        (p x b, once) when it fails or (``check``) leaves the block not orthonormal to 1e-10.

        Without ``check`` (y's Gram matrix has condition below 1e12, so cond(y) < 1e6) the result is
        not measured: CholeskyQR2 is orthonormal to O(eps) for cond(y) up to ~eps^-1/2 = 1e8
        (Yamamoto et al. 2015), and the Cholesky factorizations themselves still guard it.
        """
        r = cholesky_r(gram)
        if r is not None:
            once, grams = self._each_pair(times_r_inverse, ys, r, blocks=False)
            r2 = cholesky_r(self._sum(grams))
            if r2 is not None:
                twice, grams = self._each_pair(times_r_inverse, once, r2, blocks=False)
                if not check or np.abs(self._sum(grams) - np.eye(len(gram))).max() < 1e-10:
                    return twice
        y = np.concatenate(self.run.gather(ys))
        q = self.run.share(np.linalg.qr(y, mode="reduced")[0], "svd-k")
        return [self._submit(c, chunk_of, q, *self.rows[c])
                for c in range(self.n_chunks)]

    def last32(self):
        """The newest block in float32, p x b (submitted when the block was stored): on a client a list of futures,
        one on each worker of ``workers`` (the products' groups, in order), an array here."""
        last, self._last32 = self._last32, None
        return last

    def combine_signed(self, vr: np.ndarray) -> tuple[Any, np.ndarray]:
        """``flip_signs(Q vr)`` in float32 (p x k) as a future on a worker, and the signs: each chunk's rows
        are combined where the chunk lives, only their column peaks come to the driver."""
        futs = self._map(combined_rows, lambda c: (vr, *self.blocks[c]))
        k = vr.shape[1]
        peak, signed = np.full(k, -1.0), np.zeros(k)
        for chunk_peak, chunk_signed in self.run.gather([self._submit(c, operator.itemgetter(1, 2), f)
                                                         for c, f in enumerate(futs)]):
            better = chunk_peak > peak  # strictly: the first chunk wins a tie, as the first entry in flip_signs
            peak[better], signed[better] = chunk_peak[better], chunk_signed[better]
        sign = np.sign(signed)
        sign[sign == 0] = 1
        return self._submit(0, signed_stack, sign, *futs), sign

    def gather64(self) -> np.ndarray:
        """The whole basis in float64 on the driver (p x W): only for spaces narrower than k (small X)."""
        rows = [np.concatenate([q for q, _ in self.run.gather(blocks)], axis=1) for blocks in self.blocks]
        return np.concatenate(rows)

    def combine(self, vr: np.ndarray, live: int, seed: int, step: int) -> tuple[np.ndarray, Any]:
        """V built on a worker (``combine_signed``) and fetched; a space narrower than k (small X) on the driver,
        from the gathered basis."""
        if live == vr.shape[1]:
            v_future, _ = self.combine_signed(vr)
            return value(v_future), v_future if is_future(v_future) else None
        return signed_v32(self.gather64()[:, : vr.shape[0]] @ vr, live, seed, step), None

    def release(self) -> None:
        """Forget every chunk (their memory on the workers goes with the futures)."""
        for blocks in self.blocks:
            for f in blocks:
                if is_future(f):
                    f.release()
        self.blocks = [[] for _ in range(self.n_chunks)]
        self._last32 = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
