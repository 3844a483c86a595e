"""An output root, whatever it is stored on: its bookkeeping, written once over a few primitives.

A root holds published runs (``<root>/<run_id>/``, each with its ``_manifest.json``), ``LATEST``
(the newest published run's id) and the runs' state records (``<root>/.mfsim/runs/<run_id>.json``).
``Root`` reads and writes them: LATEST, manifests and tables of published runs, state records,
the list of runs and their status, retention, resolving ``<root>/LATEST`` or a run's path to a
published run. Each kind of root (``posix.PosixRoot``: a local directory; ``object_store.ObjectStoreRoot``:
an fsspec URL) supplies only the primitives: read a file, replace one whole (atomically: readers
see the old bytes or the new ones), whether a file exists, list a directory, remove a file, the
mutex that serializes the bookkeeping, the error a failure becomes, how a published run is taken
away, and the kind's run writer. ``roots.open_root`` picks the kind.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs.lock import STATE_DIR, hostname, iso, parse_iso, utc_now
from mfsim.pipeline.runs.records import LATEST, MANIFEST, NIGHTLY_ID, RUNS_DIR, RunStatus, is_run_id, state_record, \
    status_from_manifest, status_from_record, validate_run_id

__all__ = ["REMOVE", "Root", "check_keep_last", "state_relative"]

log = logging.getLogger("mfsim.runs")

REMOVE = object()  # Root.update_record: delete the record


def state_relative(run_id: str) -> str:
    """Where run ``run_id`` records its state, inside its root: ``.mfsim/runs/<run_id>.json``."""
    return f"{STATE_DIR}/{RUNS_DIR}/{validate_run_id(run_id)}.json"


def check_keep_last(keep_last: Any) -> None:
    """``run.keep_last`` must be a whole number >= 0; an ``MfsimError`` saying so otherwise."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise MfsimError(f"run.keep_last must be a whole number >= 0 (or null to keep every run); got {keep_last!r}")


