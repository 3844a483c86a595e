"""Run directories, the manifest, atomic publishing, and the output root's bookkeeping.

This is the only module that writes run outputs (Parquet and JSON). An output root ``R`` holds::

    R/<run_id>/                      a published run; its _manifest.json is written last
    R/LATEST                         the id of the newest published run, one line
    R/.<run_id>.tmp-<pid>-<tag>/     a run being written (hidden)
    R/.<run_id>.old-<pid>-<tag>/     a published run being replaced (replace=True, --force; hidden)
    R/.<run_id>.del-<pid>-<tag>/     a run being removed (retention, a rolled-back publish; hidden)
    R/.mfsim/runs/<run_id>.json      each run's state while and after it runs
    R/.mfsim/lock, R/.mfsim/mutex    the nightly lock and the bookkeeping mutex (pipeline.lock)

``<tag>`` is six hex digits naming the host that made the directory, then six random ones: stale
cleanup (``clean_stale``) only judges this host's directories by their pid, so a root shared
between hosts (NFS; a driver running on a cluster worker) never loses another host's live run.

What is promised, exactly:

- A run directory becomes visible only complete: every file is written in the hidden temporary
  directory, ``_manifest.json`` last, all of it fsynced, and one ``os.rename`` makes it ``R/<run_id>``.
- LATEST is replaced atomically (a ``tempfile.mkstemp`` file in R, fsynced, ``os.replace``; never a
  predictable name, never a symlink followed) after that rename; then the state becomes
  ``succeeded``. If the process dies between the rename and LATEST, the new run is visible and
  complete while LATEST still names the previous run, and its state file says ``running`` until it
  goes ``lost`` (see ``list_runs``). An *error* writing LATEST (disk full) rolls the rename back: the
  run is moved out of sight and removed, its state is ``failed``, LATEST is unchanged.
- A run that fails (an exception, KeyboardInterrupt, SystemExit: the command line turns SIGTERM
  into one of these) leaves no visible directory and the state ``failed`` with its one error line.
  A killed run leaves its hidden temporary directory; the next ``RunWriter`` on the root removes it
  once its pid is gone on this host, with one INFO line.
- Two runs publishing the same id at once: the final ``os.rename`` is the arbiter (on Linux renaming
  onto a non-empty directory fails with ENOTEMPTY/EEXIST), so exactly one wins; the other raises an
  ``MfsimError`` saying the run already exists, and its temporary directory is removed. The state
  file then records the winner. Runs with different ids never touch each other's files.
- An ``OSError`` while writing (ENOSPC, EACCES, EROFS, a root that is a regular file or cannot be
  created) raises one ``MfsimError`` naming the path, the errno text and what to do; the temporary
  directory is removed, so nothing half-written is visible, and earlier runs are untouched. Its exit
  code is 2 when the root cannot be used at all (EACCES, EROFS, ENOTDIR, ...: a bad ``--output``), 1 for
  a failure while writing (ENOSPC, EIO: a run-time failure).
- ``replace=True`` (``--force``): the new run is built in its temporary directory as usual; at
  publish the old ``R/<run_id>`` is renamed to ``.<run_id>.old-...``, the new one is renamed in (for
  the microseconds between those two renames ``R/<run_id>`` is absent), then LATEST and the state,
  and the old copy is removed last. Until the swap the old run stays readable. A crash between the
  two renames leaves neither visible: the old run in ``.old-``, the new one in ``.tmp-``; the next
  ``RunWriter`` renames the old one back into place (dropping the dead run's ``running`` record, so
  it lists as ``succeeded`` from its manifest) and removes the new one. A crash after the second
  rename leaves the new run in place (``running`` until ``lost``, as above) and the old copy,
  which the next ``RunWriter`` removes. If a forced run fails, the old run and its state stay.
  Concurrent forced runs of one id are not arbitrated here: run them under ``OutputLock``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.outputs import dataset_of, schema_json
from mfsim.pipeline.runs.storage import Location, Written
from mfsim.pipeline.runs.lock import STATE_DIR, LockHeld, OutputLock, host_tag, hostname, iso, os_error, parse_iso, \
    pid_alive, root_mutex, utc_now

__all__ = [
    "LATEST", "MANIFEST", "NIGHTLY_ID", "RESERVED_NAMES", "RUN_ID_PATTERN", "STATE_DIR", "LockHeld", "OutputLock",
    "RunStatus", "RunWriter", "clean_stale", "list_runs", "new_run_id", "package_versions", "prune_runs",
    "record_submitted",
    "read_latest", "read_manifest", "resolve_run_dir", "run_status", "state_path", "validate_run_id", "write_latest",
]

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: "abc\n" is no id
NIGHTLY_ID = re.compile(r"\d{4}-\d{2}-\d{2}")  # mfsim nightly's run ids: the day, YYYY-MM-DD (fullmatch)
MANIFEST = "_manifest.json"
LATEST = "LATEST"
RESERVED_NAMES = frozenset({LATEST, STATE_DIR})  # names the root uses itself; LATEST in any case
RUNS_DIR = "runs"  # <root>/.mfsim/runs/<run_id>.json
MOVE_LATEST = ("always", "if_newer", "never")
COUNT_KEYS = ("n_users", "n_items", "nnz")
PACKAGES = ("mfsim", "numpy", "scipy", "scikit-learn", "numba", "dask", "distributed", "pyarrow", "pandas", "pydantic")
_HIDDEN = re.compile(r"\.(?P<run_id>[A-Za-z0-9][A-Za-z0-9._-]*)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)-(?P<tag>[0-9a-f]+)")
_NOT_PUBLISHED = "nothing was published; earlier runs are untouched"
FAULT_BEFORE_PUBLISH = "MFSIM_FAULT_BEFORE_PUBLISH"  # test hook: "1" SIGKILLs the process at publish (RunWriter)

log = logging.getLogger("mfsim.runs")


def new_run_id(now: dt.datetime | None = None) -> str:
    """A sortable, unique run id: ``YYYYmmddTHHMMSSZ-xxxxxx``."""
    now = now or utc_now()
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def validate_run_id(run_id: str) -> str:
    """``run_id`` if it is a safe directory name; an ``MfsimError`` saying what is allowed otherwise.

    The whole id must match (``re.fullmatch``: a trailing newline is rejected), and the names the
    output root uses itself (``RESERVED_NAMES``: ``LATEST`` in any case, ``.mfsim``) are refused.
    """
    if isinstance(run_id, str) and run_id.casefold() in {name.casefold() for name in RESERVED_NAMES}:
        raise MfsimError(f"run id {run_id!r} is reserved: the output root uses {sorted(RESERVED_NAMES)} for its "
                         "own bookkeeping; pass another --run-id")
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id) or ".." in run_id:
        raise MfsimError(
            f"run id {run_id!r} is not allowed: use letters, digits, '.', '_' or '-' (no path separators, "
            "no '..', not starting with '.', no whitespace or newline), at most 128 characters"
        )
    return run_id


def package_versions() -> dict[str, str]:
    """Versions of the packages a run depends on, for its manifest."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def state_path(root: str | Path, run_id: str) -> Path:
    """Where run ``run_id`` records its state: ``<root>/.mfsim/runs/<run_id>.json``."""
    return Path(root) / STATE_DIR / RUNS_DIR / f"{validate_run_id(run_id)}.json"


