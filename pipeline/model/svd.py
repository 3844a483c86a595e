"""Truncated SVD of X (n users x p items) by the randomized range finder, over CSR row blocks.

Steck, Ekanadham & Kallus (2024) solve both objectives in closed form from the rank-k SVD
``X = U S V^T``: Eq. 1's ``A B^T = V_k diag(w) V_k^T`` with ``w_i = 1 / (1 + lam / s_i^2)`` and
Eq. 2's ``A = V_k diag(sqrt((1/s)(1 - lam/s)_+))``, ``B = V_k diag(sqrt(s (1 - lam/s)_+))``. This
stage computes ``s`` (``sigma``) and ``V_k``, and ``U_k`` on request.

The algorithm is Halko, Martinsson & Tropp (2011), Algorithm 4.4 (randomized subspace
iteration) followed by Algorithm 5.1 (direct SVD), applied to the item side: ``Q`` (p x l,
``l = k + oversample``) is an orthonormal basis of ``(X^T X)^q X^T Omega``, re-orthonormalized by
QR after every product with ``X^T X``; then ``C = X Q`` (n x l, in row blocks), ``C = Q_C R``
by TSQR, ``R = U_r S V_r^T`` and ``V = Q V_r``, ``U = Q_C U_r``. Only p x l and l x l matrices
ever meet in one process; n x l blocks stay with their rows of X.

An implicit column offset ``X_eff = X - 1 c^T`` (centering or standardizing without densifying)
enters every product as a rank-one correction: ``X_eff M = X M - 1 (c^T M)`` and
``X_eff^T Z = X^T Z - c (1^T Z)``.

The same code runs in-process (blocks are ``CSRBlock``s, the numba kernels use every thread)
and on a Dask client (blocks are futures; one task per block or row range of one, on the block's worker, so
every product runs where its rows live and only p x l partial sums travel): ``_BlockTasks`` runs
its calls through ``pipeline.shared.runner``. The Krylov solver's basis, the largest thing it
holds, stays on the workers too (``krylov_basis.new_basis``: one interface in both places).

Precision: the big products run on float32 inputs (X's values and ``Q`` rounded to float32,
relative error 6e-8, far below the 1e-3 the stage is held to) with float64 accumulation of
``X^T Z`` (a popular item sums over up to n products; float64 keeps those sums exact to ~1e-16
and independent of how rows are split into blocks, workers and threads). The small dense steps
(QR of p x l, TSQR, SVD of l x l) run in float64: they cost O(p l^2) and O(n l^2), little next
to the products, and keep the basis orthonormal to 1e-15 whatever the conditioning of the
sketch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mfsim.kernels.threads import blas_limit, on_worker
from mfsim.kernels.sparse import csc_t_matmat, csr_matmat, csr_transpose
from mfsim.pipeline.blocks import CSRBlock, RowBlocks
from mfsim.pipeline.config import SvdSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.model.krylov_basis import flip_signs, new_basis, orthonormalize
from mfsim.pipeline.progress import progress
from mfsim.pipeline.shared import is_future, runner

#: Rows per chunk of the Gaussian test matrix Omega (n x l): chunk j is drawn from
#: ``default_rng([seed, j])``, so Omega's rows depend only on their global index, never on how
#: the rows are split into blocks. 4096 rows keep the per-chunk generator set-up (~20 us) negligible.
OMEGA_CHUNK_ROWS = 4096

#: Stored entries per product task on a worker: each block a task, a block above this many cut into row ranges of
#: about equal entries (``row_ranges``); each task's p x l float64 partial of ``X^T Z`` is added on its worker
#: (for the basis' chunks: only the rows each chunk takes, ``product_rows``), so no partial travels between
#: workers. Measured at 1M users x 200k items x 50M (b = 16, 16 blocks of 65,536 users): a block's product ~80 ms,
#: the most active users' block 0 ~330 ms (the step's critical path) until cut in 4; per-block partials summed in a
#: tree instead moved 25.6 MB partials several times per step (~0.1 s each over the embedded cluster's TLS):
#: SVD 21 -> 27-32 s; one task per worker (before): a step's critical path all of that worker's blocks. Ranges of 1M
#: entries: the step's largest task 4x shorter, but each range's partial allocated and added (SVD work +31%).
PRODUCT_TASK_NNZ = 1 << 22

#: The solvers' defaults are the configuration's (``svd.oversample``, ``svd.power_iterations`` in
#: ``SvdSection``, where they are explained), so a direct call and a configured run agree.
DEFAULT_OVERSAMPLE: int = SvdSection.model_fields["oversample"].default
DEFAULT_POWER_ITERATIONS: int = SvdSection.model_fields["power_iterations"].default


@dataclass
class SvdResult:
    """Top-k singular values and vectors of X (or of ``X - 1 c^T`` with a column offset).

    Attributes
    ----------
    sigma : ndarray of float64, shape (k,)
        Singular values, descending.
    V : ndarray of float32, shape (p, k)
        Right singular vectors (item side), orthonormal columns, signs fixed by ``flip_signs``
        (each column's largest-magnitude entry positive).
    U : list or None
        Left singular vectors in row blocks aligned with X's blocks (``u_row_offsets``): ndarrays
        of float32 (n_b x k) in-process, futures on a Dask client. None unless requested.
    u_row_offsets : ndarray or None
        int64 (n_blocks + 1,), the rows of each block of ``U``.
    diagnostics : dict
        ``solver``, ``l`` (sketch width), ``power_iterations``, ``n_blocks``, ``executor``,
        ``seconds`` per phase.
    V_future : future or None
        The same V on the workers (the Krylov solver on a client builds it there): the factors are
        built from it without sending V back through the scheduler.
    """

    sigma: np.ndarray
    V: np.ndarray
    U: list | None = None
    u_row_offsets: np.ndarray | None = None
    client: Any = None
    diagnostics: dict = field(default_factory=dict)
    V_future: Any = None  # V (float32) as a future on the workers, where the solver built it there

    def gather_u(self) -> np.ndarray:
        """U_k as one (n x k) float32 array in this process (for small data and tests)."""
        if self.U is None:
            raise MfsimError("U was not computed; call the SVD with compute_u=True to get the user-side vectors")
        parts = self.client.gather(self.U) if self.client is not None else self.U
        k = len(self.sigma)
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, k), np.float32)


# ---------------------------------------------------------------------------------------------
# work on a list of blocks (the same functions run in-process and inside Dask tasks)


def omega_rows(row_start: int, n_rows: int, l: int, seed: int) -> np.ndarray:
    """Rows ``[row_start, row_start + n_rows)`` of the Gaussian test matrix Omega (n x l), float32.

    Row r is the same whatever the block it is drawn in: it comes from chunk
    ``r // OMEGA_CHUNK_ROWS``, drawn by ``numpy.random.default_rng([seed, chunk])``. O(n_rows * l).
    """
    out = np.empty((n_rows, l), dtype=np.float32)
    r = row_start
    while r < row_start + n_rows:
        chunk = r // OMEGA_CHUNK_ROWS
        lo = chunk * OMEGA_CHUNK_ROWS
        rows = np.random.default_rng([seed, chunk]).standard_normal((OMEGA_CHUNK_ROWS, l), dtype=np.float32)
        take = min(lo + OMEGA_CHUNK_ROWS, row_start + n_rows) - r
        out[r - row_start : r - row_start + take] = rows[r - lo : r - lo + take]
        r += take
    return out


def _product_z(block: CSRBlock, q32: np.ndarray | None, cq: np.ndarray | None, row_start: int, l: int, seed: int):
    """Z_b = X_eff_b Q (float32, n_b x l), or Omega_b when ``q32`` is None."""
    if q32 is None:
        return omega_rows(row_start, block.n_rows, l, seed)
    z = csr_matmat(block.indptr, block.indices, block.data, q32, np.empty((block.n_rows, l), np.float32))
    if cq is not None:
        z -= cq  # X_eff Q = X Q - 1 (c^T Q)
    return z


def gram_partial(
    blocks: list, transposes: list, row_starts: list, q32, cq, l: int, seed: int, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sum over ``blocks`` of ``(X_b^T Z_b, 1^T Z_b)`` with ``Z_b = X_eff_b Q`` (or Omega_b); ``transposes``: each
    block's ``transposed`` (X_b^T in CSR form, made once for the SVD's many products).

    Returns the p x l float64 partial of ``X^T Z`` (in ``out`` when given) and the l float64
    column sums of Z; the caller adds the offset term ``- c (1^T Z)`` once after summing
    partials. Memory: the p x l float64 sum plus one n_b x l float32 Z block at a time.
    """
    p = blocks[0].n_cols if blocks else 0
    out = np.zeros((p, l), np.float64) if out is None else out
    out.fill(0.0)
    zsum = np.zeros(l, dtype=np.float64)
    for block, t, start in zip(blocks, transposes, row_starts):
        z = _product_z(block, q32, cq, start, l, seed)
        zsum += z.sum(axis=0, dtype=np.float64)
        csc_t_matmat(t.indptr, t.indices, t.data, z, out, accumulate=True)  # out += X_b^T Z_b
    return out, zsum


def range_partial(block: CSRBlock, t: CSRBlock, lo: int, hi: int, row_start: int, q32, cq, l: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``gram_partial`` of rows ``lo:hi`` of one block (its first row ``row_start`` in X); ``t``: those rows'
    ``transposed``."""
    rows = block_rows(block, lo, hi)
    out = np.zeros((block.n_cols, l), np.float64)
    z = _product_z(rows, q32, cq, row_start + lo, l, seed)
    csc_t_matmat(t.indptr, t.indices, t.data, z, out, accumulate=True)  # out = X_s^T Z_s
    return out, z.sum(axis=0, dtype=np.float64)


def transposed(block: CSRBlock, lo: int = 0, hi: int | None = None) -> CSRBlock:
    """Rows ``lo:hi`` of ``block`` (all by default) transposed: X_s^T in CSR form (``csr_transpose``: one row per
    column of X, its entries' positions among the rows ascending), the operand of ``csc_t_matmat``. The Krylov
    SVD multiplies by the same X^T at every step: made once per SVD (a copy of X's entries, released with it),
    each step's ``X^T Z`` then reads a column's entries in order instead of scattering into ``out`` (the same
    bits: ``kernels.sparse``)."""
    rows = block_rows(block, lo, block.n_rows if hi is None else hi)
    return CSRBlock(*csr_transpose(rows.indptr, rows.indices, rows.data, rows.n_cols), rows.n_rows)


def block_rows(block: CSRBlock, lo: int, hi: int) -> CSRBlock:
    """Rows ``lo:hi`` of ``block`` as a block (views of its entries; the block itself for all of its rows)."""
    if lo == 0 and hi == block.n_rows:
        return block
    a, b = int(block.indptr[lo]), int(block.indptr[hi])
    return CSRBlock(block.indptr[lo : hi + 1] - a, block.indices[a:b], block.data[a:b], block.n_cols)


def row_ranges(block: CSRBlock, nnz: int) -> list[tuple[int, int]]:
    """The block's rows in ``ceil(block nnz / nnz)`` consecutive ranges of about equal stored entries (whole rows;
    one range for a block at or below ``nnz``)."""
    pieces = max(1, -(-block.nnz // max(1, nnz)))
    if pieces == 1:
        return [(0, block.n_rows)]
    cuts = np.searchsorted(block.indptr, np.arange(1, pieces) * block.nnz / pieces, side="left").tolist()
    bounds = sorted({0, block.n_rows, *[min(max(c, 0), block.n_rows) for c in cuts]})
    return list(zip(bounds[:-1], bounds[1:]))


def _c_block(block: CSRBlock, q32: np.ndarray, cq64: np.ndarray | None) -> np.ndarray:
    """C_b = X_eff_b Q in float64 (n_b x l)."""
    c = csr_matmat(block.indptr, block.indices, block.data, q32, np.empty((block.n_rows, q32.shape[1]), np.float64))
    if cq64 is not None:
        c -= cq64
    return c


def _r_factor(a: np.ndarray) -> np.ndarray:
    """R of a = Q R (min(m, l) x l); an empty matrix gives a 0 x l R."""
    if a.shape[0] == 0:
        return np.zeros((0, a.shape[1]))
    return np.linalg.qr(a, mode="r")


def tsqr_partial(blocks: list, q32: np.ndarray, cq64: np.ndarray | None) -> np.ndarray:
    """R factor of ``[C_1; C_2; ...]`` for ``C_b = X_eff_b Q``: QR per block, then QR of the stacked R's.

    Only one n_b x l block and the small R's (at most l x l each) are held at a time.
    O(sum_b n_b l^2) time.
    """
    l = q32.shape[1]
    rs = [_r_factor(_c_block(b, q32, cq64)) for b in blocks]
    return _r_factor(np.vstack(rs)) if rs else np.zeros((0, l))


def u_block(block: CSRBlock, q32: np.ndarray, cq64: np.ndarray | None, w: np.ndarray) -> np.ndarray:
    """U_b = C_b W with ``W = V_r[:, :k] S^-1`` (= Q_C,b U_r,k), float32 (n_b x k)."""
    return (_c_block(block, q32, cq64) @ w).astype(np.float32)


def _add_pairs(*parts: tuple) -> tuple:
    """``(sum of the first items, sum of the second items)`` of ``gram_partial`` results, added in order."""
    y, zsum = parts[0][0].copy(), parts[0][1].copy()
    for a, b in parts[1:]:
        y += a
        zsum += b
    return y, zsum


# ---------------------------------------------------------------------------------------------
# where the blocks live


class _BlockTasks:
    """X's blocks where they live, and the products over them: one task per block (or row range of one), partials
    added per worker, then across workers.

    Where the calls run is ``pipeline.shared.runner(blocks.client)``'s: in this process the blocks are
    ``CSRBlock``s and one group, one call over all of them with the kernels parallel over threads; on a Dask
    client they are futures, grouped by the worker that held them when the SVD started, one task per block or
    row range (``PRODUCT_TASK_NNZ``), their partials added on that worker, and the workers' sums by one task
    (``product``) or, for a basis in row chunks, chunk by chunk on the chunks' workers (``product_rows``).
    The groups are fixed for the whole SVD: a group's tasks are pinned to its worker only loosely
    (``allow_other_workers``), so when that worker is lost the same group runs elsewhere, after the scheduler
    has recomputed the lost blocks from their lineage. The sums are therefore grouped and ordered the same
    whichever worker ends up running a group, and a run that loses a worker mid-SVD gets the same sigma and V
    as one that does not (bit for bit, given the same groups). Q reaches the tasks as a shared value
    (``pipeline.shared``), recomputable on loss, never a broadcast. Each task runs ``kernels.threads.on_worker``.
    """

    def __init__(self, blocks: RowBlocks):
        self.blocks = blocks
        self.client = blocks.client
        self.run = runner(blocks.client)
        self.executor = self.run.name
        self.starts = [int(s) for s in blocks.row_offsets[:-1]]
        groups: dict[str, list[int]] = {}
        for i, holder in enumerate(self.run.holders(blocks.parts)):
            groups.setdefault(holder or "", []).append(i)
        self.groups = [(w or None, idx) for w, idx in sorted(groups.items())]
        self.workers = [w for w, _ in self.groups]
        self.n_workers = len(self.groups)
        self._out = None
        self._ranges: list | None = None  # per block (in group order), the row ranges of its product tasks
        self._transposes: list | None = None  # per block (in group order), its ranges' ``transposed`` (futures)
        self._here_transposes: list | None = None  # in this process: each block's ``transposed``

    def _task(self, fn: Callable, worker, idx: list[int], *args, **kwargs):
        """``fn(blocks idx, *args, **kwargs)`` for one group, on its worker."""
        return self.run.submit(on_worker, fn, [self.blocks.parts[i] for i in idx], *args, worker=worker, **kwargs)

    def _share(self, q32):
        return None if q32 is None else self.run.share(q32, "svd-q")

    def _scratch(self, l: int) -> np.ndarray | None:
        """The p x l float64 sum of a product in this process, kept for the products of one width (first-touching
        p x l pages costs); None on a client, where each task makes its own."""
        if self.client is not None:
            return None
        if self._out is None or self._out.shape[1] != l:
            self._out = np.zeros((self.blocks.n_cols, l), np.float64)
        return self._out

    def _sums(self, qf, cq, l: int, seed: int) -> list:
        """Per worker, the sum of its blocks' partials of ``X^T Z``: one task per block or row range of one
        (``ranges``, in order), added on that worker; one task over every block in this process. ``qf``: Q (a
        future, None for Omega), or a list of futures of it, one per group (on its worker)."""
        if self.client is None:
            if self._here_transposes is None:
                self._here_transposes = [transposed(part) for part in self.blocks.parts]
            return [gram_partial([self.blocks.parts[i] for i in idx], [self._here_transposes[i] for i in idx],
                                 [self.starts[i] for i in idx], q32=qf, cq=cq, l=l, seed=seed, out=self._scratch(l))
                    for _, idx in self.groups]
        return [parts[0] if len(parts) == 1 else self.run.submit(_add_pairs, *parts, worker=w)
                for (w, _), parts in zip(self.groups, self._partials(qf, cq, l, seed))]

    def _partials(self, qf, cq, l: int, seed: int) -> list[list]:
        """On a client, per worker, the futures of its blocks' partials of ``X^T Z`` (``range_partial``: one task per
        block or row range of one, ``PRODUCT_TASK_NNZ``), in order; ``qf`` as ``_sums``'."""
        if self._ranges is None:  # one round, at the first product: rows per task from each block's entries
            self._ranges = self.run.gather([self.run.submit(row_ranges, self.blocks.parts[i], PRODUCT_TASK_NNZ,
                                                            worker=w) for w, idx in self.groups for i in idx])
            ranges = iter(self._ranges)  # each range transposed once, where its block lives (released with self)
            self._transposes = [[self.run.submit(transposed, self.blocks.parts[i], lo, hi, worker=w)
                                 for lo, hi in next(ranges)] for w, idx in self.groups for i in idx]
        out, at = [], 0
        for g, (w, idx) in enumerate(self.groups):
            q = qf[g] if isinstance(qf, list) else qf
            parts = []
            for i in idx:
                parts += [self.run.submit(on_worker, range_partial, self.blocks.parts[i], t, lo, hi, self.starts[i],
                                          q, cq, l, seed, worker=w)
                          for (lo, hi), t in zip(self._ranges[at], self._transposes[at])]
                at += 1
            out.append(parts)
        return out

    def gram(self, q32, cq, l, seed):
        """``(X^T Z, 1^T Z)`` in this process: the workers' sums (``_sums``) added where they run."""
        parts = self._sums(self._share(q32), cq, l, seed)
        return self.run.gather(parts[0] if len(parts) == 1 else self.run.submit(_add_pairs, *parts))

    def product(self, k, c, l, seed):
        """``X_eff^T X_eff K`` (p x l float64) for K rounded to float32 (an array, a future, or
        ``ChunkedBasis.last32``'s futures, one per group; None: Omega) and
        ``c``, the column offset (``run.share``d) or None: an array here, a future on a worker on a client (nothing
        p-sized comes to this process). The task that adds the workers' sums adds the offset term (``centered_sum``)."""
        return self.run.submit(centered_sum, c, *self._sums(*self._k_where(k, c), l, seed))

    def _k_where(self, k, c) -> tuple[Any, Any]:
        """``(K where the products read it, its offset row c^T K or None)`` for ``product`` and ``product_rows``: K
        as given when it is None (Omega), a future or per-group futures, else shared; the offset row a task."""
        qf = k if k is None or is_future(k) or isinstance(k, list) else self._share(k)
        cq = None if c is None or qf is None else self.run.submit(offset_product, c,
                                                                   qf[0] if isinstance(qf, list) else qf)
        return qf, cq

    def product_rows(self, k, c, l, seed, rows: list[tuple[int, int]], workers: list) -> list:
        """``product``'s value in the row chunks ``rows`` (``(lo, hi)`` each), chunk i a future on ``workers[i]``:
        the partials stay where they were made; one task per worker adds, from its partials, the rows of each other
        worker's chunks (``rows_for``), and each chunk's rows are added, from its worker's partials and the other
        workers' cut rows, with the offset term, on the chunk's worker (``centered_rows``: the same values as
        ``centered_sum``'s rows, bit for bit). A reduce-scatter: no p x l array crosses between workers, no task adds
        whole partials, and the chunks' tasks start when the products end, with no add of a worker's sum between."""
        partials = self._partials(*self._k_where(k, c), l, seed)
        spans: dict[Any, list[tuple[int, int]]] = {}  # per worker, the rows of its chunks
        for worker, span in zip(workers, rows):
            spans.setdefault(worker, []).append(span)
        cut = {(g, d): self.run.submit(rows_for, spans[d], *partials[g], worker=w)
               for g, (w, _) in enumerate(self.groups) for d in spans if d != w}
        return [self.run.submit(centered_rows, c, lo, hi,
                                *[partials[g] if w == d else cut[(g, d)] for g, (w, _) in enumerate(self.groups)],
                                worker=d)
                for d, (lo, hi) in zip(workers, rows)]

    def tsqr(self, q32, cq64):
        """The R factor of ``X_eff Q``: one R per group's blocks, then the R of their stack."""
        qf = self._share(q32)
        rs = self.run.gather([self._task(tsqr_partial, w, idx, qf, cq64) for w, idx in self.groups])
        return _r_factor(np.vstack(rs))

    def u(self, q32, cq64, w):
        """U per block, beside its rows of X (futures on a client)."""
        qf = self._share(q32)
        return [self.run.submit(on_worker, u_block, part, qf, cq64, w) for part in self.blocks.parts]


# ---------------------------------------------------------------------------------------------
# the solver


def _check(blocks: RowBlocks, rank: int, oversample: int, power_iterations: int, col_offset) -> np.ndarray | None:
    n, p = blocks.shape
    if rank < 1 or rank > min(n, p):
        raise MfsimError(
            f"svd.rank must be between 1 and min(n_users, n_items) = min({n}, {p}) = {min(n, p)}, got {rank}; "
            "lower svd.rank or check that the input has enough users and items"
        )
    if oversample < 0 or power_iterations < 0:
        raise MfsimError(
            f"svd.oversample and svd.power_iterations must be >= 0, got {oversample} and {power_iterations}"
        )
    if col_offset is None:
        return None
    c = np.asarray(col_offset, dtype=np.float64)
    if c.shape != (p,) or not np.all(np.isfinite(c)):
        raise ValueError(f"col_offset must be a finite float vector of shape ({p},) (one value per item), got shape {c.shape}")
    return c


def randomized_svd(
    blocks: RowBlocks,
    rank: int,
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    seed: int = 0,
    col_offset: np.ndarray | None = None,
    compute_u: bool = False,
) -> SvdResult:
    """Top-``rank`` singular values and right singular vectors of X (or ``X - 1 c^T``).

    Parameters
    ----------
    blocks : RowBlocks
        X (n x p) in CSR row blocks, in-process or on a Dask client.
    rank : int
        k, the number of singular triplets; ``1 <= k <= min(n, p)``.
    oversample : int, default ``SvdSection.oversample`` (10)
        Extra sketch columns: ``l = min(k + oversample, n, p)``. Halko et al. (2011, Sec. 4.2)
        recommend 5-10; more costs O(nnz) per column per product.
    power_iterations : int, default ``SvdSection.power_iterations`` (32)
        q, the number of products with ``X^T X`` after the sketch; each costs two passes over X.
        The error in ``s_j`` shrinks like ``(s_{l+1} / s_j)^(4q+2)``, slowly when the spectrum is
        flat around k, as it is for interaction data. Measured for a 1e-3 relative error on every
        one of the top k values (against ``scipy.sparse.linalg.svds``, seeds 0-4): ml-100k with
        k = 64 needs q = 21-29 with oversample = 10 but q = 6 with oversample = 64; a power-law
        3000 x 1000 matrix with k = 50 needs q = 17-31 with oversample = 10 but q = 7-10 with
        oversample = 50. Cost grows like ``(k + oversample)(2q + 2)``, so a wide sketch with few
        iterations is the cheaper way to that accuracy. The default q = 32 with oversample = 10
        covers both measured ranges; q = 4 with oversample = 10 gives only ~4e-2.
    seed : int, default 0
        Seeds the Gaussian test matrix (``numpy.random.default_rng``); the result is a function of
        (X, k, oversample, q, seed), independent of the block split and the number of workers up to
        float rounding.
    col_offset : ndarray (p,), optional
        c in ``X_eff = X - 1 c^T`` (e.g. column means to center), applied without densifying X.
    compute_u : bool, default False
        Also compute U_k in row blocks (one more pass over X).

    Returns
    -------
    SvdResult
        ``sigma`` (k,) float64 descending, ``V`` (p, k) float32, ``U`` blocks when asked.

    Notes
    -----
    Cost: ``2 (q + 1)`` passes over X of O(nnz l) each (``X^T Omega``, q times ``X Q`` and
    ``X^T Z``, the final ``X Q``; one more for U), q + 1 QRs of p x l (O(p l^2)) and a TSQR of
    n x l (O(n l^2)). Memory: X; per process one p x l float64 sum and one n_b x l block at a
    time; on the client, a few p x l float64 matrices. BLAS is limited to one thread in this
    process: its dense steps are small, and idle BLAS threads spin after each call, taking the
    cores from the numba kernels that run next (measured 2-3x slower products on 2 cores).
    The power iterations report their progress as ``svd power iterations`` (``pipeline.progress``:
    live on a terminal, a log line at each quarter otherwise).

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp (2011), "Finding structure with randomness",
    SIAM Review 53(2): Algorithm 4.4 (subspace iteration), Algorithm 5.1 (direct SVD), Sec. 10
    (error bounds). TSQR: Demmel, Grigori, Hoemmen, Langou (2012), SIAM J. Sci. Comput. 34(1).
    """
    c = _check(blocks, rank, oversample, power_iterations, col_offset)
    with blas_limit(1):
        return _randomized_svd(_BlockTasks(blocks), blocks, rank, oversample=oversample,
                               power_iterations=power_iterations, seed=seed, c=c, compute_u=compute_u)


def _randomized_svd(tasks: _BlockTasks, blocks: RowBlocks, rank: int, *, oversample: int, power_iterations: int,
                    seed: int, c: np.ndarray | None, compute_u: bool) -> SvdResult:
    n, p = blocks.shape
    l = min(rank + oversample, n, p)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    def corrected(y, zsum):
        if c is not None:
            y = y - np.outer(c, zsum)  # X_eff^T Z = X^T Z - c (1^T Z)
        return y

    def offset_row(q32):
        return None if c is None else (c @ q32.astype(np.float64))  # c^T Q, (l,)

    y, zsum = tasks.gram(q32=None, cq=None, l=l, seed=seed)  # Y = X_eff^T Omega
    q = orthonormalize(corrected(y, zsum))
    seconds["sketch"] = time.perf_counter() - t0
    for _ in progress(range(power_iterations), power_iterations, "svd power iterations"):
        q32 = q.astype(np.float32)
        cq = offset_row(q32)
        y, zsum = tasks.gram(q32, None if cq is None else cq.astype(np.float32), l, seed)  # X_eff^T (X_eff Q)
        q = orthonormalize(corrected(y, zsum))
    seconds["power"] = time.perf_counter() - t0 - seconds["sketch"]

    t1 = time.perf_counter()
    q32 = q.astype(np.float32)
    cq64 = offset_row(q32)
    r = tasks.tsqr(q32, cq64)  # X_eff Q = Q_C R
    u_r, s, vt_r = np.linalg.svd(r, full_matrices=False)  # R = U_r S V_r^T
    vr = vt_r[:rank].T  # (l, k)
    sigma = s[:rank].astype(np.float64)
    v, sign = flip_signs(q32.astype(np.float64) @ vr)  # V = Q V_r
    seconds["final"] = time.perf_counter() - t1

    u = None
    if compute_u:
        t2 = time.perf_counter()
        with np.errstate(divide="ignore"):
            inv = np.where(sigma > 0, 1.0 / sigma, 0.0)  # a zero singular value gets a zero U column
        u = tasks.u(q32, cq64, vr * sign * inv)  # U = X_eff Q V_r S^-1 = Q_C U_r
        seconds["u"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    return SvdResult(
        sigma=sigma,
        V=v.astype(np.float32),
        U=u,
        u_row_offsets=blocks.row_offsets.copy() if compute_u else None,
        client=blocks.client,
        diagnostics=dict(
            solver="subspace", l=l, power_iterations=power_iterations, oversample=oversample, seed=seed,
            passes=round(l * (2 * power_iterations + 2 + int(compute_u)) / (rank + 10), 2), block_size=l,
            blocks=power_iterations + 1, estimated_error=None, converged=None,
            n_blocks=blocks.n_blocks, executor=tasks.executor, n_workers=tasks.n_workers, seconds=seconds,
        ),
    )


def _ritz_pairs(t_cols: list[np.ndarray], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-``rank`` Ritz values of X (descending) and their eigenvectors in the basis, on the space whose
    ``T = Q^T X^T X Q`` has the column blocks ``t_cols`` (block i: rows of blocks 0..i, the upper block triangle;
    the lower triangle is its mirror)."""
    m = sum(h.shape[1] for h in t_cols)
    upper = np.zeros((m, m))
    owner = np.zeros(m, dtype=np.int64)  # the block of each row/column
    col = 0
    for i, h in enumerate(t_cols):
        upper[: h.shape[0], col : col + h.shape[1]] = h
        owner[col : col + h.shape[1]] = i
        col += h.shape[1]
    T = np.where(owner[:, None] <= owner[None, :], upper, upper.T)
    T = (T + T.T) / 2  # the diagonal blocks are symmetric only up to rounding
    lam, vecs = np.linalg.eigh(T)
    top = np.argsort(lam)[::-1][:rank]
    return np.sqrt(np.clip(lam[top], 0, None)), vecs[:, top]


#: Ritz values whose relative change is below this are taken as converged in the error estimate (changes
#: there are rounding, ~1e-16 of T's entries, and their ratios are noise).
_RITZ_FLOOR = 1e-13
#: The largest convergence ratio the error estimate extrapolates with (a ratio at or above 1 means the value
#: is not yet in its geometric phase; capping keeps the estimate finite: 1 / (1 - 0.9) = 10 changes).
_RATIO_CAP = 0.9


def ritz_error_estimate(history: list[np.ndarray]) -> float:
    """Estimated largest relative error of the last Ritz values in ``history`` (one array per space size).

    Ritz values of nested spaces only grow towards the singular values (Cauchy interlacing), so the error
    of the last value is the sum of all its future changes. With ``d`` the last relative change of value i
    and ``r`` its ratio to the change before, a geometric tail gives ``d r / (1 - r)``; Krylov's convergence
    is faster than geometric, so that overestimates, and the estimate reports ``d / (1 - r)`` (one change of
    margin, ``r`` capped at ``_RATIO_CAP``). Infinite until three spaces have been seen.
    """
    if len(history) < 3 or any(len(h) < len(history[-1]) for h in history[-3:]):
        return float("inf")
    last, mid, first = history[-1], history[-2][: len(history[-1])], history[-3][: len(history[-1])]
    scale = np.maximum(last, np.finfo(float).tiny)
    d = np.abs(last - mid) / scale
    d_prev = np.abs(mid - first) / scale
    d = np.where(d <= _RITZ_FLOOR, 0.0, d)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(d_prev > 0, d / d_prev, np.where(d > 0, np.inf, 0.0))
    r = np.minimum(r, _RATIO_CAP)
    return float(np.max(d / (1.0 - r))) if len(d) else 0.0


def krylov_svd(
    blocks: RowBlocks,
    rank: int,
    *,
    block_size: int | None = None,
    tol: float = 1e-6,
    max_blocks: int = 16,
    seed: int = 0,
    col_offset: np.ndarray | None = None,
    compute_u: bool = False,
    start: np.ndarray | None = None,
    chunked_basis: bool | None = None,
) -> SvdResult:
    """Top-``rank`` singular triplets of X (or ``X - 1 c^T``) by randomized block Krylov iteration.

    The item-side Krylov space ``[K_0, A K_0, A^2 K_0, ...]`` with ``A = X^T X`` and
    ``K_0 = orth(X^T Omega)`` (Musco & Musco 2015, Algorithm 2), each new block orthogonalized
    against every earlier one (``krylov_basis.extend_basis``: block Gram-Schmidt twice), and Rayleigh-Ritz on
    the whole space. The products ``A K_j`` give the projected matrix ``T = Q^T A Q`` at no extra
    pass (its columns are the Gram-Schmidt coefficients, as in block Lanczos), so Rayleigh-Ritz is
    the eigendecomposition of T: ``sigma_i = sqrt(theta_i)``, ``V = Q y_i``, and U (on request)
    ``X V / sigma``, one k-wide product.

    Stopping rule: after each block, ``ritz_error_estimate`` of the top-k Ritz values (their last
    relative change, extrapolated by its ratio to the change before); at or below ``tol`` the space
    stops growing (``converged``), else it stops after ``max_blocks`` products. The estimate is
    of the values returned: the final Ritz pairs are those of the last space it judged.

    ``chunked_basis``: the basis in row chunks in this process too (``krylov_basis.new_basis``; None: chunked on
    a client only), for an SVD moved here from a client that must equal the workers' bit for bit.

    ``start`` (p x m, optional): a warm start, e.g. the previous run's V_k aligned to these items;
    the first block is then ``block_size`` random combinations of its columns (no pass over X).

    Parameters as ``randomized_svd``; ``block_size`` defaults to ``max(8, ceil(rank / 2))``.
    Memory: the basis, 12 p W bytes (float64 and a float32 copy; W = b x blocks, which
    ``max_blocks`` bounds; at p = 1M and W = 272, 3.3 GB): in this process without a client, in
    row chunks over the workers on one (``krylov_basis.ChunkedBasis``), where the driver holds
    only W x b coefficients and finally V; per worker one p x b partial of each product, and for the SVD's time a
    transpose of its share of X (``transposed``). Cost in passes of a (k + 10)-wide product over X:
    ``(b + 2 b j) / (k + 10)`` for j products with ``A`` (``diagnostics["passes"]``), plus ``k / (k + 10)`` for U.
    """
    c = _check(blocks, rank, 0, 0, col_offset)
    n, p = blocks.shape
    b = int(block_size) if block_size else max(8, -(-rank // 2))
    if b < 1 or max_blocks < 1 or not tol > 0:
        raise MfsimError(f"svd.block_size, svd.max_blocks and svd.tol must be positive, got {block_size}, "
                         f"{max_blocks} and {tol}")
    with blas_limit(1):
        return _krylov(_BlockTasks(blocks), blocks, rank, block_size=b, tol=float(tol), max_blocks=int(max_blocks),
                       seed=seed, c=c, compute_u=compute_u, start=start, chunked_basis=chunked_basis)


def _krylov(tasks: _BlockTasks, blocks: RowBlocks, rank: int, *, block_size: int, tol: float, max_blocks: int,
            seed: int, c: np.ndarray | None, compute_u: bool, start: np.ndarray | None,
            chunked_basis: bool | None = None) -> SvdResult:
    n, p = blocks.shape
    b = block_size
    width_cap = min(n, p)
    seconds: dict[str, float] = {}
    columns = 0  # columns of products over X, summed: passes = columns / (k + 10)
    t0 = time.perf_counter()
    c_task = None if c is None else tasks.run.share(c, "svd-offset")  # the offset where the products run

    def product(k32, width: int, into=None):
        """``X_eff^T X_eff K`` (p x w float64) for K rounded to float32, as in every product (K None: Omega):
        an array in this process, a future on the workers on a client (``_BlockTasks.product``), or with ``into``
        (a basis in row chunks on a client) a future per chunk of its rows, on the chunk's worker
        (``_BlockTasks.product_rows``)."""
        nonlocal columns
        columns += width if k32 is None else 2 * width
        if into is not None and tasks.client is not None and into.kind == "chunked":
            return tasks.product_rows(k32, c_task, width, seed, into.rows, into.chunk_workers)
        return tasks.product(k32, c_task, width, seed)

    def drop(y, width: int) -> None:
        """Forget a product submitted ahead (a future, or its chunks' futures) and its columns in the count of
        passes; None, the ``ahead`` after."""
        nonlocal columns
        columns -= 2 * width
        for f in y if isinstance(y, list) else [y]:
            f.release()

    if start is None:
        y = product(None, b)  # X_eff^T Omega
    else:  # b random combinations of the start's columns: a first block inside the previous top-k subspace
        g = np.random.default_rng([seed, 15485863]).standard_normal((start.shape[1], b))
        y = np.asarray(start, np.float64) @ g
    first_width = min(b, width_cap)
    if first_width < b:  # a first block capped by min(n, p)
        y = _first_columns(tasks.run, y, first_width)
    # the space's cap, the first block included; every block but the last has room for b columns
    cap = min(width_cap, first_width + b * (max_blocks - 1))
    basis = new_basis(tasks.run, p, cap, tasks.workers, chunked_basis)  # here, or in row chunks on the workers
    basis.start(y, seed)
    del y
    t_cols: list[np.ndarray] = []  # T = Q^T A Q, column block by column block
    history: list[np.ndarray] = []  # the top-k Ritz values of each space
    estimate, converged, steps = float("inf"), False, 0
    # On a client each step is one graph of tasks (the product, the Gram-Schmidt passes, the new block) and the next
    # step's product is submitted before this step's coefficients come back (``ahead``): the driver's Ritz step and
    # its round trip then overlap the workers' next product, and a product is dropped (not counted) when the space
    # stops there or its block was made again.
    ahead = None
    explicit_before = 0
    for step in progress(range(1, max_blocks + 1), max_blocks, "svd krylov blocks"):  # stops early when converged
        y, ahead = (product(basis.last32(), basis.widths[-1], basis) if ahead is None else ahead), None  # A K_{j-1}
        steps += 1
        width = basis.width
        room = cap - width if step < max_blocks else 0
        # basis^T A K_{j-1}: T's column block j-1, rows of blocks 0 .. j-1; the new block when there is room
        coefficients = basis.extend_later(y, seed, step, room)
        del y
        if tasks.client is not None and room > 0:  # a ChunkedBasis: the block is stored, H not read yet
            explicit_before = basis.explicit_steps
            ahead = product(basis.last32(), basis.widths[-1], basis)
        t_cols.append(coefficients())
        if ahead is not None and basis.explicit_steps != explicit_before:  # the block was made again
            ahead = drop(ahead, basis.widths[-1])
        ritz, vecs = _ritz_pairs(t_cols, rank)
        history.append(ritz)
        if width >= width_cap and len(ritz) == min(rank, width_cap):
            estimate, converged = 0.0, True
        elif len(ritz) >= rank:
            estimate = ritz_error_estimate(history)
            converged = estimate <= tol
        if converged or room <= 0:
            break
    if ahead is not None:
        ahead = drop(ahead, basis.widths[-1])
    seconds["krylov"] = time.perf_counter() - t0

    # the Ritz pairs of the last space the estimate judged: T covers every block but the unmultiplied newest
    t1 = time.perf_counter()
    m = vecs.shape[0]
    sigma = np.zeros(rank)
    sigma[: len(ritz)] = ritz
    vr = np.zeros((m, rank))
    vr[:, : vecs.shape[1]] = vecs
    # V = Q vr (a space narrower than k, from the rank of X or of the matrix below k, completed), and V where the
    # basis built it on the workers (kept there for the factors)
    v32, v_future = basis.combine(vr, vecs.shape[1], seed, max_blocks + 1)
    basis_kind = basis.kind
    explicit = getattr(basis, "explicit_steps", None)
    basis.release()
    del basis
    seconds["final"] = time.perf_counter() - t1
    u = None
    if compute_u:
        t2 = time.perf_counter()
        with np.errstate(divide="ignore"):
            inv = np.where(sigma > 0, 1.0 / sigma, 0.0)
        u = tasks.u(v32, None if c is None else c @ v32.astype(np.float64), np.diag(inv))
        columns += rank
        seconds["u"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    return SvdResult(
        sigma=sigma, V=v32, U=u,
        u_row_offsets=blocks.row_offsets.copy() if compute_u else None, client=blocks.client, V_future=v_future,
        diagnostics=dict(
            solver="krylov", block_size=b, blocks=steps, width=int(m), tol=tol,
            estimated_error=estimate, converged=converged, passes=round(columns / (rank + 10), 2), seed=seed,
            n_blocks=blocks.n_blocks, executor=tasks.executor, n_workers=tasks.n_workers, seconds=seconds,
            basis=basis_kind, **({} if explicit is None else {"explicit_steps": explicit}),
        ),
    )


def _first_columns(run, y, width: int):
    """The first ``width`` columns of y: a task on a future (``run``'s), a view of an array."""
    if is_future(y):
        return run.submit(_columns, y, width)
    return y[:, :width]


def _columns(y: np.ndarray, width: int) -> np.ndarray:
    return np.ascontiguousarray(y[:, :width])


def centered_sum(c: np.ndarray | None, *parts: tuple) -> np.ndarray:
    """``X^T Z - c (1^T Z)`` from ``range_partial`` sums ``(X^T Z, 1^T Z)`` (added in order; the offset term added
    once)."""
    y, zsum = _add_pairs(*parts) if len(parts) > 1 else parts[0]
    return y - np.outer(c, zsum) if c is not None else y


def summed_rows(partials: list, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``lo:hi`` of a worker's sum ``(X^T Z, 1^T Z)`` from its partials, added in order as ``_add_pairs`` adds
    them, row by row: the same values bit for bit."""
    y, zsum = np.array(partials[0][0][lo:hi]), partials[0][1].copy()
    for a, b in partials[1:]:
        y += a[lo:hi]
        zsum += b
    return y, zsum


def rows_for(spans: list[tuple[int, int]], *partials: tuple) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """The rows of a worker's sum ``(X^T Z, 1^T Z)`` that another worker's chunks take, added from the worker's
    partials (``summed_rows``): ``{lo: rows lo:hi}`` for each ``(lo, hi)`` of ``spans``, with ``1^T Z``."""
    cut = {lo: summed_rows(list(partials), lo, hi) for lo, hi in spans}
    return {lo: y for lo, (y, _) in cut.items()}, cut[spans[0][0]][1]


def centered_rows(c: np.ndarray | None, lo: int, hi: int, *parts: Any) -> np.ndarray:
    """Rows ``lo:hi`` of ``centered_sum(c, *sums)`` from the workers' sums, in order: each from its partials (a list:
    the worker of this chunk), as a whole sum (a pair), or as the rows cut for this worker's chunks (``rows_for``);
    added as ``centered_sum`` adds them: the same values bit for bit."""
    def rows(part) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(part, list):
            return summed_rows(part, lo, hi)
        y, zsum = part
        return (y[lo] if isinstance(y, dict) else y[lo:hi]), zsum

    summed = [rows(part) for part in parts]
    y, zsum = _add_pairs(*summed) if len(summed) > 1 else (np.array(summed[0][0]), summed[0][1])
    return y - np.outer(c[lo:hi], zsum) if c is not None else y


def offset_product(c: np.ndarray | None, k32: np.ndarray) -> np.ndarray | None:
    """``c^T K`` in float32 (the offset row of ``X_eff K``), None without an offset."""
    return None if c is None or k32 is None else (c @ k32.astype(np.float64)).astype(np.float32)


def sklearn_svd(
    blocks: RowBlocks,
    rank: int,
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    seed: int = 0,
    col_offset: np.ndarray | None = None,
    compute_u: bool = False,
) -> SvdResult:
    """The same SVD by ``sklearn.utils.extmath.randomized_svd`` on the gathered scipy matrix.

    A reference solver: it gathers X into one process (memory: the whole of X) and runs
    single-threaded sparse products. Same k, oversampling, power iterations and seed (sklearn
    draws its own test matrix, so results agree to the algorithm's accuracy, not bitwise).
    A column offset is not supported (sklearn would need X densified), and no progress is shown
    (the iterations run inside sklearn).
    """
    from sklearn.utils.extmath import randomized_svd as sk_randomized_svd

    _check(blocks, rank, oversample, power_iterations, None)
    if col_offset is not None:
        raise MfsimError(
            "svd.solver=sklearn cannot apply a column offset (centering/standardizing) without densifying X; "
            "use svd.solver=mfsim, or turn off preprocess.center_columns and preprocess.standardize_columns"
        )
    t0 = time.perf_counter()
    x = blocks.gather()
    uu, s, vt = sk_randomized_svd(
        x, rank, n_oversamples=oversample, n_iter=power_iterations, random_state=seed, flip_sign=False
    )
    v, sign = flip_signs(vt.T.astype(np.float64))
    u = None
    if compute_u:
        u_all = (uu * sign).astype(np.float32)
        u = [u_all[a:b] for a, b in zip(blocks.row_offsets[:-1], blocks.row_offsets[1:])]
    return SvdResult(
        sigma=s.astype(np.float64),
        V=v.astype(np.float32),
        U=u,
        u_row_offsets=blocks.row_offsets.copy() if compute_u else None,
        client=None,
        diagnostics=dict(
            solver="sklearn", l=min(rank + oversample, *blocks.shape), power_iterations=power_iterations,
            oversample=oversample, seed=seed, block_size=min(rank + oversample, *blocks.shape),
            blocks=power_iterations + 1, estimated_error=None, converged=None,
            passes=round(min(rank + oversample, *blocks.shape) * (2 * power_iterations + 2) / (rank + 10), 2), n_blocks=blocks.n_blocks, executor="local", n_workers=1,
            seconds={"total": time.perf_counter() - t0},
        ),
    )


@dataclass(frozen=True)
class Solver:
    """One ``svd.solver``: its function, the ``SvdSection`` fields it takes (as keywords of the same name), and
    whether it takes a warm start (``start``; the others ignore ``svd.warm_start``)."""

    fn: Callable[..., SvdResult]
    options: tuple[str, ...]
    warm_start: bool = False


SOLVERS: dict[str, Solver] = {
    "krylov": Solver(krylov_svd, ("block_size", "tol", "max_blocks"), warm_start=True),
    "subspace": Solver(randomized_svd, ("oversample", "power_iterations")),
    "sklearn": Solver(sklearn_svd, ("oversample", "power_iterations")),
}


def round_width(cfg: SvdSection) -> int:
    """Columns of one round's products over X (``X^T X K``: two passes of K's width): ``2 block_size`` for the
    Krylov solver, ``2 (rank + oversample)`` for the others; ``blocks.rounds_where`` weighs a round by it."""
    if cfg.solver == "krylov":
        return 2 * int(cfg.block_size)  # an int: ``auto`` is resolved by the config
    return 2 * int(cfg.fit_rank + cfg.oversample)


def truncated_svd(
    blocks: RowBlocks, cfg: SvdSection, col_offset: np.ndarray | None = None, *, compute_u: bool = False,
    start: np.ndarray | None = None, as_on_workers: bool = False,
) -> SvdResult:
    """The SVD stage: ``cfg.solver`` from ``SOLVERS`` ("krylov", the default: ``krylov_svd`` with ``block_size``,
    ``tol`` and ``max_blocks``; "subspace": ``randomized_svd`` with ``oversample`` and ``power_iterations``;
    "sklearn"), with ``rank`` and ``seed``. ``as_on_workers``: an SVD in this process that must equal the workers'
    bit for bit (the Krylov basis in chunks, ``krylov_svd``'s ``chunked_basis``; the pipeline's, wherever X is)."""
    solver = SOLVERS.get(cfg.solver)
    if solver is None:
        raise MfsimError(f"unknown svd.solver {cfg.solver!r}; valid: {', '.join(SOLVERS)}")
    options = {name: getattr(cfg, name) for name in solver.options}
    if solver.warm_start:
        options["start"] = start
    if as_on_workers and cfg.solver == "krylov":
        options["chunked_basis"] = True
    # rank: auto on a matrix smaller than rank_max: every rank it has (the sweep keeps the grid's ranks within them)
    rank = min(cfg.fit_rank, *blocks.shape) if cfg.rank == "auto" else cfg.fit_rank
    return solver.fn(blocks, rank, seed=cfg.seed, col_offset=col_offset, compute_u=compute_u, **options)


def aligned_start(prev_ids, prev_v: np.ndarray, item_ids, seed: int = 0) -> tuple[np.ndarray, int]:
    """The previous run's V_k (rows ``prev_ids``) as a warm start for items ``item_ids``: known items keep their
    rows, new items get seeded Gaussian entries of the same scale (1/sqrt(p)); returns (start, items matched)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    prev_ids = pa.array(prev_ids)
    item_ids = pa.array(item_ids)
    if prev_ids.type != item_ids.type:
        prev_ids = prev_ids.cast(item_ids.type)
    pos = pc.index_in(item_ids, value_set=prev_ids)
    found = pos.is_valid().to_numpy(zero_copy_only=False)
    p, k = len(item_ids), prev_v.shape[1]
    start = np.random.default_rng([seed, 104729]).standard_normal((p, k)) / np.sqrt(max(p, 1))
    start[found] = np.asarray(prev_v, np.float64)[pos.drop_null().to_numpy()]
    return start, int(found.sum())


def basis_start(basis, item_ids, seed: int = 0, *, id_col: str = "item_id") -> tuple[np.ndarray, int]:
    """``aligned_start`` from a table of V_k as a run publishes it (``svd/basis.parquet``: ``id_col`` and
    ``embedding``, one fixed-size list of k floats per item); returns (start, items matched)."""
    v = np.asarray(basis["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                   np.float64).reshape(basis.num_rows, -1)
    return aligned_start(basis[id_col], v, item_ids, seed)
