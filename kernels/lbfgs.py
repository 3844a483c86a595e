"""L-BFGS's search direction by the two-loop recursion (Nocedal & Wright 2006, Algorithm 7.4), in place.

The cosine-trained model's L-BFGS (``pipeline/model/cosine_model.py``) runs on 2 p k float64 variables;
its direction reads each of the 2 m stored vectors twice, and per iteration that is most of its work
outside the loss. As NumPy calls, each step is a dot product and an ``axpy`` with a temporary (8 calls
per pair); here each pass over the variables does the ``axpy`` of one step and the dot product of the
next, with no temporary: half the memory traffic (ml-100k, 215k variables, m = 10: 9.1 -> 4.5 ms on one
thread). Sums run left to right, so the direction is the same bit for bit in any process.
``lbfgs_direction_reference`` is the textbook NumPy version the tests compare against.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _pair_products(s, y):
    """``(s.y, y.y)`` in float64, left to right (float32 slots: products in float64)."""
    sy = 0.0
    yy = 0.0
    for j in range(s.shape[0]):
        s_j = np.float64(s[j])
        y_j = np.float64(y[j])
        sy += s_j * y_j
        yy += y_j * y_j
    return sy, yy


@njit(nogil=True, cache=True)
def _initial_scales(sy1, yy1, sy2, yy2):
    """The initial Hessian's two scales ``s_b.y_b / y_b.y_b``; a segment without curvature of its own (empty, or
    ``s_b.y_b <= 0``) takes the whole pair's ``s.y / y.y``."""
    whole = (sy1 + sy2) / (yy1 + yy2)
    gamma1 = sy1 / yy1 if sy1 > 0 and yy1 > 0 else whole
    gamma2 = sy2 / yy2 if sy2 > 0 and yy2 > 0 else whole
    return gamma1, gamma2


@njit(nogil=True, cache=True)
def _two_loop(g, S, Y, rho, order, out, split):
    n = g.shape[0]
    m = order.shape[0]
    alpha = np.empty(m)
    for j in range(n):
        out[j] = -g[j]
    # first loop, newest pair to oldest: a_t = rho_t s_t.q; q -= a_t y_t (each pass: this axpy, the next dot)
    i = order[m - 1]
    acc = 0.0
    for j in range(n):
        acc += S[i, j] * out[j]
    a = rho[i] * acc
    alpha[m - 1] = a
    for t in range(m - 1, 0, -1):
        i = order[t]
        nxt = order[t - 1]
        acc = 0.0
        for j in range(n):
            v = out[j] - a * Y[i, j]
            out[j] = v
            acc += S[nxt, j] * v
        a = rho[nxt] * acc
        alpha[t - 1] = a
    # the oldest pair's axpy, the initial Hessian gamma I (gamma = s.y / y.y of the newest pair), and the
    # second loop's first dot product in one pass
    last = order[m - 1]
    sy1, yy1 = _pair_products(S[last, :split], Y[last, :split])
    sy2, yy2 = _pair_products(S[last, split:], Y[last, split:])
    gamma1, gamma2 = _initial_scales(sy1, yy1, sy2, yy2)
    i = order[0]
    acc = 0.0
    for j in range(n):
        v = (out[j] - a * Y[i, j]) * (gamma1 if j < split else gamma2)
        out[j] = v
        acc += Y[i, j] * v
    # second loop, oldest pair to newest: b_t = rho_t y_t.r; r += (a_t - b_t) s_t
    for t in range(m):
        i = order[t]
        c = alpha[t] - rho[i] * acc
        if t + 1 < m:
            nxt = order[t + 1]
            acc = 0.0
            for j in range(n):
                v = out[j] + c * S[i, j]
                out[j] = v
                acc += Y[nxt, j] * v
        else:
            for j in range(n):
                out[j] += c * S[i, j]


@njit(nogil=True, cache=True)
def _store_pair(x_new, x, g_new, g, s_out, y_out):
    """``s = x_new - x`` and ``y = g_new - g`` stored (in the slots' precision), and ``(s.y, g.s)`` of the stored s and
    y in float64, summed left to right."""
    sy = 0.0
    gs = 0.0
    for j in range(x.shape[0]):
        s_out[j] = x_new[j] - x[j]
        y_out[j] = g_new[j] - g[j]
        sj = np.float64(s_out[j])
        sy += sj * np.float64(y_out[j])
        gs += g[j] * sj
    return sy, gs