def error_line(exc: BaseException | None) -> str:
    """The one line a failed run's state records: an ``MfsimError``'s message, ``Type: message`` for
    anything else, ``interrupted`` for KeyboardInterrupt and SystemExit."""
    if exc is None:
        return "the run ended without being published"
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "interrupted"
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, MfsimError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class DatasetBook:
    """What a run wrote and how long it took, for its manifest and its state record; shared by the run writers
    of every kind of root. ``files`` maps each path inside the run to (rows, schema) (None, None for a file
    that is not a table); the writer sets it, ``timings``, ``counts`` and its identity, and its write_table
    records into ``files``."""

    files: dict[str, tuple[int | None, pa.Schema | None]]
    timings: dict[str, float]

    def _begin_book(self, run_id: str | None, heartbeat_s: float, replace: bool) -> None:
        """The state every writer starts with: its id, the heartbeat period, empty timings, counts and files."""
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")
        self.run_id = validate_run_id(new_run_id() if run_id is None else run_id)
        self.replace = bool(replace)
        self.heartbeat_s = float(heartbeat_s)
        self.timings = {}
        self.started = utc_now()
        self.published = False
        self.latest_moved = False
        self.manifest: dict[str, Any] = {}
        self.counts: dict[str, int] | None = None
        self.files = {}
        self._host, self._pid = hostname(), os.getpid()
        self._state_written = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _heartbeat(self) -> None:
        """Refresh ``heartbeat_at`` in the run's state record once (each kind of root writes it its own way)."""
        raise NotImplementedError

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"mfsim-heartbeat-{self.run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._heartbeat()
            except MfsimError as exc:
                if not warned:
                    log.warning("heartbeat of run %s not recorded: %s", self.run_id, exc)
                    warned = True

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times a stage; the wall time lands in the manifest under ``timings[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 4)

    def _record(self, state: str, error: str | None = None) -> dict[str, Any]:
        """The run's state record: ``state``, this process, its start, a fresh heartbeat, counts, where it goes."""
        return state_record(self.run_id, state, self._host, self._pid, iso(self.started), self.counts,
                            str(self.final), error)

    def written(self, w: Written) -> None:
        """Record a part a worker wrote below ``self.location`` (or write it, when it came back as a table);
        a write that failed on the worker raises its one ``MfsimError`` here."""
        if w.error is not None:
            code, text, path = w.error
            raise os_error(OSError(code, text), path, "write", _NOT_PUBLISHED)
        if w.table is not None:
            self.write_table(w.relative, w.table)
        else:
            self.files[w.relative] = (w.rows, w.schema)

    def datasets(self) -> dict[str, dict[str, Any]]:
        """Every dataset of the run for the manifest: its path, row count, schema and files (``outputs.dataset_of``)."""
        out: dict[str, dict[str, Any]] = {}
        for relative in sorted(self.files):
            rows, schema = self.files[relative]
            name = dataset_of(relative)
            if schema is None:  # a file that is not a table (report.html)
                out[name] = {"path": name, "format": Path(relative).suffix.lstrip(".")}
                continue
            d = out.setdefault(name, {"path": name, "format": "parquet", "rows": 0, "files": 0,
                                      "schema": schema_json(schema)})
            d["rows"] += int(rows)
            d["files"] += 1
        return out


