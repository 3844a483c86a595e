"""Run ids, the names an output root uses, state records, and a run's status as ``mfsim runs`` shows it.

Every kind of root keeps the same records (``<root>/.mfsim/runs/<run_id>.json``) and reads a run's
status from them the same way; this module holds that vocabulary, with no file access of its own.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import uuid
from typing import Any

from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs.lock import STATE_DIR, hostname, iso, parse_iso, pid_alive, utc_now

__all__ = [
    "COUNT_KEYS", "LATEST", "MANIFEST", "MOVE_LATEST", "NIGHTLY_ID", "RESERVED_NAMES", "RUNS_DIR", "RUN_ID_PATTERN",
    "RunStatus", "data_time", "is_lost", "is_run_id", "new_run_id", "state_record", "status_from_manifest", "status_from_record",
    "validate_run_id",
]

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: "abc\n" is no id
NIGHTLY_ID = re.compile(r"\d{4}-\d{2}-\d{2}")  # mfsim nightly's run ids: the day, YYYY-MM-DD (fullmatch)
MANIFEST = "_manifest.json"
LATEST = "LATEST"
RESERVED_NAMES = frozenset({LATEST, STATE_DIR})  # names the root uses itself; LATEST in any case
RUNS_DIR = "runs"  # <root>/.mfsim/runs/<run_id>.json
MOVE_LATEST = ("always", "if_newer", "never")
COUNT_KEYS = ("n_users", "n_items", "nnz")


def new_run_id(now: dt.datetime | None = None) -> str:
    """A sortable, unique run id: ``YYYYmmddTHHMMSSZ-xxxxxx``."""
    now = now or utc_now()
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


TIMESTAMP_ID = re.compile(r"(\d{8}T\d{6}Z)-[0-9a-f]{6}")  # ``new_run_id``'s ids (fullmatch)


def data_time(run_id: str, started_at: str | None = None) -> dt.datetime | None:
    """When a run's data ends, by which LATEST moves forward (``move_latest="if_newer"``): for a nightly id
    ``YYYY-MM-DD`` the end of that day (its ``ingest.as_of``), for a ``new_run_id`` id its start time, else
    ``started_at`` (from its state record); None when none is known. A root that mixes nightly and manual runs
    orders them by this, never by the ids' string order (``2026-12-05`` sorts before any ``2026...T...Z`` id)."""
    if NIGHTLY_ID.fullmatch(run_id):
        return dt.datetime.fromisoformat(run_id).replace(tzinfo=dt.timezone.utc) + dt.timedelta(days=1)
    m = TIMESTAMP_ID.fullmatch(run_id)
    if m:
        return dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    return parse_iso(started_at)


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


def is_run_id(name: str) -> bool:
    """Whether ``name`` passes ``validate_run_id`` (listing skips other names)."""
    try:
        validate_run_id(name)
    except MfsimError:
        return False
    return True


def state_record(run_id: str, state: str, *, host: str, pid: int, started_at: str, counts: dict[str, int] | None,
                 run_dir: str, error: str | None = None) -> dict[str, Any]:
    """A state record as every root keeps it (``<root>/.mfsim/runs/<id>.json``), heartbeat now."""
    now = iso(utc_now())
    return {"run_id": run_id, "state": state, "host": host, "pid": pid, "started_at": started_at,
            "heartbeat_at": now, "finished_at": None if state == "running" else now, "error": error,
            "counts": counts, "run_dir": run_dir}


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
    latest: bool = False  # the run <root>/LATEST names
    stage: str | None = None  # a running run's stage, "name (k/n)"
    dashboard: str | None = None  # a running run's Dask dashboard, when its cluster is started


def is_lost(record: dict[str, Any], now: dt.datetime, lost_after_s: float) -> bool:
    """A ``running`` record whose heartbeat is older than ``lost_after_s``, or whose pid is gone on this host."""
    beat = parse_iso(record.get("heartbeat_at"))
    if beat is None or (now - beat).total_seconds() > lost_after_s:
        return True
    return record.get("host") == hostname() and not pid_alive(record.get("pid"))


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
                     error=record.get("error"), run_dir=run_dir, heartbeat_at=record.get("heartbeat_at"),
                     stage=record.get("stage") if state == "running" else None,
                     dashboard=record.get("dashboard") if state == "running" else None)


def status_from_manifest(run_id: str, m: dict[str, Any], run_dir: str) -> RunStatus:
    """A published run without a state record (an older version's, or its record lost) as ``succeeded``."""
    counts = m.get("counts") if isinstance(m.get("counts"), dict) else m
    return RunStatus(run_id=run_id, state="succeeded", started_at=m.get("started_at"), finished_at=m.get("finished_at"),
                     duration_s=_seconds(parse_iso(m.get("started_at")), parse_iso(m.get("finished_at"))),
                     **{k: counts.get(k) for k in COUNT_KEYS}, run_dir=run_dir)


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start is not None and end is not None else None
