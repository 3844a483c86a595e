"""Ingest against dense NumPy builds of the same logs, and every bad-input case."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mfsim.pipeline.config import IngestSection, InputSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.ingest import ingest, resolve_input
from tests_support import dense_reference, shared_dataset


def _ingest(client, path, **kw):
    input_kw = {k: kw.pop(k) for k in list(kw) if k in InputSection.model_fields}
    return ingest(client, InputSection(path=str(path), **input_kw), IngestSection(**kw))


def _assert_matches(res, ref):
    dense, users, items = ref
    assert res.user_ids.to_pylist() == list(users)
    assert res.item_ids.to_pylist() == list(items)
    X = res.X.gather()
    assert X.shape == dense.shape
    assert X.dtype == np.float32
    np.testing.assert_array_equal(X.toarray(), dense.astype(np.float32))
    np.testing.assert_array_equal(res.user_counts, (dense != 0).sum(axis=1))
    np.testing.assert_array_equal(res.item_counts, (dense != 0).sum(axis=0))
    for part in res.X.local_parts():
        assert part.indptr.dtype == np.int64 and part.data.dtype == np.float32


def test_ml100k_entry_by_entry(client):
    path = shared_dataset("ml-100k")
    t = pq.read_table(path)
    res = _ingest(client, path)
    assert (res.counts["n_users"], res.counts["n_items"], res.counts["nnz"]) == (943, 1682, 100_000)
    ref = dense_reference(t["user_id"].to_pylist(), t["item_id"].to_pylist(), t["weight"].to_pylist())
    _assert_matches(res, ref)


def _write_hive_log(root: Path, rng: np.random.Generator) -> list[tuple]:
    """Three day partitions (two files in one), string ids, duplicate (user, item) rows across files."""
    rows = []
    users = [f"u{i:03d}" for i in range(40)]
    items = [f"item-{c}" for c in "abcdefghijklmnopqrstuvwxy"]
    for d, n_files in ((1, 1), (2, 2), (3, 1)):
        part = root / f"dt=2024-01-0{d}"
        part.mkdir(parents=True)
        for f in range(n_files):
            n = 150
            u = rng.choice(users, n)
            i = rng.choice(items, n)
            w = rng.integers(1, 5, n).astype(np.float32)
            ts = [dt.datetime(2024, 1, d, int(h)) for h in rng.integers(0, 24, n)]
            table = pa.table({"user_id": u, "item_id": i, "weight": w, "ts": pa.array(ts, pa.timestamp("ms"))})
            pq.write_table(table, part / f"part-{f}.parquet", row_group_size=40)
            rows += list(zip(u, i, w, ts))
    # files beside the partitions are not part of the log
    pq.write_table(pa.table({"item_id": items, "cluster": np.arange(len(items))}), root / "items_truth.parquet")
    (root / "_SUCCESS").write_text("")
    return rows


def test_hive_strings_duplicates_one_and_two_workers(tmp_path, client, client1):
    rows = _write_hive_log(tmp_path / "log", np.random.default_rng(1))
    assert len({(u, i) for u, i, _, _ in rows}) < len(rows)  # the log really has duplicates
    ref = dense_reference(*zip(*[(u, i, w) for u, i, w, _ in rows]))
    # small pieces and blocks, so several tasks of each kind run
    kw = dict(partition_rows=50, block_rows=7)
    res2 = _ingest(client, tmp_path / "log", **kw)
    res1 = _ingest(client1, tmp_path / "log", **kw)
    _assert_matches(res2, ref)
    _assert_matches(res1, ref)
    assert res2.X.n_blocks > 1
    assert res2.counts["duplicates_merged"] == len(rows) - ref[0].astype(bool).sum()
    assert [f["path"].endswith("items_truth.parquet") for f in res2.files].count(True) == 0
    # an fsspec URL reads the same log
    _assert_matches(_ingest(client, f"file://{tmp_path / 'log'}", **kw), ref)
    # a glob and a single file read the same rows
    res_glob = _ingest(client, str(tmp_path / "log" / "dt=2024-01-02" / "*.parquet"))
    day2 = [r for r in rows if r[3].day == 2]
    _assert_matches(res_glob, dense_reference(*zip(*[(u, i, w) for u, i, w, _ in day2])))


def test_keep_ts_holds_the_latest_timestamp_of_each_entry(tmp_path, client):
    rows = _write_hive_log(tmp_path / "log", np.random.default_rng(4))
    res = ingest(client, InputSection(path=str(tmp_path / "log")), IngestSection(partition_rows=50, block_rows=7),
                 keep_ts=True)
    latest: dict = {}
    for u, i, _, t in rows:
        latest[(u, i)] = max(latest.get((u, i), t), t)
    users, items = res.user_ids.to_pylist(), res.item_ids.to_pylist()
    seen = 0
    for part, row0 in zip(res.X.local_parts(), res.X.row_offsets[:-1]):
        assert part.ts is not None and len(part.ts) == part.nnz
        for r in range(part.n_rows):
            for k in range(part.indptr[r], part.indptr[r + 1]):
                key = (users[row0 + r], items[part.indices[k]])
                expect = int(latest[key].replace(tzinfo=dt.timezone.utc).timestamp() * 1_000_000)
                assert part.ts[k] == expect
                seen += 1
    assert seen == len(latest)


def test_time_window(tmp_path, client):
    rows = _write_hive_log(tmp_path / "log", np.random.default_rng(2))
    as_of = dt.datetime(2024, 1, 3, 12)
    start = as_of - dt.timedelta(days=1.5)
    kept = [r for r in rows if start <= r[3] < as_of]
    res = _ingest(client, tmp_path / "log", as_of=as_of, window_days=1.5)
    _assert_matches(res, dense_reference(*zip(*[(u, i, w) for u, i, w, _ in kept])))
    assert res.counts["rows_outside_window"] == len(rows) - len(kept)


def test_minimum_support_iterates_until_stable(tmp_path, client):
    rng = np.random.default_rng(3)
    u = rng.integers(0, 60, 900)
    i = (rng.zipf(1.6, 900) % 50).astype(np.int64)
    w = np.ones(900, np.float32)
    pq.write_table(pa.table({"user_id": u, "item_id": i, "weight": w}), tmp_path / "x.parquet")
    dense, users, items = dense_reference(u, i, w)
    keep_u, keep_i = np.ones(len(users), bool), np.ones(len(items), bool)
    while True:  # the textbook loop on the dense matrix
        sub = dense[np.ix_(keep_u, keep_i)] != 0
        bad_u = sub.sum(1) < 6
        bad_i = sub.sum(0) < 4
        if not bad_u.any() and not bad_i.any():
            break
        keep_u[np.flatnonzero(keep_u)[bad_u]] = False
        keep_i[np.flatnonzero(keep_i)[bad_i]] = False
    ref = (dense[np.ix_(keep_u, keep_i)], users[keep_u], items[keep_i])
    res = _ingest(client, tmp_path / "x.parquet", ts_col=None, min_user_interactions=6,
                  min_item_interactions=4, block_rows=16)
    assert res.counts["support_rounds"] == 2  # the reference loop also needs two rounds here
    assert 0 < ref[0].shape[0] < 60
    _assert_matches(res, ref)


def _write(path: Path, **cols) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def _good(path: Path) -> Path:
    return _write(path, user_id=np.array([1, 2, 2]), item_id=np.array([10, 10, 11]),
                  weight=np.array([1.0, 2.0, 3.0], np.float32))


def test_invalid_rows_error_and_drop(tmp_path, client):
    p = _write(tmp_path / "bad.parquet",
               user_id=pa.array([1, None, 2, 3, 4, 5, 6]),
               item_id=pa.array([1, 1, None, 1, 2, 2, 2]),
               weight=pa.array([1.0, 1.0, 1.0, float("nan"), float("inf"), -1.0, 2.0]))
    with pytest.raises(MfsimError, match=r"bad\.parquet.*on_invalid=drop"):
        _ingest(client, p, ts_col=None)
    res = _ingest(client, p, ts_col=None, on_invalid="drop")
    assert res.counts["rows_dropped"] == {"null_user": 1, "null_item": 1, "nan_weight": 1, "inf_weight": 1,
                                          "negative_weight": 1}
    _assert_matches(res, dense_reference([1, 6], [1, 2], [1.0, 2.0]))


def test_weights_beyond_float32_are_judged_as_stored(tmp_path, client):
    p = _write(tmp_path / "w.parquet", user_id=[1, 2, 3], item_id=[1, 1, 1],
               weight=pa.array([2**40, 3, 5], pa.int64()))  # a large integer rounds, no cast error
    res = _ingest(client, p, ts_col=None)
    np.testing.assert_array_equal(res.X.gather().toarray().ravel(), np.float32([2**40, 3, 5]))
    p = _write(tmp_path / "f.parquet", user_id=[1, 2], item_id=[1, 1], weight=pa.array([1e300, 2.0]))
    res = _ingest(client, p, ts_col=None, on_invalid="drop")  # 1e300 is inf in float32
    assert res.counts["rows_dropped"] == {"inf_weight": 1}


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing_path", r"does not exist"),
        ("missing_column", r"column 'weight'.*missing.*input\.weight_col"),
        ("wrong_dtype", r"column 'user_id'.*double.*integers or strings"),
        ("schema_differs", r"column 'item_id' has type string in .*b\.parquet but int64 in .*a\.parquet"),
        ("empty_after_filters", r"no valid rows after the time window"),
        ("empty_after_support", r"empty after the minimum-support filter"),
        ("corrupt", r"c\.parquet is not a readable Parquet file"),
        ("empty_dir", r"holds no Parquet file"),
    ],
)
def test_bad_input_names_the_problem(tmp_path, client, case, pattern):
    kw: dict = {"ts_col": None}
    if case == "missing_path":
        path = tmp_path / "nope.parquet"
    elif case == "missing_column":
        path = _write(tmp_path / "a.parquet", user_id=[1], item_id=[2])
    elif case == "wrong_dtype":
        path = _write(tmp_path / "a.parquet", user_id=[1.5], item_id=[2], weight=[1.0])
    elif case == "schema_differs":
        path = tmp_path / "d"
        _good(path / "a.parquet")
        _write(path / "b.parquet", user_id=[1], item_id=["x"], weight=[1.0])
    elif case == "empty_after_filters":
        path = _write(tmp_path / "a.parquet", user_id=[1], item_id=[2], weight=[1.0],
                      ts=pa.array([dt.datetime(2020, 1, 1)], pa.timestamp("s")))
        kw = {"as_of": dt.datetime(2019, 1, 1), "window_days": 7}
    elif case == "empty_after_support":
        path = _good(tmp_path / "a.parquet")
        kw["min_user_interactions"] = 5
    elif case == "corrupt":
        path = tmp_path / "d"
        _good(path / "a.parquet")
        (path / "c.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    elif case == "empty_dir":
        path = tmp_path / "d"
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    with pytest.raises(MfsimError, match=pattern):
        _ingest(client, path, **kw)


def test_resolve_input_skips_hidden_and_loose_files(tmp_path):
    _good(tmp_path / "dt=1" / "a.parquet")
    _good(tmp_path / "dt=1" / "_tmp.parquet")
    _good(tmp_path / ".hidden" / "dt=2" / "b.parquet")
    _good(tmp_path / "items_truth.parquet")
    _, files = resolve_input(str(tmp_path))
    assert [Path(f).relative_to(tmp_path).as_posix() for f in files] == ["dt=1/a.parquet"]