class RunWriter(DatasetBook):
    """Collects a run's outputs in a hidden temporary directory, records its state, publishes it atomically.

    Use as a context manager::

        with RunWriter(root, run_id) as run:
            run.write_table("ids/users.parquet", table)
            run.set_counts({"n_users": ..., "n_items": ..., "nnz": ...})
            run.publish(manifest, move_latest="if_newer")

    Parameters
    ----------
    output_root : the output root (created if missing).
    run_id : the run's id (validated); None gives a fresh ``new_run_id()``.
    heartbeat_s : how often a daemon thread refreshes ``heartbeat_at`` in the state file while the
        run runs; keep it well below the ``lost_after_s`` readers use (120 s by default).
    replace : replace a published run of the same id at publish (``--force``); see the module notes.

    ``__enter__`` removes stale hidden directories of earlier runs (``clean_stale``), creates the
    temporary directory, records the state ``running`` and starts the heartbeat. ``__exit__`` stops
    the heartbeat and, unless the run was published, removes the temporary directory and records
    ``failed`` with the exception's line (``error_line``). Every ``OSError`` while writing becomes
    one ``MfsimError`` (``pipeline.lock.os_error``).

    Test hook: with the environment variable ``MFSIM_FAULT_BEFORE_PUBLISH=1``, ``publish`` sends its
    own process SIGKILL right after ``_manifest.json`` is written and the tree fsynced, before the
    rename that would publish it, so a test can kill a driver at exactly that point
    (``tests/jobs/test_faults.py``). It only ever kills the process; it changes nothing on disk.
    """

    def __init__(self, output_root: str | Path, run_id: str | None = None, *, heartbeat_s: float = 10.0,
                 replace: bool = False):
        self._begin_book(run_id, heartbeat_s, replace)
        self.root = Path(output_root)
        self.final = self.root / self.run_id
        if not self.replace and os.path.lexists(self.final):  # a quick answer; the final rename decides
            raise self._exists_error()
        self.tmp = self.root / _hidden_name(self.run_id, "tmp")
        self.location = Location.of(self.tmp)  # where workers write their parts while the run runs
        self._lost_race = False  # another run published this id first: the state file is the winner's
        self._previous_state: dict[str, Any] | None = None  # replace=True: the replaced run's record

    def __enter__(self) -> "RunWriter":
        try:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise os_error(exc, self.root, "create the output root", _NOT_PUBLISHED) from exc
            clean_stale(self.root)
            try:
                self.tmp.mkdir()
            except OSError as exc:
                raise os_error(exc, self.tmp, "create the run's temporary directory", _NOT_PUBLISHED) from exc
            self._update_state(self._begin)
            self._state_written = True
        except BaseException as exc:
            self._abort(exc)
            raise
        self._start_heartbeat()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop_heartbeat()
        if not self.published:
            self._abort(exc)

    def set_counts(self, counts: Mapping[str, Any]) -> None:
        """Record ``n_users``, ``n_items`` and ``nnz`` (other keys are ignored) in the run's state."""
        missing = [k for k in COUNT_KEYS if k not in counts]
        if missing:
            raise ValueError(f"set_counts needs {list(COUNT_KEYS)}; missing {missing}")
        self.counts = {k: int(counts[k]) for k in COUNT_KEYS}
        if self._state_written and not self.published:
            self._update_state(lambda cur: {**cur, "counts": self.counts} if self._running_mine(cur) else None)

    # -- writing ------------------------------------------------------------------------------
    def path(self, relative: str) -> Path:
        """A path inside the (temporary) run directory; parent directories are created."""
        rel = Path(relative)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"run output path must be relative and inside the run: {relative}")
        p = self.tmp / rel
        with self._writing(p.parent, "create"):
            p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_table(self, relative: str, table: pa.Table) -> Path:
        """Write ``table`` as Parquet (zstd) at ``relative`` inside the run."""
        p = self.path(relative)
        with self._writing(p):
            pq.write_table(table, p, compression="zstd")
        self.files[relative] = (table.num_rows, table.schema)
        return p

    def write_table_parts(self, relative: str, tables) -> Path:
        """One Parquet file from an iterable of tables with the same schema (streamed, bounded memory)."""
        p = self.path(relative)
        writer = None
        with self._writing(p):
            try:
                for t in tables:
                    if writer is None:
                        writer = pq.ParquetWriter(p, t.schema, compression="zstd")
                    writer.write_table(t)
            finally:
                if writer is not None:
                    writer.close()
        return p

    def write_json(self, relative: str, obj: Any) -> Path:
        """Write ``obj`` as indented JSON at ``relative`` inside the run."""
        p = self.path(relative)
        with self._writing(p):
            p.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
        return p

    def write_bytes(self, relative: str, data: bytes) -> Path:
        """Write ``data`` as is at ``relative`` inside the run (the report page), listed as a dataset of its own."""
        p = self.path(relative)
        with self._writing(p):
            p.write_bytes(data)
        self.files[relative] = (None, None)
        return p

    @contextmanager
    def _writing(self, p: Path, action: str = "write") -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise os_error(exc, p, action, _NOT_PUBLISHED) from exc

    # -- publishing ---------------------------------------------------------------------------
    def publish(self, manifest: dict[str, Any], *, move_latest: str = "always") -> Path:
        """Write ``_manifest.json`` last, fsync, rename the run into place, move LATEST, record ``succeeded``.

        ``move_latest``: ``always``; ``if_newer``, only when LATEST is absent or names an id that sorts
        before this one (nightly ids are days, so a backfill never moves it back); ``never``.
        ``self.latest_moved`` says whether it moved. Returns the run directory. Raises ``MfsimError``
        when another run published this id first, or on a write error (nothing published then).
        """
        if move_latest not in MOVE_LATEST:
            raise ValueError(f"move_latest must be one of {MOVE_LATEST}, got {move_latest!r}")
        if self.published:
            raise RuntimeError(f"run {self.run_id} is already published")
        if self.counts is None and isinstance(manifest.get("counts"), Mapping) and \
                all(k in manifest["counts"] for k in COUNT_KEYS):
            self.counts = {k: int(manifest["counts"][k]) for k in COUNT_KEYS}
        manifest = dict(manifest)
        manifest.update(
            datasets=self.datasets(),
            run_id=self.run_id,
            started_at=iso(self.started),
            finished_at=iso(utc_now()),
            timings=dict(self.timings),
            versions=package_versions(),
            status="succeeded",
        )
        self.manifest = manifest
        self.write_json(MANIFEST, manifest)
        with self._writing(self.tmp, "flush"):
            _fsync_tree(self.tmp)
        if os.environ.get(FAULT_BEFORE_PUBLISH) == "1":  # the test hook above: die complete but unpublished
            os.kill(os.getpid(), signal.SIGKILL)
        aside = self._rename_into_place()
        self.published = True
        try:
            self.latest_moved = self._move_latest(move_latest)
        except OSError as exc:
            self._roll_back(aside)
            raise os_error(exc, self.root / LATEST, "update", "the run was taken back, " + _NOT_PUBLISHED) from exc
        self._stop_heartbeat()
        try:
            self._update_state(lambda cur: self._record("succeeded"))
        except MfsimError as exc:  # the run is out and complete; its state shows lost in time
            log.warning("run %s is published, but its state could not be recorded: %s", self.run_id, exc)
        if aside is not None:
            _remove_tree(aside)
        return self.final

    def _rename_into_place(self) -> Path | None:
        """``os.rename(tmp, final)``, moving a replaced run aside first; returns where it went (or None)."""
        aside = None
        if self.replace and os.path.lexists(self.final):
            aside = self.root / _hidden_name(self.run_id, "old")
            try:
                os.rename(self.final, aside)
            except FileNotFoundError:
                aside = None
            except OSError as exc:
                raise os_error(exc, self.final, "move aside the run being replaced,", _NOT_PUBLISHED) from exc
        try:
            os.rename(self.tmp, self.final)
        except OSError as exc:
            if aside is not None:
                self._put_back(aside)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR) and \
                    os.path.lexists(self.final):
                self._lost_race = True
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise self._exists_error(concurrent=True) from exc
            raise os_error(exc, self.final, "publish", _NOT_PUBLISHED) from exc
        _fsync_dir(self.root)
        return aside

    def _put_back(self, aside: Path) -> None:
        """Return a replaced run to its place; if another run took the place meanwhile, drop the old one."""
        try:
            os.rename(aside, self.final)
        except OSError:
            _remove_tree(aside)

    def _move_latest(self, mode: str) -> bool:
        if mode == "never":
            return False
        if mode == "if_newer":
            current = read_latest(self.root)
            if current is not None and not current < self.run_id:
                return False
        write_latest(self.root, self.run_id)
        return True

    def _roll_back(self, aside: Path | None) -> None:
        """Take a just-renamed run out of sight again (LATEST could not be written)."""
        hidden = self.root / _hidden_name(self.run_id, "del")
        try:
            os.rename(self.final, hidden)
        except OSError as exc:
            log.error("could not take back run %s after the failed LATEST update: %s", self.final, exc)
            return
        self.published = False
        if aside is not None:
            self._put_back(aside)
        _remove_tree(hidden)

    def _exists_error(self, concurrent: bool = False) -> MfsimError:
        how = "another run published it at the same time; " if concurrent else ""
        return MfsimError(f"run {self.final} already exists ({how}this run was not published); pass another "
                          "--run-id (or none for a fresh one), --force to replace it, or remove that directory")

    # -- the state file -----------------------------------------------------------------------
    def _running_mine(self, record: dict[str, Any] | None) -> bool:
        """Whether ``record`` is this writer's, still running (a same-id run may have written since)."""
        return record is not None and record.get("state") == "running" and record.get("host") == self._host \
            and record.get("pid") == self._pid and record.get("started_at") == iso(self.started)

    def _begin(self, current: dict[str, Any] | None) -> dict[str, Any]:
        if not self.replace and os.path.lexists(self.final):
            raise self._exists_error()
        if self.replace:
            self._previous_state = current
        return self._record("running")

    def _update_state(self, change: Callable[[dict[str, Any] | None], Any]) -> None:
        """Under the root's mutex: ``change(current record or None)`` -> a new record, None (keep) or
        ``_REMOVE``; written atomically."""
        path = state_path(self.root, self.run_id)
        try:
            with root_mutex(self.root):
                path.parent.mkdir(parents=True, exist_ok=True)
                new = change(_read_record(path))
                if new is _REMOVE:
                    path.unlink(missing_ok=True)
                elif new is not None:
                    _atomic_write(path, json.dumps(new, indent=1).encode())
        except OSError as exc:
            raise os_error(exc, path, "record the run's state in", "the run was stopped") from exc

    def _heartbeat(self) -> None:
        self._update_state(lambda cur: {**cur, "heartbeat_at": iso(utc_now())} if self._running_mine(cur) else None)

    def _abort(self, exc: BaseException | None) -> None:
        """Remove the temporary directory; record ``failed`` (or, when replacing, restore the old record)."""
        self._stop_heartbeat()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if not self._state_written or self._lost_race:
            return
        line = error_line(exc)
        if self.replace and os.path.lexists(self.final):  # the replaced run is still there, and still current
            previous = self._previous_state
            change = lambda cur: (previous if previous is not None else _REMOVE) if self._running_mine(cur) else None
        else:
            change = lambda cur: self._record("failed", line) if self._running_mine(cur) else None
        try:
            self._update_state(change)
        except MfsimError as err:  # never hide the run's own error behind this one
            log.warning("could not record that run %s failed: %s", self.run_id, err)


