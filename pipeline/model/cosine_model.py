"""A model trained with cosine similarity itself: Steck, Ekanadham & Kallus (2024), Section 3, first remedy.

Objective ``cosine``, over A (p x k), B (p x k) and a scale gamma >= 0::

    L(A, B, gamma) = ||X - gamma N(X A) N(B)^T||_F^2 + lam gamma (n_+ + p_+)

where N(.) scales each row to unit length (a zero row stays zero) and n_+, p_+ count the non-zero
rows of X A and B. The model scores user u and item i by ``gamma cos(x_u A, b_i)``, so the cosine
of its item embeddings is exactly what it was trained for, and nothing about it is arbitrary.

The penalty is Eq. 2's ``lam (||P||^2 + ||Q||^2)`` on the embeddings the model scores with,
``P = gamma^1/2 N(X A)`` and ``Q = gamma^1/2 N(B)``: ``||P||^2 + ||Q||^2 = gamma (n_+ + p_+)``. On the raw A
and B it would have no minimizer: the data term does not change when A, or any row of B, is scaled,
so ``lam (||A||^2 + ||B||^2)`` would only pull them towards 0, where N is undefined.

Exact and full batch, X never dense. With ``P = N(X A)``, ``Q = N(B)``, ``Z = X Q`` and the k x k Gram
matrices ``G_P = P^T P``, ``G_Q = Q^T Q``::

    ||X - gamma P Q^T||^2 = ||X||^2 - 2 gamma <P, Z> + gamma^2 trace(G_P G_Q)

(``||P Q^T||_F^2 = trace(G_P G_Q)``; ``<X, P Q^T> = <P, X Q>`` is a sum over X's non-zeros). For fixed A, B
the best gamma is ``max(0, (<P, Z> - lam (n_+ + p_+) / 2) / trace(G_P G_Q))``; the optimizer works on
``L(A, B) = min_gamma L(A, B, gamma)``, whose gradient is that of L at the best gamma (the derivative in
gamma is zero there). With ``g_P = -2 gamma Z + 2 gamma^2 P G_Q`` and ``g_Q = -2 gamma X^T P + 2 gamma^2 Q G_P``::

    dL/dA = X^T N'(X A)[g_P],   dL/dB = N'(B)[g_Q],   N'(y)[g] = (g - (g . N(y)) N(y)) / |y|

per row. One loss and gradient: two products with each of X's row blocks (``X_b [A | Q]`` and
``X_b^T [N'[Z] | N'[P G_Q] | P]``: ``g_P`` is linear in its two terms, so gamma is applied after the sums),
O(nnz k), plus O((n + p) k^2) for the Gram matrices; one round of tasks over the row blocks on the Dask
client per evaluation. Sums over blocks run in a fixed tree (``blocks.tree_reduce``), so the result is the
same bit for bit on any number of workers.
Centred preprocessing (``X_eff = X - 1 c^T``) is applied implicitly.

L-BFGS (``lbfgs``: the two-loop recursion and MINPACK's line search, float64), started from the Eq. 2 solution;
each iteration's loss and gradient norm are logged. Memory on the driver: the L-BFGS state, about ``(m + 9) 2 p k``
float64 (the m = ``LBFGS_MEMORY`` = 5 correction pairs in float32: 28 p k, 290 MB at p = 20,000, k = 64).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mfsim.kernels.lbfgs import lbfgs_direction, store_pair
from mfsim.kernels.threads import blas_limit, on_local_threads, one_thread, threads
from mfsim.kernels.rows import ordered_sum, row_dots, row_norms, unit_rows, unit_rows_backward_into
from mfsim.kernels.sparse import csr_matmat, csr_t_matmat
from mfsim.pipeline.blocks import CSRBlock, RowBlocks, tree_reduce
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.shared import runner

log = logging.getLogger("mfsim.cosine")

#: Columns of an evaluation's products per embedding column: ``X_b [A | Q]`` (2k) and ``X_b^T [...]`` (3k).
COSINE_WIDTH = 5


@dataclass
class CosineFit:
    """The trained model: ``A`` (user side: the user embeddings are ``gamma^1/2 N(X A)``), ``Q = N(B)``, gamma,
    and the optimizer's record (``history``: loss and gradient norm at each accepted iterate, the start first)."""

    A: np.ndarray  # float64 p x k
    Q: np.ndarray  # float64 p x k, unit (or zero) rows
    gamma: float
    loss: float
    iterations: int
    evaluations: int
    converged: bool
    message: str
    seconds: float
    history: list[tuple[float, float]] = field(default_factory=list)
    users_without_embedding: int = 0  # rows of X A that are zero or below DIRECTION_FLOOR: no embedding, no score

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """The published pair: ``A`` and ``B = gamma^1/2 N(B)`` (float32); the user embeddings ``gamma^1/2
        N(X A)`` come with ``user_scale`` (``factors.user_embeddings_blocks(..., unit_rows=...)``)."""
        return (np.ascontiguousarray(self.A, np.float32),
                np.ascontiguousarray(self.Q * np.sqrt(self.gamma), np.float32))

    @property
    def user_scale(self) -> float:
        """The length of every non-zero user embedding, ``gamma^1/2``."""
        return float(np.sqrt(self.gamma))

    def describe(self) -> dict[str, Any]:
        """The manifest's account: gamma, final loss, iterations, convergence, time."""
        return {"gamma": self.gamma, "loss": self.loss, "iterations": self.iterations,
                "evaluations": self.evaluations, "converged": self.converged, "message": self.message,
                "seconds": round(self.seconds, 3), "users_without_embedding": self.users_without_embedding,
                # the same users: every other embedding has length gamma^1/2, above any cosine norm floor
                "users_without_cosine_list": self.users_without_embedding,
                "start_loss": self.history[0][0] if self.history else None}


