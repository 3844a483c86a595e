"""Writing one run on an output root: its files, its state record with a heartbeat, its manifest, publishing it.

``RunWriter`` is what every kind of root shares: the run's id and timings, the record of what it
wrote (the manifest's ``datasets``), the state record (``running`` with a heartbeat, then
``succeeded`` or ``failed``, each change made under the root's mutex where it has one, and only
while the record is still this writer's), the manifest, and the order of publishing: everything but the manifest,
then the step that makes the run visible, then LATEST, then the state. What differs between
roots, where the files go while the run runs and what makes a run visible (a rename on a POSIX
root, the manifest's PUT on an object store), is supplied by ``posix.PosixRunWriter`` and
``object_store.ObjectStoreRunWriter``; the root's own bookkeeping is ``root.Root``'s.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pyarrow as pa

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.outputs import dataset_of, schema_json
from mfsim.pipeline.runs.lock import hostname, iso, os_error, utc_now
from mfsim.pipeline.runs.records import COUNT_KEYS, LATEST, MANIFEST, MOVE_LATEST, data_time, new_run_id, \
    state_record, validate_run_id
from mfsim.pipeline.runs.root import REMOVE, Root
from mfsim.pipeline.runs.storage import Location, Written

__all__ = ["FAULT_BEFORE_PUBLISH", "NOT_PUBLISHED", "RunWriter", "error_line", "package_versions"]

PACKAGES = ("mfsim", "numpy", "scipy", "scikit-learn", "numba", "dask", "distributed", "pyarrow", "pandas", "pydantic")
NOT_PUBLISHED = "nothing was published; earlier runs are untouched"
FAULT_BEFORE_PUBLISH = "MFSIM_FAULT_BEFORE_PUBLISH"  # test hook: "1" SIGKILLs the process at publish (RunWriter)

log = logging.getLogger("mfsim.runs")


def package_versions() -> dict[str, str]:
    """Versions of the packages a run depends on, for its manifest."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


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


#: Called as ``listener(name, "start" | "done", time.time())`` around every timed stage of a run (``RunWriter.stage``:
#: the names of the manifest's ``timings``); ``pipeline.trace.StageClock`` of ``mfsim bench scaling`` listens. Empty in
#: a normal run.
STAGE_LISTENERS: list = []


