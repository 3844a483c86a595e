"""One fit of both objectives: preprocess X, its truncated SVD, the closed forms of Eq. 1 and Eq. 2.

The main job fits once on all data (the published factors and lists) and the held-out
evaluation fits again on its train split, with the same config and the same code.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mfsim.pipeline.blocks import RowBlocks
from mfsim.pipeline.config import Config
from mfsim.pipeline.factors import Factors, build_embeddings, user_embeddings_blocks
from mfsim.pipeline.preprocess import Preprocessor, preprocess
from mfsim.pipeline.runs import RunWriter
from mfsim.pipeline.svd import truncated_svd


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
        on a client A itself is built on the workers (``Factors.on_client``)."""
        if key not in self.user_parts:
            A = self.factors.on_client(self.X.client, key)[0] if self.X.client is not None else self.factors[key][0]
            self.user_parts[key] = user_embeddings_blocks(self.X, A, self.prep.col_offset)
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
        return out


def fit_model(X_raw: RowBlocks, cfg: Config, run: RunWriter | None = None, prefix: str = "",
              start: np.ndarray | None = None) -> Fit:
    """Preprocess, truncated SVD and the closed forms of Eq. 1 and Eq. 2 (each timed when ``run`` is given).

    ``start``: a warm start for the Krylov SVD (p x m, e.g. the previous run's V_k aligned to these items).
    """

    def stage(name: str):
        return run.stage(prefix + name) if run is not None else nullcontext()

    with stage("preprocess"):
        X, prep = preprocess(X_raw, cfg.preprocess)
    with stage("svd"):
        svd = truncated_svd(X, cfg.svd, col_offset=prep.col_offset, start=start)
    with stage("factors"):
        emb = build_embeddings(svd.sigma, svd.V, cfg.objectives, svd.V_future)
    return Fit(X, prep, np.asarray(svd.sigma), np.asarray(svd.V), emb["factors"], emb["meta"],
               svd_info=dict(svd.diagnostics))
