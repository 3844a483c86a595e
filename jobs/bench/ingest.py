"""``mfsim bench ingest``: mfsim's Dask ingest against a single-process pyarrow + scipy build.

The anchor, timed in the same run on the same files: ``pyarrow.parquet.read_table`` of the three
columns and ``scipy.sparse.coo_matrix((w, (u, i))).tocsr()``, with the synthetic ids used directly
as indices (the anchor does no id mapping, no validation and no minimum support, so it is a
lower bound for any ingest). mfsim's time runs from the call to the CSR blocks being ready on the
workers; the embedded cluster's start-up is reported apart.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import wait

from mfsim.jobs.bench.measure import local_client, timed
from mfsim.pipeline.config import IngestSection, InputSection
from mfsim.pipeline.ingest import ingest


def write_synthetic_log(path: Path, rows: int, users: int, items: int, *, files: int = 8, seed: int = 0) -> None:
    """A Parquet log of ``rows`` rows: power-law user activity and item popularity, int64 ids, float32 weights."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // files)
    # popularity ~ rank^-0.8 (items) and rank^-0.5 (users), sampled by inverse CDF on a cumulative table
    item_cdf = np.cumsum(np.arange(1, items + 1, dtype=np.float64) ** -0.8)
    item_cdf /= item_cdf[-1]
    user_cdf = np.cumsum(np.arange(1, users + 1, dtype=np.float64) ** -0.5)
    user_cdf /= user_cdf[-1]
    t0 = np.datetime64("2024-01-01T00:00:00", "ms").astype(np.int64)
    for f in range(files):
        n = min(per_file, rows - f * per_file)
        if n <= 0:
            break
        u = np.searchsorted(user_cdf, rng.random(n)).astype(np.int64)
        i = np.searchsorted(item_cdf, rng.random(n)).astype(np.int64)
        w = rng.integers(1, 6, n).astype(np.float32)
        ts = pa.array(t0 + rng.integers(0, 30 * 86_400_000, n), pa.timestamp("ms"))
        pq.write_table(pa.table({"user_id": u, "item_id": i, "weight": w, "ts": ts}),
                       path / f"part-{f:03d}.parquet", row_group_size=1_000_000, compression="zstd")


def ready_log(log_dir: Path, rows: int, users: int, items: int) -> None:
    """``write_synthetic_log`` into ``log_dir`` unless it is there already; prints one line about it."""
    t = time.perf_counter()
    if not log_dir.exists():
        write_synthetic_log(log_dir, rows, users, items)
    print(f"synthetic log: {rows:,} rows, {users:,} users, {items:,} items "
          f"({sum(f.stat().st_size for f in log_dir.iterdir()) / 2**20:.0f} MiB, ready in {time.perf_counter() - t:.1f}s)")


def _warm_up() -> None:
    import numpy as np

    from mfsim.kernels.coo import bucket_order, coo_to_csr_sum

    bucket_order(np.zeros(1, np.int64), 1, 1)
    coo_to_csr_sum(np.zeros(1, np.int64), np.zeros(1, np.int32), np.ones(1, np.float32), 1, np.zeros(0, np.int64))


def _ingest_ready(client, log_dir: Path, block_rows: int):
    """mfsim's ingest, returned once the CSR blocks are ready on the workers."""
    res = ingest(client, InputSection(path=str(log_dir), ts_col=None), IngestSection(block_rows=block_rows))
    wait(res.X.parts)
    return res


def anchor_build(path: Path):
    """Single-process reference: pyarrow read + scipy coo -> csr (duplicates summed)."""
    import scipy.sparse as sp

    t = pq.read_table(path, columns=["user_id", "item_id", "weight"])
    u = t["user_id"].to_numpy()
    i = t["item_id"].to_numpy()
    w = t["weight"].to_numpy()
    return sp.coo_matrix((w, (u, i)), shape=(int(u.max()) + 1, int(i.max()) + 1)).tocsr()


def run_bench_ingest(rows: int = 50_000_000, users: int | None = None, items: int | None = None,
                     workdir: Path | None = None, n_workers: int = 2, block_rows: int = 65536) -> dict:
    """Time mfsim's Dask ingest of a synthetic log against ``anchor_build``; print three lines; return the numbers.

    ``users`` and ``items`` default to ``rows // 50`` and ``rows // 250``. The log is written to
    ``workdir/log`` (kept, and reused when it already exists) or to a temporary directory
    (removed). Peak RSS: this process during the anchor, each worker during mfsim's ingest.
    """
    users = users or max(10, rows // 50)
    items = items or max(10, rows // 250)
    own_dir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="mfsim-bench-ingest-")) if own_dir else Path(workdir)
    log_dir = base / "log"
    try:
        ready_log(log_dir, rows, users, items)

        anchor = timed(lambda: anchor_build(log_dir))
        anchor_nnz = anchor.result.nnz
        anchor.result = None
        t_anchor = anchor.seconds
        print(f"anchor  pyarrow read + scipy coo->csr (1 process): {t_anchor:7.2f}s  "
              f"peak RSS {anchor.peak / 2**30:.2f} GiB")

        t = time.perf_counter()
        with local_client(n_workers) as client:
            client.run(_warm_up)  # imports and compiled kernels, as on a cluster that already ran a job
            t_start = time.perf_counter() - t
            run = timed(lambda: _ingest_ready(client, log_dir, block_rows), client)
        res, t_mfsim, peaks = run.result, run.seconds, run.worker_peaks
        ok = res.counts["nnz"] == anchor_nnz
        ratio = t_mfsim / t_anchor
        print(f"mfsim   Dask ingest ({n_workers} workers x 1 thread):      {t_mfsim:7.2f}s  "
              f"peak RSS per worker {max(peaks.values()) / 2**30:.2f} GiB  (cluster start and warm-up {t_start:.1f}s, not counted)")
        print(f"ratio mfsim/anchor = {ratio:.2f}x (target <= 1.5x)  nnz {res.counts['nnz']:,} "
              f"{'equal to' if ok else 'DIFFERENT from'} the anchor's {anchor_nnz:,}")
        return {"rows": rows, "anchor_s": t_anchor, "mfsim_s": t_mfsim, "ratio": ratio, "anchor_peak": anchor.peak,
                "worker_peaks": peaks, "nnz_equal": ok}
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