_REMOVE = object()  # _update_state: delete the record


def state_record(run_id: str, state: str, host: str, pid: int, started_at: str, counts: dict[str, int] | None,
                 run_dir: str, error: str | None = None) -> dict[str, Any]:
    """A state record as every root keeps it (``<root>/.mfsim/runs/<id>.json``), heartbeat now."""
    now = iso(utc_now())
    return {"run_id": run_id, "state": state, "host": host, "pid": pid, "started_at": started_at,
            "heartbeat_at": now, "finished_at": None if state == "running" else now, "error": error,
            "counts": counts, "run_dir": run_dir}


def record_submitted(root: str | Path, run_id: str, pid: int) -> None:
    """State ``running`` for a run just started in process ``pid`` (``mfsim submit``), before its ``RunWriter``
    takes over the record: the run is listed from the moment its id is printed, and shows ``lost`` if that
    process dies before writing anything."""
    root = Path(root)
    now = iso(utc_now())
    record = state_record(validate_run_id(run_id), "running", hostname(), int(pid), now, None, str(root / run_id))
    path = state_path(root, run_id)
    try:
        with root_mutex(root):
            path.parent.mkdir(parents=True, exist_ok=True)
            if _read_record(path) is None:  # the run itself may have written already
                _atomic_write(path, json.dumps(record, indent=1).encode())
    except OSError as exc:
        raise os_error(exc, path, "record the run's state in") from exc


