"""Independent references shared by the tests: dense NumPy builds, the shared real data sets."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import scipy.sparse as sp
import pyarrow.types as pa_types
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/data/<name>/interactions.parquet``; skips the test when absent."""
    path = SHARED_DATA / name / "interactions.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real data set {name} lives in ../shared beside the checkout")
    return path


def ml100k_csr():
    """ml-100k as a float32 CSR matrix (users x items in order of first appearance); skips when absent."""
    import pandas as pd
    import scipy.sparse as sp

    d = pd.read_parquet(shared_dataset("ml-100k"), columns=["user_id", "item_id", "weight"])
    u, _ = pd.factorize(d["user_id"])
    i, _ = pd.factorize(d["item_id"])
    return sp.csr_matrix((d["weight"].to_numpy(np.float32), (u, i)), shape=(u.max() + 1, i.max() + 1))


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


def end_process(proc: subprocess.Popen) -> None:
    """Terminate ``proc`` by pid, wait up to 10 s, then kill it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def assert_same_run_tables(a_dir: Path, b_dir: Path) -> list[Path]:
    """Every Parquet file of two runs: the same files, schemas and rows; ids, ranks and counts exactly,
    floats within rtol 1e-5 (float32 lists from SVDs that agree to ~1e-15 but are summed in another
    grouping). Returns the files compared."""
    files = sorted(p.relative_to(a_dir) for p in a_dir.rglob("*.parquet"))
    assert files == sorted(p.relative_to(b_dir) for p in b_dir.rglob("*.parquet"))
    for rel in files:
        a, b = pq.read_table(a_dir / rel), pq.read_table(b_dir / rel)
        assert a.schema == b.schema and a.num_rows == b.num_rows, rel
        for name in a.column_names:
            x, y = a[name].combine_chunks(), b[name].combine_chunks()
            if pa_types.is_floating(x.type) or name == "embedding":
                x = np.asarray(x.flatten() if name == "embedding" else x, dtype=np.float64)
                y = np.asarray(y.flatten() if name == "embedding" else y, dtype=np.float64)
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{rel}:{name}")
            else:
                assert x.equals(y), f"{rel}:{name}"
    return files


# ---------------------------------------------------------------------------------------------
# a published run against dense NumPy (tests/jobs)


def run_factor(run_dir, objective, scaling, side):
    dataset = {"items": "item_embeddings", "users": "user_embeddings"}[side]
    t = ds.dataset(run_dir / f"{dataset}/objective={objective}/scaling={scaling}", format="parquet").to_table()
    emb = t["embedding"]
    return np.asarray(emb.combine_chunks().flatten().to_numpy(), np.float64).reshape(len(t), -1)


def dense_x(run_dir, sim_dir):
    files = sorted(str(f) for f in sim_dir.glob("dt=*/*.parquet"))
    log = ds.dataset(files, format="parquet").to_table(columns=["user_id", "item_id"])
    users = pq.read_table(run_dir / "ids/users.parquet")["user_id"].to_numpy()
    items = pq.read_table(run_dir / "ids/items.parquet")["item_id"].to_numpy()
    r = np.searchsorted(users, log["user_id"].to_numpy())
    c = np.searchsorted(items, log["item_id"].to_numpy())
    X = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(len(users), len(items))).toarray()
    return (X > 0).astype(np.float64), users, items  # binarized, as configured


def cosine_rows(M, norm_floor=0.0):
    """Rows of M at unit length, and which rows take part in cosine lists: a non-zero norm of at least
    ``norm_floor`` times the largest row norm (``neighbours.cosine_norm_floor``)."""
    norms = np.linalg.norm(M, axis=1)
    ok = (norms > 0) & (norms >= norm_floor * norms.max(initial=0.0))
    inv = np.where(ok, 1 / np.where(ok, norms, 1), 0)
    return M * inv[:, None], ok


def check_lists(table, q_col, n_col, q_ids, n_ids, scores_ref, admissible, tol, what="", top_n=7):
    """Every query's list (``top_n`` long): the top-N of the reference (up to near-ties) with the reference's scores."""
    q = np.searchsorted(q_ids, table[q_col].to_numpy())
    nb = np.searchsorted(n_ids, table[n_col].to_numpy())
    rank = table["rank"].to_numpy()
    score = table["score"].to_numpy().astype(np.float64)
    order = np.lexsort((rank, q))
    assert (order == np.arange(len(q))).all(), "rows are sorted by query then rank"
    for i in range(scores_ref.shape[0]):
        ok = admissible[i]
        ref = np.where(ok, scores_ref[i], -np.inf)
        expect_count = min(top_n, int(ok.sum()))
        mine = q == i
        assert mine.sum() == expect_count, (i, mine.sum(), expect_count)
        if expect_count == 0:
            continue
        assert (rank[mine] == np.arange(1, expect_count + 1)).all()
        got_nb, got_score = nb[mine], score[mine]
        assert ok[got_nb].all(), "an excluded candidate (self, seen item, zero row) was listed"
        np.testing.assert_allclose(got_score, ref[got_nb], atol=tol, err_msg=f"{what} query {i}")  # reported = reference
        best = np.sort(ref)[::-1][:expect_count]
        np.testing.assert_allclose(got_score, best, atol=tol, err_msg=f"{what} query {i}")  # and the N best
        assert (np.diff(got_score) <= 0).all()
