"""The main batch job: conf -> Dask client -> the stages of ``jobs.stages.STAGES`` -> one atomically published run.

Each stage is timed under ``timings`` in the manifest (``fit`` as its parts: preprocess, svd,
factors) and logs its start and end. The run's state (running with a heartbeat, succeeded,
failed) is kept in the output root by its run writer (``pipeline.runs.writer.RunWriter``); a copy
of the run's log lines is published inside the run as ``_log.txt``. ``mfsim run``, ``mfsim submit``
and ``mfsim nightly`` all come here.
"""

from __future__ import annotations

import importlib
import logging
import os
import resource
import sys
import threading
import time
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

from mfsim.jobs.logs import tee_to_file
from mfsim.jobs.stages import STAGES, Beside, StageContext
from mfsim.pipeline import blocks
from mfsim.pipeline.cluster import ClusterOnDemand
from mfsim.pipeline.config import Config
from mfsim.pipeline.ingest import validate_before_cluster
from mfsim.pipeline.inputs import load_item_truth
from mfsim.pipeline.runs.records import validate_run_id
from mfsim.pipeline.runs.roots import open_root

log = logging.getLogger("mfsim.job")

RUN_LOG = "_log.txt"


def run_stages(ctx: StageContext) -> dict[str, Any]:
    """Every stage of ``STAGES`` that applies, in order; returns the manifest entries they made, and the
    driver's peak RSS after each stage (``driver_peak_rss_mib``: a running maximum, so the stage where it
    rises is the one that needed the memory)."""
    peaks: dict[str, int] = {}
    planned = [stage for stage in STAGES if stage.when(ctx)]  # each ``when`` reads the config (and the item truth)
    started = time.perf_counter()
    # a terminal whose log level hides the stage lines (--log-level WARNING) keeps one live line of them
    live = sys.stderr.isatty() and not log.isEnabledFor(logging.INFO)
    waiting = None
    for k, stage in enumerate(planned, 1):
        place = f"{k}/{len(planned)}"
        if live:
            sys.stderr.write(f"\r[{place}] {stage.name} ({time.perf_counter() - started:.1f}s)\x1b[K")
            sys.stderr.flush()
        if not peaks:
            log.info("stage %s: start (%s), %.2fs after the process started (imports, config)", stage.name, place,
                     seconds_since_process_start())
        else:
            log.info("stage %s: start (%s)", stage.name, place)
        ctx.run.set_stage(stage.name, place)
        if k == 2:  # after ingest, whose work is mostly Python (the fit's is mostly numba and BLAS, without the GIL)
            import_beside([module for later in planned[k:] for module in later.imports])
        t0 = time.perf_counter()
        try:
            with ctx.run.stage(stage.name) if stage.timed else nullcontext():
                ctx.results[stage.name] = stage.fn(ctx)
                if waiting is not None:  # the previous stage's last wait (``StageResult.wait_later``)
                    waiting, wait = None, waiting
                    wait()
        except BaseException:
            if waiting is not None:  # its tasks end before the error is raised: none writes into an aborted run
                with suppress(Exception):  # the stage's error is the one to report
                    waiting()
            raise
        waiting = ctx.results[stage.name].wait_later
        peaks[stage.name] = driver_peak_rss_mib()
        for later in planned[k:]:  # the parts of later stages that can begin now (``Stage.early``)
            work = later.early(ctx) if later.early is not None and later.early_after == stage.name else None
            if work is not None:
                ctx.early[later.name] = Beside(work, later.name)
        log.info("stage %s: done in %.2fs (%s, %.1fs since the first); driver peak RSS so far %d MiB", stage.name,
                 time.perf_counter() - t0, place, time.perf_counter() - started, peaks[stage.name])
    if waiting is not None:  # the last stage's (none of today's stages leaves one)
        waiting()
    if live:
        sys.stderr.write(f"\r[{len(planned)}/{len(planned)}] done in {time.perf_counter() - started:.1f}s\x1b[K\n")
        sys.stderr.flush()
    entries = {key: value for result in ctx.results.values() for key, value in result.manifest.items()}
    return {**entries, "driver_peak_rss_mib": peaks}


