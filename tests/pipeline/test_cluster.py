"""The Dask seam: the embedded cluster's TLS and loopback binding, a remote TLS scheduler, cleanup.

Real processes only: the embedded ``LocalCluster`` of ``get_client`` and, for the remote case, a
``dask scheduler`` and a ``dask worker`` started as subprocesses with a CA and certificate made
here, ended by pid.
"""

from __future__ import annotations

import datetime as dt
import gc
import ipaddress
import json
import operator
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dask
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mfsim.pipeline.cluster import JOB_DASK_CONFIG, get_client, loopback_dashboard
from mfsim.pipeline.config import ClusterSection, TlsSection, load_config
from mfsim.pipeline.errors import MfsimError
from tests_support import end_process

DASK = [sys.executable, "-m", "dask"]


def cluster_cfg(address: str, tls: dict | None = None) -> ClusterSection:
    """A ``cluster`` section for the scheduler at ``address``, with ``tls`` files when given."""
    return ClusterSection(address=address, tls=TlsSection(**tls) if tls is not None else None)


def listening(pid: int) -> list[str]:
    """The IP addresses of the TCP sockets process ``pid`` listens on."""
    return [c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


def gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie awaiting its parent's wait counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def embedded():
    """The embedded cluster of ``get_client`` (2 worker processes) and its client."""
    with get_client(ClusterSection(n_workers=2, memory_limit="2GiB")) as client:
        yield client


def test_embedded_cluster_refuses_a_client_without_its_credentials(embedded):
    from distributed import Client, Security

    assert embedded.submit(operator.add, 1, 2).result() == 3  # the yielded client holds the credentials
    address = embedded.scheduler.address
    assert address.startswith("tls://127.0.0.1:")
    plain = address.replace("tls://", "tcp://")
    # no credentials at all (tls:// and tcp:// to the same port), and TLS with a certificate of one's own
    for attempt in (lambda: Client(address, timeout=3), lambda: Client(plain, timeout=3),
                    lambda: Client(address, timeout=3, security=Security.temporary())):
        with pytest.raises(Exception):
            intruder = attempt()
            intruder.close()
        # the refused Client is collected here: its __del__ run inside the next Client's start deadlocks distributed
        gc.collect()
    assert embedded.submit(operator.mul, 6, 7).result() == 42  # refusals left the job's client working


def test_embedded_cluster_listens_on_loopback_only(embedded):
    worker_pids = list(embedded.run(os.getpid).values())
    scheduler_pid = embedded.run_on_scheduler(os.getpid)
    assert len(worker_pids) == 2 and scheduler_pid == os.getpid()  # the embedded scheduler runs in the driver
    assert "127.0.0.1" in embedded.dashboard_link
    for pid in worker_pids + [scheduler_pid]:
        ips = listening(pid)
        assert ips, f"process {pid} listens on nothing"
        assert set(ips) == {"127.0.0.1"}, f"process {pid} listens on {ips}"


def test_bounded_timeouts_in_force_on_driver_and_workers(embedded):
    def read():
        return {key: dask.config.get(key) for key in JOB_DASK_CONFIG}

    assert read() == JOB_DASK_CONFIG
    assert all(v == JOB_DASK_CONFIG for v in embedded.run(read).values())
    assert embedded.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 3


def test_no_worker_outlives_the_driver_after_an_exception():
    with pytest.raises(RuntimeError, match="driver failed"):
        with get_client(ClusterSection(n_workers=2, memory_limit="2GiB", dashboard_address=None)) as client:
            pids = list(client.run(os.getpid).values())
            assert len(pids) == 2
            raise RuntimeError("driver failed")
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(gone(pid) for pid in pids), f"worker processes left: {[p for p in pids if not gone(p)]}"


def test_job_config_ends_with_the_client_and_leaves_dask_defaults(tmp_path):
    # a fresh interpreter, where distributed is first imported by get_client: the set must not undo its defaults
    script = tmp_path / "probe.py"
    script.write_text(
        "import dask, operator\n"
        "from mfsim.pipeline.cluster import get_client\n"
        "from mfsim.pipeline.config import ClusterSection\n"
        "before = dask.config.get('distributed.comm.timeouts.connect', None)\n"
        "with get_client(ClusterSection(n_workers=1, processes=False, dashboard_address=None)) as c:\n"
        "    assert c.scheduler.address.startswith('tls://127.0.0.1:'), c.scheduler.address\n"
        "    assert c.submit(operator.add, 1, 2).result() == 3\n"
        "    inside = dask.config.get('distributed.comm.timeouts.connect')\n"
        "print(before, inside, dask.config.get('distributed.comm.timeouts.connect'),\n"
        "      dask.config.get('distributed.comm.require-encryption'))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["None", "10s", "30s", "None"]


@pytest.mark.parametrize("given, bound", [(None, None), ("127.0.0.1:0", "127.0.0.1:0"), (":8787", "127.0.0.1:8787"),
                                          ("8787", "127.0.0.1:8787"), ("localhost:0", "127.0.0.1:0")])
def test_dashboard_is_bound_to_loopback(given, bound):
    assert loopback_dashboard(given) == bound


@pytest.mark.parametrize("given", ["0.0.0.0:8787", "10.1.2.3:0", "[::]:8787", "127.0.0.1:http"])
def test_dashboard_elsewhere_is_refused(given):
    with pytest.raises(MfsimError, match="cluster.dashboard_address must be 127.0.0.1:PORT"):
        loopback_dashboard(given)


# ---------------------------------------------------------------------------------------------
# a remote scheduler over TLS


def make_tls_files(directory: Path) -> dict[str, str]:
    """A self-signed CA and one certificate it signed (for scheduler, worker and client), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mfsim test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca_file": directory / "ca.pem", "cert_file": directory / "cert.pem", "key_file": directory / "key.pem"}
    files["ca_file"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert_file"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key_file"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    files["key_file"].chmod(0o600)
    return {k: str(v) for k, v in files.items()}


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 30) -> dict:
    """The JSON that ``proc`` writes to ``path`` (its scheduler file), once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with {proc.returncode}")
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:  # being written
                pass
        time.sleep(0.1)
    raise TimeoutError(f"no scheduler file {path} after {timeout} s")


@contextmanager
def tls_cluster(directory: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real ``dask scheduler`` and one ``dask worker`` (1 process, 1 thread) on 127.0.0.1 over TLS,
    with a CA and certificate made in ``directory``; yields (scheduler address, TLS files). Ended by pid."""
    tls = make_tls_files(directory)
    flags = ["--tls-ca-file", tls["ca_file"], "--tls-cert", tls["cert_file"], "--tls-key", tls["key_file"]]
    scheduler_file = directory / "scheduler.json"
    procs: list[subprocess.Popen] = []
    worker_pids: list[int] = []
    log = open(directory / "dask.log", "w")
    try:
        procs.append(subprocess.Popen(
            DASK + ["scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                    "--scheduler-file", str(scheduler_file), *flags], stdout=log, stderr=subprocess.STDOUT))
        address = wait_for_file(scheduler_file, procs[0])["address"]
        assert address.startswith("tls://127.0.0.1:")
        procs.append(subprocess.Popen(
            DASK + ["worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                    "--memory-limit", "1GiB", *flags], stdout=log, stderr=subprocess.STDOUT))
        with get_client(cluster_cfg(address, tls)) as client:
            client.wait_for_workers(1, timeout=30)
            worker_pids = list(client.run(os.getpid).values())
        yield address, tls
    finally:
        for proc in reversed(procs):
            end_process(proc)
        for pid in worker_pids:  # the worker process under its nanny, should the nanny have left it
            if not gone(pid):
                psutil.Process(pid).kill()
        log.close()


def test_remote_scheduler_over_tls(tmp_path):
    with tls_cluster(tmp_path) as (address, tls):
        with get_client(cluster_cfg(address, tls)) as client:
            assert client.submit(operator.add, 20, 22).result(timeout=30) == 42


def test_a_job_through_a_tls_cluster(tmp_path):
    """``run_job`` with ``cluster.address`` and ``cluster.tls``: ingest, SVD, factors and lists on the TLS worker."""
    from mfsim.jobs.main_job import run_job

    rng = np.random.default_rng(3)
    pairs = rng.choice(60 * 40, size=900, replace=False)  # 60 users x 40 items, each pair once
    log = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": pairs // 40, "item_id": pairs % 40, "weight": np.ones(900, np.float32)}), log)
    with tls_cluster(tmp_path) as (address, tls):
        cfg = load_config(None, [
            f"input.path={log}", f"run.output={tmp_path / 'runs'}", "run.run_id=over-tls",
            f"cluster.address={address}", *(f"cluster.tls.{key}={path}" for key, path in tls.items()),
            # a small, fast run (test_ops.QUICK): rank 4, short lists, no held-out fit, no audit, no report
            "svd.rank=4", "neighbours.top_n=5", "evaluation.holdout=none", "audit.enabled=false",
            "report.enabled=false", "objectives.eq1.lambda=10", "objectives.eq2.lambda=10", "objectives.cosine=null",
        ])
        run_dir, manifest = run_job(cfg, scheduler=None)
    assert run_dir == tmp_path / "runs" / "over-tls"
    assert (tmp_path / "runs" / "LATEST").read_text().strip() == "over-tls"
    assert manifest["nnz"] == 900 and manifest["n_users"] == len(np.unique(pairs // 40))
    assert (run_dir / "similar_items").is_dir() and (run_dir / "_log.txt").is_file()


def test_missing_tls_file_names_the_key_and_the_file(tmp_path):
    tls = make_tls_files(tmp_path)
    tls["cert_file"] = str(tmp_path / "nope.pem")
    with pytest.raises(MfsimError, match=r"cluster\.tls\.cert_file: file .*nope\.pem does not exist") as err:
        with get_client(cluster_cfg("tls://127.0.0.1:1", tls)):
            pass
    assert "\n" not in str(err.value)


def test_tls_without_its_files_names_the_missing_key():
    with pytest.raises(MfsimError, match=r"cluster\.tls\.ca_file is not set; cluster\.tls needs ca_file, cert_file"):
        with get_client(ClusterSection(address="tls://127.0.0.1:1", tls=TlsSection())):
            pass


@pytest.mark.parametrize("address, with_tls, message", [
    ("tcp://127.0.0.1:1", True, r"cluster\.tls is set but the scheduler address tcp://127\.0\.0\.1:1 is tcp://"),
    ("tls://127.0.0.1:1", False, r"is tls:// but cluster\.tls is not set"),
])
def test_protocol_and_tls_must_agree(tmp_path, address, with_tls, message):
    cfg = cluster_cfg(address, make_tls_files(tmp_path) if with_tls else None)
    with pytest.raises(MfsimError, match=message):
        with get_client(cfg):
            pass


def test_the_embedded_cluster_leaves_the_drivers_environment_as_it_was(monkeypatch):
    """distributed applies the workers' pre-spawn environment (NUMBA_NUM_THREADS=1, ...) to this process with
    os.environ.update; get_client puts it back, so the driver's own numba and BLAS keep their thread counts."""
    import os

    from mfsim.pipeline.cluster import THREAD_ENV_VARS, get_client
    from mfsim.pipeline.config import ClusterSection

    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    before = {k: os.environ.get(k) for k in THREAD_ENV_VARS}
    with get_client(ClusterSection(n_workers=1, threads_per_worker=1, dashboard_address=None)) as client:
        assert {k: os.environ.get(k) for k in THREAD_ENV_VARS} == before
        envs = client.run(lambda: {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")})
        assert list(envs.values()) == [{"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}]  # the workers' pinning
    assert {k: os.environ.get(k) for k in THREAD_ENV_VARS} == before
