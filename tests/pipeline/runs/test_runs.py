"""The output root's bookkeeping: atomic publishing, run ids, run states, cleanup, the lock, retention.

Faults are real where a test can make them real: other processes (spawned with subprocess, killed
with ``os._exit`` at a chosen point), a full or read-only tmpfs (mounted when the machine allows),
planted symlinks. Expected values are written out by hand.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs import posix as runs
from mfsim.pipeline.runs import records
from mfsim.pipeline.runs.lock import LockHeld, OutputLock
from mfsim.pipeline.runs.posix import PosixRoot, PosixRunWriter
from mfsim.pipeline.runs.roots import open_root, read_manifest, resolve_run

HOST = socket.gethostname()
STATE_KEYS = {"run_id", "state", "host", "pid", "started_at", "heartbeat_at", "finished_at", "error", "counts",
              "run_dir"}


def _publish(root, run_id, value=1, **options):
    move_latest = options.pop("move_latest", "always")
    with PosixRunWriter(root, run_id, **options) as run:
        with run.stage("work"):
            run.write_table("t/x.parquet", pa.table({"x": [value]}))
        return run.publish({"counts": {"n": value}}, move_latest=move_latest)


def _visible(root):
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def _hidden(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def _tree_bytes(top):
    """Every file under ``top`` with its bytes: a byte-for-byte fingerprint of a run."""
    return {p.relative_to(top).as_posix(): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def _state(root, run_id):
    return json.loads((root / ".mfsim" / "runs" / f"{run_id}.json").read_text())


def _write_state(root, run_id, **fields):
    """A state file written by hand, as another process would have left it."""
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    record = {"run_id": run_id, "state": "running", "host": HOST, "pid": os.getpid(), "started_at": now,
              "heartbeat_at": now, "finished_at": None, "error": None, "counts": None, "run_dir": None}
    record.update(fields)
    path = root / ".mfsim" / "runs" / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _dead_pid():
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _ago(seconds):
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)).isoformat()


def _python(code, *args):
    """Run ``code`` in a fresh interpreter; returns the finished process (stdout and stderr as text)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


# -- publishing ---------------------------------------------------------------------------------
def test_publish_writes_manifest_last_and_latest(tmp_path):
    run_dir = _publish(tmp_path, "r1")
    assert run_dir == tmp_path / "r1"
    m = read_manifest(run_dir)
    assert m["run_id"] == "r1" and m["status"] == "succeeded" and "work" in m["timings"]
    assert m["versions"]["numpy"] != "not installed"
    assert open_root(tmp_path).read_latest() == "r1"
    _publish(tmp_path, "r2", 2)
    assert open_root(tmp_path).read_latest() == "r2"
    assert _visible(tmp_path) == ["LATEST", "r1", "r2"]


