"""Logging for every ``mfsim`` command: one format, UTC timestamps, a copy of a run's lines in the run.

``setup_logging(level, fmt)`` sends the log to stderr, as text::

    2026-12-01T22:15:03.123Z INFO mfsim.job: stage svd: start

or as one JSON object per line (``fmt="json"``) with the keys ``time``, ``level``, ``logger``,
``message`` and, when an exception is logged, ``exc`` (its traceback). The time is ISO 8601 in UTC
with milliseconds and ``Z``, whatever the machine's time zone. ``tee_to_file(path)`` copies the
same lines to a file for as long as its ``with`` block lasts (``jobs.main_job`` publishes that copy
inside the run as ``_log.txt``).

Worker processes log in the same format: ``worker_log_env()`` gives the level and format chosen
by ``setup_logging`` as ``MFSIM_LOG_LEVEL`` and ``MFSIM_LOG_FORMAT``, the embedded cluster
(``pipeline.cluster``) puts them in its workers' environment and names this module as their
preload, and ``dask_setup`` (run by each worker process at start) calls ``setup_logging`` with
them. Without it a warning logged in a worker reaches the driver's stderr in distributed's own
format, one line that is not JSON among JSON lines. The same works for an external cluster:
``MFSIM_LOG_FORMAT=json dask worker ADDR --preload mfsim.pipeline.logs --preload-nanny
mfsim.pipeline.logs`` (the few start-up lines logged before the preload runs keep Dask's format).

The jobs import all of this through ``jobs.logs``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")

# Libraries that log every connection and task at INFO: WARNING and above only (or the chosen
# level, when it is higher). distributed also gives some of them a handler of its own with its own
# format at import; those handlers go, so every line comes out in mfsim's format.
NOISY_LOGGERS = ("distributed", "tornado", "bokeh", "asyncio", "numba", "fsspec", "s3fs", "botocore", "aiobotocore",
                 "urllib3")
_DISTRIBUTED_HANDLED = ("distributed", "distributed.client", "distributed.gc", "bokeh", "tornado",
                        "tornado.application")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The environment variables that carry the driver's level and format to worker processes.
LEVEL_ENV = "MFSIM_LOG_LEVEL"
FORMAT_ENV = "MFSIM_LOG_FORMAT"

_handler: logging.Handler | None = None  # the stderr handler setup_logging installed on the root logger
_settings: dict[str, str] = {}  # the level and format of that handler, as worker_log_env gives them


def utc_timestamp(created: float) -> str:
    """``created`` (seconds since the epoch, as in ``LogRecord.created``) as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC.

    Milliseconds are truncated, not rounded, so a line never shows a time later than its event.
    """
    stamp = dt.datetime.fromtimestamp(created, dt.timezone.utc).isoformat(timespec="milliseconds")
    return stamp.removesuffix("+00:00") + "Z"


class TextFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger>: <message>``, a logged exception's traceback on the lines below."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        """The record's time as ISO 8601 UTC with milliseconds and ``Z``."""
        return utc_timestamp(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message`` (+ ``exc``), on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (newlines inside the message and traceback are escaped)."""
        line = {"time": utc_timestamp(record.created), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def check_level(level: str) -> int:
    """The ``logging`` level of a name in ``LEVELS`` (any case); ``ValueError`` listing them otherwise."""
    name = str(level).upper()
    if name not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)} (any case)")
    return logging.getLevelName(name)


def make_formatter(fmt: str) -> logging.Formatter:
    """The formatter of a name in ``FORMATS``; ``ValueError`` listing them otherwise."""
    if fmt == "text":
        return TextFormatter()
    if fmt == "json":
        return JsonFormatter()
    raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log records of ``level`` and above to stderr in ``fmt`` (``text`` or ``json``), times in UTC.

    Replaces the handler of an earlier call (calling twice does not double lines) and leaves other
    handlers on the root logger alone. The loggers of ``NOISY_LOGGERS`` log WARNING and above (or
    ``level``, when higher) through the same handler, and so do Python warnings (logger
    ``py.warnings``, which would otherwise print lines of their own). An unknown level or format
    raises ``ValueError`` naming the valid ones, before anything changes.
    """
    global _handler, _settings
    numeric = check_level(level)
    formatter = make_formatter(fmt)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(formatter)
    _handler.setLevel(numeric)
    root.addHandler(_handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)  # warnings.warn (distributed's "Port 8787 is already in use") as records too
    _settings = {LEVEL_ENV: logging.getLevelName(numeric), FORMAT_ENV: fmt}
    _quiet_noisy_loggers()
    if "distributed" in sys.modules:
        adopt_distributed_logging()


def _quiet_noisy_loggers() -> None:
    numeric = logging.getLevelName(_settings[LEVEL_ENV])
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, numeric))


