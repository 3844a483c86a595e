"""A POSIX output root (a local or mounted directory): runs built out of sight and renamed into place.

An output root ``R`` holds::

    R/<run_id>/                      a published run; its _manifest.json is written last
    R/LATEST                         the id of the newest published run, one line
    R/.<run_id>.tmp-<pid>-<tag>/     a run being written (hidden)
    R/.<run_id>.old-<pid>-<tag>/     a published run being replaced (replace=True, --force; hidden)
    R/.<run_id>.del-<pid>-<tag>/     a run being removed (retention, a rolled-back publish; hidden)
    R/.mfsim/runs/<run_id>.json      each run's state while and after it runs
    R/.mfsim/lock, R/.mfsim/mutex    the nightly lock and the bookkeeping mutex (``lock``)

``<tag>`` is six hex digits naming the host that made the directory, then six random ones: stale
cleanup (``PosixRoot.clean_stale``) only judges this host's directories by their pid, so a root shared
between hosts (NFS; a driver running on a cluster worker) never loses another host's live run.

What is promised, exactly:

- A run directory becomes visible only complete: every file is written in the hidden temporary
  directory, ``_manifest.json`` last, all of it fsynced, and one ``os.rename`` makes it ``R/<run_id>``.
- LATEST is replaced atomically (a ``tempfile.mkstemp`` file in R, fsynced, ``os.replace``; never a
  predictable name, never a symlink followed) after that rename; then the state becomes
  ``succeeded``. If the process dies between the rename and LATEST, the new run is visible and
  complete while LATEST still names the previous run, and its state file says ``running`` until it
  goes ``lost`` (see ``Root.list_runs``). An *error* writing LATEST (disk full) rolls the rename back: the
  run is moved out of sight and removed, its state is ``failed``, LATEST is unchanged.
- A run that fails (an exception, KeyboardInterrupt, SystemExit: the command line turns SIGTERM
  into one of these) leaves no visible directory and the state ``failed`` with its one error line.
  A killed run leaves its hidden temporary directory; the next ``PosixRunWriter`` on the root removes it
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
  ``PosixRunWriter`` renames the old one back into place (dropping the dead run's ``running`` record, so
  it lists as ``succeeded`` from its manifest) and removes the new one. A crash after the second
  rename leaves the new run in place (``running`` until ``lost``, as above) and the old copy,
  which the next ``PosixRunWriter`` removes. If a forced run fails, the old run and its state stay.
  Concurrent forced runs of one id are not arbitrated here: run them under ``OutputLock``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs.lock import STATE_DIR, host_tag, hostname, os_error, pid_alive, root_mutex
from mfsim.pipeline.runs.records import MANIFEST
from mfsim.pipeline.runs.root import Root, state_relative
from mfsim.pipeline.runs.storage import Location, local_path, parquet_options
from mfsim.pipeline.runs.writer import NOT_PUBLISHED, RunWriter

__all__ = ["PosixRoot", "PosixRunWriter"]

_HIDDEN = re.compile(r"\.(?P<run_id>[A-Za-z0-9][A-Za-z0-9._-]*)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)-(?P<tag>[0-9a-f]+)")

log = logging.getLogger("mfsim.runs")


class PosixRoot(Root):
    """An output root that is a directory: files replaced by ``os.replace``, the bookkeeping under ``root_mutex``."""

    ERRORS = (OSError,)
    RUN_NOUN = "directory"
    UNPUBLISHED_HINT = "pass a directory written by mfsim run"

    def __init__(self, base: str | Path):
        self.base = local_path(base)

    @classmethod
    def locate(cls, path: str | Path) -> tuple["PosixRoot", str]:
        p = local_path(path)
        return cls(p.parent), p.name

    def path(self, relative: str = "") -> Path:
        return self.base / relative if relative else self.base

    def read_bytes(self, relative: str) -> bytes:
        return self.path(relative).read_bytes()

    def write_atomic(self, relative: str, data: bytes) -> None:
        """A ``tempfile.mkstemp`` file beside it (``.<name>.*``, created exclusively, so nothing planted under a
        guessed name is followed), fsynced, then ``os.replace``."""
        path = self.path(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, data)

    def is_file(self, relative: str) -> bool:
        return self.path(relative).is_file()

    def list_names(self, relative: str = "") -> list[str]:
        directory = self.path(relative)
        return sorted(os.listdir(directory)) if directory.is_dir() else []

    def remove(self, relative: str) -> None:
        self.path(relative).unlink(missing_ok=True)

    def mutex(self) -> AbstractContextManager:
        return root_mutex(self.base)

    def error(self, exc: BaseException, where: Any, action: str, note: str = "") -> MfsimError:
        return os_error(exc, where, action, note)

    def check(self) -> None:
        if not self.base.is_dir():
            raise MfsimError(f"output root {self.base} does not exist or is not a directory; pass the --output of "
                             "your runs")

    def arrow_source(self, relative: str) -> tuple[str, None]:
        return str(self.path(relative)), None

    def lock_dir(self) -> Path:
        return self.base

    def log_dir(self) -> Path:
        return self.base / STATE_DIR / "logs"

    def writer(self, run_id: str | None = None, *, heartbeat_s: float = 10.0,
               replace: bool = False) -> "PosixRunWriter":
        return PosixRunWriter(self.base, run_id, heartbeat_s=heartbeat_s, replace=replace)

    def _not_a_run(self, name: str) -> MfsimError:
        return MfsimError(f"{self.path(name)} is neither a run directory (no {MANIFEST}) nor an output root's LATEST "
                          "file: pass <output>/<run_id> or <output>/LATEST")

    def _remove_run(self, run_id: str) -> bool:
        """Renamed to a hidden name and its record removed (under the mutex, unless a run of that id started
        since the listing), then deleted."""
        hidden = self.path(_hidden_name(run_id, "del"))
        try:
            with self.mutex():
                record = self.read_record(run_id)
                if record is not None and record.get("state") != "succeeded":
                    return False  # a run of that id started since the listing
                os.rename(self.path(run_id), hidden)
                self.remove(state_relative(run_id))
        except OSError as exc:
            raise os_error(exc, self.path(run_id), "remove the old run", "later runs are untouched") from exc
        _remove_tree(hidden)
        return True

    def clean_stale(self) -> list[str]:
        """Remove what dead runs of this host left in the root; returns the hidden names handled.

        A hidden ``.<id>.tmp-<pid>-<tag>`` or ``.<id>.del-<pid>-<tag>`` directory whose pid is gone is
        removed; a ``.<id>.old-<pid>-<tag>`` (a forced run died while swapping) is renamed back to
        ``<id>`` when that is absent, removed otherwise. One INFO line each. Directories of a live pid,
        of another host (by ``<tag>``) and anything that is not a real directory are left alone.
        """
        try:
            names = sorted(os.listdir(self.base))
        except OSError:
            return []
        handled = []
        for name in names:
            m = _HIDDEN.fullmatch(name)
            path = self.path(name)
            if m is None or (len(m["tag"]) > 6 and m["tag"][:6] != host_tag()) or pid_alive(int(m["pid"])):
                continue
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    continue
                if m["kind"] == "old" and not os.path.lexists(self.path(m["run_id"])):
                    os.rename(path, self.path(m["run_id"]))
                    self._drop_dead_record(m["run_id"], int(m["pid"]))
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

    def _drop_dead_record(self, run_id: str, pid: int) -> None:
        """Remove run ``run_id``'s ``running`` record if it is that of ``pid`` on this host, now gone."""
        with self.mutex():
            record = self.read_record(run_id)
            if record is not None and record.get("state") == "running" and record.get("host") == hostname() \
                    and record.get("pid") == pid:
                self.remove(state_relative(run_id))