@pytest.mark.parametrize("where", ["before_rename", "inside_stage"])
def test_crash_leaves_nothing_visible(tmp_path, monkeypatch, where):
    _publish(tmp_path, "good")
    before = sorted(p.name for p in tmp_path.iterdir())

    class Crash(Exception):
        pass

    if where == "before_rename":
        def boom(*a, **k):
            raise Crash("killed between writing and renaming")
        monkeypatch.setattr(runs.os, "rename", boom)
        with pytest.raises(Crash):
            _publish(tmp_path, "bad")
    else:
        with pytest.raises(Crash):
            with PosixRunWriter(tmp_path, "bad") as run:
                run.write_table("a.parquet", pa.table({"x": [1]}))
                raise Crash("stage failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run, no temporary directory
    assert open_root(tmp_path).read_latest() == "good"
    assert json.loads((tmp_path / "good" / "_manifest.json").read_text())["counts"] == {"n": 1}


def test_manifest_written_last(tmp_path, monkeypatch):
    order = []
    real = PosixRunWriter.write_json

    def spy(self, rel, obj):
        order.append(sorted(p.relative_to(self.tmp).as_posix() for p in self.tmp.rglob("*") if p.is_file()))
        return real(self, rel, obj)

    monkeypatch.setattr(PosixRunWriter, "write_json", spy)
    _publish(tmp_path, "r")
    assert order == [["t/x.parquet"]]


def test_write_bytes_and_json_land_inside_the_run(tmp_path):
    with PosixRunWriter(tmp_path, "r") as run:
        run.write_bytes("report/a.png", b"\x89PNG")
        run.write_json("extra/x.json", {"a": 1})
        with pytest.raises(ValueError, match="inside the run"):
            run.write_bytes("../escape.bin", b"x")
        run.publish({})
    assert (tmp_path / "r" / "report" / "a.png").read_bytes() == b"\x89PNG"
    assert json.loads((tmp_path / "r" / "extra" / "x.json").read_text()) == {"a": 1}
    assert not (tmp_path / "escape.bin").exists()


# -- run ids ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "", "a" * 200, "x y", "abc\n", "abc\r", "\nabc"])
def test_run_id_validated(tmp_path, bad):
    with pytest.raises(MfsimError, match="run id"):
        PosixRunWriter(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("reserved", ["LATEST", "latest", "Latest", ".mfsim"])
def test_reserved_names_are_not_run_ids(tmp_path, reserved):
    with pytest.raises(MfsimError, match="run id"):
        records.validate_run_id(reserved)
    with pytest.raises(MfsimError, match="reserved"):
        PosixRunWriter(tmp_path, reserved)
    assert list(tmp_path.iterdir()) == []


def test_existing_run_is_never_overwritten(tmp_path):
    _publish(tmp_path, "same")
    with pytest.raises(MfsimError, match="already exists"):
        PosixRunWriter(tmp_path, "same")
    assert read_manifest(tmp_path / "same")["counts"] == {"n": 1}


def test_new_run_ids_are_unique_and_valid():
    ids = {records.new_run_id() for _ in range(50)}
    assert len(ids) == 50
    for i in ids:
        assert records.validate_run_id(i) == i
    assert not any(os.sep in i for i in ids)


def test_latest_never_follows_a_planted_symlink(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("not yours\n")
    planted = root / f".LATEST.tmp-{os.getpid()}"  # the name the old code wrote LATEST through
    planted.symlink_to(precious)
    _publish(root, "r1")
    assert precious.read_text() == "not yours\n"
    assert planted.is_symlink() and os.readlink(planted) == str(precious)
    assert (root / "LATEST").read_text() == "r1\n" and not (root / "LATEST").is_symlink()


# -- run states ---------------------------------------------------------------------------------
def test_state_running_then_succeeded(tmp_path):
    with PosixRunWriter(tmp_path, "r", heartbeat_s=60) as run:
        s = _state(tmp_path, "r")
        assert set(s) == STATE_KEYS
        assert (s["run_id"], s["state"], s["host"], s["pid"]) == ("r", "running", HOST, os.getpid())
        assert s["finished_at"] is None and s["error"] is None and s["counts"] is None
        assert s["run_dir"] == str(tmp_path / "r")
        assert dt.datetime.fromisoformat(s["started_at"]).utcoffset() == dt.timedelta(0)
        run.set_counts({"n_users": 3, "n_items": 2, "nnz": 4, "dropped": 1})
        assert _state(tmp_path, "r")["counts"] == {"n_users": 3, "n_items": 2, "nnz": 4}
        run.write_table("x.parquet", pa.table({"x": [1]}))
        run.publish({})
    s = _state(tmp_path, "r")
    assert s["state"] == "succeeded" and s["error"] is None and s["counts"] == {"n_users": 3, "n_items": 2, "nnz": 4}
    assert dt.datetime.fromisoformat(s["finished_at"]) >= dt.datetime.fromisoformat(s["started_at"])
    st = open_root(tmp_path).run_status("r")
    assert (st.state, st.n_users, st.n_items, st.nnz, st.run_dir) == ("succeeded", 3, 2, 4, str(tmp_path / "r"))
    assert st.duration_s >= 0


def test_a_running_runs_stage_and_dashboard_are_in_its_status(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    mfsim_bin = str(Path(sys.executable).parent / "mfsim")
    with PosixRunWriter(tmp_path, "r", heartbeat_s=60) as run:
        run.set_stage("neighbours", "4/9")
        run.set_dashboard("http://127.0.0.1:8787/status")
        st = open_root(tmp_path).run_status("r")
        assert (st.state, st.stage, st.dashboard) == ("running", "neighbours (4/9)", "http://127.0.0.1:8787/status")
        shown = subprocess.run([mfsim_bin, "status", "r", "--output", str(tmp_path)], capture_output=True, text=True)
        assert shown.returncode == 3 and "stage: neighbours (4/9)" in shown.stdout
        assert "dashboard: http://127.0.0.1:8787/status" in shown.stdout
        run.write_table("x.parquet", pa.table({"x": [1]}))
        run.publish({})
    st = open_root(tmp_path).run_status("r")
    assert (st.state, st.stage, st.dashboard) == ("succeeded", None, None)


def test_counts_come_from_the_manifest_when_not_set(tmp_path):
    with PosixRunWriter(tmp_path, "r") as run:
        run.publish({"counts": {"n_users": 5, "n_items": 6, "nnz": 7, "rows_dropped": {}}})
    assert _state(tmp_path, "r")["counts"] == {"n_users": 5, "n_items": 6, "nnz": 7}


@pytest.mark.parametrize("exc, line", [
    (ValueError("boom\nsecond line"), "ValueError: boom"),
    (MfsimError("column 'user' is missing in a.parquet"), "column 'user' is missing in a.parquet"),
    (KeyboardInterrupt(), "interrupted"),
    (SystemExit(143), "interrupted"),
])
def test_state_failed_with_the_error_line(tmp_path, exc, line):
    with pytest.raises(type(exc)):
        with PosixRunWriter(tmp_path, "bad") as run:
            run.write_table("x.parquet", pa.table({"x": [1]}))
            raise exc
    s = _state(tmp_path, "bad")
    assert (s["state"], s["error"]) == ("failed", line)
    assert s["finished_at"] is not None
    assert _visible(tmp_path) == [] and _hidden(tmp_path) == [".mfsim"]
    assert open_root(tmp_path).run_status("bad").state == "failed"


def test_heartbeat_advances_and_stops(tmp_path):
    with PosixRunWriter(tmp_path, "r", heartbeat_s=0.05) as run:
        first = _state(tmp_path, "r")["heartbeat_at"]
        deadline = time.monotonic() + 10
        while _state(tmp_path, "r")["heartbeat_at"] == first and time.monotonic() < deadline:
            time.sleep(0.02)
        later = _state(tmp_path, "r")["heartbeat_at"]
        assert dt.datetime.fromisoformat(later) > dt.datetime.fromisoformat(first)
        assert _state(tmp_path, "r")["state"] == "running"
        thread = run._thread
    assert not thread.is_alive()


def test_lost_when_the_pid_is_gone(tmp_path):
    dead = _dead_pid()
    _write_state(tmp_path, "dead", pid=dead)
    _write_state(tmp_path, "alive", pid=os.getpid())
    _write_state(tmp_path, "elsewhere", host=HOST + "-other", pid=dead)  # a pid on another host means nothing here
    assert open_root(tmp_path).run_status("dead").state == "lost"
    assert open_root(tmp_path).run_status("dead", lost_after_s=1e9).state == "lost"
    assert open_root(tmp_path).run_status("alive").state == "running"
    assert open_root(tmp_path).run_status("elsewhere").state == "running"


def test_lost_when_the_heartbeat_is_stale(tmp_path):
    _write_state(tmp_path, "r", pid=os.getpid(), started_at=_ago(400), heartbeat_at=_ago(300))
    st = open_root(tmp_path).run_status("r")
    assert st.state == "lost"
    assert st.duration_s == pytest.approx(100.0, abs=0.5)  # lost: from the start to the last heartbeat
    assert open_root(tmp_path).run_status("r", lost_after_s=600).state == "running"


def test_list_runs_sorted_with_older_runs_from_their_manifest(tmp_path):
    _write_state(tmp_path, "b", state="failed", started_at="2026-01-01T10:00:00+00:00",
                 finished_at="2026-01-01T10:00:30+00:00", error="boom")
    _write_state(tmp_path, "a", state="succeeded", started_at="2026-01-01T11:00:00+00:00",
                 finished_at="2026-01-01T11:02:00+00:00", counts={"n_users": 1, "n_items": 2, "nnz": 3})
    _write_state(tmp_path, "c", state="failed", started_at="2026-01-01T10:00:00+00:00",
                 finished_at="2026-01-01T10:00:01+00:00", error="x")
    old = tmp_path / "old"  # published by a version without state files
    old.mkdir()
    (old / "_manifest.json").write_text(json.dumps({
        "run_id": "old", "started_at": "2026-01-01T09:00:00+00:00", "finished_at": "2026-01-01T09:01:00+00:00",
        "counts": {"n_users": 7, "n_items": 8, "nnz": 9, "dropped": {}}, "status": "succeeded"}))
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "a").mkdir()  # a recorded succeeded run is listed so while its folder and manifest are there
    (tmp_path / "a" / "_manifest.json").write_text(json.dumps({"run_id": "a", "status": "succeeded"}))
    got = open_root(tmp_path).list_runs()
    assert [(s.run_id, s.state) for s in got] == [("old", "succeeded"), ("b", "failed"), ("c", "failed"),
                                                  ("a", "succeeded")]
    o, b, c, a = got
    assert (o.n_users, o.n_items, o.nnz, o.duration_s, o.host, o.pid) == (7, 8, 9, 60.0, None, None)
    assert o.run_dir == str(old)
    assert (b.error, b.duration_s, b.run_dir) == ("boom", 30.0, None)
    assert (a.n_users, a.n_items, a.nnz, a.duration_s) == (1, 2, 3, 120.0)
    assert open_root(tmp_path).run_status("old").nnz == 9


def test_unknown_run_and_missing_root(tmp_path):
    _publish(tmp_path, "r1")
    with pytest.raises(MfsimError, match=f"no run 'nope' in the output root {tmp_path}"):
        open_root(tmp_path).run_status("nope")
    with pytest.raises(MfsimError, match="does not exist"):
        open_root(tmp_path / "missing").list_runs()


# -- cleanup ------------------------------------------------------------------------------------
def test_stale_tmp_of_a_dead_pid_is_removed_with_a_log_line(tmp_path, caplog):
    _publish(tmp_path, "good")
    dead = _dead_pid()
    this_host = hashlib.sha256(HOST.encode()).hexdigest()[:6]
    other_host = "ffffff" if this_host != "ffffff" else "000000"
    stale = tmp_path / f".r1.tmp-{dead}-abcdef"
    mine = tmp_path / f".r2.tmp-{os.getpid()}-abcdef"
    foreign = tmp_path / f".r3.tmp-{dead}-{other_host}123456"  # made on another host: its pid means nothing here
    for d in (stale, mine, foreign):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "x.parquet").write_bytes(b"x" * 1000)
    with caplog.at_level(logging.INFO, logger="mfsim.runs"):
        with PosixRunWriter(tmp_path, "new") as run:
            assert not stale.exists() and mine.exists() and foreign.exists()
            run.publish({})
    removals = [r for r in caplog.records if r.name == "mfsim.runs" and "stale" in r.getMessage()]
    assert len(removals) == 1 and removals[0].levelno == logging.INFO
    assert str(stale) in removals[0].getMessage() and str(dead) in removals[0].getMessage()
    assert _visible(tmp_path) == ["LATEST", "good", "new"]


def test_kill_between_rename_and_latest(tmp_path):
    """The stated promise: the new run is visible and complete, LATEST still names the previous one,
    and the state says running until it goes lost."""
    _publish(tmp_path, "r1")
    proc = _python("""
        import os, sys
        import pyarrow as pa
        from mfsim.pipeline.runs import posix as runs
        runs.PosixRoot.write_latest = lambda *a, **k: os._exit(9)   # die right after the rename
        with runs.PosixRunWriter(sys.argv[1], "r2") as run:
            run.write_table("t/x.parquet", pa.table({"x": [2]}))
            run.publish({"counts": {"n": 2}})
    """, tmp_path)
    assert proc.returncode == 9, proc.stderr
    assert open_root(tmp_path).read_latest() == "r1"
    assert read_manifest(tmp_path / "r2")["counts"] == {"n": 2}
    assert pq.read_table(tmp_path / "r2" / "t" / "x.parquet").column("x").to_pylist() == [2]
    assert _state(tmp_path, "r2")["state"] == "running"
    assert open_root(tmp_path).run_status("r2").state == "lost"  # its pid is gone


# -- two runs at once ---------------------------------------------------------------------------
RACER = """
    import os, sys, time, pathlib
    import pyarrow as pa
    from mfsim.pipeline.errors import MfsimError
    from mfsim.pipeline.runs.posix import PosixRunWriter
    root, run_id, barrier, name = sys.argv[1:5]
    with PosixRunWriter(root, run_id) as run:
        run.write_table("who.parquet", pa.table({"who": [name]}))
        pathlib.Path(barrier, name).touch()
        deadline = time.monotonic() + 60
        while len(os.listdir(barrier)) < 2:   # both runs are written and about to publish
            if time.monotonic() > deadline:
                sys.exit("barrier timed out")
            time.sleep(0.005)
        try:
            run.publish({"who": name})
        except MfsimError as exc:
            print("LOST", exc, flush=True)
            sys.exit(3)
    print("WON", flush=True)
"""


def _race(tmp_path, ids):
    root, barrier = tmp_path / "out", tmp_path / "barrier"
    barrier.mkdir()
    procs = {name: subprocess.Popen([sys.executable, "-c", textwrap.dedent(RACER), str(root), run_id, str(barrier),
                                     name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, run_id in zip(("p1", "p2"), ids)}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[name] = (p.returncode, stdout + stderr, p.pid)
    return root, out


def test_same_run_id_at_once_exactly_one_wins(tmp_path):
    root, out = _race(tmp_path, ("same", "same"))
    codes = sorted(rc for rc, _, _ in out.values())
    assert codes == [0, 3], out
    winner = next(name for name, (rc, _, _) in out.items() if rc == 0)
    loser = next(name for name, (rc, _, _) in out.items() if rc == 3)
    assert "already exists" in out[loser][1] and "at the same time" in out[loser][1]
    assert _visible(root) == ["LATEST", "same"] and _hidden(root) == [".mfsim"]  # the loser's tmp is gone
    assert read_manifest(root / "same")["who"] == winner
    assert pq.read_table(root / "same" / "who.parquet").column("who").to_pylist() == [winner]
    s = _state(root, "same")
    assert (s["state"], s["pid"]) == ("succeeded", out[winner][2])


def test_different_run_ids_at_once_both_publish(tmp_path):
    root, out = _race(tmp_path, ("a", "b"))
    assert [rc for rc, _, _ in out.values()] == [0, 0], out
    assert _visible(root) == ["LATEST", "a", "b"] and _hidden(root) == [".mfsim"]
    for name, run_id in (("p1", "a"), ("p2", "b")):
        assert read_manifest(root / run_id)["who"] == name
        assert pq.read_table(root / run_id / "who.parquet").column("who").to_pylist() == [name]
    assert open_root(root).read_latest() in {"a", "b"}
    assert [(s.run_id, s.state) for s in sorted(open_root(root).list_runs(), key=lambda s: s.run_id)] == [
        ("a", "succeeded"), ("b", "succeeded")]


# -- write errors -------------------------------------------------------------------------------
def test_root_under_a_regular_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep\n")
    with pytest.raises(MfsimError, match=r"cannot create the output root .*file/out: Not a directory \(ENOTDIR\)"):
        with PosixRunWriter(f / "out", "r"):
            pass
    assert f.read_text() == "keep\n"


def test_root_is_a_regular_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep\n")
    with pytest.raises(MfsimError, match=r"output root .*file: File exists \(EEXIST\).*not a directory"):
        with PosixRunWriter(f, "r"):
            pass
    assert f.read_text() == "keep\n" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o500; the tmpfs tests cover root")
def test_unwritable_root(tmp_path):
    _publish(tmp_path, "good")
    before = _tree_bytes(tmp_path / "good")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(MfsimError, match=r"Permission denied \(EACCES\)"):
            _publish(tmp_path, "bad")
    finally:
        tmp_path.chmod(0o700)
    assert _visible(tmp_path) == ["LATEST", "good"] and _tree_bytes(tmp_path / "good") == before


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs, mounted for the test (needs root and a machine that allows it; skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _too_big(run, how):
    """Write about 3 MB that does not compress, through one of the writer's methods."""
    values = np.random.default_rng(0).random(400_000)
    if how == "table":
        run.write_table("big.parquet", pa.table({"x": values}))
    elif how == "parts":
        run.write_table_parts("big.parquet", (pa.table({"x": v}) for v in np.array_split(values, 4)))
    elif how == "bytes":
        run.write_bytes("report/big.png", values.tobytes())
    else:
        run.write_json("big.json", values.tolist())


@pytest.mark.parametrize("how", ["table", "parts", "bytes", "json"])
def test_disk_full_mid_write(small_fs, how):
    _publish(small_fs, "good")
    before, latest = _tree_bytes(small_fs / "good"), (small_fs / "LATEST").read_bytes()
    with pytest.raises(MfsimError, match=r"cannot write .*big.*: No space left on device \(ENOSPC\)") as info:
        with PosixRunWriter(small_fs, "big") as run:
            _too_big(run, how)
    assert "\n" not in str(info.value)
    assert _visible(small_fs) == ["LATEST", "good"] and _hidden(small_fs) == [".mfsim"]
    assert _tree_bytes(small_fs / "good") == before and (small_fs / "LATEST").read_bytes() == latest
    s = _state(small_fs, "big")
    assert s["state"] == "failed" and "No space left on device" in s["error"]


def test_read_only_filesystem(small_fs):
    _publish(small_fs, "good")
    before = _tree_bytes(small_fs / "good")
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
    with pytest.raises(MfsimError, match=r"Read-only file system \(EROFS\)"):
        _publish(small_fs, "bad")
    assert _visible(small_fs) == ["LATEST", "good"] and _tree_bytes(small_fs / "good") == before
    assert open_root(small_fs).read_latest() == "good"


def test_failed_latest_update_takes_the_run_back(tmp_path, monkeypatch):
    _publish(tmp_path, "good")
    before = _tree_bytes(tmp_path / "good")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PosixRoot, "write_latest", full)
    with pytest.raises(MfsimError, match=r"cannot update .*LATEST: No space left on device .*taken back"):
        _publish(tmp_path, "bad")
    assert _visible(tmp_path) == ["LATEST", "good"] and _hidden(tmp_path) == [".mfsim"]
    assert open_root(tmp_path).read_latest() == "good" and _tree_bytes(tmp_path / "good") == before
    assert _state(tmp_path, "bad")["state"] == "failed"


# -- replace (--force) and LATEST's direction -----------------------------------------------------
def test_replace_keeps_the_old_run_readable_until_the_swap(tmp_path, monkeypatch):
    _publish(tmp_path, "r", 1)
    old = _tree_bytes(tmp_path / "r")
    seen = []
    real_rename = os.rename

    def spy(src, dst):  # what a reader could find at each rename
        dirs = {p.name: _tree_bytes(p) for p in tmp_path.iterdir() if p.is_dir() and p.name != ".mfsim"}
        seen.append((os.path.basename(src), os.path.basename(dst), dirs))
        return real_rename(src, dst)

    with PosixRunWriter(tmp_path, "r", replace=True) as run:
        run.write_table("t/x.parquet", pa.table({"x": [2]}))
        assert _tree_bytes(tmp_path / "r") == old  # the old run is readable while the new one is built
        monkeypatch.setattr(runs.os, "rename", spy)
        run.publish({"counts": {"n": 2}})
        monkeypatch.undo()
    (a_src, a_dst, a_dirs), (b_src, b_dst, b_dirs) = seen
    assert a_src == "r" and a_dst.startswith(".r.old-") and a_dirs["r"] == old  # readable up to the swap
    assert b_src.startswith(".r.tmp-") and b_dst == "r" and "r" not in b_dirs
    assert b_dirs[a_dst] == old  # the old run is complete aside until the new one is in
    assert len(seen) == 2
    assert _visible(tmp_path) == ["LATEST", "r"] and _hidden(tmp_path) == [".mfsim"]
    assert read_manifest(tmp_path / "r")["counts"] == {"n": 2}
    assert pq.read_table(tmp_path / "r" / "t" / "x.parquet").column("x").to_pylist() == [2]
    assert [(s.run_id, s.state) for s in open_root(tmp_path).list_runs()] == [("r", "succeeded")]


def test_replace_that_fails_keeps_the_old_run_and_its_state(tmp_path):
    _publish(tmp_path, "r", 1)
    old, old_state = _tree_bytes(tmp_path / "r"), _state(tmp_path, "r")
    with pytest.raises(RuntimeError):
        with PosixRunWriter(tmp_path, "r", replace=True) as run:
            assert _state(tmp_path, "r")["state"] == "running" and run.tmp.is_dir()
            raise RuntimeError("stage failed")
    assert _tree_bytes(tmp_path / "r") == old and _state(tmp_path, "r") == old_state
    assert _visible(tmp_path) == ["LATEST", "r"] and _hidden(tmp_path) == [".mfsim"]


def test_crash_between_the_replace_renames_is_restored(tmp_path, caplog):
    _publish(tmp_path, "r", 1)
    old = _tree_bytes(tmp_path / "r")
    proc = _python("""
        import os, sys
        import pyarrow as pa
        from mfsim.pipeline.runs import posix as runs
        real = os.rename
        def rename(src, dst):
            real(src, dst)
            if ".old-" in os.fspath(dst):
                os._exit(9)   # die with the old run aside and the new one not yet in place
        os.rename = rename
        with runs.PosixRunWriter(sys.argv[1], "r", replace=True) as run:
            run.write_table("t/x.parquet", pa.table({"x": [2]}))
            run.publish({"counts": {"n": 2}})
    """, tmp_path)
    assert proc.returncode == 9, proc.stderr
    assert _visible(tmp_path) == ["LATEST"]
    hidden = _hidden(tmp_path)
    assert [h.split("-")[0] for h in hidden] == [".mfsim", ".r.old", ".r.tmp"]
    with caplog.at_level(logging.INFO, logger="mfsim.runs"):
        with PosixRunWriter(tmp_path, "next"):
            pass
    assert _tree_bytes(tmp_path / "r") == old
    assert _visible(tmp_path) == ["LATEST", "r"] and _hidden(tmp_path) == [".mfsim"]
    assert any("restored run r" in r.getMessage() for r in caplog.records)
    assert open_root(tmp_path).run_status("r").state == "succeeded"


def test_leftover_old_copy_after_the_swap_is_removed(tmp_path):
    _publish(tmp_path, "r", 2)
    new = _tree_bytes(tmp_path / "r")
    left = tmp_path / f".r.old-{_dead_pid()}-abcdef"  # a forced run died after swapping the new one in
    left.mkdir()
    (left / "_manifest.json").write_text("{}")
    with PosixRunWriter(tmp_path, "next"):
        pass
    assert not left.exists() and _tree_bytes(tmp_path / "r") == new


def test_if_newer_never_moves_latest_back(tmp_path):
    def publish(run_id, mode):
        with PosixRunWriter(tmp_path, run_id) as run:
            run.publish({}, move_latest=mode)
        return run.latest_moved

    assert publish("2026-01-05", "if_newer") is True  # no LATEST yet
    assert publish("2026-01-03", "if_newer") is False and open_root(tmp_path).read_latest() == "2026-01-05"
    assert publish("2026-01-07", "if_newer") is True and open_root(tmp_path).read_latest() == "2026-01-07"
    assert publish("2026-01-09", "never") is False and open_root(tmp_path).read_latest() == "2026-01-07"
    assert publish("2026-01-01", "always") is True and open_root(tmp_path).read_latest() == "2026-01-01"
    with pytest.raises(ValueError, match="move_latest"):
        with PosixRunWriter(tmp_path, "x") as run:
            run.publish({}, move_latest="sometimes")


def test_resolve_run_dir(tmp_path):
    _publish(tmp_path, "r1")
    _publish(tmp_path, "r2")
    assert resolve_run(tmp_path / "r1") == tmp_path / "r1"
    assert resolve_run(tmp_path / "LATEST") == tmp_path / "r2"
    with pytest.raises(MfsimError, match="is an output root, not a run"):
        resolve_run(tmp_path)
    with pytest.raises(MfsimError, match="neither a run directory"):
        resolve_run(tmp_path / "missing")
    open_root(tmp_path).write_latest("gone")
    with pytest.raises(MfsimError, match="names run 'gone'"):
        resolve_run(tmp_path / "LATEST")
    with pytest.raises(MfsimError, match="no run has succeeded"):
        resolve_run(tmp_path / "empty" / "LATEST")


# -- the lock -----------------------------------------------------------------------------------
def test_second_lock_gets_lock_held(tmp_path):
    with OutputLock(tmp_path) as first:
        held = json.loads((tmp_path / ".mfsim" / "lock").read_text())
        assert (held["host"], held["pid"]) == (HOST, os.getpid()) and first.holder == held
        with pytest.raises(LockHeld) as info:
            with OutputLock(tmp_path, timeout_s=0):
                pass
    err = info.value
    assert isinstance(err, MfsimError) and err.exit_code == 75
    assert f"pid {os.getpid()}" in str(err) and HOST in str(err) and held["started_at"] in str(err)
    assert str(tmp_path / ".mfsim" / "lock") in str(err)
    assert not (tmp_path / ".mfsim" / "lock").exists()  # released on exit


def test_lock_waits_for_the_holder(tmp_path):
    took, released = threading.Event(), threading.Event()

    def hold():
        with OutputLock(tmp_path):
            took.set()
            time.sleep(0.3)
        released.set()

    t = threading.Thread(target=hold)
    t.start()
    took.wait(5)
    t0 = time.monotonic()
    with OutputLock(tmp_path, timeout_s=10, poll_s=0.02) as second:
        waited = time.monotonic() - t0
        assert released.is_set() and second.holder is not None
    t.join()
    assert 0.15 < waited < 5


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _dead_pid()
    lock = tmp_path / ".mfsim" / "lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": HOST, "pid": dead, "started_at": "2026-01-01T00:00:00+00:00"}))
    with caplog.at_level(logging.WARNING, logger="mfsim.runs"):
        with OutputLock(tmp_path):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"pid {dead}" in warnings[0] and "stale" in warnings[0]


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    lock = tmp_path / ".mfsim" / "lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": HOST + "-other", "pid": _dead_pid(), "started_at": "x"}))
    with pytest.raises(LockHeld, match=f"host {HOST}-other"):
        with OutputLock(tmp_path):
            pass
    assert lock.exists()


