"""Runs on an object store (``s3://``, ``gs://``, ``abfs://``, ``memory://``): written in place, published by
the manifest.

Object stores have no rename, so a run cannot be built out of sight and moved into place as on
a POSIX root (``pipeline.runs``). Here a run is written under its final prefix and a reader tells
a published run by its manifest:

    <root>/<run_id>/...              the run's files, written where they are computed
    <root>/<run_id>/_manifest.json   written last (one PUT): from then on the run is published
    <root>/LATEST                    then replaced (one PUT): the id of the newest published run
    <root>/.mfsim/runs/<run_id>.json the run's state while and after it runs (heartbeat)

What is promised, exactly:

- A prefix without ``_manifest.json`` is not a published run: ``mfsim runs``, ``mfsim show``,
  ``mfsim.open_run`` and the README treat it so. A reader reads ``LATEST`` first, then the run it
  names; LATEST only ever names a run whose manifest was written before it.
- A run that fails removes its prefix and records ``failed``; a killed one leaves an unpublished
  prefix (and a ``running`` state that turns ``lost`` when its heartbeat stops). The next run of
  that id removes the leftover prefix first, with one INFO line.
- A run whose id is published already is refused unless ``replace`` (``--force``): then the old
  manifest is deleted first (the old run is no longer published from that moment) and its files
  are removed before the new run writes; unlike a POSIX root, the old run is not readable while
  the new one is written.
- Two runs of one id at once are not arbitrated (object stores have no exclusive create that
  every store offers): one found running with a fresh heartbeat is refused, which catches a
  second firing, but not an exact race. Nightly runs keep their lock on a local root.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import pyarrow as pa

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs.lock import STATE_DIR, hostname, iso, parse_iso, utc_now
from mfsim.pipeline.runs.posix import COUNT_KEYS, FAULT_BEFORE_PUBLISH, LATEST, MANIFEST, MOVE_LATEST, RUNS_DIR, DatasetBook, \
    RunStatus, error_line, is_lost, is_run_id, package_versions, state_record, status_from_manifest, \
    status_from_record, validate_run_id
from mfsim.pipeline.runs.storage import Location, filesystem, normalize

log = logging.getLogger("mfsim.runs")
_NOT_PUBLISHED = "nothing was published; earlier runs are untouched"


def _store_error(exc: Exception, url: str, action: str, note: str = _NOT_PUBLISHED) -> MfsimError:
    err = MfsimError(f"cannot {action} {url}: {type(exc).__name__}: {exc}; {note}; check the URL, the bucket and "
                     "the credentials (environment or fsspec config), then rerun")
    err.exit_code = 2 if isinstance(exc, (PermissionError, FileNotFoundError)) else 1
    return err


class ObjectStoreRunWriter(DatasetBook):
    """``pipeline.runs.RunWriter`` for an object-store root: same calls, published by the manifest (module notes)."""

    def __init__(self, output_root: str, run_id: str | None = None, *, heartbeat_s: float = 10.0,
                 replace: bool = False):
        self._begin_book(run_id, heartbeat_s, replace)
        self.root = normalize(output_root)
        self.final = f"{self.root}/{self.run_id}"
        self.location = Location(self.final)
        self._local = Path(tempfile.mkdtemp(prefix=f"mfsim-{self.run_id}-"))  # the log copy until publish
        if not self.replace and _exists(self.final + "/" + MANIFEST):
            shutil.rmtree(self._local, ignore_errors=True)
            raise self._exists_error()

    def __enter__(self) -> "ObjectStoreRunWriter":
        try:
            current = _read_record(state_url(self.root, self.run_id))
            if current is not None and current.get("state") == "running" and not is_lost(current, utc_now(), 120.0):
                raise MfsimError(f"run {self.final} is being written by {current.get('host')} (pid "
                                 f"{current.get('pid')}, heartbeat {current.get('heartbeat_at')}); wait for it or "
                                 "pass another --run-id")
            if _exists(self.final + "/" + MANIFEST):  # replace: unpublish the old run first
                _remove(self.final + "/" + MANIFEST)
                log.info("run %s: replacing the published run (its manifest is removed first)", self.final)
            if _exists(self.final):
                _remove(self.final, recursive=True)
                log.info("removed the unpublished prefix %s left by an earlier run of this id", self.final)
            self._put_state(self._record("running"))
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
        shutil.rmtree(self._local, ignore_errors=True)

    def set_counts(self, counts: Mapping[str, Any]) -> None:
        """Record ``n_users``, ``n_items`` and ``nnz`` in the run's state."""
        missing = [k for k in COUNT_KEYS if k not in counts]
        if missing:
            raise ValueError(f"set_counts needs {list(COUNT_KEYS)}; missing {missing}")
        self.counts = {k: int(counts[k]) for k in COUNT_KEYS}
        if self._state_written and not self.published:
            self._put_state(self._record("running"))

    # -- writing ------------------------------------------------------------------------------
    def path(self, relative: str) -> Path:
        """A local path for ``relative`` (only the run's log copy is written locally; uploaded at publish)."""
        p = self._local / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_table(self, relative: str, table: pa.Table) -> str:
        with self._writing(relative):
            self.location.write_table(relative, table)
        self.files[relative] = (table.num_rows, table.schema)
        return self.location.join(relative)

    def write_json(self, relative: str, obj: Any) -> str:
        with self._writing(relative):
            self.location.write_bytes(relative, json.dumps(obj, indent=2, default=str).encode())
        return self.location.join(relative)

    def write_bytes(self, relative: str, data: bytes) -> str:
        with self._writing(relative):
            self.location.write_bytes(relative, data)
        self.files[relative] = (None, None)
        return self.location.join(relative)

    @contextmanager
    def _writing(self, relative: str) -> Iterator[None]:
        try:
            yield
        except (OSError, ValueError) as exc:
            raise _store_error(exc, self.location.join(relative), "write") from exc

    # -- publishing ---------------------------------------------------------------------------
    def publish(self, manifest: dict[str, Any], *, move_latest: str = "always") -> str:
        """Upload the log copy, write ``_manifest.json`` last (the run is published), then LATEST, then the state."""
        if move_latest not in MOVE_LATEST:
            raise ValueError(f"move_latest must be one of {MOVE_LATEST}, got {move_latest!r}")
        if self.published:
            raise RuntimeError(f"run {self.run_id} is already published")
        for p in sorted(self._local.rglob("*")):  # the log copy (_log.txt)
            if p.is_file():
                self.write_bytes(p.relative_to(self._local).as_posix(), p.read_bytes())
                self.files.pop(p.relative_to(self._local).as_posix(), None)
        manifest = dict(manifest)
        manifest.update(datasets=self.datasets(), run_id=self.run_id, started_at=iso(self.started),
                        finished_at=iso(utc_now()), timings=dict(self.timings), versions=package_versions(),
                        status="succeeded")
        self.manifest = manifest
        if os.environ.get(FAULT_BEFORE_PUBLISH) == "1":  # test hook (as RunWriter's): die with every part written
            os.kill(os.getpid(), signal.SIGKILL)
        self.write_json(MANIFEST, manifest)
        self.published = True
        try:
            self.latest_moved = self._move_latest(move_latest)
        except (OSError, ValueError) as exc:
            raise _store_error(exc, f"{self.root}/{LATEST}", "update",
                               "the run is published but LATEST still names the previous run") from exc
        self._stop_heartbeat()
        try:
            self._put_state(self._record("succeeded"))
        except MfsimError as exc:
            log.warning("run %s is published, but its state could not be recorded: %s", self.run_id, exc)
        return self.final

    def _move_latest(self, mode: str) -> bool:
        if mode == "never":
            return False
        if mode == "if_newer":
            current = read_latest(self.root)
            if current is not None and not current < self.run_id:
                return False
        write_latest(self.root, self.run_id)
        return True

    def _exists_error(self) -> MfsimError:
        return MfsimError(f"run {self.final} already exists (this run was not published); pass another --run-id "
                          "(or none for a fresh one), --force to replace it, or remove that prefix")

    # -- the state object ---------------------------------------------------------------------
    def _put_state(self, record: dict[str, Any]) -> None:
        url = state_url(self.root, self.run_id)
        try:
            fs, path = filesystem(url)
            fs.pipe_file(path, json.dumps(record, indent=1).encode())
        except (OSError, ValueError) as exc:
            raise _store_error(exc, url, "record the run's state in", "the run was stopped") from exc

    def _heartbeat(self) -> None:
        self._put_state(self._record("running"))

    def _abort(self, exc: BaseException | None) -> None:
        """Remove the run's prefix (nothing of it stays visible); record ``failed``."""
        self._stop_heartbeat()
        try:
            if _exists(self.final):
                _remove(self.final, recursive=True)
        except (OSError, ValueError) as err:
            log.warning("could not remove the unpublished prefix %s: %s", self.final, err)
        if self._state_written:
            try:
                self._put_state(self._record("failed", error_line(exc)))
            except MfsimError as err:
                log.warning("could not record that run %s failed: %s", self.run_id, err)


