"""The output root's lock, and the process bookkeeping it shares with the run state.

``OutputLock(root)`` stops two nightly runs on one output root from overlapping. It holds
``<root>/.mfsim/lock``, a file created exclusively (``O_CREAT|O_EXCL|O_WRONLY|O_NOFOLLOW``: a file
or symlink already there is never opened, let alone followed) that holds the holder's ``host``,
``pid`` and ``started_at`` as JSON. A second acquirer waits up to ``timeout_s`` and then raises
``LockHeld`` (exit code 75) naming the holder. A lock whose holder is on this host and whose pid is
gone is stale: it is taken over with a WARNING line. A holder on another host is never judged
stale from here (its pid means nothing on this host): remove the file by hand if it is gone.

Checking, taking over and releasing the lock happen under ``root_mutex``, an ``flock`` on
``<root>/.mfsim/mutex``, so two processes that find the same stale lock cannot both take it, and a
release never removes a lock that someone else has taken since. ``posix.PosixRoot`` uses the same
mutex around every update of a run's state file.

Also here, for both: this host's name and a short tag of it (for hidden names), whether a pid is
alive on this host, ISO 8601 UTC times, and ``os_error``, the one message for an ``OSError`` met
while writing in the output root.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mfsim.pipeline.errors import MfsimError

STATE_DIR = ".mfsim"  # <root>/.mfsim/: run states, the lock, the mutex
LOCK_FILE = "lock"
MUTEX_FILE = "mutex"

log = logging.getLogger("mfsim.runs")

_ADVICE = {
    errno.ENOSPC: "free space on that filesystem (or pass another --output) and rerun",
    errno.EDQUOT: "the disk quota is used up: free space (or pass another --output) and rerun",
    errno.EACCES: "make the output root writable by this user, or pass another --output",
    errno.EPERM: "make the output root writable by this user, or pass another --output",
    errno.EROFS: "that filesystem is read-only: pass another --output",
    errno.ENOTDIR: "a part of that path is a regular file, not a directory: pass another --output",
    errno.EEXIST: "it exists and is not a directory: pass another --output",
}


class LockHeld(MfsimError):
    """The output root is locked by another run; the command line exits with code 75 (EX_TEMPFAIL)."""

    exit_code = 75


def hostname() -> str:
    """This host's name, as recorded in locks and run states."""
    return socket.gethostname()


