"""Runs on an object store (``s3://``, ``gs://``, ``abfs://``, ``memory://``): written in place, published by
the manifest.

Object stores have no rename, so a run cannot be built out of sight and moved into place as on
a POSIX root (``posix``). Here a run is written under its final prefix and a reader tells
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

import hashlib
import logging
import shutil
import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs.lock import utc_now
from mfsim.pipeline.runs.records import LATEST, MANIFEST, is_lost
from mfsim.pipeline.runs.root import Root, state_relative
from mfsim.pipeline.runs.storage import Location, filesystem, normalize
from mfsim.pipeline.runs.writer import RunWriter

__all__ = ["ObjectStoreRoot", "ObjectStoreRunWriter"]

log = logging.getLogger("mfsim.runs")
CACHE = Path.home() / ".cache" / "mfsim"  # this host's side of an object-store root: nightly locks, submitted logs


class ObjectStoreRoot(Root):
    """An output root that is an fsspec URL: each file written in one PUT, no mutex (the store has none)."""

    ERRORS = (OSError, ValueError)
    RUN_NOUN = "prefix"
    UNPUBLISHED_HINT = (f"on an object store a run is published only once its manifest is written: read "
                        f"<root>/{LATEST} and the run it names")

    def __init__(self, base: str):
        self.base = normalize(base)

    @classmethod
    def locate(cls, path: str) -> tuple["ObjectStoreRoot", str]:
        parent, name = normalize(path).rsplit("/", 1)
        return cls(parent), name

    def path(self, relative: str = "") -> str:
        return f"{self.base}/{relative}" if relative else self.base

    def _fs(self, relative: str = ""):
        return filesystem(self.path(relative))

    def read_bytes(self, relative: str) -> bytes:
        fs, path = self._fs(relative)
        return fs.cat_file(path)

    def write_atomic(self, relative: str, data: bytes) -> None:
        """One PUT: readers see the old object or the new one."""
        fs, path = self._fs(relative)
        fs.pipe_file(path, data)

    def is_file(self, relative: str) -> bool:
        return self.exists(relative)

    def exists(self, relative: str) -> bool:
        """Whether an object or a prefix is there (asked afresh, not from a cached listing)."""
        fs, path = self._fs(relative)
        fs.invalidate_cache(path)
        return fs.exists(path)

    def list_names(self, relative: str = "") -> list[str]:
        fs, path = self._fs(relative)
        if not fs.exists(path):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in sorted(fs.ls(path, detail=False))]

    def remove(self, relative: str, *, recursive: bool = False) -> None:
        """Remove an object, or with ``recursive`` every object below a prefix (gone already is fine)."""
        fs, path = self._fs(relative)
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        fs.invalidate_cache()

    def mutex(self) -> AbstractContextManager:
        return nullcontext()

    def error(self, exc: BaseException, where: Any, action: str, note: str = "") -> MfsimError:
        err = MfsimError(f"cannot {action} {where}: {type(exc).__name__}: {exc}; {note + '; ' if note else ''}check "
                         "the URL, the bucket and the credentials (environment or fsspec config), then rerun")
        err.exit_code = 2 if isinstance(exc, (PermissionError, FileNotFoundError)) else 1
        return err

    def check(self) -> None:
        self._fs()[0].invalidate_cache()

    def arrow_source(self, relative: str) -> tuple[str, Any]:
        fs, path = self._fs(relative)
        return path, fs

    def lock_dir(self) -> Path:
        """A local directory named after the URL (an object store has no exclusive create): the lock stops
        overlapping runs of this host, not of two hosts."""
        return CACHE / "locks" / hashlib.sha256(self.base.encode()).hexdigest()[:16]

    def log_dir(self) -> Path:
        return CACHE / "logs"

    def writer(self, run_id: str | None = None, *, heartbeat_s: float = 10.0,
               replace: bool = False) -> "ObjectStoreRunWriter":
        return ObjectStoreRunWriter(self.base, run_id, heartbeat_s=heartbeat_s, replace=replace)

    def _remove_run(self, run_id: str) -> bool:
        """The manifest first, so the run stops being published before its files go, then its files and its state
        record (unless a run of that id started since the listing)."""
        record = self.read_record(run_id)
        if record is not None and record.get("state") != "succeeded":
            return False  # a run of that id started since the listing
        self.remove(f"{run_id}/{MANIFEST}")
        self.remove(run_id, recursive=True)
        self.remove(state_relative(run_id))
        return True


class ObjectStoreRunWriter(RunWriter):
    """``writer.RunWriter`` on an object-store root: written in place under ``<root>/<run_id>/``, published by
    the manifest (module notes). The test hook (``RunWriter``) fires with every part and the log copy
    written, before the manifest's PUT."""

    root: ObjectStoreRoot

    def __init__(self, output_root: str, run_id: str | None = None, *, heartbeat_s: float = 10.0,
                 replace: bool = False):
        super().__init__(ObjectStoreRoot(output_root), run_id, heartbeat_s=heartbeat_s, replace=replace)
        self.location = Location(self.final)
        if not self.replace and self.root.is_file(f"{self.run_id}/{MANIFEST}"):
            raise self._exists_error()
        self._local = Path(tempfile.mkdtemp(prefix=f"mfsim-{self.run_id}-"))  # the log copy until publish

    def _prepare(self) -> None:
        """Refuse a run of this id that is alive elsewhere; unpublish a replaced run (its manifest first), and
        remove what an earlier run of this id left."""
        current = self.root.read_record(self.run_id)
        if current is not None and current.get("state") == "running" and not is_lost(current, utc_now(), 120.0) \
                and (current.get("host"), current.get("pid")) != (self._host, self._pid):
            raise MfsimError(f"run {self.final} is being written by {current.get('host')} (pid "
                             f"{current.get('pid')}, heartbeat {current.get('heartbeat_at')}); wait for it or "
                             "pass another --run-id")
        if self.root.exists(f"{self.run_id}/{MANIFEST}"):  # replace: unpublish the old run first
            self.root.remove(f"{self.run_id}/{MANIFEST}")
            log.info("run %s: replacing the published run (its manifest is removed first)", self.final)
        if self.root.exists(self.run_id):
            self.root.remove(self.run_id, recursive=True)
            log.info("removed the unpublished prefix %s left by an earlier run of this id", self.final)

    def _discard(self) -> None:
        """Remove the run's prefix: nothing of it stays visible."""
        try:
            if self.root.exists(self.run_id):
                self.root.remove(self.run_id, recursive=True)
        except (OSError, ValueError) as err:
            log.warning("could not remove the unpublished prefix %s: %s", self.final, err)

    def _close(self) -> None:
        shutil.rmtree(self._local, ignore_errors=True)

    def path(self, relative: str) -> Path:
        """A local path for ``relative`` (only the run's log copy is written locally; uploaded at publish)."""
        p = self._local / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _write_out(self, manifest: dict[str, Any]) -> None:
        """Upload the log copy (``_log.txt``: a file of the run, not a dataset)."""
        for p in sorted(self._local.rglob("*")):
            if p.is_file():
                relative = p.relative_to(self._local).as_posix()
                self.write_bytes(relative, p.read_bytes())
                self.files.pop(relative, None)

    def _make_visible(self, manifest: dict[str, Any]) -> None:
        """``_manifest.json`` in one PUT: from then on the run is published."""
        self.write_json(MANIFEST, manifest)

    def _latest_failed(self, exc: BaseException) -> MfsimError:
        return self._latest_error(exc, "the run is published but LATEST still names the previous run")
