"""Factors: the closed-form embeddings of Eq. 1 and Eq. 2 from a truncated SVD of X.

Steck, Ekanadham & Kallus (2024), "Is Cosine-Similarity of Embeddings Really About Similarity?",
Section 2. With ``X = U S V^T`` truncated to rank k (``sigma`` = diag S, ``V`` = V_k, p x k):

- Eq. 1, ``min ||X - X A B^T||_F^2 + lam ||A B^T||_F^2``: every minimizer has
  ``A B^T = V_k W V_k^T``, ``w_i = s_i^2 / (s_i^2 + lam)``; any invertible diagonal D gives another
  one, ``(A D, B D^-1)``, so the scale of each embedding dimension (and with it the cosine
  similarity of the embeddings) is arbitrary. The scalings below are named choices of D.
- Eq. 2, ``min ||X - X A B^T||_F^2 + lam (||X A||_F^2 + ||B||_F^2)``: the solution is unique up
  to a rotation of the k dimensions (which leaves cosines unchanged):
  ``A = V_k diag(sqrt((1/s)(1 - lam/s)_+))``, ``B = V_k diag(sqrt(s (1 - lam/s)_+))``, so that
  the user embeddings ``X A = U_k diag(sqrt(s - lam)_+)`` and ``B`` carry the same scale
  (soft-thresholding of the singular values at lam).

Weights are computed in float64; factors are returned as float32 unless asked otherwise.
A component with ``s_i = 0`` carries no signal in X: it gets zero weight and zero columns in
both A and B (never inf or NaN), for every scaling.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from mfsim.kernels.sparse import csr_matmat
from mfsim.pipeline.blocks import CSRBlock, RowBlocks
from mfsim.pipeline.model.cosine_model import direction_floors, frobenius
from mfsim.pipeline.config import ObjectivesSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.registry import EQ1_SCALINGS, UNIQUE
from mfsim.pipeline.shared import is_future, runner

log = logging.getLogger("mfsim.factors")


def scaling_exponents(name: str, custom: tuple[float, float] | None = None) -> tuple[float, float]:
    """(alpha, beta) of a named Eq. 1 scaling; ``custom`` supplies them for ``"custom"``."""
    if name not in EQ1_SCALINGS:
        raise MfsimError(f"unknown eq1 scaling {name!r}; valid: {', '.join(EQ1_SCALINGS)}")
    exps = EQ1_SCALINGS[name]
    if exps is None:
        if custom is None:
            raise MfsimError("eq1 scaling 'custom' needs (alpha, beta); set objectives.eq1.custom.alpha and .beta")
        exps = (float(custom[0]), float(custom[1]))
    return exps


def _check_svd(sigma: np.ndarray, V: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(sigma, dtype=np.float64)
    V = np.asarray(V)
    if s.ndim != 1 or V.ndim != 2 or V.shape[1] != s.shape[0]:
        raise MfsimError(
            f"expected sigma of shape (k,) and V of shape (p, k), got {s.shape} and {V.shape}; "
            "pass the singular values and right singular vectors of the same truncated SVD"
        )
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise MfsimError(f"singular values must be finite and >= 0, got min {s.min(initial=0):g}; check the SVD")
    if not np.isfinite(lam) or lam < 0:
        raise MfsimError(f"lambda must be a finite number >= 0, got {lam!r}; set objectives.eq*.lambda")
    return s, V


def eq1_weights(sigma: np.ndarray, lam: float) -> np.ndarray:
    """Shrinkage of Eq. 1: ``w_i = s_i^2 / (s_i^2 + lam)`` (= 1/(1 + lam/s_i^2)), 0 where s_i = 0.

    Parameters
    ----------
    sigma : (k,) array
        Singular values of X, >= 0.
    lam : float
        Regularization lambda >= 0.

    Returns
    -------
    (k,) float64 array in [0, 1].
    """
    s, _ = _check_svd(sigma, np.zeros((0, np.shape(sigma)[0])), lam)
    s2 = s * s
    w = np.zeros_like(s)
    np.divide(s2, s2 + lam, out=w, where=s > 0)
    return w


def eq1_factors(
    sigma: np.ndarray,
    V: np.ndarray,
    lam: float,
    alpha: float,
    beta: float,
    *,
    dtype: Any = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """One minimizer (A, B) of Eq. 1, with dimension scales set by (alpha, beta).

    ``B = V diag(w^alpha s^beta)``, ``A = V diag(w^(1-alpha) s^-beta)``, so ``A B^T = V W V^T``
    for every (alpha, beta): the paper's Eq. 1 solution with ``D = diag(w^(alpha-1/2) s^beta)``
    applied to the symmetric one.

    Parameters
    ----------
    sigma : (k,) array
        Singular values of X (descending not required).
    V : (p, k) array
        Right singular vectors V_k.
    lam : float
        Lambda of Eq. 1, >= 0.
    alpha, beta : float
        Exponents; see ``registry.EQ1_SCALINGS`` for the named choices.
    dtype : numpy dtype, default float32
        dtype of A and B (the weights are computed in float64).

    Returns
    -------
    A, B : (p, k) arrays
        Components with ``w_i = 0`` (``s_i = 0``) are zero columns in both.

    Notes
    -----
    O(p k) time and memory.
    """
    a_scale, b_scale = eq1_scales(sigma, V, lam, alpha, beta)
    return scaled_columns(V, a_scale, dtype), scaled_columns(V, b_scale, dtype)


def eq1_scales(sigma: np.ndarray, V: np.ndarray, lam: float, alpha: float, beta: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` (k,) float64 with ``A = V diag(a)``, ``B = V diag(b)`` for ``eq1_factors`` (inputs checked)."""
    s, V = _check_svd(sigma, V, lam)
    w = eq1_weights(s, lam)
    live = w > 0
    sl, wl = s[live], w[live]
    b_scale = np.zeros_like(s)
    a_scale = np.zeros_like(s)
    b_scale[live] = wl**alpha * sl**beta  # B = V diag(w^alpha s^beta)
    a_scale[live] = wl ** (1.0 - alpha) * sl ** (-beta)  # A = V diag(w^(1-alpha) s^-beta)
    return a_scale, b_scale


