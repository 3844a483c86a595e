"""``mfsim submit``: start a run and walk away.

Without a scheduler, a detached local process (its own session, no terminal, stdin closed) runs
``mfsim run`` on the embedded cluster. With ``--scheduler`` the run's driver runs inside the Dask
cluster, the way ``spark-submit --deploy-mode cluster`` puts the driver on the cluster: a
long-running task (``fire_and_forget``, so it survives the submitter) that secedes from its
worker's thread pool (``worker_client``) and drives the stages through a client of its own. The
output root must then be a path the workers can write (a shared filesystem or an fsspec URL).

Either way the run id is fixed before it starts and printed at once, and the run's log lines go
to ``<output>/.mfsim/logs/<run_id>.log``, which ``--wait`` streams until the run ends.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from mfsim.pipeline.config import Config, validate_config
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs.roots import open_root


def log_path(output: str | Path, run_id: str) -> Path:
    """Where a submitted run's log lines go: ``<output>/.mfsim/logs/<id>.log``, or for an object-store output
    a local ``~/.cache/mfsim/logs/<id>.log`` (``Root.log_dir``; the run's own ``_log.txt`` is published in the run
    either way)."""
    return open_root(output).log_dir() / f"{run_id}.log"


def start_local(run_argv: list[str], output: str, run_id: str) -> subprocess.Popen:
    """``mfsim run ...`` in a detached process: own session, no stdin, output to the run's log file."""
    path = log_path(output, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the run's log lines (stderr) in the log; its summary (stdout) beside it, for ``--wait`` to print on stdout
    with open(path, "ab") as err, open(path.with_suffix(".out"), "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "mfsim.jobs.cli", *run_argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True, close_fds=True,
                                env=environ_for_child())


def drive_on_cluster(config: dict[str, Any], log_file: str, log_level: str, log_format: str) -> int:
    """The run's driver as a Dask task: secede, drive every stage through a client of its own, return the exit code."""
    from distributed import worker_client

    from mfsim.jobs.logs import tee_to_file
    from mfsim.jobs.main_job import run_job

    root = logging.getLogger()
    root.setLevel(log_level)
    with tee_to_file(log_file, fmt=log_format):
        try:
            cfg = validate_config(config, "submit")
            with worker_client(separate_thread=True) as client:
                run_job(cfg, client=client)
            return 0
        except MfsimError as exc:
            logging.getLogger("mfsim.job").error("error: %s", exc)
            return exc.exit_code
        except Exception as exc:  # noqa: BLE001  (the task reports, the submitter exits with the code)
            logging.getLogger("mfsim.job").error("error: %s: %s", type(exc).__name__, exc, exc_info=True)
            return 1


def submit_driver(client, cfg: Config, log_level: str, log_format: str):
    """Submit the driver task of run ``cfg.run.run_id`` on ``client``; fire-and-forget, so it outlives the submitter."""
    from distributed import fire_and_forget

    path = log_path(cfg.run.output, cfg.run.run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = f"mfsim-driver-{cfg.run.run_id}"
    fut = client.submit(drive_on_cluster, cfg.resolved(), str(path.resolve()), log_level, log_format, key=key,
                        pure=False)
    fire_and_forget(fut)
    held_by_scheduler(client, key)
    return fut


def _held_for_ever(key: str, dask_scheduler=None) -> bool:
    """On the scheduler: whether task ``key`` is known and wanted by the fire-and-forget holder."""
    ts = dask_scheduler.tasks.get(key)
    return ts is not None and any(getattr(cs, "client_key", None) == "fire-and-forget" for cs in ts.who_wants)


def held_by_scheduler(client, key: str, timeout_s: float = 30.0) -> None:
    """Wait until the scheduler holds the driver task for good: ``submit`` and ``fire_and_forget`` travel in the
    background, and a submitter that exits (or is killed) before they arrive would leave a printed run id with no run.
    """
    deadline = time.monotonic() + timeout_s
    while not client.run_on_scheduler(_held_for_ever, key):
        if time.monotonic() > deadline:
            raise MfsimError(f"the scheduler did not take the run's driver task {key} within {timeout_s:.0f}s; "
                             "check the scheduler's log")
        time.sleep(0.02)


def stream_until(path: Path, done: Callable[[], bool], out: TextIO, poll_s: float = 0.2) -> None:
    """Copy the lines appended to ``path`` to ``out`` until ``done()`` holds, then the rest."""
    pos = 0
    while True:
        finished = done()
        if path.is_file():
            with open(path, "rb") as fh:
                fh.seek(pos)
                chunk = fh.read()
                pos += len(chunk)
            if chunk:
                out.write(chunk.decode("utf-8", "replace"))
                out.flush()
        if finished:
            return
        time.sleep(poll_s)


def wait_local(proc: subprocess.Popen, output: str, run_id: str, out: TextIO) -> int:
    """Stream a detached run's log until its process ends; its exit code."""
    stream_until(log_path(output, run_id), lambda: proc.poll() is not None, out)
    return int(proc.returncode)


def wait_cluster(fut, output: str, run_id: str, out: TextIO) -> int:
    """Stream a cluster driver's log until its task ends; its exit code (1 if the task itself failed)."""
    stream_until(log_path(output, run_id), fut.done, out)
    try:
        return int(fut.result())
    except Exception as exc:  # noqa: BLE001  (the driver task died: worker lost, killed)
        out.write(f"error: the driver task of run {run_id} failed: {type(exc).__name__}: {exc}\n")
        return 1


def environ_for_child() -> dict[str, str]:
    """The environment of a detached run: this one, unbuffered so its log streams line by line."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}
