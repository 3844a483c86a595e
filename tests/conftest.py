"""Shared fixtures: Dask clients with 1 and 2 workers, the shared real data sets."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/data/<name>/interactions.parquet``; skips the test when absent."""
    path = SHARED_DATA / name / "interactions.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real data set {name} lives in ../shared beside the checkout")
    return path


def _local_client(n_workers: int):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
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