# ---------------------------------------------------------------------------------------------
# row normalization and its derivative


#: A row ``x_u A`` whose norm is below this times ``(|x_u| + |c|) ||A||_F`` (an upper bound of its norm) has no
#: direction: the user is all but orthogonal to the model's space, and is treated as a zero row, in the loss and
#: in the published user embeddings (no embedding, no score). The gradient through a row scales with
#: 1 / |x_u A|, so such rows also ruin L-BFGS's steps. On lastfm-hetrec2011 (raw play counts, k = 64) seven users
#: lie at 1e-27..1e-17 of the bound (rounding noise: their items are outside the top-k space), the next ones at
#: 1e-6..1e-4: with a floor of 1e-12 the gradient was 1.8e16 and the first line search failed; with 1e-4 it
#: runs (the manifest's ``factors.cosine.users_without_embedding`` counts the users without one).
DIRECTION_FLOOR = 1e-4


def direction_floors(block: CSRBlock, c_norm: float, a_norm: float) -> np.ndarray:
    """``DIRECTION_FLOOR (|x_u| + |c|) ||A||_F`` per row of the block (float64; the row norms kept with the block)."""
    return DIRECTION_FLOOR * (block.row_norms() + float(c_norm)) * float(a_norm)


def frobenius(A: np.ndarray) -> float:
    """``||A||_F`` in float64, summed in one fixed order."""
    return float(np.sqrt(ordered_sum(row_dots(A, A))))


