"""``mfsim.Model``, the in-memory estimator, against a published run of the same log (its Parquet read by hand),
against dense NumPy for its filtered and folded-in recommendations, and through save and load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

import mfsim
from mfsim.pipeline.errors import MfsimError
from tests_support import shared_dataset

CONF = Path(__file__).resolve().parents[2] / "conf" / "default.yaml"
DATASETS = {"item_item": "similar_items", "user_item": "recommendations", "user_user": "similar_users"}


@pytest.fixture(scope="module")
def ml100k(ml100k_default_run):
    """(published run, model, log table) of ml-100k with the default config: the README's run (shared with
    test_cli) and a model fit in memory on the same log."""
    r, run_dir = ml100k_default_run
    assert r.returncode == 0, r.stderr
    log = pq.read_table(shared_dataset("ml-100k"))
    return mfsim.open_run(run_dir), mfsim.Model(CONF).fit(log), log


def _published(run, kind: str, combo: tuple[str, str, str]) -> pd.DataFrame:
    o, s, m = combo
    t = pq.read_table(Path(run.path) / DATASETS[kind] / f"objective={o}" / f"scaling={s}" / f"metric={m}")
    q_col = t.column_names[0]
    return t.to_pandas().sort_values([q_col, "rank"]).reset_index(drop=True)


def test_every_list_of_the_model_equals_the_runs_on_ml100k(ml100k):
    run, model, _ = ml100k
    assert model.manifest["factors"]["eq1"]["lambda"] == run.manifest["factors"]["eq1"]["lambda"]  # the sweep's
    metrics = run.metrics()  # the run's held-out evaluation, as published
    pd.testing.assert_frame_equal(metrics, pq.read_table(Path(run.path) / "evaluation/metrics.parquet").to_pandas())
    compared = 0
    for kind in ("item_item", "user_item"):  # the default config computes no user-user lists
        assert model.lists(kind) == run.lists(kind)
        for combo in run.lists(kind):
            want = _published(run, kind, combo)
            q_col = want.columns[0]
            table = model._list_source(kind, {combo}).to_table(columns=list(want.columns))
            got = table.to_pandas().sort_values([q_col, "rank"]).reset_index(drop=True)
            # the same kernels on the same factors in the same tiles: ids, ranks and scores exactly
            pd.testing.assert_frame_equal(got, want, check_exact=True)
            compared += 1
    # item-item: Eq. 1's model and projected_cosine, Eq. 2's four, the cosine model's cosine; user-item: Eq. 1's dot,
    # Eq. 2's dot and cosine, the cosine model's cosine (no list of a named Eq. 1 scaling: neighbours.eq1_scalings;
    # the cosine model's dot lists are its cosine lists, published once)
    assert compared == 7 + 4
    items = [50, 56, 181]
    pd.testing.assert_frame_equal(model.similar_items(items, n=20), run.similar_items(items, n=20))
    pd.testing.assert_frame_equal(model.recommend([7, 1], objective="cosine"), run.recommend([7, 1],
                                                                                              objective="cosine"))


def test_fold_in_of_training_users_equals_their_published_recommendations(ml100k):
    run, model, log = ml100k
    users = [1, 7, 42, 500, 943]
    for objective, metric in (("eq1", "dot"), ("eq2", "dot"), ("eq2", "cosine"), ("cosine", "cosine")):
        published = run.recommend(users, n=100, objective=objective, metric=metric)
        for u in users:
            rows = log.filter(pc.equal(log["user_id"], u))
            got = model.recommend_new(dict(zip(rows["item_id"].to_pylist(), rows["weight"].to_pylist())), n=100,
                                      objective=objective, metric=metric)
            want = published[published["user_id"] == u].drop(columns="user_id").reset_index(drop=True)
            pd.testing.assert_frame_equal(got, want, check_exact=True)
    # a list of item ids (weight 1 each) and a sparse row are the same interactions
    ids = [50, 56, 181]
    row = sp.csr_matrix((np.ones(3, np.float32), ([0, 0, 0], model._rows("items", ids))),
                        shape=(1, len(model._ids("items"))))
    pd.testing.assert_frame_equal(model.recommend_new(ids), model.recommend_new(row))
    with pytest.raises(MfsimError, match="unknown item ids 999999"):
        model.recommend_new([50, 999999])


def test_filters_match_dense_numpy(ml100k):
    _, model, log = ml100k
    item_ids, B = model.item_embeddings("eq1", "symmetric")
    user_ids, P = model.user_embeddings("eq1", "symmetric")
    items = np.asarray(item_ids)
    u = 7
    scores = P[np.searchsorted(np.asarray(user_ids), u)].astype(np.float64) @ B.T.astype(np.float64)
    own = set(log.filter(pc.equal(log["user_id"], u))["item_id"].to_pylist())
    # own items allowed: the top 20 by the dot product over all items (float32 scores: compare within rounding)
    got = model.recommend(u, n=20, metric="dot", scaling="symmetric", filter_already_liked_items=False)
    order = np.argsort(-scores, kind="stable")[:20]
    np.testing.assert_allclose(got["score"], scores[order], rtol=1e-5)
    assert set(got["item_id"]) & own  # this user's best-scored items include some they rated
    assert got["item_id"].tolist()[:10] == items[order].tolist()[:10]
    # candidates restricted to a set of items, own items still excluded
    allowed = [1, 2, 3, 50, 56, 100, 181, 200, 300]
    got = model.recommend(u, n=5, items=allowed)
    keep = np.array([i in allowed and i not in own for i in items])
    want = items[keep][np.argsort(-scores[keep], kind="stable")][:5]
    assert got["item_id"].tolist() == want.tolist() and set(got["item_id"]) <= set(allowed) - own


def test_save_and_load_give_the_same_model(ml100k, tmp_path):
    _, model, _ = ml100k
    path = model.save(tmp_path / "m.mfsim")
    again = mfsim.Model.load(path)
    pd.testing.assert_frame_equal(again.similar_items(50), model.similar_items(50))
    pd.testing.assert_frame_equal(again.recommend_new([50, 56]), model.recommend_new([50, 56]))
    pd.testing.assert_frame_equal(again.audit(), model.audit())
    with pytest.raises(MfsimError, match="not a model saved"):
        (tmp_path / "x").write_bytes(b"\x80\x05K\x01.")  # a pickle of the number 1
        mfsim.Model.load(tmp_path / "x")


def test_a_scipy_matrix_and_a_table_of_the_same_log_fit_the_same_model():
    rng = np.random.default_rng(2)
    n, p, nnz = 120, 50, 1500
    cells = rng.choice(n * p, size=nnz, replace=False)
    weights = rng.integers(1, 6, nnz).astype(np.float32)
    X = sp.csr_matrix((weights, (cells // p, cells % p)), shape=(n, p))
    user_ids, item_ids = np.arange(n) * 10, np.arange(p) + 1000  # ids in sorted order, as ingest sorts them
    cfg = {"svd": {"rank": 8}, "objectives": {"eq1": {"lambda": 5.0}, "eq2": {"lambda": 3.0}, "cosine": None},
           "evaluation": {"holdout": "none"}, "neighbours": {"top_n": 7}}
    from_matrix = mfsim.Model(cfg).fit(X, user_ids=user_ids, item_ids=item_ids)
    table = pa.table({"user_id": user_ids[cells // p], "item_id": item_ids[cells % p], "weight": weights})
    from_table = mfsim.Model(cfg).fit(table.to_pandas())
    for kind in ("item_item", "user_item"):
        for combo in from_matrix.lists(kind):
            a = from_matrix._list_source(kind, {combo}).to_table().to_pandas()
            b = from_table._list_source(kind, {combo}).to_table().to_pandas()
            pd.testing.assert_frame_equal(a, b, check_exact=True)
    # the lists against NumPy: Eq. 2's item-item dot list is B B^T's top 7 off the diagonal
    ids, B = from_matrix.item_embeddings("eq2", "unique")
    S = B.astype(np.float64) @ B.T.astype(np.float64)
    np.fill_diagonal(S, -np.inf)
    got = from_matrix.similar_items(1003, n=7, objective="eq2", metric="dot")
    np.testing.assert_allclose(got["score"], np.sort(S[3])[::-1][:7], rtol=1e-5)


def test_errors_say_what_to_do():
    with pytest.raises(MfsimError, match=r"not fitted: call model.fit\(X\) first"):
        mfsim.Model().similar_items(1)
    with pytest.raises(MfsimError, match="no column 'user_id'"):
        mfsim.Model().fit(pd.DataFrame({"user": [1], "item_id": [2], "weight": [1.0]}))
    with pytest.raises(MfsimError, match="negative weights"):
        mfsim.Model().fit(sp.csr_matrix(np.array([[1.0, -1.0]], np.float32)))
    with pytest.raises(MfsimError, match="scipy.sparse matrix or a pandas/pyarrow table"):
        mfsim.Model().fit(np.ones((3, 3)))


def test_the_readme_model_example_runs(tmp_path, monkeypatch):
    import re

    readme = (CONF.parents[1] / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    code = next(c for c in re.findall(r"```python\n(.*?)\n```", section, re.S) if "mfsim.Model(" in c)
    rng = np.random.default_rng(4)
    users, items = rng.integers(0, 120, 3000), rng.integers(0, 200, 3000)
    interactions = pd.DataFrame({"user_id": users, "item_id": items, "weight": np.ones(3000, np.float32)})
    monkeypatch.chdir(tmp_path)
    ns = {"mfsim": mfsim, "interactions": interactions}
    exec(compile(code.replace('"conf/default.yaml"', repr(str(CONF))), "<README>", "exec"), ns)
    assert isinstance(ns["model"], mfsim.Model) and (tmp_path / "model.mfsim").is_file()
