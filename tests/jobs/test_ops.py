"""Running it unattended, through the real command line: nightly (windows, idempotence, --force, backfill,
LATEST only forward, lock, retention), submit (detached and in-cluster), runs/status/show, schedule."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

MFSIM = str(Path(sys.executable).parent / "mfsim")
REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# a small, fast run: rank 4, short lists, no held-out fit, no audit, no report, one worker
QUICK = ["--set", "objectives.eq1.lambda=10", "--set", "objectives.eq2.lambda=10", "--set", "objectives.cosine=null",
         "--set", "svd.rank=4", "--set", "neighbours.top_n=5", "--set", "evaluation.holdout=none",
         "--set", "audit.enabled=false", "--set", "report.enabled=false", "--set", "cluster.n_workers=1"]
DAY0 = dt.date(2026, 11, 1)


def mfsim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([MFSIM, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def daily_log(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """60 users x 40 items over four days (Nov 1-4, 2026), each (user, item) pair once."""
    rng = np.random.default_rng(3)
    pairs = rng.choice(60 * 40, size=900, replace=False)
    start = pd.Timestamp(DAY0, tz="UTC")
    df = pd.DataFrame({"user_id": pairs // 40, "item_id": pairs % 40, "weight": np.ones(900, np.float32),
                       "ts": start + pd.to_timedelta(rng.uniform(0, 4 * 86400, 900), unit="s")})
    path = tmp_path_factory.mktemp("log") / "log.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path, df


def expected_nnz(df: pd.DataFrame, day: dt.date, window_days: int) -> int:
    """Rows of the window of ``window_days`` days ending at the end of ``day`` (pandas, independent of ingest)."""
    end = pd.Timestamp(day + dt.timedelta(days=1), tz="UTC")
    return int(((df.ts >= end - pd.Timedelta(days=window_days)) & (df.ts < end)).sum())


def visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def submit_then_kill_the_submitter(out: Path, *args: str) -> str:
    """``mfsim submit --wait`` SIGKILLed as soon as it has printed its run's id (the run submitted, not yet
    published: a run this small takes about a second from its first stage to its end, less than the log takes to
    reach the submitter, so the kill cannot wait for a stage's line; the id is printed once the scheduler, or the
    detached process, holds the run); the run's id."""
    proc = subprocess.Popen([MFSIM, "submit", *args, "--output", str(out), "--wait"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id and not (out / run_id).exists(), "the run finished before its submitter was killed"
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    return run_id


def wait_for_status(out: Path, run_id: str, polls: int = 240) -> subprocess.CompletedProcess:
    """``mfsim status`` once the run is neither running (exit 3) nor waiting for its driver (exit 2, no run yet)."""
    for _ in range(polls):
        st = mfsim("status", run_id, "--output", str(out))
        # running (3), or submitted and not started yet: no state record until its driver starts (2, "no run")
        if st.returncode != 3 and not (st.returncode == 2 and f"no run '{run_id}'" in st.stderr):
            return st
        time.sleep(0.5)
    return st


def test_version():
    import mfsim as pkg

    r = mfsim("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mfsim {pkg.__version__}"


def test_nightly_backfill_windows_idempotence_force_and_latest(tmp_path, daily_log):
    log, df = daily_log
    out = tmp_path / "runs"
    base = ["nightly", "conf/default.yaml", "--input", str(log), "--output", str(out), "--set", "ingest.window_days=2",
            *QUICK]
    r = mfsim(*base, "--backfill", "2026-11-02", "2026-11-04")
    assert r.returncode == 0, r.stderr
    assert visible(out) == ["2026-11-02", "2026-11-03", "2026-11-04", "LATEST"]
    assert (out / "LATEST").read_text().strip() == "2026-11-04"
    for day in ("2026-11-02", "2026-11-03", "2026-11-04"):
        m = json.loads((out / day / "_manifest.json").read_text())
        assert m["nnz"] == expected_nnz(df, dt.date.fromisoformat(day), 2), day
        assert m["config"]["ingest"]["as_of"].startswith(str(dt.date.fromisoformat(day) + dt.timedelta(days=1)))
        assert (out / day / "_log.txt").read_text().count("stage neighbours: done") == 1

    # a second firing of a finished day: exit 0 in seconds, no cluster, nothing rewritten
    before = (out / "2026-11-03" / "_manifest.json").read_bytes()
    t0 = time.perf_counter()
    r = mfsim(*base, "--date", "2026-11-03")
    assert r.returncode == 0 and "already succeeded" in r.stderr and "started local Dask cluster" not in r.stderr
    assert time.perf_counter() - t0 < 15  # interpreter start and imports; a run would start a cluster
    assert (out / "2026-11-03" / "_manifest.json").read_bytes() == before

    # an older day published later does not move LATEST back
    r = mfsim(*base, "--date", "2026-11-01")
    assert r.returncode == 0, r.stderr
    assert (out / "LATEST").read_text().strip() == "2026-11-04"

    # --force recomputes and swaps the day in: one directory, a new manifest, the same lists
    lists_before = pq.read_table(out / "2026-11-03" / "ids" / "items.parquet")
    r = mfsim(*base, "--date", "2026-11-03", "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "2026-11-03" / "_manifest.json").read_bytes() != before
    assert pq.read_table(out / "2026-11-03" / "ids" / "items.parquet").equals(lists_before)
    assert visible(out) == ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04", "LATEST"]

    r = mfsim("runs", "--output", str(out), "--format", "json")
    rows = json.loads(r.stdout)
    assert [x["run_id"] for x in rows if x["state"] == "succeeded"] == ["2026-11-02", "2026-11-04", "2026-11-01",
                                                                        "2026-11-03"]  # by start time
    r = mfsim("runs", "--output", str(out))
    assert r.returncode == 0 and r.stdout.splitlines()[0].split() == ["run_id", "state", "started_at", "duration_s",
                                                                      "n_users", "n_items", "nnz"]
    r = mfsim("status", "2026-11-04", "--output", str(out))
    assert r.returncode == 0 and "succeeded" in r.stdout
    r = mfsim("show", str(out / "LATEST"))
    assert r.returncode == 0 and "run 2026-11-04 (succeeded)" in r.stdout and "stages:" in r.stdout


def test_backfill_stops_at_a_failing_day_naming_it(tmp_path, daily_log):
    log, _ = daily_log
    out = tmp_path / "runs"
    # the window of Nov 1 with window_days=0.1 is the last 2.4 hours of that day: enough rows; an empty window
    # (a day before the log) fails at run time
    r = mfsim("nightly", "conf/default.yaml", "--input", str(log), "--output", str(out), "--set", "ingest.window_days=1",
              *QUICK, "--backfill", "2026-10-30", "2026-11-01")
    assert r.returncode in (1, 2)
    assert "2026-10-30" in r.stderr.splitlines()[-1]
    assert visible(out) == []  # nothing published, the later days not attempted


def test_lock_held_exits_75_and_a_stale_lock_is_taken_over(tmp_path, daily_log):
    log, _ = daily_log
    out = tmp_path / "runs"
    (out / ".mfsim").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid,
                "started_at": dt.datetime.now(dt.timezone.utc).isoformat()}
        (out / ".mfsim" / "lock").write_text(json.dumps(lock))
        args = ["nightly", "conf/default.yaml", "--input", str(log), "--output", str(out), *QUICK, "--date", "2026-11-02"]
        r = mfsim(*args)
        assert r.returncode == 75, r.stderr
        assert str(holder.pid) in r.stderr.splitlines()[-1]
    finally:
        holder.kill()
        holder.wait()
    r = mfsim(*args)  # the holder is gone: its lock is stale
    assert r.returncode == 0, r.stderr
    assert "stale" in r.stderr.lower() and visible(out) == ["2026-11-02", "LATEST"]
    assert not (out / ".mfsim" / "lock").exists()


def test_retention_keeps_the_newest_nightly_runs(tmp_path, daily_log):
    log, _ = daily_log
    out = tmp_path / "runs"
    r = mfsim("nightly", "conf/default.yaml", "--input", str(log), "--output", str(out), *QUICK,
              "--set", "run.keep_last=2", "--backfill", "2026-11-01", "2026-11-03")
    assert r.returncode == 0, r.stderr
    assert visible(out) == ["2026-11-02", "2026-11-03", "LATEST"]


def test_submit_returns_at_once_and_wait_gives_the_run_status(tmp_path, daily_log):
    log, _ = daily_log
    out = tmp_path / "runs"
    t0 = time.perf_counter()
    r = mfsim("submit", "conf/default.yaml", "--input", str(log), "--output", str(out), *QUICK)
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    assert time.perf_counter() - t0 < 15 and not (out / run_id).exists()  # returned before the run finished
    assert f"follow it with: mfsim logs {run_id} --output {out} --follow" in r.stderr
    follow = mfsim("logs", run_id, "--output", str(out), "--follow")  # returns when the run ends, with its status
    assert follow.returncode == 0 and "succeeded" in follow.stdout, follow.stderr
    st = wait_for_status(out, run_id)
    assert st.returncode == 0, st.stdout + st.stderr
    assert (out / run_id / "_manifest.json").is_file()
    # --wait: the log on stderr, the run's summary on stdout after its id, as mfsim run prints it
    r = mfsim("submit", "conf/default.yaml", "--input", str(log), "--output", str(out), *QUICK, "--wait")
    assert r.returncode == 0, r.stderr
    waited = r.stdout.splitlines()[0]
    assert f"run directory: {out / waited}" in r.stdout and "run directory:" not in r.stderr
    assert "stage ingest: start" in r.stderr and "stage ingest: start" not in r.stdout

    # the run goes on when its submitter (here one that was --wait-ing) is killed
    run_id = submit_then_kill_the_submitter(out, "conf/default.yaml", "--input", str(log), *QUICK)
    st = wait_for_status(out, run_id)
    assert st.returncode == 0, st.stdout + st.stderr
    assert json.loads((out / run_id / "_manifest.json").read_text())["nnz"] == 900

    # --wait streams the log and exits with the run's status: a user id that is not in the log fails (2)
    r = mfsim("submit", "conf/default.yaml", "--input", str(log), "--output", str(out), *QUICK,
              "--set", "neighbours.users=[123456]", "--wait")
    assert r.returncode == 2
    bad_id = r.stdout.splitlines()[0]
    assert "unknown user ids [123456]" in r.stderr and "stage ingest: start" in r.stderr
    assert mfsim("status", bad_id, "--output", str(out)).returncode == 1
    assert not (out / bad_id).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_to_an_external_cluster_runs_the_driver_there(tmp_path, daily_log):
    log, _ = daily_log
    out = tmp_path / "runs"
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--host",
                                           "127.0.0.1", "--nthreads", "1", "--no-dashboard", "--memory-limit", "2GiB"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        r = mfsim("submit", "conf/default.yaml", "--input", str(log), "--output", str(out), *QUICK,
                  "--scheduler", f"tcp://127.0.0.1:{port}", "--wait")
        assert r.returncode == 0, r.stderr
        run_id = r.stdout.splitlines()[0]  # then, with --wait, the run's summary
        state = json.loads((out / ".mfsim" / "runs" / f"{run_id}.json").read_text())
        worker_pids = {p.pid for p in procs[1:]}
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", ",".join(map(str, worker_pids))],
                                  capture_output=True, text=True).stdout.split()
        assert state["state"] == "succeeded" and state["pid"] in worker_pids | {int(c) for c in children}
        assert json.loads((out / run_id / "_manifest.json").read_text())["nnz"] == 900

        # the driver task goes on when the submitting process is killed
        run_id = submit_then_kill_the_submitter(out, "conf/default.yaml", "--input", str(log), *QUICK,
                                                "--scheduler", f"tcp://127.0.0.1:{port}")
        st = wait_for_status(out, run_id)
        assert st.returncode == 0, st.stdout + st.stderr
        assert json.loads((out / run_id / "_manifest.json").read_text())["nnz"] == 900
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_commands_take_a_run_by_id_path_or_latest_and_run_force_replaces(tmp_path, daily_log):
    log, _ = daily_log
    out = tmp_path / "runs"
    base = ["run", "conf/default.yaml", "--input", str(log), "--output", str(out), *QUICK]
    for run_id in ("a", "b"):
        assert mfsim(*base, "--run-id", run_id).returncode == 0
    again = mfsim(*base, "--run-id", "a")
    assert again.returncode == 2 and "--force to replace it" in again.stderr
    forced = mfsim(*base, "--run-id", "a", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "LATEST").read_text().strip() == "a"
    listed = mfsim("runs", "--output", str(out))
    assert [ln.split()[0:2] for ln in listed.stdout.splitlines()[1:]] == [["b", "succeeded"], ["a", "(LATEST)"]]
    # one run, named three ways: id + --output, its path, ROOT/LATEST (and LATEST + --output)
    refs = (["a", "--output", str(out)], [str(out / "a")], [str(out / "LATEST")], ["LATEST", "--output", str(out)])
    for cmd, some in (("status", refs), ("show", refs[1:3]), ("logs", refs[::3])):
        shown = {mfsim(cmd, *ref).stdout for ref in some}
        assert len(shown) == 1 and shown != {""}, (cmd, shown)
    assert "stage neighbours: done" in mfsim("logs", str(out / "b")).stdout  # the published _log.txt
    r = mfsim("status", "a")
    assert r.returncode == 2 and "give its output root too (--output ROOT)" in r.stderr
    r = mfsim("neighbours", "a", "--output", str(out), "--item", "1")
    assert r.returncode == 0 and r.stdout == mfsim("neighbours", str(out / "a"), "--item", "1").stdout
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,weight\n1,2,1.0\n")
    r = mfsim("run", "conf/default.yaml", "--input", str(csv), "--output", str(out), *QUICK)
    assert r.returncode == 2 and "mfsim reads Parquet logs; convert it once" in r.stderr, r.stderr
    r = subprocess.run([MFSIM, "run", "conf/default.yaml", "--input", str(log)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2 and f"the configs mfsim ships are {REPO / 'conf' / 'default.yaml'}" in r.stderr


def test_latest_moves_by_the_time_the_data_ends_on_a_root_of_manual_and_nightly_runs(tmp_path, daily_log):
    """A manual run (timestamp id) then nightlies: a later day moves LATEST past it, an earlier day does not (ids
    compared as strings, '2026-11-05' < '2026...T...Z', froze LATEST on the manual run)."""
    log, _ = daily_log
    out = tmp_path / "runs"
    manual = mfsim("run", "conf/default.yaml", "--input", str(log), "--output", str(out), *QUICK)
    assert manual.returncode == 0, manual.stderr
    manual_id = (out / "LATEST").read_text().strip()
    today = dt.datetime.now(dt.timezone.utc).date()
    night = ["nightly", "conf/default.yaml", "--input", str(log), "--output", str(out), *QUICK]
    r = mfsim(*night, "--date", (today - dt.timedelta(days=1)).isoformat())  # its data ends at 00:00 today
    assert r.returncode == 0 and (out / "LATEST").read_text().strip() == manual_id, r.stderr
    r = mfsim(*night, "--date", today.isoformat())  # its data ends at 00:00 tomorrow: after the manual run
    assert r.returncode == 0 and (out / "LATEST").read_text().strip() == today.isoformat(), r.stderr


def test_damaged_bookkeeping_is_one_line_naming_the_file_and_what_to_do(tmp_path, daily_log):
    """LATEST not UTF-8, not a run id, or a folder; a truncated manifest; a published run removed by hand."""
    log, _ = daily_log
    out = tmp_path / "runs"
    base = ["run", "conf/default.yaml", "--input", str(log), "--output", str(out), *QUICK]
    for run_id in ("a", "b", "c"):
        assert mfsim(*base, "--run-id", run_id).returncode == 0
    (out / "LATEST").write_bytes(b"\xff\xfe\x00")
    for args in (["show", str(out / "LATEST")], [*base, "--run-id", "d"]):
        r = mfsim(*args)
        assert r.returncode == 2 and "LATEST holds bytes that are not UTF-8 text: it is damaged." in r.stderr, r.stderr
        assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [r.stderr.strip().splitlines()[-1]]
    assert not (out / "d").exists() and "stage ingest" not in r.stderr  # refused before any work
    listed = mfsim("runs", "--output", str(out))
    assert listed.returncode == 0 and "LATEST holds bytes" in listed.stderr and listed.stdout.count("succeeded") == 3
    (out / "LATEST").unlink()
    (out / "LATEST").mkdir()
    r = mfsim(*base, "--run-id", "d")
    assert r.returncode == 2 and "LATEST is a folder" in r.stderr and not (out / "d").exists()
    (out / "LATEST").rmdir()
    (out / "LATEST").write_text("c\n")
    manifest = out / "b" / "_manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:100])
    r = mfsim("show", str(out / "b"))
    assert r.returncode == 2 and "_manifest.json does not parse" in r.stderr and "--run-id b --force" in r.stderr
    shutil.rmtree(out / "a")
    listed = json.loads(mfsim("runs", "--output", str(out), "--format", "json").stdout)
    assert {r["run_id"]: (r["state"], r["latest"]) for r in listed} == {
        "a": ("removed", False), "b": ("damaged", False), "c": ("succeeded", True)}
    r = mfsim("status", "b", "--output", str(out))
    assert r.returncode == 1 and "does not parse" in r.stdout
    assert mfsim(*base, "--run-id", "b", "--force").returncode == 0  # what the line said to do
    assert mfsim("status", "b", "--output", str(out)).returncode == 0


def test_reserved_and_malformed_run_ids_are_refused(tmp_path, daily_log):
    log, _ = daily_log
    for bad in ("LATEST", "latest", "abc\n", ".mfsim"):
        r = mfsim("run", "conf/default.yaml", "--input", str(log), "--output", str(tmp_path), "--run-id", bad, *QUICK)
        assert r.returncode == 2 and r.stderr.startswith("error: run id"), (bad, r.stderr)
    assert not any(tmp_path.iterdir())


def cron_shell(line: str) -> str:
    """The shell text cron runs for a crontab line: after the five time fields, ``\\%`` read as ``%``."""
    return line.split(None, 5)[5].replace("\\%", "%")


def crontab_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1, text  # one line, and no CRON_TZ (it would change the zone of the crontab's later lines)
    return lines[0]


def test_schedule_installs_a_cron_line_that_runs_to_a_published_run(tmp_path):
    """``mfsim schedule`` with nightly's --input and --set, installed into a folder; its cron line, run by ``sh`` as
    cron runs it (another directory, a bare environment) at the scheduled time, publishes yesterday's run."""
    now = dt.datetime.now(dt.timezone.utc)
    yesterday = (now - dt.timedelta(days=1)).date()
    rng = np.random.default_rng(11)
    pairs = rng.choice(60 * 40, size=900, replace=False)
    start = pd.Timestamp(yesterday, tz="UTC") - pd.Timedelta(days=1)
    df = pd.DataFrame({"user_id": pairs // 40, "item_id": pairs % 40, "weight": np.ones(900, np.float32),
                       "ts": start + pd.to_timedelta(rng.uniform(0, 2 * 86400, 900), unit="s")})
    log = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), log)
    out, into = tmp_path / "nightly" / "runs", tmp_path / "units"
    at = now.strftime("%H:%M")  # the guard lets it through for 15 minutes from --at
    r = mfsim("schedule", "conf/default.yaml", "--input", str(log), "--output", str(out), "--at", at, "--install",
              "--into", str(into), *QUICK)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in into.iterdir()) == ["crontab", "mfsim-nightly.service", "mfsim-nightly.timer"]
    assert out.is_dir() and "nightly --dry-run:" in r.stderr and f"would run {yesterday}" in r.stderr
    assert "| crontab -" in r.stdout and "systemctl --user enable --now mfsim-nightly.timer" in r.stdout
    timer = (into / "mfsim-nightly.timer").read_text()
    assert f"OnCalendar=*-*-* {at}:00 UTC" in timer
    service = (into / "mfsim-nightly.service").read_text()
    assert f"--input {log}" in service and "--set svd.rank=4" in service

    line = crontab_line((into / "crontab").read_text())
    mm = int(at[3:])
    assert line.split()[:5] == [",".join(str(m) for m in sorted((mm + 15 * j) % 60 for j in range(4))),
                                "*", "*", "*", "*"]
    elsewhere = tmp_path / "cron-home"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(elsewhere), "SHELL": "/bin/sh"}  # cron's environment
    ran = subprocess.run(["/bin/sh", "-c", cron_shell(line)], cwd=elsewhere, env=env, timeout=300)
    assert ran.returncode == 0, (out / "nightly.log").read_text()
    day = yesterday.isoformat()
    assert visible(out) == [day, "LATEST", "nightly.log"]
    assert json.loads((out / day / "_manifest.json").read_text())["nnz"] == expected_nnz(df, yesterday, 10_000)
    assert "nightly: 1 run(s) published" in (out / "nightly.log").read_text()

    # at any other time of day the line does nothing
    later = (now + dt.timedelta(hours=2)).strftime("%H:%M")
    r = mfsim("schedule", "conf/default.yaml", "--input", str(log), "--output", str(out), "--at", later, *QUICK)
    assert r.returncode == 0, r.stderr
    idle = subprocess.run(["/bin/sh", "-c", cron_shell(crontab_line(r.stdout.split("# mfsim-nightly.service")[0]))],
                          cwd=elsewhere, env=env, timeout=60)
    assert idle.returncode != 0 and visible(out) == [day, "LATEST", "nightly.log"]


