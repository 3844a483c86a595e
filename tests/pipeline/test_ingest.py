"""Ingest against dense NumPy builds of the same logs, and every bad-input case."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mfsim.pipeline.config import Config, EvaluationSection, IngestSection, InputSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.ingest import ingest, resolve_input, validate_before_cluster
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
    # planned for 8 worker threads (``bench scaling --plan-for``): as many fold groups as blocks allow, the same X
    from mfsim.pipeline.ingest import _worker_slots
    from mfsim.pipeline.shared import planned_threads
    with planned_threads(8):
        slots = _worker_slots(client)
        res8 = _ingest(client, tmp_path / "log", **kw)
    assert len(slots) == 8 and len(set(slots)) == 2 and slots[0] != slots[1]  # the workers taken in turn
    _assert_matches(res8, ref)
    for a, b in zip(res2.X.local_parts(), res8.X.local_parts()):
        np.testing.assert_array_equal(a.indptr, b.indptr)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.data, b.data)
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
        ("no_common_integer", r"column 'user_id' has type uint64 in .*b\.parquet but int64 in .*a\.parquet"),
        ("all_zero_weights",
         r"all 3 valid rows of .*z\.parquet have weight 0 in column 'weight'.*check input\.weight_col"),
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
    elif case == "no_common_integer":  # uint64 beside int64: no integer type holds both
        path = tmp_path / "d"
        _good(path / "a.parquet")
        _write(path / "b.parquet", user_id=pa.array([2**63 + 5], pa.uint64()), item_id=[10], weight=[1.0])
    elif case == "all_zero_weights":
        path = _write(tmp_path / "z.parquet", user_id=[1, 2, 2], item_id=[10, 10, 11], weight=[0.0, 0.0, 0.0])
    with pytest.raises(MfsimError, match=pattern):
        _ingest(client, path, **kw)


def test_resolve_input_skips_hidden_and_loose_files(tmp_path):
    _good(tmp_path / "dt=1" / "a.parquet")
    _good(tmp_path / "dt=1" / "_tmp.parquet")
    _good(tmp_path / ".hidden" / "dt=2" / "b.parquet")
    _good(tmp_path / "items_truth.parquet")
    _, files = resolve_input(str(tmp_path))
    assert [Path(f).relative_to(tmp_path).as_posix() for f in files] == ["dt=1/a.parquet"]


def _encoding_rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"user_id": rng.integers(0, 30, n), "item_id": np.array([f"it{k}" for k in rng.integers(0, 20, n)]),
            "weight": rng.integers(1, 4, n),
            "ts": np.datetime64("2024-01-01T00:00:00", "ms") + rng.integers(0, 86_400_000, n).astype("m8[ms]")}


def test_files_that_differ_only_in_encoding_decode_the_same(tmp_path, client):
    """dictionary<string> / large_string / string, int32 / int64, a zero-row null-typed file: one log.

    Weights (float32, int64, float64) and timestamps (ms, us with a time zone, ns) also differ by file.
    """
    rng = np.random.default_rng(7)
    parts = [_encoding_rows(rng, n) for n in (120, 90, 60)]
    d = tmp_path / "log"
    d.mkdir()
    a, b, c = parts
    pq.write_table(pa.table({"user_id": pa.array(a["user_id"], pa.int32()),
                             "item_id": pa.array(a["item_id"]).dictionary_encode(),
                             "weight": pa.array(a["weight"], pa.float32()),
                             "ts": pa.array(a["ts"])}), d / "a.parquet")
    pq.write_table(pa.table({"user_id": pa.array(b["user_id"], pa.int64()),
                             "item_id": pa.array(b["item_id"], pa.large_string()),
                             "weight": pa.array(b["weight"], pa.int64()),
                             "ts": pa.array(b["ts"]).cast(pa.timestamp("us", tz="UTC"))}), d / "b.parquet")
    pq.write_table(pa.table({"user_id": pa.array(c["user_id"], pa.int64()), "item_id": pa.array(c["item_id"]),
                             "weight": pa.array(c["weight"], pa.float64()),
                             "ts": pa.array(c["ts"]).cast(pa.timestamp("ns"))}), d / "c.parquet")
    empty = pa.table({k: pa.array([], pa.null()) for k in ("user_id", "item_id", "weight", "ts")})
    pq.write_table(empty, d / "e.parquet")
    assert pq.read_schema(d / "e.parquet").field("user_id").type == pa.null()
    # the same rows in one file with one schema
    one = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    pq.write_table(pa.table({"user_id": pa.array(one["user_id"], pa.int64()), "item_id": pa.array(one["item_id"]),
                             "weight": pa.array(one["weight"], pa.float32()), "ts": pa.array(one["ts"])}),
                   tmp_path / "one.parquet")

    kw = dict(partition_rows=50, block_rows=8, as_of=dt.datetime(2024, 1, 3), window_days=5)
    union = ingest(client, InputSection(path=str(d)), IngestSection(**kw), keep_ts=True)
    single = ingest(client, InputSection(path=str(tmp_path / "one.parquet")), IngestSection(**kw), keep_ts=True)
    assert union.user_ids.type == pa.int64() and union.item_ids.type == pa.string()
    assert union.user_ids.equals(single.user_ids) and union.item_ids.equals(single.item_ids)
    assert union.counts == single.counts and union.counts["rows_read"] == 270
    np.testing.assert_array_equal(union.user_counts, single.user_counts)
    np.testing.assert_array_equal(union.item_counts, single.item_counts)
    Xu, Xs = union.X.gather(), single.X.gather()
    assert (Xu != Xs).nnz == 0 and Xu.nnz == Xs.nnz and Xu.dtype == Xs.dtype == np.float32
    for pu, ps in zip(union.X.local_parts(), single.X.local_parts()):
        np.testing.assert_array_equal(pu.ts, ps.ts)


def _corrupt_middle_of_data_pages(path: Path, column: int) -> None:
    """Overwrite 64 bytes in the middle of the data pages of column ``column``'s chunk in row group 0."""
    meta = pq.ParquetFile(path).metadata.row_group(0).column(column)
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    end = start + meta.total_compressed_size
    with open(path, "r+b") as fh:
        fh.seek(meta.data_page_offset + (end - meta.data_page_offset) // 2)
        fh.write(b"\xff" * 64)


def _rows(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"user_id": rng.integers(0, 500, n),
                     "item_id": pa.array([f"i{k}" for k in rng.integers(0, 300, n)]),
                     "weight": rng.random(n).astype(np.float32),
                     "ts": pa.array(np.datetime64("2024-01-01", "s") + rng.integers(0, 86_400, n).astype("m8[s]"))})


