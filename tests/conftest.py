"""Shared fixtures: Dask clients with 1 and 2 workers, the shared real data sets."""

from __future__ import annotations

import pytest

from tests_support import SHARED_DATA, shared_dataset  # noqa: F401  (re-exported for tests)

def _local_client(n_workers: int):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit="4GiB",
    )
    return cluster, Client(cluster)


@pytest.fixture(scope="session")
def client():
    """A local Dask cluster with 2 single-threaded worker processes."""
    cluster, c = _local_client(2)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="session")
def client1():
    """A local Dask cluster with 1 single-threaded worker process."""
    cluster, c = _local_client(1)
    yield c
    c.close()
    cluster.close()
