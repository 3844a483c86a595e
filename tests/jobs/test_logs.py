"""Log lines: ISO 8601 UTC timestamps with milliseconds, JSON lines, the noisy loggers, the tee file,
the embedded cluster's worker processes in the same format."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import subprocess
import sys
import time

import pytest

from mfsim.jobs.logs import JsonFormatter, TextFormatter, setup_logging, tee_to_file, utc_timestamp
from mfsim.pipeline import logs  # where the handler state lives (jobs.logs re-exports it)

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
# 2026-12-01 22:15:03.123456 UTC; .123456 -> .123 (truncated)
FIXED = dt.datetime(2026, 12, 1, 22, 15, 3, 123456, tzinfo=dt.timezone.utc).timestamp()

log = logging.getLogger("mfsim.test_logs")


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    """Each test leaves the root logger, the noisy loggers and ``logs._handler`` as it found them."""
    import distributed  # noqa: F401  (its import installs handlers; snapshot after it)

    names = [None, *logs._DISTRIBUTED_HANDLED, *logs.NOISY_LOGGERS]
    saved = {n: (lg.level, list(lg.handlers), lg.propagate) for n in names for lg in [logging.getLogger(n)]}
    monkeypatch.setattr(logs, "_handler", None)
    monkeypatch.setattr(logs, "_settings", {})
    yield
    logging.captureWarnings(False)  # so that the next setup_logging captures them again
    for name, (level, handlers, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


def record(msg: str, *args, level: int = logging.INFO, name: str = "mfsim.job", exc_info=None) -> logging.LogRecord:
    """A LogRecord created at FIXED."""
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    rec.created = FIXED
    return rec


def test_text_line_at_a_fixed_time_is_utc_with_milliseconds(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")  # the machine's zone must not leak into the line
    time.tzset()
    try:
        line = TextFormatter().format(record("stage %s: start", "svd"))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert line == "2026-12-01T22:15:03.123Z INFO mfsim.job: stage svd: start"
    assert utc_timestamp(FIXED) == "2026-12-01T22:15:03.123Z"
    assert utc_timestamp(0.9999) == "1970-01-01T00:00:00.999Z"  # truncated, never rounded up to the next second


def test_json_line_at_a_fixed_time_carries_the_fields():
    try:
        1 / 0
    except ZeroDivisionError:
        import sys

        rec = record("failed\nbadly", level=logging.ERROR, exc_info=sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert {k: obj[k] for k in ("time", "level", "logger", "message")} == {
        "time": "2026-12-01T22:15:03.123Z", "level": "ERROR", "logger": "mfsim.job", "message": "failed\nbadly"}
    assert obj["exc"].startswith("Traceback") and "ZeroDivisionError" in obj["exc"]
    assert "exc" not in json.loads(JsonFormatter().format(record("fine")))


def test_setup_logging_text_lines_to_stderr(capsys):
    setup_logging("info", "text")
    before = dt.datetime.now(dt.timezone.utc)
    log.info("hello %d", 42)
    log.debug("not shown")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"({STAMP}) INFO mfsim\.test_logs: hello 42", lines[0])
    stamp = dt.datetime.fromisoformat(lines[0].split()[0].replace("Z", "+00:00"))
    assert abs((stamp - before).total_seconds()) < 5  # UTC now, not local time


def test_setup_logging_json_lines_parse(capsys):
    setup_logging("DEBUG", "json")
    log.debug("one")
    try:
        raise KeyError("k")
    except KeyError:
        log.exception("two")
    objs = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(o["level"], o["logger"], o["message"]) for o in objs] == [
        ("DEBUG", "mfsim.test_logs", "one"), ("ERROR", "mfsim.test_logs", "two")]
    assert all(re.fullmatch(STAMP, o["time"]) for o in objs)
    assert "exc" not in objs[0] and "KeyError" in objs[1]["exc"]


def test_noisy_loggers_quiet_and_in_the_same_format(capsys):
    setup_logging("INFO")
    logging.getLogger("distributed.scheduler").info("a worker joined")
    logging.getLogger("numba.core").info("compiling")
    logging.getLogger("distributed.nanny").warning("restarting a worker")
    lines = capsys.readouterr().err.splitlines()
    # one line (distributed's own handler is gone, so no second copy in its format), ours
    assert len(lines) == 1 and re.fullmatch(rf"{STAMP} WARNING distributed\.nanny: restarting a worker", lines[0])


def test_a_higher_level_also_quiets_the_noisy_loggers(capsys):
    setup_logging("ERROR")
    logging.getLogger("distributed").warning("w")
    log.warning("w")
    log.error("e")
    assert [line.split(" ", 1)[1] for line in capsys.readouterr().err.splitlines()] == ["ERROR mfsim.test_logs: e"]


def test_calling_twice_does_not_double_lines(capsys):
    setup_logging("INFO", "json")
    setup_logging("INFO", "text")
    log.info("once")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith("INFO mfsim.test_logs: once")


@pytest.mark.parametrize("kwargs, message", [
    ({"level": "LOUD"}, "log level 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ({"fmt": "xml"}, "log format 'xml' is not one of text, json"),
])
def test_invalid_level_or_format_names_the_valid_ones(kwargs, message):
    handlers = list(logging.getLogger().handlers)
    with pytest.raises(ValueError, match=re.escape(message)):
        setup_logging(**kwargs)
    assert logging.getLogger().handlers == handlers  # nothing changed


def test_tee_file_gets_the_same_lines_and_stops_after_the_block(tmp_path, capsys):
    setup_logging("INFO")
    path = tmp_path / "_log.txt"
    log.info("before")
    with tee_to_file(path) as teed:
        assert teed == path
        log.info("stage %s: start", "svd")
        logging.getLogger("distributed.worker").warning("lost a worker")
        log.info("stage svd: done")
    log.info("after")
    err = capsys.readouterr().err.splitlines()
    file_lines = path.read_text(encoding="utf-8").splitlines()
    assert file_lines == err[1:4]
    assert [line.split(" ", 1)[1] for line in file_lines] == [
        "INFO mfsim.test_logs: stage svd: start", "WARNING distributed.worker: lost a worker",
        "INFO mfsim.test_logs: stage svd: done"]
    assert not any(getattr(h, "baseFilename", None) == str(path) for h in logging.getLogger().handlers)


def test_tee_without_setup_takes_the_format_it_is_given(tmp_path):
    logging.getLogger().setLevel(logging.INFO)  # as a Dask task driving a run sets it
    path = tmp_path / "run.log"
    with tee_to_file(path, fmt="json"):
        log.info("from a task")
    (obj,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert obj["message"] == "from a task" and re.fullmatch(STAMP, obj["time"])


def test_a_copy_that_cannot_be_written_detaches_with_one_warning(tmp_path, capsys):
    """A full disk under ``_log.txt``: one warning, no ``--- Logging error ---`` traceback per later line."""
    logs.setup_logging("INFO", "text")
    log = logging.getLogger("mfsim.test")
    with logs.tee_to_file(tmp_path / "copy.txt") as path:
        handler = [h for h in logging.getLogger().handlers if getattr(h, "baseFilename", None) == str(path)][0]
        handler.stream.close()  # every later write raises, as on a full disk
        for i in range(3):
            log.info("line %d", i)
    err = capsys.readouterr().err
    assert "Logging error" not in err and err.count("could not copy the log to") == 1
    assert "line 2" in err  # the lines still reach stderr


def test_worker_env_carries_the_chosen_level_and_format():
    assert logs.worker_log_env() == {}  # setup_logging not called: the workers keep Dask's logging
    setup_logging("debug", "json")
    assert logs.worker_log_env() == {"MFSIM_LOG_LEVEL": "DEBUG", "MFSIM_LOG_FORMAT": "json"}
    assert logs.setup_logging_from_env({}) is False


# A fresh driver that selects JSON lines and starts the embedded cluster (one worker process, which
# inherits the driver's stderr); a task logs on the worker through a distributed.* logger (which
# carries distributed's own handler there), an mfsim.* one (no handler of its own), below the level,
# and a Python warning (printed by the warnings module unless captured), as the driver does too.
WORKER_LOGS = """
import logging, os, warnings
from mfsim.jobs.logs import setup_logging
from mfsim.pipeline.cluster import get_client
from mfsim.pipeline.config import ClusterSection