@pytest.mark.parametrize("column, kw", [
    (1, {"ts_col": None}),   # item_id, read by the scan
    (3, {"window_days": 1}),  # ts, first read by the default as_of's task (max_ts)
])
def test_corrupt_column_chunk_is_one_error_naming_file_and_column(tmp_path, client, column, kw):
    """The footer is fine, so the damage shows only when a worker decodes the column chunk."""
    d = tmp_path / "log"
    d.mkdir()
    pq.write_table(_rows(2000, 1), d / "a.parquet")
    bad = d / "c.parquet"
    pq.write_table(_rows(20_000), bad)
    _corrupt_middle_of_data_pages(bad, column)
    pq.ParquetFile(bad).metadata  # the footer still reads
    with pytest.raises(MfsimError) as e:
        _ingest(client, d, **kw)
    msg = str(e.value)
    name = _rows(1).column_names[column]
    assert msg.startswith(f"{bad} is corrupt: column '{name}' in row group 0 cannot be decoded (") and \
        msg.endswith("replace or remove the file"), msg
    assert "\n" not in msg


def test_page_checksums_are_verified(tmp_path, client):
    """Damage that would decode to wrong values is an error when the writer stored page checksums."""
    t = _rows(20_000)
    path = tmp_path / "x.parquet"
    pq.write_table(t, path, write_page_checksum=True)
    clean = path.read_bytes()
    meta = pq.ParquetFile(path).metadata.row_group(0).column(2)  # weight: a dictionary page of plain floats
    with open(path, "r+b") as fh:
        fh.seek(meta.dictionary_page_offset + 40)
        fh.write(b"\xff" * 64)
    assert path.read_bytes() != clean
    assert not pq.read_table(path).equals(t)  # without verification: wrong weights, no error
    with pytest.raises(MfsimError, match=rf"{path} is corrupt: column 'weight' in row group 0 cannot be decoded"):
        _ingest(client, path, ts_col=None)