def eq2_scales(sigma: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Column scales of the Eq. 2 solution: ``a_i = sqrt((1/s_i)(1 - lam/s_i)_+)``,
    ``b_i = sqrt(s_i (1 - lam/s_i)_+)`` (float64, 0 where s_i <= lam or s_i = 0), and their count
    of active components (``s_i > lam``)."""
    s, _ = _check_svd(sigma, np.zeros((0, np.shape(sigma)[0])), lam)
    active = (s > lam) & (s > 0)
    a = np.zeros_like(s)
    b = np.zeros_like(s)
    sa = s[active]
    shrink = 1.0 - lam / sa  # (1 - lam/s)_+ on the active components
    a[active] = np.sqrt(shrink / sa)
    b[active] = np.sqrt(shrink * sa)
    return a, b, int(np.count_nonzero(active))


def eq2_factors(
    sigma: np.ndarray, V: np.ndarray, lam: float, *, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray, int]:
    """The Eq. 2 solution ``A = V diag(sqrt((1/s)(1 - lam/s)_+))``, ``B = V diag(sqrt(s (1 - lam/s)_+))``.

    Parameters
    ----------
    sigma : (k,) array
        Singular values of X.
    V : (p, k) array
        Right singular vectors V_k.
    lam : float
        Lambda of Eq. 2, >= 0 (singular values <= lam are cut to zero).
    dtype : numpy dtype, default float32
        dtype of A and B.

    Returns
    -------
    A, B : (p, k) arrays
        Zero columns for the inactive components.
    n_active : int
        Components with ``s_i > lam``; 0 means every embedding is zero (lambda too large).

    Notes
    -----
    O(p k) time and memory. With P = X A the objective is
    ``sum_i (s_i - p_i b_i)^2 + lam (p_i^2 + b_i^2)`` per component (p_i = s_i a_i); since
    ``p^2 + b^2 >= 2 p b`` with equality iff p = b, the optimum is p_i = b_i = sqrt((s_i - lam)_+),
    i.e. soft-thresholding of s at lam.
    """
    s, V = _check_svd(sigma, V, lam)
    a, b, n_active = eq2_scales(s, lam)
    return scaled_columns(V, a, dtype), scaled_columns(V, b, dtype), n_active


# ---------------------------------------------------------------------------------------------
# user embeddings P = X_eff A, block-wise


def _block_times(block: CSRBlock, A: np.ndarray, offset_row: np.ndarray | None,
                 unit_rows: float | None = None, c_norm: float = 0.0) -> np.ndarray:
    """Rows of ``X A - 1 (c^T A)`` for one block, float32; with ``unit_rows`` each non-zero row scaled to
    that length (the cosine-trained model's ``gamma^1/2 N(X A)``), rows without a direction
    (``cosine_model.direction_floors``; ``c_norm`` = |c|) left zero as in its training.

    Sums are accumulated in float64 (a heavy user's row sums thousands of terms) and rounded
    once. O(nnz k) time, O(n_rows k) memory.
    """
    out = np.empty((block.n_rows, A.shape[1]), dtype=np.float64)
    csr_matmat(block.indptr, block.indices, block.data, A, out)  # X A
    if offset_row is not None:
        out -= offset_row  # X_eff A = X A - 1 (c^T A)
    if unit_rows is not None:
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))
        norms[norms < direction_floors(block, c_norm, frobenius(np.asarray(A, np.float64)))] = 0.0
        scale = np.zeros_like(norms)
        np.divide(float(unit_rows), norms, out=scale, where=norms > 0)
        out *= scale[:, None]
    return out.astype(np.float32)


def offset_row_of(col_offset: np.ndarray, A32: np.ndarray) -> np.ndarray:
    """``c^T A`` (k,) in float64, with the float32 A used for X A."""
    return np.asarray(col_offset, dtype=np.float64) @ A32.astype(np.float64)


def user_embeddings_blocks(blocks: RowBlocks, A: Any, col_offset: np.ndarray | None = None,
                           unit_rows: float | None = None) -> list[Any]:
    """``P = (X - 1 c^T) A`` per row block: arrays locally, futures on a client.

    A may be a future of a float32 p x k array on the blocks' client (``Factors.pair``).
    ``unit_rows``: every non-zero row of P scaled to this length (``Factors.user_scale``).
    """
    n, p = blocks.shape
    c_norm = 0.0 if col_offset is None else frobenius(np.asarray(col_offset, np.float64)[None, :])  # as in training
    run = runner(blocks.client)
    if is_future(A):  # c^T A on the worker too
        c = col_offset
        if c is not None:
            c = np.asarray(c, dtype=np.float64)
            if c.shape != (p,):
                raise MfsimError(f"expected col_offset of shape ({p},), got {c.shape}; pass Preprocessor.col_offset")
            c = run.submit(offset_row_of, run.share(c, "column-offset"), A)
        return blocks.map(_block_times, A, c, unit_rows, c_norm)
    A = np.asarray(A)
    if A.ndim != 2 or A.shape[0] != p:
        raise MfsimError(f"expected A of shape ({p}, k) for X of shape {blocks.shape}, got {A.shape}")
    A32 = np.ascontiguousarray(A, dtype=np.float32)
    offset_row = None
    if col_offset is not None:
        c = np.asarray(col_offset, dtype=np.float64)
        if c.shape != (p,):
            raise MfsimError(f"expected col_offset of shape ({p},), got {c.shape}; pass Preprocessor.col_offset")
        offset_row = offset_row_of(c, A32)
    A32 = run.share(A32, "factor-a")  # on a client: recomputable with its P blocks when a worker is lost
    return blocks.map(_block_times, A32, offset_row, unit_rows, c_norm)


def user_embeddings(blocks: RowBlocks, A: np.ndarray, col_offset: np.ndarray | None = None) -> np.ndarray:
    """User embeddings ``P = X_eff A`` with ``X_eff = X - 1 c^T`` (c = ``col_offset``), never dense X.

    Parameters
    ----------
    blocks : RowBlocks
        X (n x p) after ``apply_preprocess`` (column scale already folded in).
    A : (p, k) array
        User-side factor of Eq. 1 or Eq. 2.
    col_offset : (p,) array or None
        The implicit column offset c from preprocessing.

    Returns
    -------
    (n, k) float32 array.

    Notes
    -----
    O(nnz k + n k) time; O(n k) memory for the result, O(p k) per worker for A.
    """
    k = np.shape(A)[1] if np.ndim(A) == 2 else 0
    parts = user_embeddings_blocks(blocks, A, col_offset)
    if blocks.client is not None:
        parts = blocks.client.gather(parts)
    if not parts:
        return np.zeros((0, k), dtype=np.float32)
    return np.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------------
# all configured embeddings

#: Rows of V scaled per step by ``scaled_columns`` (16 MiB of float64 at k = 64): bounds its temporaries.
SCALE_ROWS = 1 << 15


def scaled_columns(V: np.ndarray, scale: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """``(V diag(scale)).astype(dtype)`` computed in float64, ``SCALE_ROWS`` rows at a time.

    Equal bit for bit to ``(V.astype(float64) * scale).astype(dtype)`` (each entry is one float64
    product, rounded once), without the two p x k float64 temporaries. O(p k) time.
    """
    out = np.empty(V.shape, dtype=dtype)
    for lo in range(0, len(V), SCALE_ROWS):
        out[lo : lo + SCALE_ROWS] = V[lo : lo + SCALE_ROWS].astype(np.float64) * scale
    return out


class Factors(Mapping):
    """``(A, B)`` per ``(objective, scaling)``, made from V when read.

    Every closed-form solution is V with its columns scaled (``A = V diag(a)``, ``B = V diag(b)``),
    so only V (p x k float32) and the 2k scales are kept; a pair is built on each access
    (``scaled_columns``: O(p k), a few hundredths of a second per million items at k = 64) and
    belongs to the caller. Holding every pair of a run at once would take 2 x 5 x p k float32
    (2.6 GB at p = 1M, k = 64). Solutions that are not column scalings of V can be added as arrays.
    """

    def __init__(self, V: np.ndarray, v_future: Any = None):
        self.V = V
        self._v_future = v_future  # V on the workers: the SVD's, or shared from here once (see ``pair``)
        self._scales: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._arrays: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._order: list[tuple[str, str]] = []
        self.user_scales: dict[tuple[str, str], float] = {}  # solutions whose user embeddings are unit rows x scale

    def add_scaled(self, key: tuple[str, str], a_scale: np.ndarray, b_scale: np.ndarray) -> None:
        """The solution ``A = V diag(a_scale)``, ``B = V diag(b_scale)`` (scales in float64)."""
        if key not in self:
            self._order.append(key)
        self._scales[key] = (np.asarray(a_scale, np.float64), np.asarray(b_scale, np.float64))

    def add(self, key: tuple[str, str], A: np.ndarray, B: np.ndarray, user_scale: float | None = None) -> None:
        """A solution given as its arrays (kept as they are); ``user_scale``: its user embeddings are the rows of
        ``X A`` scaled to this length (the cosine-trained model), else ``X A``."""
        if key not in self:
            self._order.append(key)
        self._arrays[key] = (A, B)
        if user_scale is not None:
            self.user_scales[key] = float(user_scale)

    def __getitem__(self, key: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pair(key)

    def pair(self, key: tuple[str, str], client: Any = None) -> tuple[Any, Any]:
        """``(A, B)`` of one solution where ``client`` runs its tasks (``pipeline.shared.runner``): arrays in this
        process without one; with one, futures of float32 arrays built on the workers.

        Each factor is ``scaled_columns(V, scale)``, run here on V or as a task on V on the workers: the SVD's
        future when it built V there, else V shared once (``pipeline.shared.share``: recomputable, one copy in
        the scheduler). So neither the driver nor the scheduler holds a client's solution arrays, and a factor
        lost with its worker is rebuilt from V. A solution added as arrays is returned as it is here, shared as
        float32 on a client.
        """
        run = runner(client)
        if key in self._arrays:
            A, B = self._arrays[key]
            if run.client is None:
                return A, B
            return run.share_f32(A, "factor-a"), run.share_f32(B, "factor-b")
        a, b = self._scales[key]
        v = self._v_where(run)
        return run.submit(scaled_columns, v, a), run.submit(scaled_columns, v, b)

    def _v_where(self, run) -> Any:
        """V where ``run`` runs: this process's V, or V on the workers (the SVD's future, else shared once, kept)."""
        if run.client is None:
            return self.V
        if self._v_future is None:
            self._v_future = run.share(np.ascontiguousarray(self.V), "svd-v")
        return self._v_future

    def b(self, key: tuple[str, str]) -> np.ndarray:
        """B of one solution (the item embeddings) alone."""
        if key in self._arrays:
            return self._arrays[key][1]
        return scaled_columns(self.V, self._scales[key][1])

    def rows(self, key: tuple[str, str], items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``items`` of ``(A, B)`` of one solution in this process: ``pair(key)``'s rows bit for bit (each entry
        one product, rounded once), in O(len(items) k) instead of O(p k)."""
        if key in self._arrays:
            A, B = self._arrays[key]
            return A[items], B[items]
        a, b = self._scales[key]
        V = self.V[items]
        return scaled_columns(V, a), scaled_columns(V, b)

    def b_rows(self, key: tuple[str, str], items: np.ndarray) -> np.ndarray:
        """Rows ``items`` of B of one solution (``b(key)[items]``, bit for bit): ``rows``' B."""
        return self.rows(key, items)[1]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._scales or key in self._arrays

    def of(self, objective: str, client: Any = None) -> "ObjectiveFactors":
        """The solutions of one objective, keyed by scaling name (as lazy as this mapping); with ``client``
        each pair is a pair of futures built on the workers (``pair``)."""
        return ObjectiveFactors(self, objective, client)


class ObjectiveFactors(Mapping):
    """``scaling -> (A, B)`` for one objective of a ``Factors``, each pair built on access (on the workers of
    ``client``, as futures, when it is given)."""

    def __init__(self, factors: Factors, objective: str, client: Any = None):
        self.factors, self.objective, self.client = factors, objective, client
        self._names = [s for o, s in factors if o == objective]

    def __getitem__(self, scaling: str) -> tuple[Any, Any]:
        if scaling not in self._names:
            raise KeyError(scaling)
        return self.factors.pair((self.objective, scaling), self.client)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)



def build_embeddings(sigma: np.ndarray, V: np.ndarray, cfg: ObjectivesSection, v_future: Any = None,
                     warn: bool = True) -> dict[str, Any]:
    """Factors for every configured objective and scaling (``v_future``: the same V on the workers, if there).

    Returns
    -------
    dict with
        ``"factors"``: a ``Factors`` mapping ``{("eq1", scaling): (A, B), ("eq2", "unique"): (A, B)}``
        (float32, p x k, each pair built from V when read);
        ``"meta"``: ``{"eq1": {"lambda", "weights", "scalings": {name: (alpha, beta)}},
        "eq2": {"lambda", "n_active", "a_scale", "b_scale"}}`` for the configured objectives.

    Logs a warning when Eq. 2 keeps no component (every singular value <= lambda), unless ``warn`` is false
    (a lambda sweep's grid reaches that end on purpose).
    """
    factors = Factors(V, v_future)
    meta: dict[str, Any] = {}
    if cfg.eq1 is not None:
        lam = float(cfg.eq1.lambda_)
        custom = (cfg.eq1.custom.alpha, cfg.eq1.custom.beta)
        used = {}
        for name in cfg.eq1.scalings:
            alpha, beta = scaling_exponents(name, custom)
            used[name] = (alpha, beta)
            factors.add_scaled(("eq1", name), *eq1_scales(sigma, V, lam, alpha, beta))
        meta["eq1"] = {"lambda": lam, "weights": eq1_weights(sigma, lam), "scalings": used}
    if cfg.eq2 is not None:
        lam = float(cfg.eq2.lambda_)
        _check_svd(sigma, V, lam)
        a, b, n_active = eq2_scales(sigma, lam)
        factors.add_scaled(("eq2", UNIQUE), a, b)
        meta["eq2"] = {"lambda": lam, "n_active": n_active, "a_scale": a, "b_scale": b}
        if n_active == 0 and warn:
            s_max = float(np.max(sigma, initial=0.0))
            log.warning(
                "eq2: lambda=%g is >= every singular value (largest %g): all Eq. 2 embeddings are zero; "
                "lower objectives.eq2.lambda below %g",
                lam, s_max, s_max,
            )
    return {"factors": factors, "meta": meta}
