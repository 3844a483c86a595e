"""Independent references shared by the tests: dense NumPy builds, the shared real data sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/data/<name>/interactions.parquet``; skips the test when absent."""
    path = SHARED_DATA / name / "interactions.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real data set {name} lives in ../shared beside the checkout")
    return path


def dense_reference(users, items, weights):
    """Dense X (float64) with duplicate (user, item) rows summed, rows and columns in sorted-id order.

    Returns (X, sorted user ids, sorted item ids). Users or items whose entries sum to zero keep
    their rows here; callers compare against data without such cases.
    """
    users = np.asarray(list(users), dtype=object)
    items = np.asarray(list(items), dtype=object)
    uid = np.array(sorted(set(users.tolist())), dtype=object)
    iid = np.array(sorted(set(items.tolist())), dtype=object)
    upos = {u: k for k, u in enumerate(uid)}
    ipos = {i: k for k, i in enumerate(iid)}
    X = np.zeros((len(uid), len(iid)))
    for u, i, w in zip(users, items, weights):
        X[upos[u], ipos[i]] += float(w)
    return X, uid, iid