def test_validate_before_cluster_fails_fast_without_a_client(tmp_path):
    missing = Config(input=InputSection(path=str(tmp_path / "nope.parquet")))
    t0 = time.perf_counter()
    with pytest.raises(MfsimError, match=r"input path .*nope\.parquet does not exist"):
        validate_before_cluster(missing)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(MfsimError, match="no input given"):
        validate_before_cluster(Config())
    log = _good(tmp_path / "log" / "a.parquet")
    validate_before_cluster(Config(input=InputSection(path=str(log))))  # a good input passes
    no_truth = Config(input=InputSection(path=str(log)),
                      evaluation=EvaluationSection(item_truth=str(tmp_path / "truth.parquet")))
    t0 = time.perf_counter()
    with pytest.raises(MfsimError, match=r"evaluation\.item_truth .*truth\.parquet does not exist"):
        validate_before_cluster(no_truth)
    assert time.perf_counter() - t0 < 1.0


# ---------------------------------------------------------------------------------------------
# the streaming ingest: blocks folded piece by piece, a bounded part of the log on the workers


def _write_float_log(root: Path, rng: np.random.Generator, n_files: int = 5, rows: int = 600) -> list[tuple]:
    """Integer users, string items, float32 weights whose sums depend on their order, zeros, many duplicates."""
    out = []
    root.mkdir(parents=True)
    for f in range(n_files):
        u = rng.integers(0, 50, rows)
        i = np.array([f"it{k:02d}" for k in rng.integers(0, 25, rows)])
        w = (rng.random(rows) * 10.0 ** rng.integers(-3, 7, rows)).astype(np.float32)
        w[rng.random(rows) < 0.05] = 0.0
        pq.write_table(pa.table({"user_id": u, "item_id": i, "weight": w}), root / f"part-{f}.parquet",
                       row_group_size=37)
        out += list(zip(u.tolist(), i.tolist(), w.tolist()))
    return out


