"""One fit of every objective: preprocess X, its truncated SVD, the closed forms of Eq. 1 and Eq. 2, and the
model trained with cosine similarity.

The main job fits once on all data (the published factors and lists) and the held-out
evaluation fits again on its train split, with the same config and the same code. ``lambda: auto``
splits the fit in two: ``fit_spectrum`` (preprocess and SVD, once per split) and ``fit_factors``
(cheap, per lambda; ``pipeline.model.lambda_sweep``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from mfsim.pipeline.blocks import RowBlocks, rounds_where
from mfsim.pipeline.config import Config, ObjectivesSection
from mfsim.pipeline.model.cosine_model import COSINE_WIDTH, normalize_rows, train_cosine
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.model.factors import Factors, build_embeddings, eq2_scales, user_embeddings_blocks
from mfsim.pipeline.model.preprocess import Preprocessor, preprocess
from mfsim.pipeline.registry import UNIQUE
from mfsim.pipeline.model.svd import round_width, truncated_svd

Timer = Callable[[str], AbstractContextManager]  # a stage name -> a context that times it (``RunWriter.stage``)


@dataclass
class Fit:
    """Preprocessed X, its SVD, and the factors ``(A, B)`` per (objective, scaling)."""

    X: RowBlocks
    prep: Preprocessor
    sigma: np.ndarray
    V: np.ndarray
    factors: Factors  # (A, B) per (objective, scaling), built from V when read
    meta: dict[str, Any]
    user_parts: dict[tuple[str, str], list] = field(default_factory=dict)  # P = X A per row block, when computed
    svd_info: dict[str, Any] = field(default_factory=dict)  # the solver's diagnostics (passes, convergence)

    def users(self, key: tuple[str, str]) -> list:
        """User embeddings ``P = X_eff A`` of (objective, scaling) per row block (futures), computed once;
        on a client A itself is built on the workers (``Factors.pair``)."""
        if key not in self.user_parts:
            A = self.factors.pair(key, self.X.client)[0]
            self.user_parts[key] = user_embeddings_blocks(self.X, A, self.prep.col_offset,
                                                          self.factors.user_scales.get(key))
        return self.user_parts[key]

    def manifest_meta(self) -> dict[str, Any]:
        """The JSON-able part of the factors' metadata: lambda and scalings of Eq. 1, lambda and n_active of Eq. 2."""
        out: dict[str, Any] = {}
        if "eq1" in self.meta:
            eq1 = self.meta["eq1"]
            out["eq1"] = {"lambda": eq1["lambda"],
                          "scalings": {k: {"alpha": a, "beta": b} for k, (a, b) in eq1["scalings"].items()}}
        if "eq2" in self.meta:
            out["eq2"] = {"lambda": self.meta["eq2"]["lambda"], "n_active": int(self.meta["eq2"]["n_active"])}
        if "cosine" in self.meta:
            out["cosine"] = dict(self.meta["cosine"])
        return out


@dataclass
class Spectrum:
    """Preprocessed X and its truncated SVD: everything a fit needs before lambda is known."""

    X: RowBlocks
    prep: Preprocessor
    svd: Any  # SvdResult

    def truncated(self, k: int) -> "Spectrum":
        """The same X with the first ``k`` singular triplets: the rank-k truncation of this SVD, for every closed form
        at rank k (``svd.rank: auto`` reads each rank of its grid off one SVD). Itself when it has at most k."""
        if len(self.svd.sigma) <= k:
            return self
        svd = replace(self.svd, sigma=np.asarray(self.svd.sigma)[:k].copy(),
                      V=np.ascontiguousarray(np.asarray(self.svd.V)[:, :k]), U=None, V_future=None,
                      diagnostics={**self.svd.diagnostics, "truncated_from": len(self.svd.sigma)})
        return Spectrum(self.X, self.prep, svd)