def test_schedule_quotes_what_it_writes_and_refuses_what_it_cannot_carry(tmp_path, daily_log):
    """An --output holding ``;``, ``$(...)``, a space, a quote and ``%``: the cron line, run by sh, publishes into
    exactly that folder and runs nothing else; the unit's ExecStart unescapes to the same words; a newline or a
    backslash is refused before anything is written."""
    log, _ = daily_log
    marker = tmp_path / "injected"
    out = tmp_path / f"runs; touch {marker}; $(touch {marker}) 'x' 100%"
    into = tmp_path / "units"
    now = dt.datetime.now(dt.timezone.utc)
    r = mfsim("schedule", "conf/default.yaml", "--input", str(log), "--output", str(out), "--at",
              now.strftime("%H:%M"), "--install", "--into", str(into), *QUICK)
    assert r.returncode == 0, r.stderr
    line = crontab_line((into / "crontab").read_text())
    assert "%" not in line.replace("\\%", "")  # every % escaped for cron
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHELL": "/bin/sh"}
    ran = subprocess.run(["/bin/sh", "-c", cron_shell(line)], cwd=tmp_path, env=env, timeout=300)
    assert ran.returncode == 0 and not marker.exists()
    day = (now - dt.timedelta(days=1)).date().isoformat()
    assert (out / day / "_manifest.json").is_file() and (out / "nightly.log").is_file()
    exec_start = next(ln for ln in (into / "mfsim-nightly.service").read_text().splitlines()
                      if ln.startswith("ExecStart="))
    words = shlex.split(exec_start.removeprefix("ExecStart=").replace("%%", "%").replace("$$", "$"))
    assert words[words.index("--output") + 1] == str(out)
    for bad in ("runs\n0 * * * * touch /tmp/x", "runs\\x"):
        r = mfsim("schedule", "conf/default.yaml", "--input", str(log), "--output", str(tmp_path / bad), "--at",
                  "02:30", "--install", "--into", str(tmp_path / "refused"))
        assert r.returncode == 2 and "cannot carry safely" in r.stderr and not (tmp_path / "refused").exists()


