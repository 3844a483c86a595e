"""The one seam between what runs and where it runs: a Dask client.

``get_client(cfg)`` connects to an existing scheduler (``cluster.address`` or ``--scheduler``) or
starts an embedded ``LocalCluster`` bound to 127.0.0.1. Every stage does its work through the
client it is handed, so the same code runs on a laptop and on a cluster.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from mfsim.pipeline.config import ClusterSection
from mfsim.pipeline.errors import MfsimError

log = logging.getLogger("mfsim.cluster")

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def worker_thread_env(threads_per_worker: int) -> dict[str, str]:
    """Environment for worker processes: BLAS, OpenMP and numba each use the worker's own threads,
    so n_workers x threads_per_worker never oversubscribes the cores."""
    return {name: str(threads_per_worker) for name in THREAD_ENV_VARS}


@contextmanager
def get_client(cfg: ClusterSection, scheduler: str | None = None) -> Iterator["distributed.Client"]:  # noqa: F821
    """Yield a ``distributed.Client``: connected to ``scheduler``/``cfg.address``, else an embedded cluster.

    The embedded cluster has ``cfg.n_workers`` processes (or threads when ``cfg.processes`` is
    false) with ``cfg.threads_per_worker`` threads each; the defaults (2 x 1) fit a 2-core machine.
    """
    import dask
    from distributed import Client, LocalCluster

    address = scheduler or cfg.address
    if address:
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise MfsimError(
                f"cannot reach the Dask scheduler at {address}: {exc}; start it (dask scheduler) "
                "or drop --scheduler / cluster.address to use an embedded local cluster"
            ) from exc
        log.info("connected to Dask scheduler %s (dashboard %s)", address, client.dashboard_link)
        try:
            yield client
        finally:
            client.close()
        return

    env = worker_thread_env(cfg.threads_per_worker)
    kwargs = dict(
        n_workers=cfg.n_workers,
        threads_per_worker=cfg.threads_per_worker,
        processes=cfg.processes,
        host="127.0.0.1",
        dashboard_address=cfg.dashboard_address,
        memory_limit=cfg.memory_limit,
    )
    if cfg.processes:
        kwargs["env"] = env
    # also before the worker processes spawn: numba and BLAS read their thread counts at import
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        cluster = LocalCluster(**kwargs)
    client = Client(cluster)
    log.info(
        "started local Dask cluster: %d workers x %d threads (dashboard %s)",
        cfg.n_workers, cfg.threads_per_worker, client.dashboard_link if cfg.dashboard_address else "off",
    )
    try:
        yield client
    finally:
        client.close()
        cluster.close()

