"""``mfsim nightly``: one run per day D, idempotent, locked, with backfill and retention.

Day D is the window of ``ingest.window_days`` days ending at the end of D (``ingest.as_of`` =
D + 1 day, 00:00 UTC, exclusive); its run id is ``YYYY-MM-DD``. A day that already succeeded is
skipped in seconds without starting a cluster, unless ``force`` (then it is rebuilt and swapped in
atomically, the old run readable until then). So a scheduler's retry or a second cron firing is
always safe. LATEST moves only forward (``move_latest="if_newer"``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shlex
from pathlib import Path

from mfsim.jobs.main_job import run_job
from mfsim.pipeline.cluster import ClusterOnDemand
from mfsim.pipeline.config import Config
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.ingest import check_input, validate_before_cluster
from mfsim.pipeline.runs.lock import OutputLock
from mfsim.pipeline.runs.records import MANIFEST
from mfsim.pipeline.runs.root import Root
from mfsim.pipeline.runs.roots import open_root

log = logging.getLogger("mfsim.nightly")


class DayFailed(MfsimError):
    """A day of a nightly run or backfill failed at run time (exit 1); earlier days stay published."""

    exit_code = 1


def yesterday_utc(now: dt.datetime | None = None) -> dt.date:
    """The default day D: yesterday in UTC."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return (now.astimezone(dt.timezone.utc) - dt.timedelta(days=1)).date()


def days_between(first: dt.date, last: dt.date) -> list[dt.date]:
    """Every day from ``first`` to ``last``, both included; an error when ``last`` is before ``first``."""
    if last < first:
        raise MfsimError(f"--backfill FROM TO needs FROM <= TO, got {first} and {last}")
    return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]


def day_config(cfg: Config, day: dt.date) -> Config:
    """The config of day D: run id ``YYYY-MM-DD`` and ``ingest.as_of`` = D + 1 day at 00:00 UTC."""
    out = cfg.model_copy(deep=True)
    out.run.run_id = day.isoformat()
    out.ingest.as_of = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc)
    return out


def succeeded(root: Root, day: dt.date) -> bool:
    """Whether run D is published (its manifest says succeeded); a manifest that does not parse is the error that
    names it and says to rerun the day with --force (not a day to compute again and fail to publish)."""
    if not root.is_file(f"{day.isoformat()}/{MANIFEST}"):
        return False
    return root.read_manifest(day.isoformat()).get("status") == "succeeded"


def run_nightly(cfg: Config, days: list[dt.date], *, force: bool = False, lock_timeout_s: float = 0.0,
                scheduler: str | None = None) -> list[str]:
    """Run every day of ``days`` that is missing (or all of them with ``force``), in order, on one cluster.

    Returns the run ids published. Raises ``LockHeld`` (exit 75) when another nightly holds the
    output root's lock past ``lock_timeout_s``, ``DayFailed`` (exit 1) naming the first day that
    failed at run time, or the ``MfsimError`` of bad input (exit 2).
    """
    root = open_root(cfg.run.output)
    todo = [d for d in days if force or not succeeded(root, d)]
    for d in days:
        if d not in todo:
            log.info("nightly %s: already succeeded in %s; nothing to do (--force recomputes it)", d,
                     root.run_location(d.isoformat()))
    if not todo:
        return []
    validate_before_cluster(day_config(cfg, todo[0]))
    published = []
    lock_root = root.lock_dir()
    lock_root.mkdir(parents=True, exist_ok=True)
    with OutputLock(lock_root, timeout_s=lock_timeout_s):
        todo = [d for d in todo if force or not succeeded(root, d)]  # another nightly may have run them meanwhile
        with ClusterOnDemand(cfg.cluster, scheduler) as client:  # started once, by the first day that needs workers
            for d in todo:
                day_cfg = day_config(cfg, d)
                log.info("nightly %s: as_of %s, window %s days", d, day_cfg.ingest.as_of.isoformat(),
                         day_cfg.ingest.window_days)
                try:
                    run_job(day_cfg, client=client, move_latest="if_newer", replace=force)
                except MfsimError as exc:  # bad input of that day keeps exit 2, a run-time failure is 1
                    err = DayFailed(f"nightly day {d} failed: {exc}; days before it stay published")
                    err.exit_code = 2 if exc.exit_code == 2 else 1
                    raise err from exc
                except Exception as exc:  # a runtime failure: stop the backfill, name the day
                    raise DayFailed(f"nightly day {d} failed: {type(exc).__name__}: {exc}; "
                                    "days before it stay published") from exc
                published.append(d.isoformat())
                if cfg.run.keep_last is not None:
                    removed = root.prune_runs(cfg.run.keep_last)
                    if removed:
                        log.info("retention run.keep_last=%d: removed %s", cfg.run.keep_last, ", ".join(removed))
    return published


def dry_run(cfg: Config, days: list[dt.date]) -> str:
    """What ``mfsim nightly --dry-run`` checks without running anything: the config (loaded by the caller), the
    input of the first day to do (every file's footer: columns and types, ``check_input``) and the output root
    (created if missing, and writable). Returns the line it prints; raises ``MfsimError`` (exit 2)."""
    root_path = Path(cfg.run.output)
    if "://" not in cfg.run.output:
        try:
            root_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MfsimError(f"--output {cfg.run.output}: cannot create it ({exc.strerror}); pick a writable "
                             "directory") from None
        if not os.access(root_path, os.W_OK):
            raise MfsimError(f"--output {cfg.run.output} is not writable by this user; pick a writable directory")
    root = open_root(cfg.run.output)
    todo = [d for d in days if not succeeded(root, d)]
    n_files, n_rows = check_input(day_config(cfg, (todo or days)[0]))
    return (f"nightly --dry-run: config, input ({n_files} file{'s' * (n_files != 1)}, {n_rows} rows; footers read) "
            f"and output "
            f"{cfg.run.output} checked; would run {', '.join(d.isoformat() for d in todo) or 'nothing'}"
            + (f" (already done: {', '.join(d.isoformat() for d in days if d not in todo)})"
               if len(todo) < len(days) else ""))