def host_tag() -> str:
    """Six hex digits naming this host in hidden directory names (so cleanup leaves other hosts' alone)."""
    return hashlib.sha256(hostname().encode()).hexdigest()[:6]


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` exists on this host (``os.kill(pid, 0)``; a process of another user counts)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def utc_now() -> dt.datetime:
    """Now, timezone-aware, in UTC."""
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime) -> str:
    """``t`` as an ISO 8601 string with microseconds and offset (``2026-11-24T03:15:00.000000+00:00``)."""
    return t.isoformat(timespec="microseconds")


def parse_iso(text: Any) -> dt.datetime | None:
    """The inverse of ``iso`` (naive times read as UTC); None for None or text that is not a time."""
    if not isinstance(text, str):
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


# errnos that say the output root itself is unusable (a bad --output, exit code 2); every other
# one (ENOSPC, EDQUOT, EIO, ...) is a run-time failure of a usable root (exit code 1), as the README lists
_BAD_OUTPUT = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                         errno.ENAMETOOLONG, errno.ELOOP})


def os_error(exc: OSError, path: str | Path, action: str, note: str = "") -> MfsimError:
    """One ``MfsimError`` for ``exc``: what could not be done to which path, the errno text, what to do.

    ``cannot <action> <path>: No space left on device (ENOSPC); <note>; free space ... and rerun``.
    Its ``exit_code`` is 2 when the errno says the output root cannot be used at all (not writable,
    read-only, not a directory: ``_BAD_OUTPUT``), 1 for a failure while writing (disk full, I/O error).
    """
    code = exc.errno
    what = os.strerror(code) if code else (exc.strerror or str(exc) or type(exc).__name__)
    name = f" ({errno.errorcode[code]})" if code in errno.errorcode else ""
    advice = _ADVICE.get(code, "check that the output root is a writable directory, then rerun")
    err = MfsimError(f"cannot {action} {path}: {what}{name}; {note + '; ' if note else ''}{advice}")
    err.exit_code = 2 if code in _BAD_OUTPUT else 1
    return err


@contextmanager
def root_mutex(root: str | Path) -> Iterator[None]:
    """Serializes the root's bookkeeping between processes and threads: ``flock`` on ``<root>/.mfsim/mutex``.

    Each call opens its own descriptor, so two threads of one process exclude each other too.
    Hold it only for a few small file operations. Raises ``OSError`` when the state directory
    cannot be created or opened.
    """
    state = Path(root) / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / MUTEX_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def read_holder(path: str | Path) -> dict[str, Any]:
    """The lock file's record (``host``, ``pid``, ``started_at``); ``{"unreadable": reason}`` if it is not one.

    Opened with ``O_NOFOLLOW``: a symlink in its place is reported, never read through.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            record = json.loads(f.read().decode())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        return {"unreadable": str(exc) or type(exc).__name__}
    return record if isinstance(record, dict) else {"unreadable": "not a JSON object"}


class OutputLock:
    """Exclusive lock on an output root, held as ``<root>/.mfsim/lock``; a context manager.

    Parameters
    ----------
    root : the output root (created if missing).
    timeout_s : how long to wait for a held lock before raising ``LockHeld``; 0 (default) gives up
        at once, which suits cron: the next firing tries again.
    poll_s : how often to look again while waiting.

    ``__enter__`` takes the lock (taking over a stale one: holder on this host, pid gone, with a
    WARNING line); ``__exit__`` removes the file only if it still holds this lock's record.
    ``self.holder`` is the record written, None while not held.
    """

    def __init__(self, root: str | Path, *, timeout_s: float = 0.0, poll_s: float = 0.5):
        if timeout_s < 0 or poll_s <= 0:
            raise ValueError(f"timeout_s must be >= 0 and poll_s > 0, got {timeout_s} and {poll_s}")
        self.root = Path(root)
        self.path = self.root / STATE_DIR / LOCK_FILE
        self.timeout_s = float(timeout_s)
        self.poll_s = float(poll_s)
        self.holder: dict[str, Any] | None = None

    def __enter__(self) -> "OutputLock":
        deadline = time.monotonic() + self.timeout_s
        while True:
            holder = self._try_acquire()
            if holder is None:
                return self
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockHeld(self._held_message(holder))
            time.sleep(min(self.poll_s, left))

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.holder is None:
            return
        try:
            with root_mutex(self.root):
                if read_holder(self.path) == self.holder:
                    os.unlink(self.path)
        except OSError as err:  # leaving it is safe: a lock of a dead pid is taken over
            log.warning("could not remove the lock %s: %s", self.path, err)
        self.holder = None

    def _try_acquire(self) -> dict[str, Any] | None:
        """None once the lock is ours; otherwise the live holder's record."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with root_mutex(self.root):
                while True:
                    try:
                        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
                    except FileExistsError:
                        holder = read_holder(self.path)
                        if holder and not _stale(holder):
                            return holder
                        if holder:
                            log.warning("taking over the stale lock %s: its holder (host %s, pid %s, since %s) is gone",
                                        self.path, holder.get("host"), holder.get("pid"), holder.get("started_at"))
                        self.path.unlink(missing_ok=True)  # stale (or removed by hand since): try again
                        continue
                    self._write_record(fd)
                    return None
        except OSError as exc:
            raise os_error(exc, self.path, "take the lock", "no run was started") from exc

    def _write_record(self, fd: int) -> None:
        record = {"host": hostname(), "pid": os.getpid(), "started_at": iso(utc_now())}
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(self.path)  # never leave an empty lock behind
            raise
        self.holder = record

    def _held_message(self, holder: dict[str, Any]) -> str:
        waited = f"waited {self.timeout_s:g} s; " if self.timeout_s > 0 else ""
        if "unreadable" in holder:
            who = f"an unreadable lock file {self.path} ({holder['unreadable']})"
        else:
            who = (f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started_at')} "
                   f"(lock file {self.path})")
        return (f"the output root {self.root} is locked by another mfsim run: {who}; {waited}let it finish, "
                f"or pass --lock-timeout SECONDS to wait for it; if no mfsim is running there, remove {self.path}")


def _stale(holder: dict[str, Any]) -> bool:
    """A holder on this host whose pid is gone (one on another host cannot be judged from here)."""
    return "unreadable" not in holder and holder.get("host") == hostname() and not pid_alive(holder.get("pid"))