# -- reading a root ---------------------------------------------------------------------------
def state_url(root: str, run_id: str) -> str:
    return f"{normalize(root)}/{STATE_DIR}/{RUNS_DIR}/{validate_run_id(run_id)}.json"


def write_latest(root: str, run_id: str) -> None:
    """``<root>/LATEST`` in one PUT (replaced whole: readers see the old id or the new one)."""
    fs, path = filesystem(f"{normalize(root)}/{LATEST}")
    fs.pipe_file(path, (validate_run_id(run_id) + "\n").encode())


def read_latest(root: str) -> str | None:
    """The id in ``<root>/LATEST``, or None."""
    fs, path = filesystem(f"{normalize(root)}/{LATEST}")
    try:
        return fs.cat_file(path).decode().strip()
    except FileNotFoundError:
        return None


def read_manifest(run_url: str) -> dict[str, Any]:
    """The manifest of a published run; an ``MfsimError`` when the prefix has none (not published)."""
    fs, path = filesystem(f"{normalize(run_url)}/{MANIFEST}")
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise MfsimError(f"{run_url} is not a published run (no {MANIFEST}); on an object store a run is "
                         f"published only once its manifest is written: read <root>/{LATEST} and the run it names"
                         ) from None


def resolve_run_url(url: str) -> str:
    """A published run's URL from a run URL or ``<root>/LATEST``."""
    url = normalize(url)
    if url.rsplit("/", 1)[-1] == LATEST:
        root = url.rsplit("/", 1)[0]
        run_id = read_latest(root)
        if run_id is None:
            raise MfsimError(f"{url} does not exist: no run has succeeded in {root} yet")
        validate_run_id(run_id)
        read_manifest(f"{root}/{run_id}")
        return f"{root}/{run_id}"
    read_manifest(url)
    return url