#: ``schedule``'s cron line fires at these minutes past ``--at``'s: every time-zone offset in use is a multiple of
#: 15 minutes, so one of them falls on ``--at`` in UTC whatever the crontab's CRON_TZ or the machine's zone.
CRON_STEP_MINUTES = 15


def parse_at(at: str) -> tuple[int, int]:
    """(hour, minute) of ``--at`` HH:MM (24-hour, UTC)."""
    try:
        hh, mm = (int(x) for x in at.split(":"))
        if not (0 <= hh < 24 and 0 <= mm < 60):
            raise ValueError
    except ValueError:
        raise MfsimError(f"--at must be HH:MM (24-hour, UTC), got {at!r}") from None
    return hh, mm


def check_schedulable(words: list[str]) -> None:
    """Refuse a word that a crontab line or a systemd unit cannot carry, whatever the quoting: a control character
    (a newline would start a new crontab line or unit directive) or a backslash (systemd unescapes it). Everything
    else (``;``, ``$(...)``, spaces, quotes, ``%``) is quoted by ``schedule_files``."""
    for word in words:
        bad = next((c for c in word if ord(c) < 32 or c in "\\\x7f"), None)
        if bad is not None:
            raise MfsimError(f"{word!r} holds {bad!r}, which a crontab line or a systemd unit cannot carry safely; "
                             "use a path or value without control characters or backslashes")


def schedule_files(command: list[str], output: str, at: str) -> dict[str, str]:
    """A crontab line and a systemd service + timer that run ``command`` (``mfsim nightly ...``, every word
    absolute) daily at ``at`` (HH:MM, UTC).

    The cron line sets no CRON_TZ (which would change the zone of every later line of the user's crontab): it fires
    every ``CRON_STEP_MINUTES`` minutes from ``at``'s minute and goes on only inside the ``CRON_STEP_MINUTES``
    minutes from ``at`` in UTC (``date -u``), so it runs once a day at ``at`` UTC whatever the zone, and a
    daemon a minute late still runs it. Its output is appended to ``<output>/nightly.log``.
    """
    hh, mm = parse_at(at)
    check_schedulable(command)
    start = hh * 100 + mm
    end_minutes = hh * 60 + mm + CRON_STEP_MINUTES
    end = (end_minutes // 60) * 100 + end_minutes % 60  # HHMM as a number; past 2359 it only bounds from above
    minutes = ",".join(str(m) for m in sorted((mm + CRON_STEP_MINUTES * j) % 60 for j in range(60 // CRON_STEP_MINUTES)))
    log_file = f"{output.rstrip('/')}/nightly.log"
    # every word quoted for sh (``;``, ``$(...)``, spaces are literal inside single quotes); cron turns an unescaped
    # % into a newline, so each is escaped
    cron_cmd = f"exec {shlex.join(command)} >> {shlex.quote(log_file)} 2>&1".replace("%", "\\%")
    guard = f't=$(date -u +\\%H\\%M); [ "$t" -ge {start} ] && [ "$t" -lt {end} ]'
    unit_cmd = shlex.join(command).replace("%", "%%").replace("$", "$$")  # systemd's specifiers and variables
    return {
        "crontab": (f"# mfsim nightly, every day at {hh:02d}:{mm:02d} UTC in any time zone: the line fires every "
                    f"{CRON_STEP_MINUTES} minutes\n# and goes on only at {hh:02d}:{mm:02d} UTC (within "
                    f"{CRON_STEP_MINUTES} minutes). Log: {log_file}\n"
                    f"{minutes} * * * * {guard} && {cron_cmd}\n"),
        "mfsim-nightly.service": ("[Unit]\nDescription=mfsim nightly run\n\n[Service]\nType=oneshot\n"
                                  f"ExecStart={unit_cmd}\n"),
        "mfsim-nightly.timer": ("[Unit]\nDescription=mfsim nightly run, daily\n\n[Timer]\n"
                                f"OnCalendar=*-*-* {hh:02d}:{mm:02d}:00 UTC\nPersistent=true\n\n"
                                "[Install]\nWantedBy=timers.target\n"),
    }


def enable_instructions(into: Path) -> str:
    """How to turn on what ``schedule --install`` wrote into ``into`` (one of the two, not both)."""
    d = shlex.quote(str(into.resolve()))
    return (f"to enable it, use one of the two (not both):\n"
            f"  cron:    (crontab -l 2>/dev/null; cat {d}/crontab) | crontab -\n"
            f"  systemd: mkdir -p ~/.config/systemd/user && cp {d}/mfsim-nightly.service {d}/mfsim-nightly.timer "
            "~/.config/systemd/user/ && systemctl --user daemon-reload && systemctl --user enable --now "
            "mfsim-nightly.timer\n"
            "  (systemd --user timers run while you are logged in unless: loginctl enable-linger $USER)")