def store_pair(x_new: np.ndarray, x: np.ndarray, g_new: np.ndarray, g: np.ndarray, s_out: np.ndarray,
               y_out: np.ndarray) -> tuple[float, float]:
    """Write the correction pair ``s = x_new - x``, ``y = g_new - g`` into slots ``s_out``, ``y_out`` (float32 or
    float64: ``lbfgs_direction`` reads either) and return ``(s.y, g.s)`` of the pair as stored, in float64: the
    curvature test and ``rho = 1 / s.y`` then describe the vectors the direction uses."""
    sy, gs = _store_pair(x_new, x, g_new, g, s_out, y_out)
    return float(sy), float(gs)


def lbfgs_direction(g: np.ndarray, S: np.ndarray, Y: np.ndarray, rho: np.ndarray, order: np.ndarray,
                    out: np.ndarray | None = None, split: int = 0) -> np.ndarray:
    """``-H g``: L-BFGS's inverse-Hessian approximation from the pairs ``(S[i], Y[i])``, ``rho[i] = 1 / s_i.y_i``,
    taken in ``order`` (slot indices, oldest first), times ``-g``. With no pairs, ``-g``. ``out`` (float64, like
    ``g``) is written and returned. O(m n) time, O(m) memory.

    The initial Hessian is ``(s.y / y.y) I`` of the newest pair; with ``split`` (0 < split < n) it is block diagonal,
    ``diag(gamma_1 I, gamma_2 I)`` with ``gamma_b = s_b.y_b / y_b.y_b`` of the pair's variables before and from
    ``split`` (a block without curvature of its own takes the whole pair's): variables of two kinds whose
    curvatures differ (the cosine model's A and B) each get their own scale, and the first step of every iteration
    is then right for both (``pipeline.model.cosine_model.lbfgs``).
    """
    g = np.ascontiguousarray(g, dtype=np.float64)
    out = np.empty_like(g) if out is None else out
    order = np.ascontiguousarray(order, dtype=np.int64)
    if len(order) == 0:
        np.negative(g, out=out)
        return out
    if S.shape != Y.shape or S.ndim != 2 or S.shape[1] != g.shape[0] or out.shape != g.shape:
        raise ValueError(f"lbfgs_direction: S {S.shape} and Y {Y.shape} must be (memory, {g.shape[0]})")
    if S.dtype != Y.dtype or S.dtype not in (np.float32, np.float64) or not (S.flags.c_contiguous
                                                                            and Y.flags.c_contiguous):
        raise ValueError("lbfgs_direction: S and Y must be C-contiguous, both float32 or both float64")
    split = int(split) if 0 < int(split) < g.shape[0] else 0
    _two_loop(g, S, Y, np.asarray(rho, dtype=np.float64), order, out, split)
    return out


def lbfgs_direction_reference(g: np.ndarray, S: np.ndarray, Y: np.ndarray, rho: np.ndarray,
                              order: np.ndarray, split: int = 0) -> np.ndarray:
    """The two-loop recursion as written in Nocedal & Wright's Algorithm 7.4, in NumPy; ``split`` as
    ``lbfgs_direction``'s (the initial Hessian ``H_0`` of eq. 7.20 block diagonal)."""
    q = -np.asarray(g, dtype=np.float64)
    if len(order) == 0:
        return q
    alphas = {}
    for i in reversed(list(order)):
        alphas[i] = rho[i] * float(S[i] @ q)
        q = q - alphas[i] * Y[i]
    last = order[-1]
    s_n, y_n = np.asarray(S[last], np.float64), np.asarray(Y[last], np.float64)
    whole = float(s_n @ y_n) / float(y_n @ y_n)
    h0 = np.full(q.size, whole)
    if 0 < split < q.size:
        for part in (slice(0, split), slice(split, q.size)):
            sy, yy = float(s_n[part] @ y_n[part]), float(y_n[part] @ y_n[part])
            if sy > 0 and yy > 0:
                h0[part] = sy / yy
    r = q * h0
    for i in order:
        beta = rho[i] * float(Y[i] @ r)
        r = r + (alphas[i] - beta) * S[i]
    return r
