"""``mfsim bench ingest``: mfsim's Dask ingest against a single-process pyarrow + scipy build.

The anchor, timed in the same run on the same files: ``pyarrow.parquet.read_table`` of the three
columns and ``scipy.sparse.coo_matrix((w, (u, i))).tocsr()``, with the synthetic ids used directly
as indices (the anchor does no id mapping, no validation and no minimum support, so it is a
lower bound for any ingest). mfsim's time runs from the call to the CSR blocks being ready on the
workers; the embedded cluster's start-up is reported apart.

With ``repeat`` R > 1, mfsim also ingests a log of the same interactions repeated R times (the
base log's files R times over, as hard links where the file system allows): R times the rows,
the same X pattern and nnz. A worker's memory should not grow with the log, only with X, so the
two runs' worker peak RSS are printed side by side; each runs on a fresh cluster.
"""

from __future__ import annotations

import os
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


def write_repeated_log(base: Path, path: Path, repeat: int) -> None:
    """A log of ``base``'s files ``repeat`` times over (``r00-part-000.parquet``, ...: repetition-major order),
    as hard links, or copies where the file system has none."""
    path.mkdir(parents=True, exist_ok=True)
    for r in range(repeat):
        for f in sorted(base.glob("*.parquet")):
            target = path / f"r{r:02d}-{f.name}"
            if not target.exists():
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copyfile(f, target)


def _warm_up() -> None:
    import numpy as np

    from mfsim.kernels.coo import bucket_order, coo_to_csr_sum

    from mfsim.kernels.coo import bucket_entries, count_ids, csr_add_coo, lookup

    one, one32, no_ts = np.zeros(1, np.int64), np.zeros(1, np.int32), np.zeros(0, np.int64)
    bucket_order(one, 1, 1)
    coo_to_csr_sum(one, one32, np.ones(1, np.float32), 1, no_ts)
    bucket_entries(one32, one32, np.ones(1, np.float32), no_ts, 1, np.arange(2), np.arange(2), one)
    lookup(one, one[0], one32)
    count_ids(one, one[0], 1, np.zeros(0, np.int32))
    count_ids(one, one[0], 1, one)
    block = (np.zeros(2, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), no_ts)
    for drop_zeros in (False, True):
        csr_add_coo(*block, one32, one32, np.ones(1, np.float32), no_ts, drop_zeros)


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


def _timed_ingest(n_workers: int, log_dir: Path, block_rows: int):
    """mfsim's ingest of ``log_dir`` on a fresh embedded cluster: (Timing, cluster start and warm-up seconds)."""
    t = time.perf_counter()
    with local_client(n_workers) as client:
        client.run(_warm_up)  # imports and compiled kernels, as on a cluster that already ran a job
        t_start = time.perf_counter() - t
        run = timed(lambda: _ingest_ready(client, log_dir, block_rows), client)
        run.result = run.result.counts  # the blocks go with the cluster
    return run, t_start


def run_bench_ingest(rows: int = 50_000_000, users: int | None = None, items: int | None = None,
                     workdir: Path | None = None, n_workers: int = 2, block_rows: int = 65536,
                     repeat: int = 1) -> dict:
    """Time mfsim's Dask ingest of a synthetic log against ``anchor_build``; print three lines; return the numbers.

    ``users`` and ``items`` default to ``rows // 50`` and ``rows // 250``. The log is written to
    ``workdir/log`` (kept, and reused when it already exists) or to a temporary directory
    (removed). Peak RSS: this process during the anchor, each worker during mfsim's ingest. With
    ``repeat`` > 1, also ingest ``workdir/log-x{repeat}`` (``write_repeated_log``) and print its time
    and the worker peak RSS of both runs (two more lines).
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

        run, t_start = _timed_ingest(n_workers, log_dir, block_rows)
        counts, t_mfsim, peak = run.result, run.seconds, max(run.worker_peaks.values())
        ok = counts["nnz"] == anchor_nnz
        ratio = t_mfsim / t_anchor
        print(f"mfsim   Dask ingest ({n_workers} workers x 1 thread):      {t_mfsim:7.2f}s  "
              f"peak RSS per worker {peak / 2**30:.2f} GiB  (cluster start and warm-up {t_start:.1f}s, not counted)")
        print(f"ratio mfsim/anchor = {ratio:.2f}x (target <= 1.0x)  nnz {counts['nnz']:,} "
              f"{'equal to' if ok else 'DIFFERENT from'} the anchor's {anchor_nnz:,}")
        out = {"rows": rows, "anchor_s": t_anchor, "mfsim_s": t_mfsim, "ratio": ratio, "anchor_peak": anchor.peak,
               "worker_peaks": run.worker_peaks, "nnz_equal": ok}
        if repeat > 1:
            out.update(_repeated(base, log_dir, rows, repeat, n_workers, block_rows, counts["nnz"], peak))
        return out
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)


def _repeated(base: Path, log_dir: Path, rows: int, repeat: int, n_workers: int, block_rows: int, nnz: int,
              peak: int) -> dict:
    """The ``repeat`` part of ``run_bench_ingest``: ingest the repeated log, print two lines, return the numbers."""
    rep_dir = base / f"log-x{repeat}"
    write_repeated_log(log_dir, rep_dir, repeat)
    run, _ = _timed_ingest(n_workers, rep_dir, block_rows)
    rep_peak = max(run.worker_peaks.values())
    ok = run.result["nnz"] == nnz
    print(f"mfsim   {repeat}x log ({repeat * rows:,} rows, the same interactions): {run.seconds:7.2f}s  "
          f"peak RSS per worker {rep_peak / 2**30:.2f} GiB  nnz {run.result['nnz']:,} "
          f"{'equal to' if ok else 'DIFFERENT from'} the 1x log's")
    print(f"worker peak RSS: 1x log {peak / 2**30:.2f} GiB, {repeat}x log {rep_peak / 2**30:.2f} GiB "
          f"(ratio {rep_peak / peak:.2f})")
    return {"repeat": repeat, "repeat_s": run.seconds, "repeat_worker_peaks": run.worker_peaks,
            "repeat_nnz_equal": ok, "rss_ratio": rep_peak / peak}
