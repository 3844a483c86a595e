"""The one seam between what runs and where it runs: a Dask client.

``get_client(cfg)`` connects to an existing scheduler (``cluster.address`` or ``--scheduler``,
over TLS when ``cluster.tls`` names a CA, a certificate and its key) or starts an embedded
``LocalCluster``. Every stage does its work through the client it is handed, so the same code runs
on a laptop and on a cluster.

The embedded cluster is the job's own: its scheduler, workers and dashboard listen on 127.0.0.1
only, and it speaks ``tls://`` with credentials made in memory for this run
(``distributed.Security.temporary()``), so another process on the host, even one that knows the
port, cannot connect to it and run code in the workers as the job's user. Both kinds of client run
under ``JOB_DASK_CONFIG``: bounded waits, so that a lost worker gives an error or a rescheduled
task in seconds instead of a run that hangs. Its worker processes log in the driver's format and
level (``pipeline.logs``: one JSON object per line under ``--log-format json``, theirs included).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from mfsim.pipeline import logs
from mfsim.pipeline.config import ClusterSection, TlsSection
from mfsim.pipeline.errors import MfsimError

log = logging.getLogger("mfsim.cluster")

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")

LOOPBACK = "127.0.0.1"

# Dask settings in force while the job's client is open (the embedded scheduler runs in this
# process and its worker processes get a copy at spawn): every wait that matters when a worker is
# lost, bounded and pinned here so that a change of Dask's defaults does not change them.
JOB_DASK_CONFIG: dict[str, Any] = {
    # give up opening one connection (to a dead worker's old address, an unreachable scheduler) after 10 s, not 30 s
    "distributed.comm.timeouts.connect": "10s",
    # a connection silent for 30 s (the peer vanished without a reset) is closed as dead
    "distributed.comm.timeouts.tcp": "30s",
    # a task that was running on 3 workers that died fails with KilledWorker instead of being retried forever
    "distributed.scheduler.allowed-failures": 3,
    # a worker without a heartbeat for 2 minutes is removed and its tasks rescheduled (default 5 minutes);
    # not shorter: a kernel that holds the GIL delays heartbeats, and a false removal recomputes its data
    "distributed.scheduler.worker-ttl": "2 minutes",
    # tasks that no worker can run for 2 minutes (every worker gone, none restarting) fail instead of waiting forever
    "distributed.scheduler.no-workers-timeout": "2 minutes",
}

#: The most threads an embedded cluster may have per core of the machine: more only thrash, and start for minutes
#: (64 workers on 2 cores: 305 s, then a connect timeout).
MAX_THREADS_PER_CORE = 4


def worker_thread_env(threads_per_worker: int) -> dict[str, str]:
    """Environment for worker processes: BLAS, OpenMP and numba each use the worker's own threads,
    so n_workers x threads_per_worker never oversubscribes the cores."""
    return {name: str(threads_per_worker) for name in THREAD_ENV_VARS}


def loopback_dashboard(address: str | None) -> str | None:
    """``cluster.dashboard_address`` bound to 127.0.0.1: ``None`` (no dashboard) stays ``None``;
    ``":8787"``, ``"8787"`` and ``"localhost:8787"`` become ``"127.0.0.1:8787"``.

    Any other host is refused with an ``MfsimError``: the embedded cluster listens on this machine
    only (reach its dashboard from elsewhere through an SSH tunnel).
    """
    if address is None:
        return None
    host, sep, port = str(address).rpartition(":")
    if not sep:
        host, port = "", str(address)
    if host not in ("", LOOPBACK, "localhost") or not port.isdigit():
        raise MfsimError(
            f"cluster.dashboard_address must be 127.0.0.1:PORT (port 0: any free port) or null, got {address!r}; "
            "the embedded cluster listens on 127.0.0.1 only (reach its dashboard through an SSH tunnel, "
            "e.g. ssh -L 8787:127.0.0.1:8787 HOST)"
        )
    return f"{LOOPBACK}:{port}"


def tls_security(tls: TlsSection) -> "distributed.Security":  # noqa: F821
    """A ``distributed.Security`` for a client of a remote TLS scheduler, from ``cluster.tls``.

    ``tls.ca_file`` is the CA that signed the scheduler's and the workers' certificates;
    ``tls.cert_file`` and ``tls.key_file`` are this client's certificate and private key (PEM).
    Encryption is required: a ``tcp://`` scheduler is refused. A file that does not exist gives one
    ``MfsimError`` naming the key and the file.
    """
    from distributed import Security

    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(tls, key, None)
        if not value:
            raise MfsimError(f"cluster.tls.{key} is not set; cluster.tls needs ca_file, cert_file and key_file "
                             "(PEM files: the CA, this client's certificate and its private key)")
        path = Path(value).expanduser()
        if not path.is_file():
            raise MfsimError(f"cluster.tls.{key}: file {path} does not exist; give the path of a PEM file "
                             "(relative paths are taken from the current directory)")
        files[key] = str(path)
    return Security(tls_ca_file=files["ca_file"], tls_client_cert=files["cert_file"],
                    tls_client_key=files["key_file"], require_encryption=True)


def _scheduler_address(address: str, tls: TlsSection | None) -> str:
    """``address`` with the protocol the client will speak: ``tls://`` when ``cluster.tls`` is set
    (added when the address has none), an error when the protocol and ``cluster.tls`` disagree."""
    protocol, sep, _ = address.partition("://")
    if tls is not None:
        if not sep:
            return f"tls://{address}"
        if protocol != "tls":
            raise MfsimError(f"cluster.tls is set but the scheduler address {address} is {protocol}://; "
                             "use tls://HOST:PORT, or drop cluster.tls for a plain scheduler")
    elif sep and protocol == "tls":
        raise MfsimError(f"the scheduler address {address} is tls:// but cluster.tls is not set; set "
                         "cluster.tls.ca_file, cluster.tls.cert_file and cluster.tls.key_file")
    return address


@contextmanager
def get_client(cfg: ClusterSection, scheduler: str | None = None) -> Iterator["distributed.Client"]:  # noqa: F821
    """Yield a ``distributed.Client``: connected to ``scheduler``/``cfg.address``, else an embedded cluster.

    Remote: over TLS with ``cfg.tls`` (``ca_file``, ``cert_file``, ``key_file``), else plain.
    Embedded: ``cfg.n_workers`` processes (or threads when ``cfg.processes`` is false) with
    ``cfg.threads_per_worker`` threads each (the defaults, 2 x 1, fit a 2-core machine); scheduler,
    workers and dashboard on 127.0.0.1, ``tls://`` with temporary credentials only this client
    holds; its worker processes log in the format and level of ``pipeline.logs.setup_logging``
    when the driver called it. ``JOB_DASK_CONFIG`` is in force while the client is open. On exit,
    normal or by exception, the client is closed and the embedded cluster with its worker
    processes shut down.
    """
    import dask
    import distributed  # noqa: F401  (before the set: its defaults must not be undone when the set ends)

    logs.adopt_distributed_logging()  # its loggers through the run's handler (distributed was just imported)

    with dask.config.set(JOB_DASK_CONFIG):
        address = scheduler or cfg.address
        if address:
            with _remote_client(address, cfg.tls) as client:
                yield client
        else:
            with _embedded_client(cfg) as client:
                yield client


class ClusterOnDemand:
    """The run's Dask client, started when a stage first needs workers (``get``): a run whose every stage ran in
    this process (``blocks``' placement rule: small data) never starts the embedded cluster, its worker processes
    nor their imports. A named scheduler (``cluster.address``, ``--scheduler``) is connected at once, so that a
    wrong address fails before any work; an existing client (``ClusterOnDemand(client=...)``) is used as it is and
    left open."""

    def __init__(self, cfg: ClusterSection | None = None, scheduler: str | None = None, *, client: Any = None):
        self._cfg, self._scheduler, self._client = cfg, scheduler, client
        self._stack = ExitStack()
        self._on_start: list = []
        if client is None and (scheduler or (cfg is not None and cfg.address)):
            self.get()

    def get(self) -> "distributed.Client":  # noqa: F821
        """The client, starting the embedded cluster (or connecting) the first time."""
        if self._client is None:
            if self._cfg is None:
                raise MfsimError("no Dask client and no cluster config to start one")
            self._client = self._stack.enter_context(get_client(self._cfg, self._scheduler))
            for fn in self._on_start:
                fn(self._client)
        return self._client

    def when_started(self, fn) -> None:
        """Call ``fn(client)`` once the client exists: now if it does, else when ``get`` starts it."""
        if self._client is not None:
            fn(self._client)
        else:
            self._on_start.append(fn)

    @property
    def started(self) -> bool:
        return self._client is not None

    def close(self) -> None:
        """Close what ``get`` started (the embedded cluster and its workers); a client handed in stays open."""
        self._stack.close()

    def __enter__(self) -> "ClusterOnDemand":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def _remote_client(address: str, tls: TlsSection | None) -> Iterator["distributed.Client"]:  # noqa: F821
    """A client of the scheduler at ``address`` (TLS with ``tls``), closed on exit."""
    from distributed import Client

    security = tls_security(tls) if tls is not None else None
    address = _scheduler_address(address, tls)
    try:
        client = Client(address, timeout="20s", security=security)
    except (OSError, TimeoutError) as exc:
        hint = " and that cluster.tls matches the scheduler's certificates" if tls is not None else ""
        raise MfsimError(
            f"cannot reach the Dask scheduler at {address}: {exc}; start it (dask scheduler), check the address"
            f"{hint}, or drop --scheduler / cluster.address to use an embedded local cluster"
        ) from exc
    log.info("connected to Dask scheduler %s%s (dashboard %s)", address, " over TLS" if tls is not None else "",
             client.dashboard_link)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def _embedded_client(cfg: ClusterSection) -> Iterator["distributed.Client"]:  # noqa: F821
    """A ``LocalCluster`` on 127.0.0.1 over TLS with temporary credentials, and its client."""
    import dask
    from distributed import Client, LocalCluster, Security

    cores = os.cpu_count() or 1
    if cfg.n_workers * cfg.threads_per_worker > MAX_THREADS_PER_CORE * cores:
        raise MfsimError(f"cluster.n_workers={cfg.n_workers} x cluster.threads_per_worker={cfg.threads_per_worker} "
                         f"asks for {cfg.n_workers * cfg.threads_per_worker} threads on a machine with {cores} cores: "
                         f"the embedded cluster would take minutes to start and then thrash; use at most "
                         f"{MAX_THREADS_PER_CORE * cores} in all, or --scheduler for a cluster of more machines")

    dashboard = loopback_dashboard(cfg.dashboard_address)
    security = Security.temporary()  # a self-signed CA + key in memory, for this run only
    env = {**worker_thread_env(cfg.threads_per_worker), **logs.worker_log_env()}
    kwargs = dict(
        n_workers=cfg.n_workers,
        threads_per_worker=cfg.threads_per_worker,
        processes=cfg.processes,
        host=LOOPBACK,  # scheduler, nannies and workers
        protocol="tls://",
        security=security,
        dashboard_address=dashboard,
        memory_limit=cfg.memory_limit,
    )
    if cfg.processes:
        kwargs["env"] = env
        kwargs["preload"] = [logs.__name__]  # each worker process logs in the driver's format (logs.dask_setup)
    # also before the worker processes spawn: numba and BLAS read their thread counts at import. distributed
    # applies pre-spawn-environ with os.environ.update in *this* process and never restores it, which would
    # leave this driver with NUMBA_NUM_THREADS=1 (and numba refusing a later change): restore it once the
    # workers are up, and again at the end (a nanny that restarts a lost worker sets it again)
    saved = {k: os.environ.get(k) for k in (*env, "PYTHONHASHSEED")}
    t0 = time.perf_counter()
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
            cluster = LocalCluster(**kwargs)
    finally:
        _restore_environ(saved)
    try:
        client = Client(cluster, security=security)
    except BaseException:
        cluster.close()
        _restore_environ(saved)
        raise
    log.info(
        "started local Dask cluster on %s over TLS in %.2fs: %d workers x %d threads (dashboard %s)",
        LOOPBACK, time.perf_counter() - t0, cfg.n_workers, cfg.threads_per_worker,
        client.dashboard_link if dashboard else "off",
    )
    try:
        yield client
    finally:
        client.close()
        cluster.close()
        _restore_environ(saved)


def _restore_environ(saved: dict[str, str | None]) -> None:
    """Put the variables of ``saved`` back as they were (removing those that were unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