def _log_order_reference(rows: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense float32 X with duplicates summed one at a time in log order (file order, then row order)."""
    users = np.array(sorted({u for u, _, _ in rows}))
    items = np.array(sorted({i for _, i, _ in rows}))
    r = np.searchsorted(users, [u for u, _, _ in rows])
    c = np.searchsorted(items, [i for _, i, _ in rows])
    dense = np.zeros((len(users), len(items)), np.float32)
    np.add.at(dense, (r, c), np.array([w for _, _, w in rows], np.float32))  # unbuffered: in order, in float32
    return dense, users, items


def _same_blocks(a, b) -> None:
    assert np.array_equal(a.X.row_offsets, b.X.row_offsets)
    for pa_, pb in zip(a.X.local_parts(), b.X.local_parts()):
        for name in ("indptr", "indices", "data"):
            x, y = getattr(pa_, name), getattr(pb, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_blocks_are_the_log_order_sums_bit_for_bit_on_one_and_two_workers(tmp_path, client, client1):
    """... and in this process (no client, or a log within ``here_max_rows``): the same blocks, there as arrays."""
    import scipy.sparse as sp

    rows = _write_float_log(tmp_path / "log", np.random.default_rng(11))
    kw = dict(ts_col=None, partition_rows=80, block_rows=6)  # 40 pieces, 9 blocks, a merge every few pieces
    res2 = _ingest(client, tmp_path / "log", **kw)
    res1 = _ingest(client1, tmp_path / "log", **kw)
    dense, users, items = _log_order_reference(rows)
    keep_u, keep_i = dense.any(axis=1), dense.any(axis=0)  # a user or item whose weights are all 0 has no entry
    _assert_matches(res2, (dense[np.ix_(keep_u, keep_i)], users[keep_u], items[keep_i]))
    _same_blocks(res1, res2)
    here = _ingest(None, tmp_path / "log", **kw)
    within = ingest(client, InputSection(path=str(tmp_path / "log"), ts_col=None),
                    IngestSection(partition_rows=80, block_rows=6), here_max_rows=len(rows))
    beyond = ingest(client, InputSection(path=str(tmp_path / "log"), ts_col=None),
                    IngestSection(partition_rows=80, block_rows=6), here_max_rows=len(rows) - 1)
    assert (here.ran_on, within.ran_on, beyond.ran_on, res2.ran_on) == ("driver", "driver", "workers", "workers")
    assert here.X.client is None and within.X.client is None and beyond.X.client is client
    for other in (here, within, beyond):
        _same_blocks(other, res2)
        assert other.user_ids.equals(res2.user_ids) and other.counts == res2.counts
    # the same X as scipy's duplicate sum (in float64, then rounded): equal up to float32 rounding, same pattern
    r, c = np.searchsorted(users, [u for u, _, _ in rows]), np.searchsorted(items, [i for _, i, _ in rows])
    ref = sp.coo_matrix((np.array([w for _, _, w in rows]), (r, c)), shape=dense.shape).tocsr()
    ref.eliminate_zeros()
    got = res2.X.gather()
    assert got.nnz == ref.nnz == res2.counts["nnz"] == np.count_nonzero(dense)
    np.testing.assert_allclose(got.toarray(), ref[np.ix_(keep_u, keep_i)].toarray(), rtol=2e-6)
    assert res2.counts["duplicates_merged"] == len(rows) - int(np.count_nonzero(dense))  # zero-weight rows too
    # X's blocks are spread over both workers (each group of blocks folded on its own worker)
    assert len({w for ws in client.who_has(res2.X.parts).values() for w in ws}) == 2


def test_a_block_of_the_most_active_users_is_folded_in_units_to_the_same_bits(tmp_path, client, client1):
    """A log whose first block holds most rows, planned for 8 worker threads (``bench scaling --plan-for``): that
    block is folded in several units over the groups (``fold_units``) and joined; its arrays, timestamps included,
    are those of one worker's fold (the block whole) and of this process's."""
    from mfsim.pipeline.ingest import _worker_slots, fold_units
    from mfsim.pipeline.shared import planned_threads

    rng = np.random.default_rng(12)
    (tmp_path / "log").mkdir()
    for f in range(4):
        n = 700
        u = np.floor(40 * rng.random(n) ** 3).astype(np.int64)  # half the rows are the first 5 users'
        w = (rng.random(n) * 10.0 ** rng.integers(-3, 7, n)).astype(np.float32)
        ts = pa.array(rng.integers(1_700_000_000_000_000, 1_700_000_900_000_000, n), pa.timestamp("us"))
        pq.write_table(pa.table({"user_id": u, "item_id": rng.integers(0, 30, n), "weight": w, "ts": ts}),
                       tmp_path / "log" / f"part-{f}.parquet", row_group_size=50)

    def run(c, **support):
        return ingest(c, InputSection(path=str(tmp_path / "log")),
                      IngestSection(partition_rows=100, block_rows=5, **support), keep_ts=True)

    one, here = run(client1), run(None)
    support = dict(min_user_interactions=16, min_item_interactions=24)  # its first round drops users and items
    one_supported = run(client1, **support)
    with planned_threads(8):
        groups = min(len(_worker_slots(client)), one.X.n_blocks)
        cut = run(client)
        cut_supported = run(client, **support)  # its first round from the units' counts (``joined_counts``)
    for a, b in ((cut, one), (cut_supported, one_supported)):
        assert a.counts == b.counts and a.user_ids.equals(b.user_ids) and a.item_ids.equals(b.item_ids)
        assert np.array_equal(a.user_counts, b.user_counts) and np.array_equal(a.item_counts, b.item_counts)
        _same_blocks(a, b)
    assert 0 < cut_supported.counts["users_removed_by_support"] and 0 < cut_supported.counts["items_removed_by_support"]
    _, per_user = np.unique(np.concatenate([pq.read_table(tmp_path / "log" / f"part-{f}.parquet")["user_id"]
                                            .to_numpy() for f in range(4)]), return_counts=True)
    units, first = fold_units(per_user, one.X.row_offsets, groups)
    assert groups == 8 and first[1] > 1  # the first block in several units
    for other in (one, here):
        for a, b in zip(cut.X.local_parts(), other.X.local_parts()):
            for name in ("indptr", "indices", "data", "ts"):
                x, y = getattr(a, name), getattr(b, name)
                assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_a_log_repeated_has_the_same_pattern_and_the_log_order_sums(tmp_path, client):
    rows = _write_float_log(tmp_path / "base", np.random.default_rng(12), n_files=2, rows=300)
    rep = tmp_path / "rep"
    rep.mkdir()
    for r in range(3):
        for f in sorted((tmp_path / "base").iterdir()):
            (rep / f"r{r}-{f.name}").write_bytes(f.read_bytes())
    kw = dict(ts_col=None, partition_rows=80, block_rows=6)
    base, res = _ingest(client, tmp_path / "base", **kw), _ingest(client, rep, **kw)
    dense, users, items = _log_order_reference(rows * 3)
    keep_u, keep_i = dense.any(axis=1), dense.any(axis=0)
    _assert_matches(res, (dense[np.ix_(keep_u, keep_i)], users[keep_u], items[keep_i]))
    assert res.counts["rows_read"] == 3 * base.counts["rows_read"] and res.counts["nnz"] == base.counts["nnz"]
    for pb, pr in zip(base.X.local_parts(), res.X.local_parts()):
        assert np.array_equal(pb.indptr, pr.indptr) and np.array_equal(pb.indices, pr.indices)


class _Resident:
    """A scheduler plugin: the most keys of each watched prefix in memory at once."""

    name = "mfsim-test-resident"

    def __init__(self, prefixes: tuple[str, ...]):
        self.prefixes = prefixes
        self.now = dict.fromkeys(prefixes, 0)
        self.most = dict.fromkeys(prefixes, 0)

    def transition(self, key, start, finish, *args, **kwargs):
        prefix = str(key).split("-")[0]
        if prefix in self.now and "memory" in (start, finish) and start != finish:
            self.now[prefix] += 1 if finish == "memory" else -1
            self.most[prefix] = max(self.most[prefix], self.now[prefix])


def test_the_pieces_on_the_workers_are_bounded_whatever_the_log_length(tmp_path, client):
    """Counted by the scheduler, not timed: pass 1's results waiting for their union, pass 2's encoded pieces and
    buckets waiting to be folded."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    from mfsim.pipeline import ingest as ingest_module

    class Resident(_Resident, SchedulerPlugin):
        pass

    d = tmp_path / "log"
    d.mkdir()
    rng = np.random.default_rng(13)
    for f in range(6):
        pq.write_table(pa.table({"user_id": rng.integers(0, 300, 200), "item_id": rng.integers(0, 40, 200),
                                 "weight": np.ones(200, np.float32)}), d / f"p{f}.parquet", row_group_size=20)
    n_slots = sum(client.nthreads().values())
    window = ingest_module.fold_window(n_slots)
    client.register_plugin(Resident(("scan_ids", "encode_piece", "group_bucket")))
    try:
        res = _ingest(client, d, ts_col=None, partition_rows=20, block_rows=16)  # 60 pieces of 20 rows
        most = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[_Resident.name].most)
    finally:
        client.unregister_scheduler_plugin(_Resident.name)
    assert res.counts["rows_read"] == 1200 and res.X.n_blocks == 19
    assert 60 >= 4 * window
    assert 0 < most["encode_piece"] <= window
    assert 0 < most["group_bucket"] <= window * n_slots
    assert 0 < most["scan_ids"] <= 2 * ingest_module.SCAN_FAN_IN