def import_beside(modules: list[str]) -> threading.Thread | None:
    """Import ``modules`` in a thread of their own while earlier stages run: a stage that imports a large library
    only when it runs (the report's matplotlib, 0.35 s) then finds it loaded. Python's import locks make a stage
    that gets there first wait for the same import, never run it twice; an import that fails here fails again,
    with its error, in the stage."""
    if not modules:
        return None

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # the stage's own import reports it
                return

    thread = threading.Thread(target=load, name="mfsim-imports", daemon=True)
    thread.start()
    return thread


def seconds_since_process_start() -> float:
    """Wall time since this process started, to 10 ms: on Linux ``/proc/uptime`` less the process's start in clock
    ticks since boot (``/proc/self/stat``), one clock; elsewhere psutil's start time, whose boot time is whole
    seconds (it read up to 1 s too much)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())


def driver_peak_rss_mib() -> int:
    """The driver process's peak resident memory so far (``getrusage`` ``ru_maxrss``, KiB on Linux), in MiB."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def on_demand(cfg: Config, scheduler: str | None, client: Any):
    """The run's ``ClusterOnDemand``: ``client`` itself when it is one (kept open for its owner), one around an
    existing client, else a new one for ``scheduler`` / ``cfg.cluster`` (closed when the run ends)."""
    if isinstance(client, ClusterOnDemand):
        return nullcontext(client)
    if client is not None:
        return nullcontext(ClusterOnDemand(client=client))
    return ClusterOnDemand(cfg.cluster, scheduler)


def run_job(cfg: Config, *, scheduler: str | None = None, client: Any = None, move_latest: str = "always",
            replace: bool = False) -> tuple[Path, dict[str, Any]]:
    """Run every configured stage and publish ``<run.output>/<run_id>/``; returns (run dir, manifest).

    ``client``: an existing Dask client to run on (the driver's own inside the cluster), or a
    ``ClusterOnDemand`` (a backfill's, shared by its days); otherwise one of its own (``scheduler``,
    or an embedded cluster started only when a stage first sends work to workers), after the config
    and the input have been checked. ``move_latest`` and ``replace`` go to
    the run writer and ``publish`` (nightly: ``"if_newer"``; ``--force``: replace).
    """
    t0 = time.perf_counter()
    if cfg.run.run_id is not None:
        validate_run_id(cfg.run.run_id)
    validate_before_cluster(cfg)  # a missing input fails in milliseconds, not after a cluster start
    truth = load_item_truth(cfg)
    open_root(cfg.run.output).read_latest()  # a damaged LATEST fails now, in one line, not after the whole job
    with open_root(cfg.run.output).writer(cfg.run.run_id, heartbeat_s=cfg.run.heartbeat_s, replace=replace) as run:
        try:
            with tee_to_file(run.path(RUN_LOG)):
                log.info("run %s: start (output %s)", run.run_id, cfg.run.output)
                with on_demand(cfg, scheduler, client) as clients, \
                        nullcontext() if cfg.cluster.small_data_here else blocks.held_to_workers():
                    clients.when_started(lambda c: run.set_dashboard(getattr(c, "dashboard_link", None)))
                    if not cfg.cluster.small_data_here:
                        clients.get()  # every stage goes to the workers: the cluster is needed from the first
                    ctx = StageContext(cfg, clients, run, truth=truth)
                    entries = run_stages(ctx)
                for w in ctx.warnings:
                    log.warning("%s", w)
            run_dir = run.publish({"config": cfg.resolved(), **entries, "warnings": ctx.warnings},
                                  move_latest=move_latest)
        except BaseException:
            # the error itself is the caller's one line (``error: ...``); this line closes the run's log
            log.info("run %s failed after %.1fs: nothing published; LATEST unchanged", run.run_id,
                     time.perf_counter() - t0)
            raise
    log.info("run %s succeeded: %s in %.1fs; LATEST %s", run.run_id, run_dir, time.perf_counter() - t0,
             f"moved to {run.run_id}" if run.latest_moved else "unchanged")
    return run_dir, run.manifest
