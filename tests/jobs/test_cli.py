"""The command line end to end: exit codes, one error line, nothing published on bad input."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests_support import shared_dataset

MFSIM = str(Path(sys.executable).parent / "mfsim")
REPO = Path(__file__).resolve().parents[2]


def mfsim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MFSIM, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_done_when_command_on_ml100k(ml100k_default_run):
    data = shared_dataset("ml-100k")
    r, run_dir = ml100k_default_run
    tmp_path = run_dir.parent
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "t1" / "_manifest.json").read_text())
    assert (m["counts"]["n_users"], m["counts"]["n_items"], m["counts"]["nnz"]) == (943, 1682, 100_000)
    assert m["status"] == "succeeded" and m["run_id"] == "t1" and "ingest" in m["timings"]
    assert m["input"]["files"][0]["size"] == data.stat().st_size
    assert (tmp_path / "LATEST").read_text().strip() == "t1"
    users = pq.read_table(tmp_path / "t1" / "ids" / "users.parquet")
    assert users.column_names == ["index", "user_id", "n_interactions"]
    assert users["n_interactions"].to_numpy().sum() == 100_000
    assert "run directory" in r.stdout


def test_bad_input_exits_2_with_one_error_line_and_publishes_nothing(tmp_path):
    good = tmp_path / "good.parquet"
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"user_id": rng.integers(0, 40, 300), "item_id": rng.integers(0, 30, 300),
                             "weight": np.ones(300, np.float32)}), good)
    out = tmp_path / "out"
    quick = ["--set", "svd.rank=4", "--set", "neighbours.top_n=5", "--set", "evaluation.cutoffs=[5]"]
    ok = mfsim("run", "conf/default.yaml", "--input", str(good), "--output", str(out), "--run-id", "a", *quick)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user": [1], "item_id": [3], "weight": [1.0]}), bad)
    r = mfsim("run", "conf/default.yaml", "--input", str(bad), "--output", str(out), "--run-id", "b", *quick)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "column 'user_id'" in errors[0] and "bad.parquet" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["LATEST", "a"]
    assert (out / "LATEST").read_text().strip() == "a"


@pytest.mark.parametrize("args, pattern", [
    (["run", "conf/default.yaml", "--set", "svd.rnak=3"], "unknown config key 'svd.rnak'"),
    (["run", "conf/default.yaml", "--run-id", "../x", "--input", "x"], "run id"),
    (["run", "conf/nope.yaml"], "does not exist"),
])
def test_config_errors_exit_2(args, pattern):
    r = mfsim(*args)
    assert r.returncode == 2 and pattern in r.stderr, r.stderr


ALIAS_BOMB = "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
                     for p, n in zip([None, *"abcdefg"], "abcdefgh"))  # 9^8 = 43M strings from ~300 bytes


@pytest.mark.parametrize("setting, pattern", [
    ("cluster.memory_limit=lots", "'lots' is not a byte size: write auto, a size such as 8GiB"),
    ("cluster.memory_limit=50MiB", "50MiB is less than a worker needs to start"),
    ("svd.max_blocks=4", "svd.rank=64 does not fit the Krylov space of svd.max_blocks x svd.block_size = 4 x 16"),
])
def test_config_values_that_would_fail_later_are_refused_at_once(tmp_path, setting, pattern):
    t0 = time.perf_counter()
    r = mfsim("run", "conf/default.yaml", "--input", "x", "--set", setting)
    assert r.returncode == 2 and pattern in r.stderr, r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert time.perf_counter() - t0 < 10  # before any cluster: an interpreter start and a config load


def test_an_embedded_cluster_the_machine_cannot_hold_is_refused_at_once(tmp_path):
    log = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [1, 2], "weight": [1.0, 1.0]}), log)
    t0 = time.perf_counter()
    r = mfsim("run", "conf/default.yaml", "--input", str(log), "--output", str(tmp_path / "o"),
              "--set", "cluster.n_workers=64", "--set", "cluster.small_data_here=false")
    assert r.returncode == 2 and "cluster.n_workers=64 x cluster.threads_per_worker=1 asks for 64 threads" in r.stderr
    assert time.perf_counter() - t0 < 20 and "Traceback" not in r.stderr  # it took 305 s and 761 lines


def test_an_svd_that_does_not_converge_is_not_published_unless_accepted(tmp_path):
    rng = np.random.default_rng(2)
    log = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": rng.integers(0, 60, 600), "item_id": rng.integers(0, 40, 600),
                             "weight": np.ones(600, np.float32)}), log)
    short = ["--set", "svd.rank=4", "--set", "svd.block_size=4", "--set", "svd.max_blocks=2", "--set", "svd.tol=1e-30",
             "--set", "objectives.eq1.lambda=1", "--set", "objectives.eq2.lambda=1", "--set", "objectives.cosine=null",
             "--set", "evaluation.holdout=none", "--set", "audit.enabled=false", "--set", "report.enabled=false",
             "--set", "neighbours.top_n=5"]
    r = mfsim("run", "conf/default.yaml", "--input", str(log), "--output", str(tmp_path / "o"), *short)
    assert r.returncode == 2 and "svd: not converged after 2 blocks" in r.stderr and "nothing published" in r.stderr
    assert not [p for p in (tmp_path / "o").iterdir() if not p.name.startswith(".")]
    r = mfsim("run", "conf/default.yaml", "--input", str(log), "--output", str(tmp_path / "o"), *short,
              "--set", "svd.accept_unconverged=true")
    assert r.returncode == 0 and "published as svd.accept_unconverged asked" in r.stderr, r.stderr


def test_yaml_alias_bombs_and_cycles_are_one_error_in_moments(tmp_path):
    bomb, cycle = tmp_path / "bomb.yaml", tmp_path / "cycle.yaml"
    bomb.write_text(ALIAS_BOMB)
    cycle.write_text("a: &a\n  b: *a\n")
    for path, pattern in ((bomb, "expands to more than 100,000 values through its aliases"),
                          (cycle, "an alias refers to the mapping or list that holds it")):
        t0 = time.perf_counter()
        r = mfsim("run", str(path), "--input", "x")
        assert r.returncode == 2 and pattern in r.stderr and time.perf_counter() - t0 < 10, r.stderr


def test_odd_data_is_one_clear_line_or_read_whole(tmp_path):
    """A year-9999 timestamp with a time window; a Hive-style part without the .parquet suffix beside suffixed
    ones (read: it is Parquet); a text file beside them (named in a warning)."""
    ts = pa.array([dt.datetime(2026, 1, 1), dt.datetime(9999, 12, 31, 23, 59, 59, 999999)], pa.timestamp("us", "UTC"))
    odd = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [1, 2], "weight": [1.0, 1.0], "ts": ts}), odd)
    r = mfsim("run", "conf/default.yaml", "--input", str(odd), "--output", str(tmp_path / "o"),
              "--set", "ingest.window_days=30")
    assert r.returncode == 2 and "holds a timestamp at the end of what dates can hold (year 9999)" in r.stderr
    huge = tmp_path / "huge.parquet"  # one weight of 1e30: its square overflows float32
    pq.write_table(pa.table({"user_id": [1, 2, 3], "item_id": [1, 2, 3], "weight": [1.0, 1e30, 1.0]}), huge)
    r = mfsim("run", "conf/default.yaml", "--input", str(huge), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "holds weights up to 1e+30" in r.stderr and "rescale the weights" in r.stderr
    logdir = tmp_path / "hive"
    logdir.mkdir()
    rng = np.random.default_rng(1)
    for name in ("part-0.parquet", "000001_0"):
        pq.write_table(pa.table({"user_id": rng.integers(0, 30, 200), "item_id": rng.integers(0, 20, 200),
                                 "weight": np.ones(200, np.float32)}), logdir / name)
    (logdir / "notes.txt").write_text("not data\n")
    r = mfsim("run", "conf/default.yaml", "--input", str(logdir), "--output", str(tmp_path / "o"), "--run-id", "h",
              "--set", "svd.rank=4", "--set", "neighbours.top_n=5", "--set", "evaluation.holdout=none",
              "--set", "objectives.eq1.lambda=1", "--set", "objectives.eq2.lambda=1", "--set", "objectives.cosine=null",
              "--set", "audit.enabled=false", "--set", "report.enabled=false")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "o" / "h" / "_manifest.json").read_text())
    assert sorted(Path(f["path"]).name for f in manifest["input"]["files"]) == ["000001_0", "part-0.parquet"]
    assert "1 file(s) that are not Parquet are not part of the log" in r.stderr and "notes.txt" in r.stderr


@pytest.mark.parametrize("cmd", [["run"], ["simulate"], ["bench", "ingest"]])
def test_help_has_an_example(cmd):
    r = mfsim(*cmd, "--help")
    assert r.returncode == 0 and "Example: mfsim" in r.stdout