def test_an_id_the_first_pass_did_not_see_is_no_position():
    from mfsim.pipeline.ingest import IdIndex

    ints = IdIndex(pa.array([3, 5, 9]))
    np.testing.assert_array_equal(ints.positions(pa.array([9, 3, 5, 3])), [2, 0, 1, 0])
    assert ints.positions(pa.array([3, 4])) is None and ints.positions(pa.array([3, 10])) is None
    assert ints.positions(pa.array([2])) is None
    strings = IdIndex(pa.array(["a", "c"]))
    np.testing.assert_array_equal(strings.positions(pa.array(["c", "a"])), [1, 0])
    assert strings.positions(pa.array(["b"])) is None


def test_id_counts_and_the_groups_of_blocks():
    from mfsim.pipeline.ingest import assign_groups, id_counts

    ids, n = id_counts(pa.array([5, 3, 5, 9, 5]))
    assert ids.to_pylist() == [3, 5, 9] and n.tolist() == [1, 3, 1] and ids.type == pa.int64()
    ids, n = id_counts(pa.array([2**40, 1, 1]))  # a sparse range: counted by pyarrow
    assert ids.to_pylist() == [1, 2**40] and n.tolist() == [2, 1]
    ids, n = id_counts(pa.array(["b", "a", "b"]), np.array([2, 1, 4]))  # a union sums the pieces' counts
    assert ids.to_pylist() == ["a", "b"] and n.tolist() == [1, 6]
    weights = np.array([25, 11, 8, 7, 6, 6, 5, 5])
    group_of = assign_groups(weights, 2)
    loads = np.bincount(group_of, weights=weights)
    assert group_of[0] == 0 and abs(loads[0] - loads[1]) <= 5
    assert assign_groups(weights, 1).tolist() == [0] * 8