def test_schedule_refuses_a_command_that_would_fail_every_night(tmp_path):
    into = tmp_path / "units"
    base = ["schedule", "conf/default.yaml", "--output", str(tmp_path / "runs"), "--at", "02:30", "--install",
            "--into", str(into)]
    r = mfsim(*base, "--input", str(tmp_path / "no-such-log.parquet"))
    assert r.returncode == 2 and "dry run" in r.stderr and "no-such-log.parquet" in r.stderr, r.stderr
    assert not into.exists()
    r = mfsim(*base)  # conf/default.yaml has no input.path
    assert r.returncode == 2 and "no input given" in r.stderr and not into.exists()
    bad_col = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": [1], "item_id": [2], "weight": [1.0], "ts": [pd.Timestamp("2026-11-01")]}),
                   bad_col)
    r = mfsim(*base, "--input", str(bad_col))
    assert r.returncode == 2 and "column 'user_id'" in r.stderr and "input.user_col" in r.stderr, r.stderr
    assert mfsim("schedule", "conf/default.yaml", "--output", "x", "--at", "25:00").returncode == 2
    assert os.access(MFSIM, os.X_OK)


def test_readme_nightly_and_schedule_examples_run_as_written(tmp_path):
    """The README's nightly lines (backfill, dry run) and its schedule line, each run as written by bash in a folder
    that holds ``.venv``, ``conf`` and a hive-partitioned ``logs/`` (HOME there too, for ``~``)."""
    block = README.read_text().split("\n## Running it every night\n", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines()]
    wanted = [ln for ln in lines if ln.startswith(".venv/bin/mfsim nightly") and ("--backfill" in ln or "--dry-run" in ln)]
    wanted += [ln for ln in lines if ln.startswith(".venv/bin/mfsim schedule")]
    assert len(wanted) == 3, block
    for name in (".venv", "conf"):
        (tmp_path / name).symlink_to(REPO / name)
    rng = np.random.default_rng(5)
    for day in range(1, 4):  # 300 users x 150 items, 1,500 interactions a day
        part = tmp_path / "logs" / f"dt=2026-11-{day:02d}"
        part.mkdir(parents=True)
        ts = pd.Timestamp(f"2026-11-{day:02d}", tz="UTC") + pd.to_timedelta(rng.uniform(0, 86400, 1500), unit="s")
        pq.write_table(pa.table({"user_id": rng.integers(0, 300, 1500), "item_id": rng.integers(0, 150, 1500),
                                 "weight": np.ones(1500, np.float32), "ts": ts}), part / "part-0.parquet")
    env = {**os.environ, "HOME": str(tmp_path)}
    for line in wanted:
        r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (line, r.stderr[-3000:])
    assert visible(tmp_path / "runs") == ["2026-11-01", "2026-11-02", "2026-11-03", "LATEST"]
    assert sorted(p.name for p in (tmp_path / "mfsim-schedule").iterdir()) == [
        "crontab", "mfsim-nightly.service", "mfsim-nightly.timer"]


