"""Faults of the driver and of the output root, with real processes through the real command line.

The driver SIGKILLed during ingest, during neighbours and between writing and publishing (the
``MFSIM_FAULT_BEFORE_PUBLISH`` hook of ``RunWriter.publish``), and SIGTERMed during neighbours; two
runs at once on one root; output roots that cannot be written or fill up mid-write; a Parquet log
with a corrupt column chunk; JSON logs. Every run is the tiny QUICK one (about 6 s); every
subprocess is ended by its pid in a ``finally``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

MFSIM = str(Path(sys.executable).parent / "mfsim")
REPO = Path(__file__).resolve().parents[2]
# a small, fast run: rank 4, short lists, no held-out fit, no audit, no report, one worker
QUICK = ["--set", "objectives.eq1.lambda=10", "--set", "objectives.eq2.lambda=10", "--set", "objectives.cosine=null",
         "--set", "svd.rank=4", "--set", "neighbours.top_n=5", "--set", "evaluation.holdout=none",
         "--set", "audit.enabled=false", "--set", "report.enabled=false", "--set", "cluster.n_workers=1"]
# a worker of the embedded cluster watches its parent through a pipe and exits at once when the
# driver dies (distributed's AsyncProcess); 30 s leaves room for a slow machine, and is still far
# below the minutes an orphaned worker would hold memory for
WORKERS_GONE_S = 30.0


def mfsim(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([MFSIM, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def run_args(out: Path, run_id: str, log: Path, *extra: str) -> list[str]:
    """A small run whose stages run on the embedded cluster's workers (``cluster.small_data_here=false``: a log this
    small would otherwise run in the driver alone, and the kill tests must see worker processes go)."""
    return ["run", "conf/default.yaml", "--input", str(log), "--output", str(out), "--run-id", run_id, *QUICK,
            "--set", "cluster.small_data_here=false", *extra]


# -- processes ------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(ppid, state, start time) of ``pid`` from /proc, None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ..., starttime is field 22
    return int(fields[1]), fields[0], fields[19]


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (children, their children, ...), pid -> start time."""
    children: dict[int, list[int]] = {}
    starts = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
            starts[int(entry)] = st[2]
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = starts[child]
                todo.append(child)
    return found


def alive(pid: int, start: str) -> bool:
    """The process ``pid`` that started at ``start`` still runs (a zombie does not: init here may not reap)."""
    st = _proc_stat(pid)
    return st is not None and st[2] == start and st[1] != "Z"