def on_worker():
    logging.getLogger("distributed.worker.test").warning("lost a peer (pid %d)", os.getpid())
    logging.getLogger("mfsim.test_worker").info("stage part done")
    logging.getLogger("mfsim.test_worker").debug("not shown")
    warnings.warn("worker warning")
    return os.getpid()

setup_logging("INFO", "json")
warnings.warn("driver warning")
with get_client(ClusterSection(n_workers=1, memory_limit="1GiB")) as client:
    assert client.submit(on_worker, pure=False).result(timeout=30) != os.getpid()
"""


def test_embedded_workers_log_json_lines_too():
    out = subprocess.run([sys.executable, "-c", WORKER_LOGS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    for line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line on the driver's stderr: {line!r}")
        assert {"time", "level", "logger", "message"} <= set(obj) and re.fullmatch(STAMP, obj["time"]), line
    seen = [(o["level"], o["logger"], o["message"].split(" (")[0]) for o in map(json.loads, lines)]
    assert ("WARNING", "distributed.worker.test", "lost a peer") in seen
    assert ("INFO", "mfsim.test_worker", "stage part done") in seen
    assert not any(logger == "mfsim.test_worker" and level == "DEBUG" for level, logger, _ in seen)
    warned = [o["message"] for o in map(json.loads, lines) if o["logger"] == "py.warnings"]
    assert sum("UserWarning: driver warning" in m for m in warned) == 1
    assert sum("UserWarning: worker warning" in m for m in warned) == 1