def test_fold_units_cut_the_blocks_of_more_than_a_groups_share():
    """Hand-computed: 10 users in blocks of 4 (rows 0-3, 4-7, 8-9: 60, 20 and 20 of the log's 100 rows)."""
    from mfsim.pipeline.ingest import fold_units

    user_rows = np.array([30, 10, 10, 10, 5, 5, 5, 5, 10, 10])
    offsets = np.array([0, 4, 8, 10])
    units, first = fold_units(user_rows, offsets, 1)  # one group: one unit a block
    assert units.tolist() == [0, 4, 8, 10] and first.tolist() == [0, 1, 2, 3]
    # 3 groups, shares of 33.3: block 0 in ceil(60 / 16.7) = 4 parts of 15 rows: user 0 (30 rows) reaches the first
    # two, user 2 (running 50) the third: units [0], [1, 2], [3] of 30, 20 and 10 rows; assign_groups makes groups of
    # 30 | 20 + 20 | 20 + 10 rows, the heaviest 40 against 60 with whole blocks
    units, first = fold_units(user_rows, offsets, 3)
    assert units.tolist() == [0, 1, 3, 4, 8, 10] and first.tolist() == [0, 3, 4, 5]
    # 2 groups, shares of 50: block 0 in 3 parts (units of 30, 10, 20 rows), the heaviest group 50 against 60 whole:
    # not a fifth less, so the blocks stay whole
    units, first = fold_units(user_rows, offsets, 2)
    assert units.tolist() == [0, 4, 8, 10] and first.tolist() == [0, 1, 2, 3]
    # a user is never cut: block 1's 8 rows are one user's 7 and another's 1 (7 against 8: whole)
    units, first = fold_units(np.array([0, 0, 7, 1]), np.array([0, 2, 4]), 4)
    assert units.tolist() == [0, 2, 4] and first.tolist() == [0, 1, 2]
    # an empty block stays one unit; block 1 (6 of 8 rows) in users of 3 and 3: heaviest group 3 against 6
    units, first = fold_units(np.array([0, 0, 3, 3, 1, 1]), np.array([0, 2, 4, 6]), 3)
    assert units.tolist() == [0, 2, 3, 4, 6] and first.tolist() == [0, 1, 3, 4]


def test_piece_shares_follow_the_groups_rows():
    """A group's share of a piece is the piece's rows in proportion to its blocks' rows where that is more than an
    even split (so the group of the most active users merges as rarely as the others), else the even split."""
    from mfsim.pipeline.ingest import piece_shares

    got = piece_shares(np.array([300, 100, 0, 600]), np.array([0, 1, 1, 2]), 3, 1000)
    assert got.tolist() == [333, 333, 600] and got.dtype == np.int64  # even: 1000 // 3
    assert piece_shares(np.array([1, 1, 1]), np.array([0, 1, 2]), 3, 10).tolist() == [4, 4, 4]  # ceil(10 / 3)
    assert piece_shares(np.array([5, 0]), np.array([0, 1]), 2, 10).tolist() == [10, 5]
    assert piece_shares(np.zeros(2), np.array([0, 1]), 2, 10).tolist() == [5, 5]
    assert piece_shares(np.array([1]), np.array([0]), 1, 0).tolist() == [1]  # at least 1