class Root:
    """An output root: a directory (``base``) and the bookkeeping of the runs in it.

    Paths given to the primitives are relative to ``base`` and use ``/``. Subclasses set
    ``ERRORS`` (what a failed storage call raises), ``RUN_NOUN`` (what a run is there: a
    directory, a prefix) and ``UNPUBLISHED_HINT`` (what to do with a run that has no manifest).
    """

    ERRORS: tuple[type[BaseException], ...] = (OSError,)
    RUN_NOUN = "directory"
    UNPUBLISHED_HINT = ""
    base: Any  # a Path or a URL

    def __str__(self) -> str:
        return str(self.base)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.base)!r})"

    # -- primitives -------------------------------------------------------------------------------
    @classmethod
    def locate(cls, path: str | Path) -> tuple["Root", str]:
        """The root that holds ``path`` and the name of ``path`` in it."""
        raise NotImplementedError

    def path(self, relative: str = "") -> Any:
        """Where ``relative`` is: a ``Path`` or a URL."""
        raise NotImplementedError

    def read_bytes(self, relative: str) -> bytes:
        """The bytes of a file; ``FileNotFoundError`` when there is none."""
        raise NotImplementedError

    def write_atomic(self, relative: str, data: bytes) -> None:
        """Replace a file whole: a reader sees the old bytes or the new ones, never a part."""
        raise NotImplementedError

    def is_file(self, relative: str) -> bool:
        raise NotImplementedError

    def list_names(self, relative: str = "") -> list[str]:
        """The names in a directory, sorted; none when it does not exist."""
        raise NotImplementedError

    def remove(self, relative: str) -> None:
        """Remove a file (gone already is fine)."""
        raise NotImplementedError

    def mutex(self) -> AbstractContextManager:
        """Held around each read-change-write of a state record."""
        raise NotImplementedError

    def error(self, exc: BaseException, where: Any, action: str, note: str = "") -> MfsimError:
        """The one ``MfsimError`` a failed storage call (one of ``ERRORS``) becomes."""
        raise NotImplementedError

    def check(self) -> None:
        """Before listing: an ``MfsimError`` if the root cannot be listed; forget cached listings."""
        raise NotImplementedError

    def arrow_source(self, relative: str) -> tuple[str, Any]:
        """(path, filesystem) of a file or directory for pyarrow; the filesystem None for a local path."""
        raise NotImplementedError

    def lock_dir(self) -> Path:
        """The local directory that holds this root's nightly lock (``lock.OutputLock``)."""
        raise NotImplementedError

    def log_dir(self) -> Path:
        """The local directory that a submitted run's log lines go to while it runs."""
        raise NotImplementedError

    def writer(self, run_id: str | None = None, *, heartbeat_s: float = 10.0, replace: bool = False):
        """The run writer of this kind of root (``writer.RunWriter``'s calls)."""
        raise NotImplementedError

    def _remove_run(self, run_id: str) -> bool:
        """Take a published run away (retention), first out of sight, then its files; False if it is in use."""
        raise NotImplementedError

    # -- LATEST, manifests, tables ----------------------------------------------------------------
    def run_location(self, run_id: str) -> str:
        """Where run ``run_id`` is (published or not): ``<root>/<run_id>`` as a path or URL."""
        return str(self.path(validate_run_id(run_id)))

    def read_latest(self) -> str | None:
        """The run id in ``<root>/LATEST``, or None when no run has succeeded there; an ``MfsimError`` naming the file
        and what to do when it is damaged (a folder, bytes that are not UTF-8, text that is not a run id)."""
        try:
            raw = self.read_bytes(LATEST)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            raise self._damaged_latest("is a folder, not the file that names the newest run") from None
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise self._damaged_latest("holds bytes that are not UTF-8 text") from None
        if not is_run_id(text):
            raise self._damaged_latest(f"holds {text[:40]!r}, which is not a run id")
        return text

    def _damaged_latest(self, what: str) -> MfsimError:
        return MfsimError(f"{self.path(LATEST)} {what}: it is damaged. Write the id of a published run into it (e.g. "
                          f"the newest in: mfsim runs --output {self.base}), or remove it (the next run that "
                          "succeeds writes it)")

    def write_latest(self, run_id: str) -> None:
        """Replace ``<root>/LATEST`` whole with ``run_id`` (``write_atomic``)."""
        self.write_atomic(LATEST, (validate_run_id(run_id) + "\n").encode())

    def read_manifest(self, name: str) -> dict[str, Any]:
        """The ``_manifest.json`` of the published run ``<root>/<name>``; an ``MfsimError`` when there is none."""
        try:
            data = self.read_bytes(f"{name}/{MANIFEST}")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._unpublished(name) from None
        try:
            manifest = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise MfsimError(f"{self.path(name)}/{MANIFEST} does not parse ({' '.join(str(exc).split())}): run "
                             f"{name} is damaged; rerun it (--run-id {name} --force) or remove it") from None
        if not isinstance(manifest, dict):
            raise MfsimError(f"{self.path(name)}/{MANIFEST} is not a manifest (a JSON object): run {name} is damaged; "
                             f"rerun it (--run-id {name} --force) or remove it")
        return manifest

    def read_table(self, relative: str) -> pa.Table:
        """One Parquet file (``<run_id>/evaluation/metrics.parquet``)."""
        path, fs = self.arrow_source(relative)
        return pq.read_table(path, filesystem=fs)

    def resolve(self, name: str) -> Any:
        """The published run that ``<root>/<name>`` stands for: ``<root>/LATEST`` (the file) resolved to
        ``<root>/<id>``, or the run ``<root>/<name>`` itself; an ``MfsimError`` saying what to pass otherwise."""
        p = self.path(name)
        if name == LATEST:
            run_id = self.read_latest()
            if run_id is None:
                raise MfsimError(f"{p} does not exist: no run has succeeded in {self.base} yet")
            if not is_run_id(run_id):
                raise MfsimError(f"{p} holds {run_id!r}, which is not a run id; rewrite it or rerun a job")
            if not self.is_file(f"{run_id}/{MANIFEST}"):
                raise MfsimError(f"{p} names run {run_id!r}, but {self.path(run_id)} is not a published run "
                                 f"(no {MANIFEST})")
            return self.path(run_id)
        if self.is_file(f"{name}/{MANIFEST}"):
            return p
        if self.is_file(f"{name}/{LATEST}"):
            raise MfsimError(f"{p} is an output root, not a run: pass {self.path(f'{name}/{LATEST}')} or "
                             f"{p}/<run_id>")
        raise self._not_a_run(name)

    def _unpublished(self, name: str) -> MfsimError:
        return MfsimError(f"{self.path(name)} is not a published run (no {MANIFEST}); {self.UNPUBLISHED_HINT}")

    def _not_a_run(self, name: str) -> MfsimError:
        """What ``resolve`` says of a name that is neither LATEST, nor a published run, nor a root."""
        return self._unpublished(name)

    # -- state records ----------------------------------------------------------------------------
    def read_record(self, run_id: str) -> dict[str, Any] | None:
        """Run ``run_id``'s state record; None when there is none (an unreadable one is logged and skipped)."""
        relative = state_relative(run_id)
        try:
            record = json.loads(self.read_bytes(relative))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable run state %s: %s", self.path(relative), exc)
            return None
        return record if isinstance(record, dict) else None

    def update_record(self, run_id: str, change: Callable[[dict[str, Any] | None], Any], note: str = "") -> None:
        """Under the root's mutex: ``change(current record or None)`` -> a new record (written whole), None
        (keep it) or ``REMOVE``; a storage failure becomes one ``MfsimError`` (``note``: what it meant)."""
        relative = state_relative(run_id)
        try:
            with self.mutex():
                new = change(self.read_record(run_id))
                if new is REMOVE:
                    self.remove(relative)
                elif new is not None:
                    self.write_atomic(relative, json.dumps(new, indent=1).encode())
        except self.ERRORS as exc:
            raise self.error(exc, self.path(relative), "record the run's state in", note) from exc

    def record_submitted(self, run_id: str, pid: int) -> None:
        """State ``running`` for a run just started in process ``pid`` (``mfsim submit``), before its run writer
        takes over the record: the run is listed from the moment its id is printed, and shows ``lost`` if that
        process dies before writing anything."""
        record = state_record(validate_run_id(run_id), "running", host=hostname(), pid=int(pid),
                              started_at=iso(utc_now()), counts=None, run_dir=str(self.path(run_id)))
        self.update_record(run_id, lambda current: record if current is None else None)  # the run may be first

    # -- listing ----------------------------------------------------------------------------------
    def list_runs(self, *, lost_after_s: float = 120.0) -> list[RunStatus]:
        """Every run of the root, sorted by start time, then id.

        The runs with a state record, plus published runs (with a manifest) but no record (from
        older versions) as ``succeeded`` from their manifest. An ``MfsimError`` if the root is none.
        """
        self.check()
        now = utc_now()
        found: dict[str, RunStatus] = {}
        for name in self.list_names(f"{STATE_DIR}/{RUNS_DIR}"):
            run_id = name[:-len(".json")]
            if name.startswith(".") or not name.endswith(".json") or not is_run_id(run_id):
                continue
            record = self.read_record(run_id)
            if record is not None:
                found[run_id] = self._checked(status_from_record(run_id, record, now, lost_after_s,
                                                                 self._published(run_id)))
        for name in self.list_names():
            if name not in found and is_run_id(name) and self.is_file(f"{name}/{MANIFEST}"):
                found[name] = self._from_manifest(name)
        try:
            latest = self.read_latest()
        except MfsimError as exc:  # the runs are still listed; LATEST's damage is said once
            log.warning("%s", exc)
            latest = None
        if latest in found:
            found[latest] = dataclasses.replace(found[latest], latest=True)
        far_past = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
        return sorted(found.values(), key=lambda s: (parse_iso(s.started_at) or far_past, s.run_id))

    def run_status(self, run_id: str, *, lost_after_s: float = 120.0) -> RunStatus:
        """The state of one run (as in ``list_runs``); an ``MfsimError`` naming the root for an unknown id."""
        self.check()
        record = self.read_record(run_id)
        if record is not None:
            return self._checked(status_from_record(run_id, record, utc_now(), lost_after_s, self._published(run_id)))
        if self.is_file(f"{run_id}/{MANIFEST}"):
            return self._from_manifest(run_id)
        raise MfsimError(f"no run {run_id!r} in the output root {self.base} (no state record, no published run); "
                         f"list its runs with: mfsim runs --output {self.base}")

    def _checked(self, st: RunStatus) -> RunStatus:
        """A run recorded ``succeeded`` as it is now: ``removed`` when its folder is gone, ``damaged`` when its
        manifest does not parse (the error says what to do)."""
        if st.state != "succeeded":
            return st
        if st.run_dir is None:
            return dataclasses.replace(st, state="removed", error=f"{self.path(st.run_id)} is gone (removed after "
                                                                   "it was published)")
        try:
            self.read_manifest(st.run_id)
        except MfsimError as exc:
            return dataclasses.replace(st, state="damaged", error=str(exc))
        return st

    def _published(self, run_id: str) -> str | None:
        return str(self.path(run_id)) if self.is_file(f"{run_id}/{MANIFEST}") else None

    def _from_manifest(self, run_id: str) -> RunStatus:
        try:
            m = self.read_manifest(run_id)
        except MfsimError as exc:
            return dataclasses.replace(status_from_manifest(run_id, {}, str(self.path(run_id))), state="damaged",
                                       error=str(exc))
        return status_from_manifest(run_id, m, str(self.path(run_id)))

    # -- retention --------------------------------------------------------------------------------
    def prune_runs(self, keep_last: int, *, pattern: re.Pattern | str = NIGHTLY_ID) -> list[str]:
        """Retention: remove the oldest succeeded runs whose id fully matches ``pattern`` beyond the newest
        ``keep_last`` of them (by id order); returns the removed ids, oldest first.

        Never the run LATEST names, never one whose state is not ``succeeded`` (a forced rerun of that
        day in progress); other ids are not looked at. Each run is taken out of sight first and then
        deleted (``_remove_run``), so readers never see a half-deleted run; each removal is logged.
        Call it under ``OutputLock``, as ``mfsim nightly`` does, so no run of the same id is starting
        meanwhile.
        """
        check_keep_last(keep_last)
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        latest = self.read_latest()
        done = sorted((s.run_id for s in self.list_runs()
                       if s.state == "succeeded" and s.run_dir is not None and pattern.fullmatch(s.run_id)),
                      reverse=True)
        removed = []
        for run_id in sorted(done[keep_last:]):
            if run_id != latest and self._remove_run(run_id):
                log.info("removed run %s (retention: the newest %d runs are kept)", run_id, keep_last)
                removed.append(run_id)
        return removed