def write_latest(root: str | Path, run_id: str) -> None:
    """Replace ``root/LATEST`` atomically: a ``tempfile.mkstemp`` file (``.LATEST.*``, created exclusively,
    so nothing planted under a guessed name is followed), fsynced, then ``os.replace``."""
    _atomic_write(Path(root) / LATEST, (validate_run_id(run_id) + "\n").encode(), prefix=f".{LATEST}.")


def read_latest(root: str | Path) -> str | None:
    """The run id in ``<root>/LATEST``, or None when no run has succeeded there."""
    p = Path(root) / LATEST
    return p.read_text().strip() if p.is_file() else None


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The ``_manifest.json`` of a published run; an ``MfsimError`` when there is none."""
    p = Path(run_dir) / MANIFEST
    if not p.is_file():
        raise MfsimError(f"{run_dir} is not a published run (no {MANIFEST}); pass a directory written by mfsim run")
    return json.loads(p.read_text())


def resolve_run_dir(path: str | Path) -> Path:
    """A published run directory from ``path``: the directory itself, or ``<root>/LATEST`` (the file)
    resolved to ``<root>/<id>``; an ``MfsimError`` saying what to pass otherwise."""
    p = Path(path)
    if p.name == LATEST and not p.is_dir():
        if not p.is_file():
            raise MfsimError(f"{p} does not exist: no run has succeeded in {p.parent} yet")
        run_id = p.read_text().strip()
        try:
            validate_run_id(run_id)
        except MfsimError:
            raise MfsimError(f"{p} holds {run_id!r}, which is not a run id; rewrite it or rerun a job") from None
        run_dir = p.parent / run_id
        if not (run_dir / MANIFEST).is_file():
            raise MfsimError(f"{p} names run {run_id!r}, but {run_dir} is not a published run (no {MANIFEST})")
        return run_dir
    if (p / MANIFEST).is_file():
        return p
    if p.is_dir() and (p / LATEST).is_file():
        raise MfsimError(f"{p} is an output root, not a run: pass {p / LATEST} or {p}/<run_id>")
    raise MfsimError(f"{p} is neither a run directory (no {MANIFEST}) nor an output root's LATEST file: "
                     "pass <output>/<run_id> or <output>/LATEST")


# -- listing ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunStatus:
    """One run as ``mfsim runs`` and ``mfsim status`` show it.

    ``state``: ``running``, ``succeeded``, ``failed`` or ``lost`` (recorded ``running``, but its
    heartbeat is older than ``lost_after_s`` or, on this host, its pid is gone). Times are ISO 8601
    UTC strings; ``duration_s`` runs to the finish, to the last heartbeat for a lost run, and to now
    for a running one. ``run_dir`` is the published directory of this id, None while there is none.
    Counts, host and pid are None where unknown (a run from before state files has no host or pid).
    """

    run_id: str
    state: str
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    n_users: int | None = None
    n_items: int | None = None
    nnz: int | None = None
    host: str | None = None
    pid: int | None = None
    error: str | None = None
    run_dir: str | None = None
    heartbeat_at: str | None = None


def list_runs(root: str | Path, *, lost_after_s: float = 120.0) -> list[RunStatus]:
    """Every run of an output root, sorted by start time, then id.

    The runs with a state file, plus published directories with a manifest but no state file (from
    older versions) as ``succeeded`` from their manifest. An ``MfsimError`` if ``root`` is no directory.
    """
    root = _existing_root(root)
    now = utc_now()
    found: dict[str, RunStatus] = {}
    states = root / STATE_DIR / RUNS_DIR
    for p in sorted(states.iterdir()) if states.is_dir() else ():
        run_id = p.name[:-len(".json")]
        if p.name.startswith(".") or not p.name.endswith(".json") or not is_run_id(run_id):
            continue
        record = _read_record(p)
        if record is not None:
            found[run_id] = _from_record(root, run_id, record, now, lost_after_s)
    for p in sorted(root.iterdir()):
        if p.name not in found and is_run_id(p.name) and (p / MANIFEST).is_file():
            found[p.name] = _from_manifest(root, p.name)
    far_past = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return sorted(found.values(), key=lambda s: (parse_iso(s.started_at) or far_past, s.run_id))


def run_status(root: str | Path, run_id: str, *, lost_after_s: float = 120.0) -> RunStatus:
    """The state of one run (as in ``list_runs``); an ``MfsimError`` naming the root for an unknown id."""
    root = _existing_root(root)
    validate_run_id(run_id)
    record = _read_record(state_path(root, run_id))
    if record is not None:
        return _from_record(root, run_id, record, utc_now(), lost_after_s)
    if (root / run_id / MANIFEST).is_file():
        return _from_manifest(root, run_id)
    raise MfsimError(f"no run {run_id!r} in the output root {root} (no state file, no published directory); "
                     f"list its runs with: mfsim runs --output {root}")


def _existing_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise MfsimError(f"output root {root} does not exist or is not a directory; pass the --output of your runs")
    return root


def is_run_id(name: str) -> bool:
    """Whether ``name`` passes ``validate_run_id`` (listing skips other names)."""
    try:
        validate_run_id(name)
    except MfsimError:
        return False
    return True


def is_lost(record: dict[str, Any], now: dt.datetime, lost_after_s: float) -> bool:
    """A ``running`` record whose heartbeat is older than ``lost_after_s``, or whose pid is gone on this host."""
    beat = parse_iso(record.get("heartbeat_at"))
    if beat is None or (now - beat).total_seconds() > lost_after_s:
        return True
    return record.get("host") == hostname() and not pid_alive(record.get("pid"))


def _from_record(root: Path, run_id: str, record: dict[str, Any], now: dt.datetime,
                 lost_after_s: float) -> RunStatus:
    return status_from_record(run_id, record, now, lost_after_s, _published(root, run_id))


def status_from_record(run_id: str, record: dict[str, Any], now: dt.datetime, lost_after_s: float,
                       run_dir: str | None) -> RunStatus:
    """A run's ``RunStatus`` from its state record (``running`` turns ``lost``: ``is_lost``), whatever the root;
    ``run_dir``: where it is published, or None."""
    state = record.get("state")
    if state == "running" and is_lost(record, now, lost_after_s):
        state = "lost"
    started, finished = parse_iso(record.get("started_at")), parse_iso(record.get("finished_at"))
    end = finished or (parse_iso(record.get("heartbeat_at")) if state == "lost" else now)
    counts = record.get("counts") if isinstance(record.get("counts"), dict) else {}
    return RunStatus(run_id=run_id, state=str(state), started_at=record.get("started_at"),
                     finished_at=record.get("finished_at"), duration_s=_seconds(started, end),
                     **{k: counts.get(k) for k in COUNT_KEYS}, host=record.get("host"), pid=record.get("pid"),
                     error=record.get("error"), run_dir=run_dir, heartbeat_at=record.get("heartbeat_at"))


def _from_manifest(root: Path, run_id: str) -> RunStatus:
    try:
        m = read_manifest(root / run_id)
    except ValueError:
        m = {}
    return status_from_manifest(run_id, m, str(root / run_id))


def status_from_manifest(run_id: str, m: dict[str, Any], run_dir: str) -> RunStatus:
    """A published run without a state record (an older version's, or its record lost) as ``succeeded``."""
    counts = m.get("counts") if isinstance(m.get("counts"), dict) else m
    return RunStatus(run_id=run_id, state="succeeded", started_at=m.get("started_at"), finished_at=m.get("finished_at"),
                     duration_s=_seconds(parse_iso(m.get("started_at")), parse_iso(m.get("finished_at"))),
                     **{k: counts.get(k) for k in COUNT_KEYS}, run_dir=run_dir)


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start is not None and end is not None else None


def _published(root: Path, run_id: str) -> str | None:
    return str(root / run_id) if (root / run_id / MANIFEST).is_file() else None


def _read_record(path: Path) -> dict[str, Any] | None:
    """A state file's record; None when there is none (an unreadable one is logged and skipped)."""
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable run state %s: %s", path, exc)
        return None
    return record if isinstance(record, dict) else None


# -- cleanup and retention --------------------------------------------------------------------
def clean_stale(root: str | Path) -> list[str]:
    """Remove what dead runs of this host left in ``root``; returns the hidden names handled.

    A hidden ``.<id>.tmp-<pid>-<tag>`` or ``.<id>.del-<pid>-<tag>`` directory whose pid is gone is
    removed; a ``.<id>.old-<pid>-<tag>`` (a forced run died while swapping) is renamed back to
    ``<id>`` when that is absent, removed otherwise. One INFO line each. Directories of a live pid,
    of another host (by ``<tag>``) and anything that is not a real directory are left alone.
    """
    root = Path(root)
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    handled = []
    for name in names:
        m = _HIDDEN.fullmatch(name)
        path = root / name
        if m is None or (len(m["tag"]) > 6 and m["tag"][:6] != host_tag()) or pid_alive(int(m["pid"])):
            continue
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            if m["kind"] == "old" and not os.path.lexists(root / m["run_id"]):
                os.rename(path, root / m["run_id"])
                _drop_dead_record(root, m["run_id"], int(m["pid"]))
                log.info("restored run %s from %s: the run replacing it (pid %s) died before its swap",
                         m["run_id"], path, m["pid"])
            else:
                shutil.rmtree(path)
                log.info("removed stale directory %s of run %s: its process (pid %s) is gone", path, m["run_id"],
                         m["pid"])
        except FileNotFoundError:  # another run's cleanup got there first
            continue
        except OSError as exc:
            log.warning("could not clean up %s: %s", path, exc)
            continue
        handled.append(name)
    return handled


def _drop_dead_record(root: Path, run_id: str, pid: int) -> None:
    """Remove run ``run_id``'s ``running`` record if it is that of ``pid`` on this host, now gone."""
    path = state_path(root, run_id)
    with root_mutex(root):
        record = _read_record(path)
        if record is not None and record.get("state") == "running" and record.get("host") == hostname() \
                and record.get("pid") == pid:
            path.unlink(missing_ok=True)


def check_keep_last(keep_last: Any) -> None:
    """``run.keep_last`` must be a whole number >= 0; an ``MfsimError`` saying so otherwise."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise MfsimError(f"run.keep_last must be a whole number >= 0 (or null to keep every run); got {keep_last!r}")


def prune_runs(root: str | Path, keep_last: int, *, pattern: re.Pattern = NIGHTLY_ID) -> list[str]:
    """Retention: remove the oldest succeeded runs whose id fully matches ``pattern`` beyond the newest
    ``keep_last`` of them (by id order); returns the removed ids, oldest first.

    Never the run LATEST names, never one whose state is not ``succeeded`` (a forced rerun of that
    day in progress); other ids are not looked at. Each run is renamed to a hidden name first and
    then deleted, so readers never see a half-deleted run; each removal is logged. Call it under
    ``OutputLock``, as ``mfsim nightly`` does, so no run of the same id is starting meanwhile.
    """
    check_keep_last(keep_last)
    pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
    root = Path(root)
    latest = read_latest(root)
    done = sorted((s.run_id for s in list_runs(root)
                   if s.state == "succeeded" and s.run_dir is not None and pattern.fullmatch(s.run_id)), reverse=True)
    removed = []
    for run_id in sorted(done[keep_last:]):
        if run_id != latest and _remove_run(root, run_id):
            log.info("removed run %s (retention: the newest %d runs are kept)", run_id, keep_last)
            removed.append(run_id)
    return removed


def _remove_run(root: Path, run_id: str) -> bool:
    hidden = root / _hidden_name(run_id, "del")
    path = state_path(root, run_id)
    try:
        with root_mutex(root):
            record = _read_record(path)
            if record is not None and record.get("state") != "succeeded":
                return False  # a run of that id started since the listing
            os.rename(root / run_id, hidden)
            path.unlink(missing_ok=True)
    except OSError as exc:
        raise os_error(exc, root / run_id, "remove the old run", "later runs are untouched") from exc
    _remove_tree(hidden)
    return True


# -- files --------------------------------------------------------------------------------------
def _hidden_name(run_id: str, kind: str) -> str:
    """``.<run_id>.<kind>-<pid>-<host tag><random>``: hidden, unique, and parseable by ``clean_stale``."""
    return f".{run_id}.{kind}-{os.getpid()}-{host_tag()}{uuid.uuid4().hex[:6]}"


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as exc:  # a later RunWriter's clean_stale retries once this pid is gone
        log.warning("could not remove %s: %s", path, exc)


def _atomic_write(path: Path, data: bytes, prefix: str | None = None) -> None:
    """Replace ``path`` with ``data``: a ``tempfile.mkstemp`` file beside it, fsynced, ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; readers of a shared root need to read it
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_tree(top: Path) -> None:
    """fsync every file and directory under ``top`` (so a power cut cannot publish empty files)."""
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
