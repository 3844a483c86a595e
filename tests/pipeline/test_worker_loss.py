"""A Dask worker SIGKILLed during the SVD, the neighbours, the evaluation or the audit stage: the job finishes with a clean run's outputs.

Real processes only: a ``dask scheduler`` and two ``dask worker`` subprocesses on 127.0.0.1, the
job run in this process through ``run_job(cfg, client=...)``. The victim is the worker process
itself (for a nanny-managed worker, the nanny's child: the nanny starts a new one; for a
``--no-nanny`` worker, the cluster shrinks to one worker). It is killed with SIGKILL from a
thread while the stage has work in flight. Every Parquet file of the faulted run must equal the
clean run's (same config, same seed, same kind of cluster): ids, ranks and counts exactly,
floats within 1e-5. Each run is bounded (``RUN_TIMEOUT_S``), so a hang fails instead of blocking.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

import mfsim.pipeline.blocks as blocks_module
import mfsim.pipeline.model.svd as svd_module
from mfsim.jobs.main_job import run_job
from mfsim.pipeline.config import load_config
from mfsim.pipeline.simulate import simulate, write_simulation
from tests_support import assert_same_run_tables, end_process

DASK = Path(sys.executable).parent / "dask"
RUN_TIMEOUT_S = 120  # a clean run takes a few seconds here; a run still going after 2 minutes hangs
# the Krylov SVD (the default solver) held to a tolerance it cannot reach (and told to publish anyway:
# svd.accept_unconverged), so it builds all MAX_BLOCKS blocks and lasts long enough (~1 s here) for a kill to land
# inside; each block's product ends in one Rayleigh-Ritz. The evaluation's fit on the train split builds as many
MAX_BLOCKS = 8
MAIN_FIT_CALLS = MAX_BLOCKS  # _ritz_pairs calls of the main fit's SVD (then the evaluation's fit)
KILL_AT_CALL = 3  # the SVD goes on for 5 more products after the kill, its basis chunks on both workers


# ---------------------------------------------------------------------------------------------
# the cluster: real processes, ended by pid


class Cluster:
    """A ``dask scheduler`` and ``dask worker`` subprocesses on 127.0.0.1, and a client of it."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.worker_pids: set[int] = set()  # every worker process seen (a nanny's children included)
        self.log = open(tmp / "cluster.log", "ab")
        sched_file = tmp / "scheduler.json"
        self.procs.append(subprocess.Popen(
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(sched_file)], stdout=self.log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while not sched_file.exists() or not sched_file.read_text().strip():
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                raise RuntimeError(f"dask scheduler did not start; see {tmp / 'cluster.log'}")
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written in one go, but give the writer a moment to close it
        self.address = json.loads(sched_file.read_text())["address"]
        from distributed import Client

        self.client = Client(self.address, timeout="20s")

    def add_workers(self, n: int, *, nanny: bool) -> None:
        """Start ``n`` single-threaded workers (under a nanny or not) and wait until all are connected."""
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   NUMBA_NUM_THREADS="1")
        want = len(self.client.scheduler_info()["workers"]) + n
        for _ in range(n):
            self.procs.append(subprocess.Popen(
                [str(DASK), "worker", self.address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
                 "--memory-limit", "2GiB", *([] if nanny else ["--no-nanny"])],
                stdout=self.log, stderr=subprocess.STDOUT, env=env))
        self.client.wait_for_workers(want, timeout=60)
        self.worker_pids.update(self.pids().values())

    def pids(self) -> dict[str, int]:
        """Worker address -> pid of the worker process (not its nanny)."""
        return self.client.run(os.getpid)

    def close(self) -> None:
        """Close the client, end every process started here by pid, then any worker process left."""
        try:
            self.worker_pids.update(self.pids().values())
        except Exception:  # noqa: BLE001  (the cluster may be half gone; what we know suffices)
            pass
        self.client.close(timeout=10)
        for proc in reversed(self.procs):  # workers (their nannies end their children) before the scheduler
            end_process(proc)
        for pid in self.worker_pids:  # a nanny's child that outlived it
            try:
                p = psutil.Process(pid)
                if "dask" in " ".join(p.cmdline()) or "distributed" in " ".join(p.cmdline()):
                    p.kill()
            except psutil.Error:
                pass
        self.log.close()


@contextmanager
def cluster(tmp: Path, *, nanny: bool):
    c = Cluster(tmp)
    try:
        c.add_workers(2, nanny=nanny)
        yield c
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# the data, the config, a bounded run


