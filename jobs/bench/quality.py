"""``mfsim bench quality``: held-out NDCG@20 of mfsim against EASE and implicit's ALS, one protocol for all.

The protocol: interactions binarized; users with at least 5 items; a seeded per-user 80/20 split (each user's
items shuffled, 20% of them, at least one, held out); every method tuned on an inner 80/20 split of train the same
way, then refitted on all of train with its best setting; NDCG@20 on the held-out items, the user's train items
excluded from the ranking; the standard error is the per-user NDCG's standard deviation over sqrt(users).

- ``mfsim``: ``mfsim.Model`` on train with the given config (``svd.rank: auto`` and ``lambda: auto`` choose rank and
  lambdas on the model's own held-out split of train, ``evaluation.holdout``); of its user-item ``dot`` lists (Eq. 1's
  invariant one, Eq. 2's) the one with the better NDCG@20 on the inner split is the one reported.
- ``EASE`` (Steck 2019): ``B = I - P diag(1 / diag(P))``, ``P = (X^T X + lambda I)^-1``, lambda from a grid.
- ``ALS``: ``implicit.cpu.als.AlternatingLeastSquares`` over factors, regularization and the confidence weight alpha.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

TOP = 20
EASE_LAMBDAS = (50.0, 200.0, 500.0, 1000.0, 3000.0)
# regularization and alpha reach past where lastfm-hetrec2011's best lay in a smaller grid (100 and 40)
ALS_GRID = {"factors": (64, 128, 256), "regularization": (0.1, 1.0, 10.0, 100.0, 1000.0),
            "alpha": (1.0, 10.0, 40.0, 100.0)}


def read_binarized(path: str | Path, min_items: int = 5) -> sp.csr_matrix:
    """The log as a binary users x items CSR (float32), users with at least ``min_items`` distinct items."""
    import pyarrow.dataset as ds

    t = ds.dataset(str(path), format="parquet").to_table(columns=["user_id", "item_id"])
    users, u = np.unique(t["user_id"].to_numpy(), return_inverse=True)
    items, i = np.unique(t["item_id"].to_numpy(), return_inverse=True)
    X = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(len(users), len(items)))
    X.data[:] = 1.0  # duplicate pairs summed: binarize again
    keep = np.diff(X.indptr) >= min_items
    X = X[keep]
    cols = np.flatnonzero(np.asarray(X.sum(axis=0)).ravel() > 0)
    return sp.csr_matrix(X[:, cols], dtype=np.float32)


def split_rows(X: sp.csr_matrix, fraction: float, seed: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Per user, ``fraction`` of the items (at least one) held out at random: (train, test), both n x p."""
    rng = np.random.default_rng(seed)
    train_rows, test_rows = [], []
    for r in range(X.shape[0]):
        items = X.indices[X.indptr[r]:X.indptr[r + 1]].copy()
        rng.shuffle(items)
        h = max(1, int(round(fraction * len(items))))
        test_rows.append(items[:h])
        train_rows.append(items[h:])

    def build(rows: list[np.ndarray]) -> sp.csr_matrix:
        indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        indices = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        m = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=X.shape)
        m.sort_indices()
        return m

    return build(train_rows), build(test_rows)


def ndcg_at(scores: Callable[[np.ndarray], np.ndarray], train: sp.csr_matrix, test: sp.csr_matrix,
            top: int = TOP, chunk: int = 1024) -> tuple[float, float, int]:
    """Mean NDCG@top over users with held-out items, its standard error, and the user count. ``scores(rows)``:
    the dense scores of those users against every item; their train items are excluded."""
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    discount = 1.0 / np.log2(np.arange(2, top + 2))
    values = []
    for a in range(0, len(users), chunk):
        rows = users[a:a + chunk]
        s = np.asarray(scores(rows), np.float64)
        tr = train[rows]
        s[tr.nonzero()] = -np.inf
        best = np.argpartition(-s, top, axis=1)[:, :top] if s.shape[1] > top else np.argsort(-s, axis=1)
        order = np.take_along_axis(best, np.argsort(-np.take_along_axis(s, best, axis=1), axis=1), axis=1)
        te = test[rows]
        for j, r in enumerate(rows):
            held = set(te.indices[te.indptr[j]:te.indptr[j + 1]])
            gain = sum(discount[k] for k, item in enumerate(order[j][:top]) if item in held)
            ideal = discount[:min(len(held), top)].sum()
            values.append(gain / ideal)
    v = np.asarray(values)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0, len(v)


def ease_scores(train: sp.csr_matrix, lam: float) -> Callable[[np.ndarray], np.ndarray]:
    G = (train.T @ train).toarray().astype(np.float64)
    G[np.diag_indices_from(G)] += lam
    # an LU inverse: scipy's dpotrf (OpenBLAS) crashed with SIGSEGV on lastfm-hetrec2011's 17,617 x 17,617 Gram matrix
    P = np.linalg.inv(G)
    B = P / (-np.diag(P))
    B[np.diag_indices_from(B)] = 0.0
    B32 = B.astype(np.float32)
    return lambda rows: (train[rows] @ B32)