def list_runs(root: str, *, lost_after_s: float = 120.0) -> list[RunStatus]:
    """Every run of an object-store root (as ``pipeline.runs.list_runs``), sorted by start time, then id."""
    root = normalize(root)
    fs, base = filesystem(root)
    fs.invalidate_cache()
    now = utc_now()
    found: dict[str, RunStatus] = {}
    states = f"{base}/{STATE_DIR}/{RUNS_DIR}"
    for path in sorted(fs.ls(states, detail=False)) if fs.exists(states) else ():
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".json") and is_run_id(name[:-5]):
            record = _read_record(f"{root}/{STATE_DIR}/{RUNS_DIR}/{name}")
            if record is not None:
                found[name[:-5]] = _status(root, name[:-5], record, now, lost_after_s)
    for path in sorted(fs.ls(base, detail=False)) if fs.exists(base) else ():
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name not in found and is_run_id(name) and fs.exists(f"{base}/{name}/{MANIFEST}"):
            found[name] = _from_manifest(root, name)
    far_past = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return sorted(found.values(), key=lambda s: (parse_iso(s.started_at) or far_past, s.run_id))


def run_status(root: str, run_id: str, *, lost_after_s: float = 120.0) -> RunStatus:
    root = normalize(root)
    record = _read_record(state_url(root, run_id))
    if record is not None:
        return _status(root, run_id, record, utc_now(), lost_after_s)
    if _exists(f"{root}/{run_id}/{MANIFEST}"):
        return _from_manifest(root, run_id)
    raise MfsimError(f"no run {run_id!r} in the output root {root} (no state, no manifest); "
                     f"list its runs with: mfsim runs --output {root}")


def _status(root: str, run_id: str, record: dict[str, Any], now: dt.datetime, lost_after_s: float) -> RunStatus:
    published = f"{root}/{run_id}" if _exists(f"{root}/{run_id}/{MANIFEST}") else None
    return status_from_record(run_id, record, now, lost_after_s, published)


def _from_manifest(root: str, run_id: str) -> RunStatus:
    return status_from_manifest(run_id, read_manifest(f"{root}/{run_id}"), f"{root}/{run_id}")


def _read_record(url: str) -> dict[str, Any] | None:
    fs, path = filesystem(url)
    try:
        record = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable run state %s: %s", url, exc)
        return None
    return record if isinstance(record, dict) else None


def _exists(url: str) -> bool:
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return fs.exists(path)


def _remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    fs.rm(path, recursive=recursive)
    fs.invalidate_cache()


def record_submitted(root: str, run_id: str, pid: int) -> None:
    """State ``running`` for a run just started in process ``pid`` (as ``pipeline.runs.record_submitted``)."""
    url = state_url(root, run_id)
    if _read_record(url) is not None:
        return
    record = state_record(run_id, "running", hostname(), int(pid), iso(utc_now()), None, f"{normalize(root)}/{run_id}")
    fs, path = filesystem(url)
    fs.pipe_file(path, json.dumps(record, indent=1).encode())


def prune_runs(root: str, keep_last: int, *, pattern) -> list[str]:
    """Retention on an object store (as ``pipeline.runs.prune_runs``): each removed run's manifest is deleted
    first, so it stops being published before its files go."""
    root = normalize(root)
    latest = read_latest(root)
    done = sorted((s.run_id for s in list_runs(root)
                   if s.state == "succeeded" and s.run_dir is not None and pattern.fullmatch(s.run_id)), reverse=True)
    removed = []
    for run_id in sorted(done[keep_last:]):
        if run_id == latest:
            continue
        _remove(f"{root}/{run_id}/{MANIFEST}")
        _remove(f"{root}/{run_id}", recursive=True)
        log.info("removed run %s (retention: the newest %d runs are kept)", run_id, keep_last)
        removed.append(run_id)
    return removed