@pytest.fixture(scope="module", autouse=True)
def work_on_the_workers():
    """Every stage's work held to tasks on the workers, the clean run's too: this log is small enough for its ingest,
    SVD, fit and lists to run in the driver (``blocks.INGEST_HERE_MAX_ROWS``, ``rounds_where``, ``lists_here``),
    where no worker loss reaches."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blocks_module, "INGEST_HERE_MAX_ROWS", -1)
        mp.setattr(blocks_module, "ROUNDS_HERE_MAX_WORK", -1.0)
        mp.setattr(blocks_module, "LIST_ROUNDS_HERE_MAX_WORK", -1.0)
        yield


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("worker-loss")
    # 5 daily files: no test here kills during the ingest, whose per-file pieces only add time
    cfg = load_config(None, ["simulate.n_users=1500", "simulate.n_items=120", "simulate.seed=5", "simulate.n_days=5"])
    write_simulation(simulate(cfg.simulate), root / "sim", cfg.simulate)
    return root / "sim"


def job_config(sim: Path, out: Path, run_id: str):
    return load_config(None, [
        f"input.path={sim}", f"run.output={out}", f"run.run_id={run_id}", "run.heartbeat_s=1",
        "preprocess.binarize=true", "svd.rank=8", "svd.solver=krylov", "svd.block_size=4", "svd.tol=1e-12", f"svd.max_blocks={MAX_BLOCKS}", "svd.accept_unconverged=true", "neighbours.top_n=10",
        "objectives.eq1.lambda=2.0", "objectives.eq2.lambda=1.5", "objectives.cosine=null",
        "objectives.eq1.scalings=[symmetric,item_orthonormal]", "neighbours.user_user=[cosine]",
        "ingest.block_rows=128",  # 12 row blocks, on both workers
        "neighbours.query_chunk=64", "neighbours.candidate_block=64",  # many top-N tasks per list (24 per user list)
        "evaluation.cutoffs=[5,10]", "audit.draws=1", "report.enabled=false",
    ])


def run_bounded(cfg, client) -> Path:
    """``run_job(cfg, client=client)`` in a thread; fails the test when it has not returned in RUN_TIMEOUT_S."""
    out: dict = {}

    def target():
        try:
            out["run_dir"] = run_job(cfg, client=client)[0]
        except BaseException as exc:  # noqa: BLE001  (handed to the test below)
            out["error"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=target, name=f"run-{cfg.run.run_id}", daemon=True)
    thread.start()
    thread.join(RUN_TIMEOUT_S)
    if thread.is_alive():
        pytest.fail(f"run {cfg.run.run_id} still running after {RUN_TIMEOUT_S}s: the job hangs")
    if "error" in out:
        raise AssertionError(f"run {cfg.run.run_id} failed after {time.monotonic() - t0:.1f}s: "
                             f"{type(out['error']).__name__}: {out['error']}") from out["error"]
    return out["run_dir"]


@pytest.fixture(scope="module")
def clean_run(sim_dir, tmp_path_factory) -> Path:
    """The reference: the same config on the same kind of cluster (2 workers under nannies), no kill."""
    tmp = tmp_path_factory.mktemp("clean")
    with cluster(tmp, nanny=True) as c:
        return run_bounded(job_config(sim_dir, tmp / "runs", "clean"), c.client)


# ---------------------------------------------------------------------------------------------
# the kill


class Killer:
    """SIGKILLs one worker process from a thread, once, as soon as one has a task of the stage (or after 3 s).

    ``task``: the prefix of the keys of the stage's own tasks (``on_worker`` for the SVD's
    products, ``topn_task`` for the neighbour lists); the test checks that the kill found one.
    """

    def __init__(self, c: Cluster, task: str):
        self.c = c
        self.task = task
        self.fired = threading.Event()
        self.done = threading.Event()
        self.victim: tuple[str, int] | None = None
        self.busy: list = []  # the keys the victim was processing when it was killed

    def fire(self) -> None:
        if self.fired.is_set():
            return
        self.fired.set()
        threading.Thread(target=self._kill, name="killer", daemon=True).start()

    def _kill(self) -> None:
        client = self.c.client
        pids = self.c.pids()
        self.c.worker_pids.update(pids.values())
        held = {w: len(keys) for w, keys in client.has_what().items()}
        # the worker holding the most data among those running a task of the stage (where the scheduler puts
        # a stage's tasks follows its inputs, so it may not be the one holding the most data overall)
        order = sorted(sorted(pids), key=lambda w: -held.get(w, 0))
        addr = order[0]
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            processing = client.processing(order)
            busy = {w: [k for k in processing.get(w, ()) if str(k).startswith(self.task)] for w in order}
            addr = next((w for w in order if busy[w]), addr)
            self.busy = busy.get(addr, [])
            if self.busy:
                break
            time.sleep(0.002)
        os.kill(pids[addr], signal.SIGKILL)
        self.victim = (addr, pids[addr])
        self.done.set()


@contextmanager
def kill_in_svd(killer: Killer, monkeypatch):
    """Fire ``killer`` at the KILL_AT_CALL-th Rayleigh-Ritz of the SVD; yields the count of calls after it."""
    calls = {"n": 0, "after_kill": 0}
    ritz_pairs = svd_module._ritz_pairs

    def counting(*args):
        calls["n"] += 1
        if killer.done.is_set() and calls["n"] <= MAIN_FIT_CALLS:  # the main fit's SVD only (not evaluation's)
            calls["after_kill"] += 1
        if calls["n"] == KILL_AT_CALL:  # after the first product's
            killer.fire()
        return ritz_pairs(*args)

    monkeypatch.setattr(svd_module, "_ritz_pairs", counting)
    yield calls


@contextmanager
def kill_at_progress(killer: Killer, label: str):
    """Fire ``killer`` at the first progress line whose label starts with ``label`` (``neighbours user_item``,
    ``evaluation ``, ``audit lists``): a tenth of that stage's first list group done."""

    class Hook(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith(label):
                killer.fire()

    import mfsim.pipeline.progress as progress_module

    logger = logging.getLogger("mfsim.progress")
    hook, level, every = Hook(logging.INFO), logger.level, progress_module.LOG_EVERY_S
    logger.addHandler(hook)
    logger.setLevel(logging.INFO)
    progress_module.LOG_EVERY_S = 0.0  # a line at every tenth of the stage, however fast
    try:
        yield
    finally:
        logger.removeHandler(hook)
        logger.setLevel(level)
        progress_module.LOG_EVERY_S = every


def check_faulted_run(c: Cluster, killer: Killer, run_dir: Path, clean: Path, *, nanny: bool) -> None:
    assert killer.done.wait(5), "the worker was never killed: the hook did not fire"
    addr, pid = killer.victim
    assert killer.busy, f"worker {addr} was killed while it had no {killer.task} task"
    try:
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"worker {pid} survived SIGKILL"
    except psutil.NoSuchProcess:
        pass
    if nanny:  # the nanny started a new worker process in its place
        c.client.wait_for_workers(2, timeout=30)
    else:
        assert len(c.client.scheduler_info()["workers"]) == 1
    files = assert_same_run_tables(clean, run_dir)
    assert sum(1 for f in files if f.parts[0] in ("similar_items", "recommendations", "similar_users")) >= 8


# ---------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("nanny", [True, False], ids=["nanny-restarts", "no-nanny"])
def test_worker_killed_during_svd(sim_dir, clean_run, tmp_path, monkeypatch, nanny):
    with cluster(tmp_path, nanny=nanny) as c:
        killer = Killer(c, "on_worker")
        with kill_in_svd(killer, monkeypatch) as calls:
            run_dir = run_bounded(job_config(sim_dir, tmp_path / "runs", "svd-kill"), c.client)
        assert calls["after_kill"] > 0, "the kill landed after the SVD, not inside it"
        check_faulted_run(c, killer, run_dir, clean_run, nanny=nanny)


@pytest.mark.parametrize("nanny", [True, False], ids=["nanny-restarts", "no-nanny"])
def test_worker_killed_during_neighbours(sim_dir, clean_run, tmp_path, nanny):
    with cluster(tmp_path, nanny=nanny) as c:
        killer = Killer(c, "topn_task")
        # at a tenth of the first user-item group: its top-N tasks are in flight then (the item-item groups before
        # it run other tasks, and the kill must find a topn_task whatever their speed)
        with kill_at_progress(killer, "neighbours user_item"):
            run_dir = run_bounded(job_config(sim_dir, tmp_path / "runs", "neighbours-kill"), c.client)
        check_faulted_run(c, killer, run_dir, clean_run, nanny=nanny)


@pytest.mark.parametrize("label", ["evaluation ", "audit lists"], ids=["evaluation", "audit"])
def test_worker_killed_during_evaluation_or_audit(sim_dir, clean_run, tmp_path, label):
    """The later stages' top-N tasks (ranking sums computed in the task, the audit's lists) survive a loss too."""
    with cluster(tmp_path, nanny=True) as c:
        # the evaluation's tasks score the held-out items' positions (holdout.held_out_rank_task), the audit's list
        killer = Killer(c, "held_out_rank_task" if label == "evaluation " else "topn_task")
        with kill_at_progress(killer, label):
            run_dir = run_bounded(job_config(sim_dir, tmp_path / "runs", label.split()[0] + "-kill"), c.client)
        check_faulted_run(c, killer, run_dir, clean_run, nanny=True)