def test_warm_start_reads_the_previous_runs_basis(tmp_path, daily_log):
    log, _ = daily_log
    out = tmp_path / "runs"
    assert mfsim("run", "conf/default.yaml", "--input", str(log), "--output", str(out), "--run-id", "a", *QUICK).returncode == 0
    r = mfsim("run", "conf/default.yaml", "--input", str(log), "--output", str(out), "--run-id", "b", *QUICK,
              "--set", "svd.warm_start=previous")
    assert r.returncode == 0, r.stderr
    basis = pq.read_table(out / "a" / "svd" / "basis.parquet")
    assert basis.column_names == ["item_id", "embedding"] and basis.num_rows == 40
    svd = json.loads((out / "b" / "_manifest.json").read_text())["svd"]
    assert svd["warm_start"] == {"from": str(out / "a"), "matched_items": 40} and svd["converged"]
    a, b = (pq.read_table(out / run / "svd" / "singular_values.parquet")["sigma"].to_numpy() for run in "ab")
    np.testing.assert_allclose(b, a, rtol=1e-6)  # the same data: the same spectrum from either start
    cold = json.loads((out / "a" / "_manifest.json").read_text())["svd"]
    assert cold["warm_start"] is None and set(cold) >= {"solver", "passes", "blocks", "block_size",
                                                        "estimated_error", "converged"}