def als_scores(train: sp.csr_matrix, factors: int, regularization: float, alpha: float, seed: int
               ) -> Callable[[np.ndarray], np.ndarray]:
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha, iterations=15,
                                    random_state=seed)
    model.fit(train.tocsr(), show_progress=False)
    U, V = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return lambda rows: U[rows] @ V.T


def mfsim_scores(train: sp.csr_matrix, config: str | None, overrides: dict[str, Any]
                 ) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], dict[str, Any]]:
    """The model's user-item dot scores per objective (``eq1`` invariant, ``eq2``), and its manifest."""
    import mfsim

    n, p = train.shape
    model = mfsim.Model(config, overrides={"preprocess.binarize": True, "audit.enabled": False,
                                           "objectives.cosine": None, **overrides})
    model.fit(train, user_ids=np.arange(n), item_ids=np.arange(p))
    out = {}
    for objective, scaling in (("eq1", "symmetric"), ("eq2", "unique")):
        if objective not in model.manifest.get("factors", {}):
            continue
        uid, P = model.user_embeddings(objective, scaling)
        iid, B = model.item_embeddings(objective, scaling)
        full_p = np.zeros((n, P.shape[1]), np.float32)
        full_p[np.asarray(uid)] = P
        full_b = np.zeros((p, B.shape[1]), np.float32)
        full_b[np.asarray(iid)] = B
        out[objective] = (lambda Pm, Bm: (lambda rows: Pm[rows] @ Bm.T))(full_p, full_b)
    return out, model.manifest


def run_bench_quality(inputs: list[str], *, config: str | None = None, overrides: dict[str, Any] | None = None,
                      seed: int = 0, ease_lambdas=EASE_LAMBDAS, als_grid=ALS_GRID) -> dict[str, Any]:
    """The protocol on each input log; prints one table per input; returns the numbers."""
    overrides = {"svd.rank": "auto", **(overrides or {})}
    results = {}
    for path in inputs:
        X = read_binarized(path)
        train, test = split_rows(X, 0.2, seed)
        inner_train, inner_test = split_rows(train, 0.2, seed + 1)
        print(f"{path}: {X.shape[0]:,} users x {X.shape[1]:,} items, {X.nnz:,} pairs (binarized, users >= 5 items)")
        rows = {}
        t0 = time.perf_counter()
        inner_fns, _ = mfsim_scores(inner_train, config, overrides)
        inner = {o: ndcg_at(f, inner_train, inner_test)[0] for o, f in inner_fns.items()}
        best_obj = max(inner, key=inner.get)
        fns, manifest = mfsim_scores(train, config, overrides)
        nd, se, users = ndcg_at(fns[best_obj], train, test)
        svd = manifest.get("svd", {})
        rows["mfsim"] = {"ndcg@20": nd, "se": se, "users": users, "seconds": time.perf_counter() - t0,
                         "setting": {"list": f"{best_obj} dot", "rank": svd.get("rank"),
                                     "lambda": manifest["factors"][best_obj]["lambda"]}}
        t0 = time.perf_counter()
        best_lam = max(ease_lambdas, key=lambda lam: ndcg_at(ease_scores(inner_train, lam), inner_train,
                                                               inner_test)[0])
        nd, se, users = ndcg_at(ease_scores(train, best_lam), train, test)
        rows["EASE"] = {"ndcg@20": nd, "se": se, "users": users, "seconds": time.perf_counter() - t0,
                        "setting": {"lambda": best_lam}}
        t0 = time.perf_counter()
        settings = [dict(zip(als_grid, v)) for v in itertools.product(*als_grid.values())]
        best = max(settings, key=lambda st: ndcg_at(als_scores(inner_train, seed=seed, **st), inner_train,
                                                     inner_test)[0])
        nd, se, users = ndcg_at(als_scores(train, seed=seed, **best), train, test)
        rows["ALS"] = {"ndcg@20": nd, "se": se, "users": users, "seconds": time.perf_counter() - t0,
                       "setting": best}
        top = max(rows.values(), key=lambda r: r["ndcg@20"])
        for name, r in rows.items():
            within = r["ndcg@20"] >= top["ndcg@20"] - top["se"]
            r["within_one_se_of_best"] = bool(within)
            print(f"  {name:<6} NDCG@20 {r['ndcg@20']:.4f} +- {r['se']:.4f}  ({r['seconds']:.1f}s tuned and fitted; "
                  f"{r['setting']}){'' if within else '  below the best by more than one standard error'}")
        results[str(path)] = rows
    return results