class PosixRunWriter(RunWriter):
    """``writer.RunWriter`` on a POSIX root: the run is built in a hidden temporary directory and renamed into place.

    Parameters as ``RunWriter``'s, with ``output_root`` the root's path (created if missing).
    ``__enter__`` also removes stale hidden directories of earlier runs (``PosixRoot.clean_stale``)
    and creates the temporary directory (``self.tmp``); every ``OSError`` while writing becomes one
    ``MfsimError`` (``pipeline.runs.lock.os_error``). The test hook (``RunWriter``) fires right after
    ``_manifest.json`` is written and the tree fsynced, before the rename that would publish it.
    """

    root: PosixRoot

    def __init__(self, output_root: str | Path, run_id: str | None = None, *, heartbeat_s: float = 10.0,
                 replace: bool = False):
        super().__init__(PosixRoot(output_root), run_id, heartbeat_s=heartbeat_s, replace=replace)
        if not self.replace and os.path.lexists(self.final):  # a quick answer; the final rename decides
            raise self._exists_error()
        self.tmp = self.root.path(_hidden_name(self.run_id, "tmp"))
        self.location = Location.of(self.tmp)  # where workers write their parts while the run runs
        self._aside: Path | None = None  # replace=True: where the replaced run went at the swap

    def _prepare(self) -> None:
        try:
            self.root.base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, self.root.base, "create the output root", NOT_PUBLISHED) from exc
        self.root.clean_stale()
        try:
            self.tmp.mkdir()
        except OSError as exc:
            raise os_error(exc, self.tmp, "create the run's temporary directory", NOT_PUBLISHED) from exc

    def _begin(self, current: dict[str, Any] | None) -> dict[str, Any]:
        if not self.replace and os.path.lexists(self.final):
            raise self._exists_error()
        return super()._begin(current)

    def _discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- writing ------------------------------------------------------------------------------
    def path(self, relative: str) -> Path:
        """A path inside the (temporary) run directory; parent directories are created."""
        rel = Path(relative)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"run output path must be relative and inside the run: {relative}")
        p = self.tmp / rel
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, p.parent, "create", NOT_PUBLISHED) from exc
        return p

    def write_table_parts(self, relative: str, tables) -> Path:
        """One Parquet file from an iterable of tables with the same schema (streamed, bounded memory)."""
        p = self.path(relative)
        writer = None
        with self._writing(relative):
            try:
                for t in tables:
                    if writer is None:
                        writer = pq.ParquetWriter(p, t.schema, **parquet_options(t.schema))
                    writer.write_table(t)
            finally:
                if writer is not None:
                    writer.close()
        return p

    # -- publishing ---------------------------------------------------------------------------
    def _write_out(self, manifest: dict[str, Any]) -> None:
        """``_manifest.json`` last, then every file and directory of the run fsynced."""
        self.write_json(MANIFEST, manifest)
        try:
            _fsync_tree(self.tmp)
        except OSError as exc:
            raise os_error(exc, self.tmp, "flush", NOT_PUBLISHED) from exc

    def _make_visible(self, manifest: dict[str, Any]) -> None:
        """``os.rename(tmp, final)``, moving a replaced run aside first (to ``self._aside``)."""
        aside = None
        if self.replace and os.path.lexists(self.final):
            aside = self.root.path(_hidden_name(self.run_id, "old"))
            try:
                os.rename(self.final, aside)
            except FileNotFoundError:
                aside = None
            except OSError as exc:
                raise os_error(exc, self.final, "move aside the run being replaced,", NOT_PUBLISHED) from exc
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
            raise os_error(exc, self.final, "publish", NOT_PUBLISHED) from exc
        _fsync_dir(self.root.base)
        self._aside = aside

    def _latest_failed(self, exc: BaseException) -> MfsimError:
        """Take the just-renamed run out of sight again (the replaced one back in), so nothing was published."""
        self._roll_back()
        return self._latest_error(exc, "the run was taken back, " + NOT_PUBLISHED)

    def _finish(self) -> None:
        if self._aside is not None:
            _remove_tree(self._aside)

    def _put_back(self, aside: Path) -> None:
        """Return a replaced run to its place; if another run took the place meanwhile, drop the old one."""
        try:
            os.rename(aside, self.final)
        except OSError:
            _remove_tree(aside)

    def _roll_back(self) -> None:
        hidden = self.root.path(_hidden_name(self.run_id, "del"))
        try:
            os.rename(self.final, hidden)
        except OSError as exc:
            log.error("could not take back run %s after the failed LATEST update: %s", self.final, exc)
            return
        self.published = False
        if self._aside is not None:
            self._put_back(self._aside)
        _remove_tree(hidden)


# -- files --------------------------------------------------------------------------------------
def _hidden_name(run_id: str, kind: str) -> str:
    """``.<run_id>.<kind>-<pid>-<host tag><random>``: hidden, unique, and parseable by ``clean_stale``."""
    return f".{run_id}.{kind}-{os.getpid()}-{host_tag()}{uuid.uuid4().hex[:6]}"


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as exc:  # a later PosixRunWriter's clean_stale retries once this pid is gone
        log.warning("could not remove %s: %s", path, exc)


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a ``tempfile.mkstemp`` file beside it, fsynced, ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
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