def test_lock_removed_only_if_still_ours(tmp_path):
    lock = tmp_path / ".mfsim" / "lock"
    other = {"host": HOST + "-other", "pid": 1, "started_at": "2026-01-01T00:00:00+00:00"}
    with OutputLock(tmp_path):
        lock.write_text(json.dumps(other))  # someone removed ours and took it meanwhile
    assert json.loads(lock.read_text()) == other


# -- retention ----------------------------------------------------------------------------------
def test_prune_keeps_the_newest_nightly_runs(tmp_path, caplog):
    days = [f"2026-01-0{d}" for d in range(1, 8)]
    for day in days + ["adhoc", "nightly-2026-01-01"]:
        _publish(tmp_path, day)
    open_root(tmp_path).write_latest("2026-01-02")
    _write_state(tmp_path, "2026-01-03", pid=os.getpid())  # a forced rerun of that day is running
    with caplog.at_level(logging.INFO, logger="mfsim.runs"):
        removed = open_root(tmp_path).prune_runs(2)
    # newest two succeeded nightly runs: 07, 06; LATEST (02) and the running 03 stay; others go
    assert removed == ["2026-01-01", "2026-01-04", "2026-01-05"]
    assert _visible(tmp_path) == ["2026-01-02", "2026-01-03", "2026-01-06", "2026-01-07", "LATEST", "adhoc",
                                  "nightly-2026-01-01"]
    assert _hidden(tmp_path) == [".mfsim"]
    assert sorted(s.run_id for s in open_root(tmp_path).list_runs()) == [
        "2026-01-02", "2026-01-03", "2026-01-06", "2026-01-07", "adhoc", "nightly-2026-01-01"]
    logged = [r.getMessage() for r in caplog.records if "removed run" in r.getMessage()]
    assert len(logged) == 3 and all(day in " ".join(logged) for day in removed)
    assert open_root(tmp_path).prune_runs(2) == []
    with pytest.raises(MfsimError, match="keep_last"):
        open_root(tmp_path).prune_runs(-1)
