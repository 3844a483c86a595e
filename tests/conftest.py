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


@pytest.fixture(scope="session")
def ml100k_default_run(tmp_path_factory):
    """``mfsim run conf/default.yaml --input ../shared/data/ml-100k/interactions.parquet`` run once, as the README
    says (the dashboard off): ``(completed process, run directory)``. Skips when the data set is absent."""
    import subprocess
    import sys
    from pathlib import Path

    data = shared_dataset("ml-100k")
    out = tmp_path_factory.mktemp("ml100k-default")
    r = subprocess.run([str(Path(sys.executable).parent / "mfsim"), "run", "conf/default.yaml", "--input", str(data),
                        "--output", str(out), "--run-id", "t1", "--set", "cluster.dashboard_address=null"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    return r, out / "t1"