@contextmanager
def timed_into(timings: dict[str, float], name: str) -> Iterator[None]:
    """Adds the wall time of the block to ``timings[name]`` (seconds, 4 decimals)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 4)


class RunWriter:
    """Collects a run's outputs, records its state, publishes it; a context manager::

        with open_root(output).writer(run_id) as run:
            run.write_table("ids/users.parquet", table)
            run.set_counts({"n_users": ..., "n_items": ..., "nnz": ...})
            run.publish(manifest, move_latest="if_newer")

    Parameters
    ----------
    root : the output root (``root.Root``).
    run_id : the run's id (validated); None gives a fresh ``new_run_id()``.
    heartbeat_s : how often a daemon thread refreshes ``heartbeat_at`` in the state record while the
        run runs; keep it well below the ``lost_after_s`` readers use (120 s by default).
    replace : replace a published run of the same id (``--force``); each kind of root says how.

    ``location`` is where the run's files are written while it runs (the workers write their parts
    there; ``written`` records them). ``__enter__`` prepares the root (``_prepare``), records the state
    ``running`` and starts the heartbeat. ``__exit__`` stops the heartbeat and, unless the run was
    published, removes what it wrote (``_discard``) and records ``failed`` with the exception's line
    (``error_line``), or, when a replaced run is still published, puts back that run's record.
    A failed write becomes one ``MfsimError`` (``Root.error``).

    Test hook: with the environment variable ``MFSIM_FAULT_BEFORE_PUBLISH=1``, ``publish`` sends its
    own process SIGKILL with everything but the step that publishes the run done (``_write_out``),
    right before that step (``_make_visible``), so a test can kill a driver at exactly that point
    (``tests/jobs/test_faults.py``, ``tests/jobs/test_object_store.py``). It only ever kills the
    process; it changes nothing in the root.
    """

    location: Location

    def __init__(self, root: Root, run_id: str | None = None, *, heartbeat_s: float = 10.0, replace: bool = False):
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")
        self.run_id = validate_run_id(new_run_id() if run_id is None else run_id)
        self.root = root
        self.final = root.path(self.run_id)
        self.replace = bool(replace)
        self.heartbeat_s = float(heartbeat_s)
        self.timings: dict[str, float] = {}
        self.started = utc_now()
        self.published = False
        self.latest_moved = False
        self.manifest: dict[str, Any] = {}
        self.counts: dict[str, int] | None = None
        # each path inside the run -> (rows, schema); (None, None) for a file that is not a table
        self.files: dict[str, tuple[int | None, pa.Schema | None]] = {}
        self._host, self._pid = hostname(), os.getpid()
        self._state_written = False
        self._lost_race = False  # another run published this id first: the state record is the winner's
        self._previous_state: dict[str, Any] | None = None  # replace=True: the replaced run's record
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what each kind of root supplies ------------------------------------------------------------
    def _prepare(self) -> None:
        """Make the root ready for this run (``__enter__``, before its state is recorded)."""
        raise NotImplementedError

    def _discard(self) -> None:
        """Remove what this run wrote (it will not be published)."""
        raise NotImplementedError

    def _write_out(self, manifest: dict[str, Any]) -> None:
        """At publish: everything but the step that makes the run visible."""
        raise NotImplementedError

    def _make_visible(self, manifest: dict[str, Any]) -> None:
        """At publish: the one step after which the run is published."""
        raise NotImplementedError

    def _latest_failed(self, exc: BaseException) -> MfsimError:
        """LATEST could not be written after the run became visible: what is done about it, and the error."""
        raise NotImplementedError

    def _finish(self) -> None:
        """After the run is published and its state recorded."""

    def _close(self) -> None:
        """On leaving the ``with`` block, published or not."""

    def path(self, relative: str) -> Path:
        """A local file that becomes ``relative`` in the run when it is published (the run's log copy)."""
        raise NotImplementedError

    # -- the run ------------------------------------------------------------------------------------
    def __enter__(self) -> "RunWriter":
        try:
            self._prepare()
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
        self._close()

    def set_counts(self, counts: Mapping[str, Any]) -> None:
        """Record ``n_users``, ``n_items`` and ``nnz`` (other keys are ignored) in the run's state."""
        missing = [k for k in COUNT_KEYS if k not in counts]
        if missing:
            raise ValueError(f"set_counts needs {list(COUNT_KEYS)}; missing {missing}")
        self.counts = {k: int(counts[k]) for k in COUNT_KEYS}
        if self._state_written and not self.published:
            self._update_state(lambda cur: {**cur, "counts": self.counts} if self._running_mine(cur) else None)

    def set_stage(self, name: str, place: str) -> None:
        """Record the stage now running (``place``: ``k/n``) in the run's state, for ``mfsim status``."""
        self._note_running({"stage": f"{name} ({place})"})

    def set_dashboard(self, url: str | None) -> None:
        """Record the run's Dask dashboard (its cluster started) in the run's state, for ``mfsim status``."""
        if url:
            self._note_running({"dashboard": url})

    def _note_running(self, fields: dict[str, Any]) -> None:
        if self._state_written and not self.published:
            try:
                self._update_state(lambda cur: {**cur, **fields} if self._running_mine(cur) else None)
            except MfsimError as exc:  # the state is for watching; the run goes on without it
                log.warning("run %s: state not updated: %s", self.run_id, exc)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times a stage; the wall time lands in the manifest under ``timings[name]``."""
        for listener in STAGE_LISTENERS:
            listener(name, "start", time.time())
        try:
            with timed_into(self.timings, name):
                yield
        finally:
            for listener in STAGE_LISTENERS:
                listener(name, "done", time.time())

    # -- writing --------------------------------------------------------------------------------------
    def write_table(self, relative: str, table: pa.Table) -> str:
        """Write ``table`` as Parquet (zstd) at ``relative`` inside the run."""
        with self._writing(relative) as where:
            self.location.write_table(relative, table)
        self.files[relative] = (table.num_rows, table.schema)
        return where

    def write_json(self, relative: str, obj: Any) -> str:
        """Write ``obj`` as indented JSON at ``relative`` inside the run."""
        with self._writing(relative) as where:
            self.location.write_bytes(relative, json.dumps(obj, indent=2, default=str).encode())
        return where

    def write_bytes(self, relative: str, data: bytes) -> str:
        """Write ``data`` as is at ``relative`` inside the run (the report page), listed as a dataset of its own."""
        with self._writing(relative) as where:
            self.location.write_bytes(relative, data)
        self.files[relative] = (None, None)
        return where

    @contextmanager
    def _writing(self, relative: str, action: str = "write") -> Iterator[str]:
        """Where ``relative`` goes (a ``ValueError`` for a path outside the run, before anything is written);
        a failed write inside becomes one ``MfsimError``."""
        where = self.location.join(relative)
        try:
            yield where
        except self.root.ERRORS as exc:
            raise self.root.error(exc, where, action, NOT_PUBLISHED) from exc

    def written(self, w: Written) -> None:
        """Record a part a worker wrote below ``self.location`` (or write it, when it came back as a table);
        a write that failed on the worker raises its one ``MfsimError`` here."""
        if w.error is not None:
            code, text, path = w.error
            raise os_error(OSError(code, text), path, "write", NOT_PUBLISHED)
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

    # -- publishing -----------------------------------------------------------------------------------
    def publish(self, manifest: dict[str, Any], *, move_latest: str = "always") -> Any:
        """Write ``_manifest.json`` and make the run visible, move LATEST, record ``succeeded``.

        ``move_latest``: ``always``; ``if_newer``, only when LATEST is absent or names an id that sorts
        before this one (nightly ids are days, so a backfill never moves it back); ``never``.
        ``self.latest_moved`` says whether it moved. Returns the run's directory or URL. Raises
        ``MfsimError`` when the run could not be published (nothing published then) or LATEST could
        not be written (what that leaves: ``_latest_failed``).
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
        self._write_out(manifest)
        if os.environ.get(FAULT_BEFORE_PUBLISH) == "1":  # the test hook above: die complete but unpublished
            os.kill(os.getpid(), signal.SIGKILL)
        self._make_visible(manifest)
        self.published = True
        try:
            self.latest_moved = self._move_latest(move_latest)
        except self.root.ERRORS as exc:
            raise self._latest_failed(exc) from exc
        self._stop_heartbeat()
        try:
            self._update_state(lambda cur: self._record("succeeded"))
        except MfsimError as exc:  # the run is out and complete; its state shows lost in time
            log.warning("run %s is published, but its state could not be recorded: %s", self.run_id, exc)
        self._finish()
        return self.final

    def _move_latest(self, mode: str) -> bool:
        if mode == "never":
            return False
        if mode == "if_newer":
            current = self.root.read_latest()
            if current is not None and not self._newer_than(current):
                return False
        self.root.write_latest(self.run_id)
        return True

    def _newer_than(self, other: str) -> bool:
        """Whether this run's data ends after run ``other``'s (``records.data_time``; ids compared only when a time
        is unknown)."""
        record = self.root.read_record(other) or {}
        theirs, mine = data_time(other, record.get("started_at")), data_time(self.run_id, iso(self.started))
        if theirs is None or mine is None:
            return other < self.run_id
        return (mine, self.run_id) > (theirs, other)

    def _latest_error(self, exc: BaseException, note: str) -> MfsimError:
        return self.root.error(exc, self.root.path(LATEST), "update", note)

    def _exists_error(self, concurrent: bool = False) -> MfsimError:
        how = "another run published it at the same time; " if concurrent else ""
        return MfsimError(f"run {self.final} already exists ({how}this run was not published); pass another "
                          f"--run-id (or none for a fresh one), --force to replace it, or remove that "
                          f"{self.root.RUN_NOUN}")

    # -- the state record -----------------------------------------------------------------------------
    def _record(self, state: str, error: str | None = None) -> dict[str, Any]:
        """The run's state record: ``state``, this process, its start, a fresh heartbeat, counts, where it goes."""
        return state_record(self.run_id, state, host=self._host, pid=self._pid, started_at=iso(self.started),
                            counts=self.counts, run_dir=str(self.final), error=error)

    def _running_mine(self, record: dict[str, Any] | None) -> bool:
        """Whether ``record`` is this writer's, still running (a same-id run may have written since)."""
        return record is not None and record.get("state") == "running" and record.get("host") == self._host \
            and record.get("pid") == self._pid and record.get("started_at") == iso(self.started)

    def _begin(self, current: dict[str, Any] | None) -> dict[str, Any]:
        if self.replace:
            self._previous_state = current
        return self._record("running")

    def _update_state(self, change: Callable[[dict[str, Any] | None], Any]) -> None:
        self.root.update_record(self.run_id, change, note="the run was stopped")

    def _heartbeat(self) -> None:
        """Refresh ``heartbeat_at`` in the run's state record once."""
        self._update_state(lambda cur: {**cur, "heartbeat_at": iso(utc_now())} if self._running_mine(cur) else None)

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

    def _replaced_run_kept(self) -> bool:
        """Whether the run this one was to replace is still published (this one failed before taking its place)."""
        try:
            return self.root.is_file(f"{self.run_id}/{MANIFEST}")
        except self.root.ERRORS:
            return False

    def _abort(self, exc: BaseException | None) -> None:
        """Remove what the run wrote; record ``failed`` (or, when the replaced run is still published, its record)."""
        self._stop_heartbeat()
        self._discard()
        if not self._state_written or self._lost_race:
            return
        line = error_line(exc)
        if self.replace and self._replaced_run_kept():
            previous = self._previous_state
            change = lambda cur: (previous if previous is not None else REMOVE) if self._running_mine(cur) else None
        else:
            change = lambda cur: self._record("failed", line) if self._running_mine(cur) else None
        try:
            self._update_state(change)
        except MfsimError as err:  # never hide the run's own error behind this one
            log.warning("could not record that run %s failed: %s", self.run_id, err)

