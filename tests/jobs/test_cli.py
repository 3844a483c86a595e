"""The command line end to end: exit codes, one error line, nothing published on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_done_when_command_on_ml100k(tmp_path):
    data = shared_dataset("ml-100k")
    r = mfsim("run", "conf/default.yaml", "--input", str(data), "--output", str(tmp_path), "--run-id", "t1",
              "--set", "cluster.dashboard_address=null")
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


@pytest.mark.parametrize("cmd", [["run"], ["simulate"], ["bench", "ingest"]])
def test_help_has_an_example(cmd):
    r = mfsim(*cmd, "--help")
    assert r.returncode == 0 and "Example: mfsim" in r.stdout