def normalize_rows(Y: np.ndarray, min_norms: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(N(Y), |y|)``: rows scaled to unit length, zero rows left zero; the row norms (float64). With
    ``min_norms`` a row whose norm is below its entry counts as zero (norm 0, row 0: no direction)."""
    r = row_norms(Y)
    if min_norms is not None:
        r[r < min_norms] = 0.0
    inv = np.zeros_like(r)
    np.divide(1.0, r, out=inv, where=r > 0)
    return Y * inv[:, None], r


def normalize_rows_backward(g: np.ndarray, N: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The gradient with respect to Y from the gradient ``g`` with respect to ``N = N(Y)``:
    ``(g - (g . n) n) / |y|`` per row; 0 for a zero row (N is constant there)."""
    inv = np.zeros_like(r)
    np.divide(1.0, r, out=inv, where=r > 0)
    return (g - row_dots(g, N)[:, None] * N) * inv[:, None]


# ---------------------------------------------------------------------------------------------
# the tasks over X's row blocks


def _times(block: CSRBlock, M: np.ndarray, offset_row: np.ndarray | None) -> np.ndarray:
    """``X_b M - 1 (c^T M)`` in float64."""
    out = np.empty((block.n_rows, M.shape[1]), np.float64)
    csr_matmat(block.indptr, block.indices, block.data, M, out)
    if offset_row is not None:
        out -= offset_row
    return out


def _t_times(block: CSRBlock, M: np.ndarray, col_offset: np.ndarray | None) -> np.ndarray:
    """``X_b^T M - c (1^T M)`` in float64 (p x l)."""
    out = np.zeros((block.n_cols, M.shape[1]), np.float64)
    csr_t_matmat(block.indptr, block.indices, block.data, np.ascontiguousarray(M), out,
                 column_cumsum=block.column_cumsum())
    if col_offset is not None:
        out -= np.outer(col_offset, M.sum(axis=0))
    return out


# ``block_pass`` runs on one thread (``kernels.threads.one_thread``). A worker thread runs one block; on ``make
# run``'s data a 20,000-row block took 50-250 ms on a worker with numba on 2 threads, 40 ms on 1. And the blocks'
# sums (``P^T P`` over the rows) must round the same in this process and on any worker.
@one_thread
def block_pass(block: CSRBlock, point: tuple[np.ndarray, np.ndarray, np.ndarray], col_offset: np.ndarray | None,
               norms: tuple[float, float]) -> tuple[float, np.ndarray, int, np.ndarray]:
    """One block at ``point = (A, Q, G_Q)``: its sums ``(<P, Z>, G_P, rows with a direction, T)``
    with ``P = N(X_b A)``, ``Z = X_b Q`` and ``T = X_b^T [N'(X_b A)[Z] | N'(X_b A)[P G_Q] | P]`` (p x 3k).

    ``g_P = -2 gamma Z + 2 gamma^2 P G_Q`` is linear in its two parts, so ``dL/dA = -2 gamma T_1 + 2 gamma^2 T_2``
    once gamma is known from all blocks' sums: one pass over the blocks per evaluation, nothing kept on the
    workers. ``X_b A`` and ``Z`` are one product with ``[A | Q]``, T one with the three parts."""
    A, Q, G_Q = point
    k = A.shape[1]
    AQ = np.ascontiguousarray(np.hstack([A, Q]))
    XAQ = _times(block, AQ, None if col_offset is None else col_offset @ AQ)  # [X_b A | Z]
    P, r, inv = unit_rows(XAQ, k, direction_floors(block, *norms))  # norms: |c|, ||A||_F
    parts = np.empty((block.n_rows, 3 * k))
    pz = unit_rows_backward_into(XAQ, k, P, inv, parts, 0)  # N'[Z], and P . Z per row
    unit_rows_backward_into(P @ G_Q, 0, P, inv, parts, k)  # N'[P G_Q]
    parts[:, 2 * k:] = P
    return ordered_sum(pz), P.T @ P, int(np.count_nonzero(r)), _t_times(block, parts, col_offset)


def block_pass_here(*args: Any) -> tuple[float, np.ndarray, int, np.ndarray]:
    """``block_pass`` in this process, its numba kernels on every thread (``kernels.threads.on_local_threads``): the
    same sums bit for bit (row- and panel-parallel kernels, BLAS on one thread); ``conf/paper.yaml``'s evaluation
    57 -> 48 ms on 2 cores."""
    return on_local_threads(block_pass.__wrapped__, *args)


def _sum_passes(*parts: tuple[float, np.ndarray, int, np.ndarray]) -> tuple[float, np.ndarray, int, np.ndarray]:
    s1, G, rows, T = parts[0][0], parts[0][1].copy(), parts[0][2], parts[0][3].copy()
    for a, g, r, t in parts[1:]:
        s1, rows = s1 + a, rows + r
        G += g
        T += t
    return s1, G, rows, T


def _sum_squares(block: CSRBlock, col_offset: np.ndarray | None) -> float:
    """``||X_b - 1 c^T||_F^2`` (float64), from the non-zeros and the column sums."""
    data = block.data.astype(np.float64)
    total = ordered_sum(data * data)
    if col_offset is not None:
        col_sums = np.bincount(block.indices, weights=data, minlength=block.n_cols)
        total += -2.0 * float(col_offset @ col_sums) + block.n_rows * float(col_offset @ col_offset)
    return total


# ---------------------------------------------------------------------------------------------
# loss and gradient


class CosineLoss:
    """``L(A, B)`` and its gradient over X's row blocks (in this process, or tasks on X's client)."""

    def __init__(self, X: RowBlocks, lam: float, col_offset: np.ndarray | None = None):
        if not np.isfinite(lam) or lam < 0:
            raise MfsimError(f"objectives.cosine.lambda must be a finite number >= 0, got {lam!r}")
        self.X, self.lam = X, float(lam)
        self.n, self.p = X.shape
        self.client = X.client
        self.run = runner(X.client)
        self._c = None if col_offset is None else self._shared(np.asarray(col_offset, np.float64), "cosine-offset")
        self.c_norm = 0.0 if col_offset is None else frobenius(np.asarray(col_offset, np.float64)[None, :])
        self.xx = float(self._reduce(X.map(_sum_squares, self._c), lambda *v: sum(v)))
        self.evaluations = 0
        self.gamma, self.rows_with_direction = 0.0, 0

    def _shared(self, value: Any, name: str) -> Any:
        return self.run.share(value, name)

    def _reduce(self, parts: list[Any], combine) -> Any:
        return tree_reduce(parts, combine, client=self.client)

    def __call__(self, A: np.ndarray, B: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
        """``(L, dL/dA, dL/dB, gamma)`` at the best gamma for (A, B).

        BLAS on one thread here too: the products are p x k, and idle BLAS threads spinning beside numba's
        (``kernels.threads``) made an evaluation on ``make run``'s data 2.4x slower in process."""
        with blas_limit(1):
            return self._evaluate(A, B)

    def _evaluate(self, A: np.ndarray, B: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
        self.evaluations += 1
        A = np.ascontiguousarray(A, np.float64)
        Q, r_B = normalize_rows(np.asarray(B, np.float64))
        Q = np.ascontiguousarray(Q)
        G_Q = Q.T @ Q
        point = self._shared((A, Q, G_Q), "cosine-point")  # one transfer per evaluation
        passes = self.X.map(block_pass if self.client is not None else block_pass_here, point, self._c,
                            (self.c_norm, frobenius(A)))
        s1, G_P, n_plus, T = self._reduce(passes, _sum_passes)
        s2 = ordered_sum(row_dots(G_P, G_Q.T))  # trace(G_P G_Q) = ||P Q^T||_F^2
        rows = n_plus + int(np.count_nonzero(r_B))
        gamma = max(0.0, (s1 - 0.5 * self.lam * rows) / s2) if s2 > 0 else 0.0
        loss = self.xx - 2.0 * gamma * s1 + gamma * gamma * s2 + self.lam * gamma * rows
        k = A.shape[1]
        g_A = -2.0 * gamma * T[:, :k] + 2.0 * gamma * gamma * T[:, k:2 * k]
        XtP = T[:, 2 * k:]
        g_Q = -2.0 * gamma * XtP + 2.0 * gamma * gamma * (Q @ G_P)
        g_B = normalize_rows_backward(g_Q, Q, r_B)
        self.gamma, self.rows_with_direction = gamma, n_plus
        return float(loss), g_A, g_B, gamma


# ---------------------------------------------------------------------------------------------
# the optimization


#: The stopping rule's window: the loss decrease over the last ``PROGRESS_WINDOW`` iterations is compared with the
#: decrease since the start (``train_cosine``).
PROGRESS_WINDOW = 10
#: Correction pairs L-BFGS keeps. Its update costs O(m p k) per iteration, which weighs when p k outweighs nnz
#: (ml-latest-small: 2 p k = 1.2M variables against 100k non-zeros). Measured to the stopping rule with scipy's
#: L-BFGS-B (57 ms per update there at m = 10): m = 5 against 10, ml-latest-small 289 iterations in 38.3 s, loss
#: 650,922, against 280 in 50.8 s, 649,125; ml-100k 189 in 4.9 s, 546,998, against 196 in 6.4 s, 547,274. With
#: ``lbfgs`` (default runs, both fits, 2 cores): ``conf/paper.yaml`` 148 iterations in 6.9 s, loss 258,645 (L-BFGS-B:
#: 150 in 8.9 s, 258,638); ml-100k 195 in 3.5 s, 545,905 (197 in 5.5 s, 545,620); ml-latest-small 286 in 25.1 s,
#: 650,095; lastfm-hetrec2011 in process from one start 206 iterations, 223 evaluations in 33.0 s, loss 1.3495253e12
#: (L-BFGS-B: 205, 222 in 51.4 s, 1.3495225e12).
LBFGS_MEMORY = 5
# The initial Hessian of L-BFGS's two-loop recursion is one scale for A's variables (Z) and one for B's
# (``lbfgs(split=)``): the loss curves on different scales along the two (A acts through X, B through the unit rows
# of N(B)), and one scale for both made every first step wrong for one of them. Measured to the stopping rule
# (tol 3e-3): ml-100k's train split 214 -> 127 iterations, loss 518,806 -> 514,160; all of ml-100k from Eq. 2 192 ->
# 111, 546,220 -> 540,748; conf/paper.yaml's train split 146 -> 129, 213,307 -> 213,389.
#: The optimizer's progress: an INFO line when a tenth of ``max_iterations`` or this many seconds passed since the
#: last (every iteration at DEBUG), with the iteration count out of ``max_iterations``.
LOG_EVERY_S = 10.0


#: The smallest factor of ``SpectralPreconditioner``'s T (s_k / s_1 is 0.15 on ``conf/paper.yaml``).
SPECTRAL_RANGE = 1e-4


class SpectralPreconditioner:
    """The change of variables ``A = T Z`` under which L-BFGS runs on A: ``T = I + V (diag(s_k / s) - I) V^T``
    (V: X's top-k right singular vectors made orthonormal in float64, s their singular values), symmetric and
    positive definite; ``T^-1`` swaps ``s_k / s`` for ``s / s_k``.

    ``dL/dA = X^T N'(X A)[g_P]`` carries X's spectrum: along v_i the loss curves about ``s_i^2`` times as
    much as along a direction X hardly uses, so plain L-BFGS creeps along the small ones. T scales each v_i by
    ``s_k / s_i`` (the rest of item space by 1, as v_k), which evens the curvature along X's top-k directions.
    Measured on ``conf/paper.yaml`` (20,000 x 1,000, k = 50): 50 iterations reach 88% of the loss decrease that
    1,500 plain iterations reach (75% without), 100 iterations 95% (91%). Cost per evaluation O(p k^2).
    """

    def __init__(self, V: np.ndarray, sigma: np.ndarray):
        s = np.asarray(sigma, np.float64)
        keep = s > 0
        self.V = np.linalg.qr(np.asarray(V, np.float64)[:, keep])[0] if keep.any() else np.zeros((len(V), 0))
        s = s[keep]
        # T's factors along V's columns, s_k / s_i; a near-zero s_k (X of lower rank than k) is floored at
        # SPECTRAL_RANGE x s_1, so that T scales no direction by less than that
        ref = max(float(s.min()), SPECTRAL_RANGE * float(s.max())) if s.size else 1.0
        self.down = np.minimum(1.0, ref / s)
        self.up = np.maximum(1.0, s / ref)  # T^-1

    def _apply(self, M: np.ndarray, factors: np.ndarray) -> np.ndarray:
        return M + self.V @ ((factors - 1.0)[:, None] * (self.V.T @ M))

    def to_a(self, Z: np.ndarray) -> np.ndarray:
        """``A = T Z`` (and the gradient in Z from the gradient in A: T is symmetric)."""
        return self._apply(Z, self.down)

    def from_a(self, A: np.ndarray) -> np.ndarray:
        """``Z = T^-1 A``."""
        return self._apply(A, self.up)


@dataclass
class LbfgsResult:
    """Where ``lbfgs`` stopped: the last accepted iterate, its loss and gradient, the iterations, and why."""

    x: np.ndarray
    f: float
    g: np.ndarray
    iterations: int
    reason: str  # "rule" (the callback's StopIteration), "stationary", "no progress", "max_iterations", "line search"
    message: str


def lbfgs(fun, x0: np.ndarray, *, memory: int, max_iterations: int, callback=None,
          f0: tuple[float, np.ndarray] | None = None, split: int = 0) -> LbfgsResult:
    """Minimize ``fun(x) -> (f, g)`` by L-BFGS (Nocedal & Wright 2006, Algorithms 7.4 and 7.5) on float64 vectors.

    The search direction by the two-loop recursion over the last ``memory`` pairs (s, y) with the initial Hessian
    ``(s^T y / y^T y) I``, or with ``split`` one such scale for the variables before ``split`` and one for the rest
    (``kernels.lbfgs.lbfgs_direction``); the step by MINPACK's line search (More & Thuente 1994, ``dcsrch``, scipy's
    ``scalar_search_wolfe1``: sufficient decrease 1e-4, curvature 0.9, as in L-BFGS-B), trying 1 first (the
    first iteration along ``-g / |g|``). A pair with ``s^T y <= eps (-g^T s)`` is skipped (curvature the search
    did not prove; eps the float64 epsilon; L-BFGS-B's test, in the scale of the step's promised decrease: a test
    against ``eps |y|^2`` skipped every pair on lastfm-hetrec2011's raw play counts, where ``s^T y / |y|^2`` is
    ~1e-18, and left steepest descent at 9 evaluations per iteration). ``callback(x, f)`` after each accepted
    iterate; its ``StopIteration`` ends the run there (reason "rule"). It also ends at a zero gradient
    ("stationary"), when a step changes f by at most 1e-15 of it ("no progress"; both converged), after
    ``max_iterations``, or when the line search finds no step.

    Why not scipy's L-BFGS-B: its Fortran update handles bounds this objective does not have and costs
    O(m n) with large constants per call, twice per iteration; on ml-latest-small (n = 1.2M variables) 57 ms per
    call, most of an iteration. This update is one kernel (``kernels.lbfgs``: 2 m + 1 passes over the variables)
    and a few BLAS-1 calls. The pairs are kept in float32 (``store_pair``: s.y and the curvature test from the stored
    values, the arithmetic in float64): the two-loop reads half the bytes (ml-100k's fits ~10% faster), and the
    iterations, the losses and the stopping points stayed those of float64 pairs to 0.1% (ml-100k, the paper's data).
    Memory: ``(m + 1) n`` float64 of pairs' worth (2 (m + 1) n float32) and ~8 n float64.
    """
    from scipy.optimize._linesearch import scalar_search_wolfe1

    x = np.array(x0, dtype=np.float64)
    f, g = f0 if f0 is not None else fun(x)
    # the pairs in slots of S, Y (one spare: a new pair is written there before the test that may skip it)
    S = np.empty((memory + 1, x.size), np.float32)
    Y = np.empty((memory + 1, x.size), np.float32)
    rho = np.zeros(memory + 1)
    order: list[int] = []  # slots of the kept pairs, oldest first
    d = np.empty(x.size)
    it = 0
    while True:
        if it >= max_iterations:
            return LbfgsResult(x, f, g, it, "max_iterations", f"stopped after max_iterations={max_iterations}")
        if not np.any(g):
            return LbfgsResult(x, f, g, it, "stationary", "the gradient is zero")
        if order:
            lbfgs_direction(g, S, Y, rho, np.array(order), out=d, split=split)
        else:
            np.multiply(g, -1.0 / np.linalg.norm(g), out=d)
        derphi0 = float(g @ d)
        if not derphi0 < 0:  # not a descent direction (rounding in a flat region): start the memory again
            order.clear()
            d = -g / np.linalg.norm(g)
            derphi0 = float(g @ d)
        seen: dict[float, tuple[np.ndarray, float, np.ndarray]] = {}

        def phi(a: float) -> float:
            if a not in seen:
                xa = x + a * d
                seen[a] = (xa, *fun(xa))
            return seen[a][1]

        def derphi(a: float) -> float:
            phi(a)
            return float(seen[a][2] @ d)

        step, f_new, _ = scalar_search_wolfe1(phi, derphi, f, None, derphi0, c1=1e-4, c2=0.9)
        if step is None:
            return LbfgsResult(x, f, g, it, "line search", "the line search found no step that lowers the loss")
        x_new, f_new, g_new = seen[step]
        slot = min(set(range(memory + 1)) - set(order))
        sy, gs = store_pair(x_new, x, g_new, g, S[slot], Y[slot])
        if sy > np.finfo(np.float64).eps * -gs:  # as L-BFGS-B: against the decrease the step promised
            rho[slot] = 1.0 / sy
            order.append(slot)
            if len(order) > memory:
                order.pop(0)
        no_progress = abs(f - f_new) <= 1e-15 * max(abs(f), abs(f_new), 1.0)
        x, f, g = x_new, f_new, g_new
        it += 1
        if callback is not None:
            try:
                callback(x, f)
            except StopIteration:
                return LbfgsResult(x, f, g, it, "rule", "stopped by the rule")
        if no_progress:
            return LbfgsResult(x, f, g, it, "no progress", "a step changed the loss by at most 1e-15 of it")


def train_cosine(X: RowBlocks, A0: np.ndarray, B0: np.ndarray, *, lam: float, max_iterations: int, tol: float,
                 col_offset: np.ndarray | None = None, basis: tuple[np.ndarray, np.ndarray] | None = None) -> CosineFit:
    """L-BFGS on ``L(A, B)`` from ``(A0, B0)`` (e.g. the Eq. 2 solution).

    Converged when the loss fell by at most ``tol`` times its decrease since the start over the last
    ``PROGRESS_WINDOW`` iterations: ``L_(t-10) - L_t <= tol (L_0 - L_t)``, a rule that does not depend on the
    scale of X (lastfm-hetrec2011's raw play counts: ``||X||^2`` 1.36e12, of which A and B change a few percent)
    nor on the loss at the optimum, which is unknown. Also converged at a stationary point (a zero gradient) or
    when a step changes the loss by less than 1e-15 relative; else it stops after ``max_iterations`` iterations,
    not converged. Each accepted iterate's loss and gradient norm is logged (at INFO every tenth of
    ``max_iterations`` or ``LOG_EVERY_S`` seconds)
    and kept in ``history``; L-BFGS's line search (strong Wolfe) accepts only steps that lower the loss.

    ``basis``: X's ``(V_k, s)``, for the change of variables ``A = T Z`` of ``SpectralPreconditioner``; the
    optimizer then runs on (Z, B), and the result is the same model (A = T Z).
    """
    p, k = np.shape(A0)
    if np.shape(B0) != (p, k) or X.n_cols != p:
        raise MfsimError(f"cosine model: A0, B0 must be {X.n_cols} x k, got {np.shape(A0)} and {np.shape(B0)}")
    t0 = time.perf_counter()
    fn = CosineLoss(X, lam, col_offset)
    pre = SpectralPreconditioner(*basis) if basis is not None else None
    with threads(numba=1, blas=1):  # see ``_optimize``
        return _optimize(fn, A0, B0, pre, lam=lam, max_iterations=max_iterations, tol=tol, t0=t0)


def _optimize(fn: CosineLoss, A0: np.ndarray, B0: np.ndarray, pre: SpectralPreconditioner | None, *, lam: float,
              max_iterations: int, tol: float, t0: float) -> CosineFit:
    """``train_cosine``'s L-BFGS, on one thread for numba and for BLAS: the driver's work between two evaluations
    (L-BFGS's update over 2 p k variables, the change of variables, the row kernels) is a series of short
    calls, and pools of idle threads of the two kinds, spinning on the same cores, made them wait for each
    other: on ml-100k the row kernels took 5 ms per call and the change of variables 7 ms (0.078 s per
    evaluation in all) against 0.3 and 1.7 ms on one thread (0.033 s per evaluation)."""
    p, k = np.shape(A0)
    size = p * k
    last: dict[str, Any] = {}

    def point(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Z, B = theta[:size].reshape(p, k), theta[size:].reshape(p, k)
        return (pre.to_a(Z) if pre is not None else Z), B

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        loss, g_A, g_B, gamma = fn(*point(theta))
        g_Z = pre.to_a(g_A) if pre is not None else g_A  # dL/dZ = T^T dL/dA, T symmetric
        grad = np.concatenate([g_Z.ravel(), g_B.ravel()])
        last.update(theta=theta.copy(), loss=loss, grad_norm=float(np.linalg.norm(grad)), gamma=gamma)
        return loss - fn.xx, grad

    Z0 = np.asarray(A0, np.float64) if pre is None else pre.from_a(np.asarray(A0, np.float64))
    theta0 = np.concatenate([Z0.ravel(), np.asarray(B0, np.float64).ravel()])
    start_grad = objective(theta0)[1]
    loss0, grad_norm0 = last["loss"], last["grad_norm"]
    history = [(loss0, grad_norm0)]
    log.info("cosine model: start loss %.6g, |grad| %.3g (lambda %g, %d x %d)", loss0, grad_norm0, lam, p, k)
    progress_rule = f"loss decrease over the last {PROGRESS_WINDOW} iterations <= tol x decrease since the start"

    shown = {"iteration": 0, "at": time.perf_counter()}  # the last iteration logged at INFO

    def callback(x: np.ndarray, f: float) -> None:
        loss = float(f) + fn.xx
        # the gradient norm of the accepted iterate: the line search's last evaluation, else one more
        grad_norm = last["grad_norm"] if np.array_equal(last["theta"], x) else float(np.linalg.norm(objective(x)[1]))
        history.append((loss, grad_norm))
        iteration = len(history) - 1
        now = time.perf_counter()
        due = iteration - shown["iteration"] >= max(1, max_iterations // 10) or now - shown["at"] >= LOG_EVERY_S
        log.log(logging.INFO if due else logging.DEBUG, "cosine model: iteration %d/%d, loss %.6g, |grad| %.3g "
                "(%.1fs)", iteration, max_iterations, loss, grad_norm, now - t0)
        if due:
            shown.update(iteration=iteration, at=now)
        if len(history) > PROGRESS_WINDOW:
            recent = history[-1 - PROGRESS_WINDOW][0] - loss
            if recent <= float(tol) * (loss0 - loss):
                raise StopIteration  # lbfgs ends the run at this iterate

    if max_iterations > 0 and np.isfinite(loss0):
        res = lbfgs(objective, theta0, memory=LBFGS_MEMORY, max_iterations=int(max_iterations), callback=callback,
                    f0=(loss0 - fn.xx, start_grad), split=size)  # A's variables (Z) and B's: a scale each
        theta, iterations = res.x, len(history) - 1
        converged = res.reason in ("rule", "stationary", "no progress")
        message = progress_rule if res.reason == "rule" else res.message
    else:
        theta, iterations, converged, message = theta0, 0, True, "no iterations asked"
    A, B = point(theta)
    if np.array_equal(last["theta"], theta):  # the last evaluation was at the returned point (as a rule)
        final_loss, gamma = last["loss"], last["gamma"]
    else:
        final_loss, _, _, gamma = fn(A, B)
    Q, _ = normalize_rows(B)
    seconds = time.perf_counter() - t0
    log.info("cosine model: %d iterations, loss %.6g -> %.6g, gamma %.4g, %.1f s (%s)", iterations, loss0,
             final_loss, gamma, seconds, message)
    return CosineFit(A=A, Q=Q, gamma=float(gamma), loss=float(final_loss), iterations=iterations,
                     evaluations=fn.evaluations, converged=converged, message=message, seconds=seconds,
                     history=history, users_without_embedding=fn.n - fn.rows_with_direction)