def fit_spectrum(X_raw: RowBlocks, cfg: Config, timer: Timer | None = None, prefix: str = "",
                 start: np.ndarray | None = None) -> Spectrum:
    """Preprocess X and its truncated SVD (timed as ``<prefix>preprocess``, ``<prefix>svd`` when ``timer`` is given).

    ``start``: a warm start for the Krylov SVD (p x m, e.g. the previous run's V_k aligned to these items).
    """
    with _stage(timer, prefix + "preprocess"):
        X, prep = preprocess(X_raw, cfg.preprocess)
    with _stage(timer, prefix + "svd"):
        # many short rounds: in this process when X is small (``rounds_where``), with the workers' code and
        # results wherever X was read (``as_on_workers``); X itself stays where it was read, and each later stage
        # places its own work (the cosine model's rounds, the user embeddings beside X's blocks, the lists)
        X_svd, where = rounds_where(X, round_width(cfg.svd))
        svd = truncated_svd(X_svd, cfg.svd, col_offset=prep.col_offset, start=start, as_on_workers=True)
        svd.diagnostics["ran_on"] = where
        del X_svd
    return Spectrum(X, prep, svd)


def fit_factors(spec: Spectrum, objectives: ObjectivesSection, timer: Timer | None = None,
                prefix: str = "", warn: bool = True) -> Fit:
    """The closed forms of Eq. 1 and Eq. 2 from the SVD (numeric lambdas), then the cosine-trained model
    (``pipeline.model.cosine_model``, from Eq. 2's solution), timed as ``<prefix>factors`` and ``<prefix>cosine``.

    Why not from the evaluation's train-split model, which has seen most of the same data: measured on
    ``conf/paper.yaml``: 63 instead of 138 iterations, but the stopping rule (its decrease measured from Eq. 2's
    loss) then stopped at loss 261,976 against 258,338 from Eq. 2, and cluster precision@10 of its lists fell from
    0.95 to 0.85: a start that has made most of the decrease stops early, short of the cold start's optimum."""
    if objectives.auto():
        raise MfsimError(f"fit_factors needs numeric lambdas; {objectives.auto()} are auto (resolve them first)")
    svd = spec.svd
    with _stage(timer, prefix + "factors"):
        emb = build_embeddings(svd.sigma, svd.V, objectives, svd.V_future, warn=warn)
    fit = Fit(spec.X, spec.prep, np.asarray(svd.sigma), np.asarray(svd.V), emb["factors"], emb["meta"],
              svd_info=dict(svd.diagnostics))
    if objectives.cosine is not None:
        ccfg = objectives.cosine
        lam2 = float(objectives.eq2.lambda_) if objectives.eq2 is not None else 0.0
        a, b, _ = eq2_scales(fit.sigma, lam2)
        if not np.any(a > 0):  # Eq. 2 kept nothing: start from its lambda = 0 solution
            a, b, _ = eq2_scales(fit.sigma, 0.0)
        V = fit.V.astype(np.float64)
        # The loss does not change with the scale of A or of a row of B; the start is scaled so that the rows
        # of X A have unit RMS length (||X V diag(a)||_F^2 = sum (s a)^2) and the rows of B unit length, which
        # puts the gradients of both on one scale (measured on conf/paper.yaml: loss 258.6k after 200
        # iterations against 263.5k from the unscaled Eq. 2 solution).
        rms = float(np.sqrt(np.sum((fit.sigma * a) ** 2) / max(1, fit.X.n_rows)))
        with _stage(timer, prefix + "cosine"):
            X, where = rounds_where(fit.X, COSINE_WIDTH * V.shape[1])
            trained = train_cosine(X, V * (a / rms), normalize_rows(V * b)[0], lam=ccfg.lambda_,
                                   max_iterations=ccfg.max_iterations, tol=ccfg.tol, col_offset=fit.prep.col_offset,
                                   basis=(V, fit.sigma))
            del X
        A, B = trained.factors()
        fit.factors.add(("cosine", UNIQUE), A, B, user_scale=trained.user_scale)
        fit.meta["cosine"] = {"lambda": float(ccfg.lambda_), "start": f"eq2 lambda={lam2:g}", "ran_on": where,
                              **trained.describe()}
    return fit


def fit_model(X_raw: RowBlocks, cfg: Config, timer: Timer | None = None, prefix: str = "",
              start: np.ndarray | None = None) -> Fit:
    """Preprocess, truncated SVD, the closed forms of Eq. 1 and Eq. 2 and the cosine-trained model (each timed
    when ``timer`` is given); the lambdas of ``cfg`` must be numbers (``jobs.stages`` resolves ``auto``)."""
    return fit_factors(fit_spectrum(X_raw, cfg, timer, prefix, start), cfg.objectives, timer, prefix)


def _stage(timer: Timer | None, name: str) -> AbstractContextManager:
    return timer(name) if timer is not None else nullcontext()