class Driver:
    """``mfsim ARGS`` as a subprocess: its stderr read line by line in a thread, its descendants collected
    at every line (the embedded cluster's worker processes), so they are known after the driver dies."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([MFSIM, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     cwd=REPO, env=env)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self.workers: dict[int, str] = {}
        self._eof = False
        self.signalled_at: float | None = None
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.collect()
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def collect(self) -> None:
        if self.proc.poll() is None:
            self.workers.update(descendants(self.pid))

    def wait_for(self, text: str, timeout: float = 90) -> None:
        """Until a stderr line contains ``text``; fails with the lines so far if the run ends first."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._eof or any(text in ln for ln in self.lines), timeout)
            if not ok or not any(text in ln for ln in self.lines):
                pytest.fail(f"no line with {text!r}; stderr so far:\n" + "\n".join(self.lines))

    def signal(self, sig: int) -> None:
        self.collect()
        self.signalled_at = time.monotonic()
        os.kill(self.pid, sig)

    def finish(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def workers_gone_after(self, limit_s: float = WORKERS_GONE_S) -> float:
        """Seconds from the signal (or from now) until every collected descendant is gone; fails after ``limit_s``."""
        t0 = self.signalled_at or time.monotonic()
        while any(alive(p, s) for p, s in self.workers.items()):
            if time.monotonic() - t0 > limit_s:
                left = [p for p, s in self.workers.items() if alive(p, s)]
                pytest.fail(f"processes {left} of driver {self.pid} still run {limit_s:g} s after it died")
            time.sleep(0.1)
        return time.monotonic() - t0

    def close(self) -> None:
        """Kill the driver (by pid) if it still runs, and any of its processes that outlived it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for pid, start in self.workers.items():
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)


# -- the output root --------------------------------------------------------------------------------
def tree_hashes(top: Path) -> dict[str, str]:
    """sha256 of every file under ``top``, by relative path."""
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(top.rglob("*")) if p.is_file()}


def visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".mfsim")


def state(root: Path, run_id: str) -> dict:
    return json.loads((root / ".mfsim" / "runs" / f"{run_id}.json").read_text())


def runs_json(root: Path) -> dict[str, dict]:
    r = mfsim("runs", "--output", str(root), "--format", "json")
    assert r.returncode == 0, r.stderr
    return {row["run_id"]: row for row in json.loads(r.stdout)}


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def assert_one_clean_error(text: str) -> str:
    """Exactly one ``error:`` line, no traceback (nor logging's own "--- Logging error ---"); returns it."""
    errors = error_lines(text)
    assert len(errors) == 1, text
    assert "Traceback" not in text and "Logging error" not in text, text
    return errors[0]


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (root only; skips with the reason otherwise), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def log_file(tmp_path_factory) -> Path:
    """60 users x 40 items, 900 interactions, each (user, item) pair once."""
    rng = np.random.default_rng(3)
    pairs = rng.choice(60 * 40, size=900, replace=False)
    df = pd.DataFrame({"user_id": pairs // 40, "item_id": pairs % 40, "weight": np.ones(900, np.float32)})
    path = tmp_path_factory.mktemp("log") / "log.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, log_file) -> SimpleNamespace:
    """An output root holding one published run, ``earlier``, made with ``--log-format json``.

    The fault tests copy this root and check that the copy's ``earlier`` stays byte for byte."""
    root = tmp_path_factory.mktemp("earlier") / "runs"
    r = mfsim(*run_args(root, "earlier", log_file), "--log-format", "json")
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(root=root, stderr=r.stderr)


def root_with_earlier(earlier: SimpleNamespace, where: Path) -> Path:
    out = where / "runs"
    shutil.copytree(earlier.root, out, symlinks=True)
    return out


# -- 1. the driver killed -----------------------------------------------------------------------------
@pytest.mark.parametrize("phase", ["ingest", "neighbours", "before_publish"])
def test_driver_sigkilled_leaves_nothing_visible_and_the_rerun_cleans_up(phase, tmp_path, log_file, earlier):
    out = root_with_earlier(earlier, tmp_path)
    before, latest = tree_hashes(out / "earlier"), (out / "LATEST").read_bytes()
    env = {**os.environ, "MFSIM_FAULT_BEFORE_PUBLISH": "1"} if phase == "before_publish" else None
    d = Driver(*run_args(out, "k", log_file), env=env)
    try:
        if phase == "before_publish":
            d.wait_for("stage neighbours: start")  # the workers are up: collect them before the run kills itself
        else:
            d.wait_for(f"stage {phase}: start")
            d.signal(signal.SIGKILL)
        assert d.finish() == -signal.SIGKILL, d.stderr
        gone_s = d.workers_gone_after()
    finally:
        d.close()
    assert d.workers, "no worker process was seen: the check below would prove nothing"
    if phase == "before_publish":
        assert "stage neighbours: done" in d.stderr and "succeeded" not in d.stderr
    else:
        assert f"stage {phase}: done" not in d.stderr  # the kill landed inside the stage

    # nothing visible, LATEST and the earlier run untouched; the hidden directory of the dead run stays
    assert visible(out) == ["LATEST", "earlier"]
    assert (out / "LATEST").read_bytes() == latest and tree_hashes(out / "earlier") == before
    left = hidden(out)
    assert len(left) == 1 and left[0].startswith(f".k.tmp-{d.pid}-"), left
    if phase == "before_publish":  # complete, fsynced, and killed just before the rename
        assert json.loads((out / left[0] / "_manifest.json").read_text())["status"] == "succeeded"
    listed = runs_json(out)
    assert listed["k"]["state"] == "lost" and listed["k"]["pid"] == d.pid and listed["k"]["run_dir"] is None
    assert listed["earlier"]["state"] == "succeeded"

    # the next run on the root (the same id again) removes the stale directory, with a log line, and publishes
    r = mfsim(*run_args(out, "k", log_file))
    assert r.returncode == 0, r.stderr
    assert f"removed stale directory {out / left[0]} of run k: its process (pid {d.pid}) is gone" in r.stderr
    assert hidden(out) == [] and visible(out) == ["LATEST", "earlier", "k"]
    assert (out / "LATEST").read_text().strip() == "k" and tree_hashes(out / "earlier") == before
    assert state(out, "k")["state"] == "succeeded"
    print(f"{phase}: {len(d.workers)} processes below the driver, gone {gone_s:.2f}s after the kill; left {left[0]}")


def test_driver_sigterm_removes_its_temporary_directory_at_once(tmp_path, log_file, earlier):
    out = root_with_earlier(earlier, tmp_path)
    before, latest = tree_hashes(out / "earlier"), (out / "LATEST").read_bytes()
    d = Driver(*run_args(out, "t", log_file))
    try:
        d.wait_for("stage neighbours: start")
        assert len(hidden(out)) == 1  # the run's temporary directory, while it runs
        d.signal(signal.SIGTERM)
        rc = d.finish()
        exit_s = time.monotonic() - d.signalled_at
        gone_s = d.workers_gone_after()
    finally:
        d.close()
    assert rc == 128 + signal.SIGTERM, d.stderr  # the CLI's handler: sys.exit(128 + signum)
    assert d.workers
    assert "stopped by SIGTERM" in assert_one_clean_error(d.stderr)  # one line, no cluster tracebacks
    # no later run needed: the hidden directory is gone the moment the process is
    assert hidden(out) == [] and visible(out) == ["LATEST", "earlier"]
    assert (out / "LATEST").read_bytes() == latest and tree_hashes(out / "earlier") == before
    assert "stage neighbours: done" not in d.stderr
    last = [ln for ln in d.lines if " mfsim.job: " in ln][-1]  # the run's last log line
    assert "run t failed after" in last and "nothing published; LATEST unchanged" in last, d.stderr
    assert "Traceback" not in d.stderr
    st = state(out, "t")
    assert st["state"] == "failed" and st["error"] == "interrupted"
    r = mfsim("status", "t", "--output", str(out))
    assert r.returncode == 1 and "failed" in r.stdout and "error: interrupted" in r.stdout
    print(f"SIGTERM: exit {rc} {exit_s:.2f}s after the signal, workers gone {gone_s:.2f}s after it")


# -- 2. two runs at once on one root ------------------------------------------------------------------
def _readable_run(run_dir: Path, run_id: str) -> None:
    m = json.loads((run_dir / "_manifest.json").read_text())
    assert m["run_id"] == run_id and m["status"] == "succeeded" and m["nnz"] == 900
    files = sorted(run_dir.rglob("*.parquet"))
    assert len(files) > 10
    for f in files:
        assert pq.read_table(f).num_rows > 0, f


def test_two_runs_of_one_id_at_once_one_publishes(tmp_path, log_file):
    out = tmp_path / "runs"
    drivers = [Driver(*run_args(out, "same", log_file)) for _ in range(2)]
    try:
        rcs = [d.finish() for d in drivers]
    finally:
        for d in drivers:
            d.close()
    assert sorted(rcs) == [0, 2], [d.stderr for d in drivers]
    winner, loser = drivers[rcs.index(0)], drivers[rcs.index(2)]
    line = assert_one_clean_error(loser.stderr)
    assert f"run {out / 'same'} already exists" in line
    assert visible(out) == ["LATEST", "same"] and hidden(out) == []
    _readable_run(out / "same", "same")
    st = state(out, "same")
    assert st["state"] == "succeeded" and st["pid"] == winner.pid
    print("same id:", "lost at the final rename" if "at the same time" in line else "refused before running")


def test_two_runs_of_different_ids_at_once_both_publish(tmp_path, log_file):
    out = tmp_path / "runs"
    drivers = [Driver(*run_args(out, run_id, log_file)) for run_id in ("x1", "x2")]
    try:
        rcs = [d.finish() for d in drivers]
    finally:
        for d in drivers:
            d.close()
    assert rcs == [0, 0], [d.stderr for d in drivers]
    assert visible(out) == ["LATEST", "x1", "x2"] and hidden(out) == []
    for run_id in ("x1", "x2"):
        _readable_run(out / run_id, run_id)
        assert state(out, run_id)["state"] == "succeeded"
    assert (out / "LATEST").read_text().strip() in ("x1", "x2")


# -- 3. an output root that cannot be written, or fills up ---------------------------------------------
@pytest.mark.parametrize("kind", ["under_a_file", "a_file", "read_only"])
def test_an_output_root_that_cannot_be_written_is_one_error_exit_2(kind, tmp_path, log_file, earlier):
    if kind == "read_only":
        with tmpfs(tmp_path / "ro", "4m") as mnt:
            out = root_with_earlier(earlier, mnt)
            before = tree_hashes(out)
            r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
            res = mfsim(*run_args(out, "n", log_file))
            assert tree_hashes(out) == before and visible(out) == ["LATEST", "earlier"] and hidden(out) == []
        expected = "Read-only file system (EROFS)"
    else:
        blocker = tmp_path / "somefile"
        blocker.write_bytes(b"not a directory\n")
        out = blocker / "runs" if kind == "under_a_file" else blocker
        res = mfsim(*run_args(out, "n", log_file))
        assert blocker.read_bytes() == b"not a directory\n" and sorted(os.listdir(tmp_path)) == ["somefile"]
        expected = "(ENOTDIR)" if kind == "under_a_file" else "(EEXIST)"
    assert res.returncode == 2, res.stderr  # a bad --output, like any bad config
    line = assert_one_clean_error(res.stderr)
    assert expected in line and str(out) in line, line
    assert "started local Dask cluster" not in res.stderr  # refused before a cluster starts


def test_a_disk_that_fills_up_mid_write_is_one_error_exit_1(tmp_path, log_file, earlier):
    with tmpfs(tmp_path / "small", "1m") as mnt:
        out = root_with_earlier(earlier, mnt)
        before, latest = tree_hashes(out / "earlier"), (out / "LATEST").read_bytes()
        st = os.statvfs(mnt)
        # leave 96 KiB: room for the state file, the log and the id tables, not for the whole run (~180 KiB here)
        (mnt / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 96 * 1024))
        r = mfsim(*run_args(out, "full", log_file))
        assert r.returncode == 1, r.stderr  # a run-time failure (README: "a full disk")
        line = assert_one_clean_error(r.stderr)
        assert "No space left on device (ENOSPC)" in line and "/.full.tmp-" in line, line
        assert "stage ingest: done" in r.stderr  # it failed mid-write, after the first tables were out
        assert visible(out) == ["LATEST", "earlier"] and hidden(out) == []
        assert (out / "LATEST").read_bytes() == latest and tree_hashes(out / "earlier") == before
        s = state(out, "full")
        assert s["state"] == "failed" and "ENOSPC" in s["error"]


# -- 4. a corrupt column chunk ---------------------------------------------------------------------------
def test_a_corrupt_column_chunk_is_one_error_naming_the_file(tmp_path, log_file, earlier):
    bad = tmp_path / "corrupt.parquet"
    shutil.copy(log_file, bad)
    col = pq.ParquetFile(bad).metadata.row_group(0).column(0)
    assert col.path_in_schema == "user_id"
    # the chunk: [dictionary page] data page(s), total_compressed_size bytes; write past the data page's header
    end = (col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset) + col.total_compressed_size
    start = col.data_page_offset + 32
    assert end - start > 64
    with open(bad, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * min(200, end - start - 16))
    assert pq.ParquetFile(bad).metadata.num_rows == 900  # the footer is fine: only decoding the chunk fails
    out = root_with_earlier(earlier, tmp_path)
    before = tree_hashes(out)
    r = mfsim(*run_args(out, "c", bad))
    assert r.returncode == 2, r.stderr
    line = assert_one_clean_error(r.stderr)
    assert str(bad) in line and "corrupt" in line and "user_id" in line, line
    assert "stage ingest: start" in r.stderr  # it surfaced on a worker, during ingest, not in the client's checks
    assert visible(out) == ["LATEST", "earlier"] and hidden(out) == []
    assert {k: v for k, v in tree_hashes(out).items() if not k.startswith(".mfsim")} == \
        {k: v for k, v in before.items() if not k.startswith(".mfsim")}
    assert state(out, "c")["state"] == "failed"


# -- 5. JSON logs ------------------------------------------------------------------------------------------
def test_json_log_lines_and_the_last_line_of_a_run(earlier):
    lines = [ln for ln in earlier.stderr.splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line on stderr is one JSON log record
    for rec in records:
        assert {"time", "level", "logger", "message"} <= set(rec), rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"]), rec
    run_dir = earlier.root / "earlier"
    last = records[-1]
    m = re.fullmatch(rf"run earlier succeeded: {re.escape(str(run_dir))} in (\d+\.\d)s; LATEST moved to earlier",
                     last["message"])
    assert m and float(m[1]) > 0 and last["logger"] == "mfsim.job", last
    published = (run_dir / "_log.txt").read_text().splitlines()
    assert [json.loads(ln)["message"] for ln in published][0].startswith("run earlier: start")
    assert any("stage neighbours: done" in ln for ln in published)
    assert set(published) <= set(lines)  # the run's own lines, as they went to stderr