def adopt_distributed_logging() -> None:
    """distributed's loggers through ``setup_logging``'s handler: importing distributed gives some of them handlers
    of their own and levels (``_DISTRIBUTED_HANDLED``); this undoes that. Called by ``setup_logging`` and by whatever
    imports distributed first after it (``pipeline.cluster``): ``setup_logging`` does not import distributed itself,
    which would cost every ``mfsim`` command 0.6 s, most of all a small run that never starts a cluster.
    Nothing before ``setup_logging``."""
    if _handler is None:
        return
    import distributed  # noqa: F401  (its handlers and levels are set on import)

    for name in _DISTRIBUTED_HANDLED:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    _quiet_noisy_loggers()


def worker_log_env() -> dict[str, str]:
    """``MFSIM_LOG_LEVEL`` and ``MFSIM_LOG_FORMAT`` of the last ``setup_logging`` call, for the
    environment of worker processes; empty when it was not called (the workers keep Dask's logging)."""
    return dict(_settings)


def setup_logging_from_env(environ: dict[str, str] | None = None) -> bool:
    """``setup_logging`` with ``MFSIM_LOG_LEVEL`` (default INFO) and ``MFSIM_LOG_FORMAT`` (default text)
    of ``environ`` (default ``os.environ``); nothing when neither is set. True when it set up logging."""
    environ = os.environ if environ is None else environ
    level, fmt = environ.get(LEVEL_ENV), environ.get(FORMAT_ENV)
    if level is None and fmt is None:
        return False
    setup_logging(level or "INFO", fmt or "text")
    return True


def dask_setup(worker=None) -> None:
    """The preload hook of a Dask worker (``preload=["mfsim.pipeline.logs"]``, ``dask worker --preload
    mfsim.pipeline.logs``): the worker process logs in mfsim's format, per ``setup_logging_from_env``."""
    setup_logging_from_env()


class _CopyHandler(logging.FileHandler):
    """A ``FileHandler`` for a copy of the log: when the file cannot be written (a full disk), it detaches
    itself after one WARNING instead of printing a traceback for every later line."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802  (logging's name)
        """Detach this handler and say so once (called by ``logging`` when a write failed)."""
        root = logging.getLogger()
        if self in root.handlers:
            root.removeHandler(self)
            exc = sys.exc_info()[1]
            logging.getLogger("mfsim.logs").warning("could not copy the log to %s: %s; the copy stops here",
                                                    self.baseFilename, exc)


@contextmanager
def tee_to_file(path: str | Path, *, fmt: str | None = None) -> Iterator[Path]:
    """Copy every log line to ``path`` (appended, UTF-8) while the ``with`` block runs; yields the path.

    The file gets the formatter and level of ``setup_logging``, or, where it was not called (a
    Dask task driving a run), ``fmt`` (default ``text``) and whatever level the loggers let pass;
    ``fmt`` given overrides the format. The caller decides the path and makes its directory; the
    file is closed on exit, and lines logged after the block no longer reach it.
    """
    if fmt is not None:
        formatter = make_formatter(fmt)
    elif _handler is not None and _handler.formatter is not None:
        formatter = _handler.formatter
    else:
        formatter = TextFormatter()
    path = Path(path)
    handler = _CopyHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(formatter)
    handler.setLevel(_handler.level if _handler is not None else logging.NOTSET)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        try:
            handler.close()
        except (OSError, ValueError):  # the last flush onto a full disk (already warned about)
            pass
