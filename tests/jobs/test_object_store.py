"""Runs on an object store and on workers that share nothing with the driver but the output.

A real S3 endpoint on 127.0.0.1 (moto's server mode, started as a subprocess and ended by pid;
s3fs as the client, credentials and endpoint from the environment as a user would set them):
the input is read from it, a whole run is published to it and read back with pyarrow (and DuckDB
where its httpfs extension loads without a network), a run killed with every part written but no
manifest is not published and its rerun cleans up, a failed run leaves no prefix. The same run
to a local path gives the same tables. Then a job on an external ``dask scheduler``/``dask
worker`` cluster whose workers start in another directory, with relative paths on the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests_support import assert_same_run_tables, end_process

BIN = Path(sys.executable).parent
MFSIM = str(BIN / "mfsim")
REPO = Path(__file__).resolve().parents[2]
QUICK = ["--set", "objectives.eq1.lambda=10", "--set", "objectives.eq2.lambda=10", "--set", "objectives.cosine=null",
         "--set", "svd.rank=4", "--set", "neighbours.top_n=5", "--set", "evaluation.holdout=none",
         "--set", "audit.draws=1", "--set", "report.enabled=true", "--set", "cluster.n_workers=1",
         "--set", "neighbours.user_user=[cosine]"]
BUCKET = "mfsim-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback; yields the environment that points clients at it (and sets it here)."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _wait_for_port(port, proc, "moto_server")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield {"env": {**os.environ, **env}, "fs": fs, "port": port}
    finally:
        end_process(proc)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def small_log(tmp_path_factory) -> Path:
    """80 users x 50 items, 1,200 interactions, as a directory of two Parquet files."""
    rng = np.random.default_rng(11)
    pairs = rng.choice(80 * 50, size=1200, replace=False)
    df = pd.DataFrame({"user_id": pairs // 50, "item_id": pairs % 50, "weight": np.ones(1200, np.float32),
                       "ts": pd.Timestamp("2026-11-01", tz="UTC") + pd.to_timedelta(np.arange(1200), unit="s")})
    out = tmp_path_factory.mktemp("log") / "log"
    out.mkdir()
    for k, part in enumerate((df.iloc[:600], df.iloc[600:])):
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), out / f"part-{k}.parquet")
    return out


def mfsim(*args: str, env=None, cwd=REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([MFSIM, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def s3_files(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p[len(prefix) + 1:] for p in fs.find(prefix))


@pytest.fixture(scope="module")
def published(s3, small_log, tmp_path_factory):
    """The log uploaded to the store; one run r1 from it to the store and the same run to a local path."""
    fs = s3["fs"]
    fs.put(str(small_log), f"{BUCKET}/logs", recursive=True)
    t0 = time.perf_counter()
    r = mfsim("run", "conf/default.yaml", "--input", f"s3://{BUCKET}/logs", "--output", f"s3://{BUCKET}/runs",
              "--run-id", "r1", *QUICK, env=s3["env"])
    s3_seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    local_root = tmp_path_factory.mktemp("local") / "runs"
    t0 = time.perf_counter()
    r = mfsim("run", "conf/default.yaml", "--input", str(small_log), "--output", str(local_root), "--run-id", "r1",
              *QUICK, env=s3["env"])
    assert r.returncode == 0, r.stderr
    print(f"run to s3 {s3_seconds:.1f}s, to a local path {time.perf_counter() - t0:.1f}s")
    return local_root / "r1"


def test_a_run_publishes_to_the_store_and_reads_back_like_a_local_one(s3, published, tmp_path):
    fs = s3["fs"]
    files = s3_files(fs, f"{BUCKET}/runs/r1")
    assert "_manifest.json" in files and "_log.txt" in files and "report.html" in files
    assert fs.cat_file(f"{BUCKET}/runs/LATEST").decode().strip() == "r1"
    # every table equals the local run's: download the run and compare file by file
    fs.get(f"{BUCKET}/runs/r1", str(tmp_path / "r1"), recursive=True)
    compared = assert_same_run_tables(published, tmp_path / "r1")
    assert any(str(f).startswith("similar_items/") for f in compared)
    manifest = json.loads(fs.cat_file(f"{BUCKET}/runs/r1/_manifest.json"))
    local_manifest = json.loads((published / "_manifest.json").read_text())
    assert manifest["datasets"] == local_manifest["datasets"]
    # pyarrow reads a dataset straight from the store, hive partitions and all
    t = ds.dataset(f"{BUCKET}/runs/r1/similar_items", filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert t.num_rows == manifest["datasets"]["similar_items"]["rows"] and t["item_id"].null_count == 0
    # the commands that read runs take the URL
    r = mfsim("runs", "--output", f"s3://{BUCKET}/runs", "--format", "json", env=s3["env"])
    assert r.returncode == 0, r.stderr
    assert [(x["run_id"], x["state"]) for x in json.loads(r.stdout)] == [("r1", "succeeded")]
    r = mfsim("show", f"s3://{BUCKET}/runs/LATEST", env=s3["env"])
    assert r.returncode == 0 and f"s3://{BUCKET}/runs/r1" in r.stdout, r.stderr
    assert mfsim("status", "r1", "--output", f"s3://{BUCKET}/runs", env=s3["env"]).returncode == 0


def test_duckdb_reads_the_store_where_httpfs_loads(s3, published):
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    try:
        con.execute("LOAD httpfs")
    except duckdb.Error:
        try:
            con.execute("INSTALL httpfs")
            con.execute("LOAD httpfs")
        except duckdb.Error as exc:
            pytest.skip(f"DuckDB's httpfs extension is not available offline here: {str(exc).splitlines()[0]}")
    con.execute(f"SET s3_endpoint='127.0.0.1:{s3['port']}'; SET s3_use_ssl=false; SET s3_url_style='path'; "
                "SET s3_access_key_id='testing'; SET s3_secret_access_key='testing'; SET s3_region='us-east-1'")
    n = con.execute(f"SELECT count(*) FROM read_parquet('s3://{BUCKET}/runs/r1/similar_items/**/*.parquet', "
                    "hive_partitioning=true)").fetchall()[0][0]
    assert n == pq.ParquetDataset(published / "similar_items").read().num_rows


def test_a_run_killed_before_its_manifest_is_not_published_and_its_rerun_cleans_up(s3, published):
    fs, env = s3["fs"], s3["env"]
    r = mfsim("run", "conf/default.yaml", "--input", f"s3://{BUCKET}/logs", "--output", f"s3://{BUCKET}/runs",
              "--run-id", "r2", *QUICK, env={**env, "MFSIM_FAULT_BEFORE_PUBLISH": "1"})
    assert r.returncode == -9, r.stderr
    left = s3_files(fs, f"{BUCKET}/runs/r2")
    assert any(f.startswith("similar_items/") for f in left) and "_manifest.json" not in left  # parts, no manifest
    assert fs.cat_file(f"{BUCKET}/runs/LATEST").decode().strip() == "r1"
    listed = {x["run_id"]: x for x in json.loads(mfsim("runs", "--output", f"s3://{BUCKET}/runs", "--format", "json",
                                                       env=env).stdout)}
    assert listed["r2"]["state"] == "lost" and listed["r2"]["run_dir"] is None  # its pid is gone: not published
    r = mfsim("show", f"s3://{BUCKET}/runs/r2", env=env)
    assert r.returncode == 2 and "not a published run" in r.stderr
    assert mfsim("status", "r2", "--output", f"s3://{BUCKET}/runs", env=env).returncode == 1
    # the rerun of that id removes what the killed one left, then publishes
    r = mfsim("run", "conf/default.yaml", "--input", f"s3://{BUCKET}/logs", "--output", f"s3://{BUCKET}/runs",
              "--run-id", "r2", *QUICK, env=env)
    assert r.returncode == 0, r.stderr
    assert "removed the unpublished prefix" in r.stderr
    assert fs.cat_file(f"{BUCKET}/runs/LATEST").decode().strip() == "r2"


def test_a_failed_run_removes_its_prefix(s3, published):
    fs, env = s3["fs"], s3["env"]
    r = mfsim("run", "conf/default.yaml", "--input", f"s3://{BUCKET}/logs", "--output", f"s3://{BUCKET}/runs",
              "--run-id", "r3", *QUICK, "--set", "neighbours.users=[123456]", env=env)
    assert r.returncode == 2 and "unknown user ids [123456]" in r.stderr
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/runs/r3") or s3_files(fs, f"{BUCKET}/runs/r3") == []
    st = mfsim("status", "r3", "--output", f"s3://{BUCKET}/runs", env=env)
    assert st.returncode == 1 and "unknown user ids" in st.stdout


def test_workers_in_another_directory_with_relative_paths_on_the_driver(small_log, tmp_path):
    """The driver's working directory holds the input and the output (given relatively); the workers start in
    a directory of their own and still read and write the right files."""
    driver_dir, worker_dir = tmp_path / "driver", tmp_path / "workers"
    driver_dir.mkdir()
    worker_dir.mkdir()
    shutil.copytree(small_log, driver_dir / "log")
    port = _free_port()
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], cwd=worker_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait_for_port(port, procs[0], "dask scheduler")
        for _ in range(2):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--host", "127.0.0.1",
                                           "--nthreads", "1", "--no-dashboard", "--memory-limit", "2GiB"],
                                          cwd=worker_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        r = mfsim("run", str(REPO / "conf/default.yaml"), "--input", "log", "--output", "runs", "--run-id", "w1",
                  "--scheduler", f"tcp://127.0.0.1:{port}", *QUICK, cwd=driver_dir)
        assert r.returncode == 0, r.stderr
        run_dir = driver_dir / "runs" / "w1"
        manifest = json.loads((run_dir / "_manifest.json").read_text())
        assert manifest["nnz"] == 1200
        for name, d in manifest["datasets"].items():
            if d["format"] == "parquet":
                assert ds.dataset(run_dir / name, format="parquet", partitioning="hive").count_rows() == d["rows"]
        assert not any(worker_dir.rglob("*.parquet")), "a worker wrote into its own directory"
    finally:
        for p in reversed(procs):
            end_process(p)


def test_open_run_reads_the_store_through_latest(s3, published):
    import mfsim

    run = mfsim.open_run(f"s3://{BUCKET}/runs/LATEST")
    assert run.run_id == s3["fs"].cat_file(f"{BUCKET}/runs/LATEST").decode().strip()
    item = pq.read_table(published / "ids/items.parquet")["item_id"][3].as_py()
    got = run.similar_items(item, n=5, metric="cosine", objective="eq2", scaling="unique")
    ref = pq.read_table(published / "similar_items/objective=eq2/scaling=unique/metric=cosine",
                        filters=[("item_id", "=", item)]).to_pandas()
    assert got["neighbour_id"].tolist() == ref["neighbour_id"].tolist()[:5]
    ids, emb = run.item_embeddings("eq1", "symmetric")
    assert emb.dtype == np.float32 and len(ids) == emb.shape[0] == run.manifest["n_items"]


def test_retention_on_the_store_removes_old_runs_with_their_state_records(s3):
    from mfsim.pipeline.runs.roots import open_root

    url = f"s3://{BUCKET}/retention"
    days = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    for day in days:
        with open_root(url).writer(day, heartbeat_s=60) as run:
            run.write_table("t/x.parquet", pa.table({"x": [1]}))
            run.publish({"counts": {"n": 1}})
    root = open_root(url)
    root.write_latest("2026-01-02")  # LATEST is never removed, whatever its age
    files = s3_files(s3["fs"], f"{BUCKET}/retention")
    assert all(f".mfsim/runs/{day}.json" in files and f"{day}/_manifest.json" in files for day in days)
    assert root.prune_runs(1) == ["2026-01-01", "2026-01-03"]
    files = s3_files(s3["fs"], f"{BUCKET}/retention")
    for gone in ("2026-01-01", "2026-01-03"):  # neither its files nor its state record are left
        assert not any(f.startswith(f"{gone}/") or f == f".mfsim/runs/{gone}.json" for f in files)
    assert sorted(s.run_id for s in root.list_runs()) == ["2026-01-02", "2026-01-04"]
    assert root.prune_runs(1) == []


def changed_between_passes(cmd: list[str], rewrite, hold: Path, env: dict) -> subprocess.CompletedProcess:
    """``mfsim`` run with ingest held after its first pass (``MFSIM_HOLD_BETWEEN_PASSES``); ``rewrite()`` then, and
    the run let go on."""
    proc = subprocess.Popen([MFSIM, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**env, "MFSIM_HOLD_BETWEEN_PASSES": str(hold)})
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{hold}.scanned").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        rewrite()
        Path(f"{hold}.go").touch()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _rewritten(table: pa.Table) -> pa.Table:
    """The same ids, items shuffled, weights x3: what a writer replacing the file with a new version might leave."""
    rng = np.random.default_rng(5)
    items = table["item_id"].to_numpy()
    return table.set_column(table.column_names.index("item_id"), "item_id", pa.array(rng.permutation(items))) \
        .set_column(table.column_names.index("weight"), "weight", pa.array(table["weight"].to_numpy() * 3))


def test_a_log_rewritten_between_ingests_passes_is_one_error_locally_and_on_the_store(s3, small_log, tmp_path):
    """Pass 1's id maps from one version of a file, pass 2's entries from another would be read silently; each
    read is checked against the file's identity (size, mtime / ETag) recorded when ingest began."""
    local = tmp_path / "log"
    shutil.copytree(small_log, local)
    part = local / "part-1.parquet"
    r = changed_between_passes(
        ["run", "conf/default.yaml", "--input", str(local), "--output", str(tmp_path / "runs"), *QUICK],
        lambda: pq.write_table(_rewritten(pq.read_table(part)), part), tmp_path / "hold-local", s3["env"])
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {part} was rewritten (its size, modification time or ETag changed) while this run "
                      "read the log; nothing was published: rerun once the log is complete (write new files beside "
                      "the old ones, not over them)"], r.stderr
    assert not [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    fs = s3["fs"]
    fs.put(str(small_log), f"{BUCKET}/changing", recursive=True)
    key = f"{BUCKET}/changing/part-1.parquet"

    def rewrite_on_the_store():
        with fs.open(key, "rb") as fh:
            table = pq.read_table(fh)
        with fs.open(key, "wb") as fh:
            pq.write_table(_rewritten(table), fh)

    r = changed_between_passes(
        ["run", "conf/default.yaml", "--input", f"s3://{BUCKET}/changing", "--output", str(tmp_path / "runs3"),
         *QUICK], rewrite_on_the_store, tmp_path / "hold-s3", s3["env"])
    assert r.returncode == 2 and f"{key} was rewritten" in r.stderr, r.stderr
    # unchanged, the same log reads through, and the manifest names each file's version
    r = mfsim("run", "conf/default.yaml", "--input", str(local), "--output", str(tmp_path / "runs"), "--run-id",
              "ok", *QUICK, env=s3["env"])
    assert r.returncode == 0, r.stderr
    files = json.loads((tmp_path / "runs" / "ok" / "_manifest.json").read_text())["input"]["files"]
    assert all(any(v.startswith("mtime") for v in f["version"]) for f in files)
