"""``mfsim bench pipeline``: the whole default job on a synthetic power-law log, on the embedded cluster.

Prints each stage's wall time (from the run's manifest), the driver's and each worker's peak
resident memory during the run (``measure.timed``), and the size of every output dataset. The
log is ``bench.ingest.write_synthetic_log``'s (kept under ``--workdir`` and reused when present).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mfsim.jobs.bench.ingest import ready_log
from mfsim.jobs.bench.measure import timed
from mfsim.pipeline.config import load_config

MiB = 2**20


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


#: What the benchmark sets before the caller's ``--set``s: fixed lambdas (a catalog-scale run is timed without the
#: held-out sweep, ``evaluation.holdout=none``) and no cosine-trained model (its L-BFGS state is O(p k) on the
#: driver: ``pipeline.model.cosine_model``). Any of them can be set back, e.g. ``--set objectives.eq1.lambda=auto``.
BENCH_DEFAULTS = ("objectives.eq1.lambda=10", "objectives.eq2.lambda=10", "objectives.cosine=null")


def run_bench_pipeline(users: int = 200_000, items: int = 50_000, nnz: int = 5_000_000, *,
                       config: str | None = None, overrides: list[str] | None = None,
                       workdir: Path | None = None, n_workers: int = 2) -> dict:
    """Run the job once on a synthetic log of ``nnz`` rows; print the stage table; return the numbers."""
    from mfsim.jobs.main_job import run_job
    from mfsim.pipeline.cluster import get_client

    own_dir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="mfsim-bench-pipeline-")) if own_dir else Path(workdir)
    log_dir = base / f"log-{users}x{items}x{nnz}"
    try:
        ready_log(log_dir, nnz, users, items)
        out_root = base / "runs"
        shutil.rmtree(out_root, ignore_errors=True)
        cfg = load_config(config, [f"input.path={log_dir}", f"run.output={out_root}", "run.run_id=bench",
                                   f"cluster.n_workers={n_workers}", "cluster.threads_per_worker=1",
                                   *BENCH_DEFAULTS, *(overrides or [])])
        with get_client(cfg.cluster) as client:
            run = timed(lambda: run_job(cfg, client=client), client)
        run_dir, manifest = run.result
        print(f"{'stage':<22}{'seconds':>10}{'driver peak MiB':>17}")
        peaks = manifest.get("driver_peak_rss_mib", {})  # per stage of the runner (fit: preprocess, svd, factors)
        for stage, seconds in manifest["timings"].items():
            print(f"{stage:<22}{seconds:>10.2f}{peaks.get(stage, peaks.get('fit', 0)):>17}")
        print(f"{'total':<22}{run.seconds:>10.2f}")
        print(f"driver peak RSS {run.peak / MiB:.0f} MiB (+{run.extra_rss / MiB:.0f} MiB during the run)")
        for addr, peak in sorted(run.worker_peaks.items()):
            print(f"worker {addr} peak RSS {peak / MiB:.0f} MiB")
        sizes = {}
        for name, d in manifest["datasets"].items():
            sizes[name] = _size(Path(run_dir) / name)
            rows = f"{d['rows']:>12,} rows" if "rows" in d else " " * 17
            print(f"{name:<34}{rows}{sizes[name] / MiB:>10.1f} MiB")
        return {"users": users, "items": items, "nnz": nnz, "seconds": run.seconds, "timings": manifest["timings"],
                "driver_peak_rss": run.peak, "driver_extra_rss": run.extra_rss, "worker_peak_rss": run.worker_peaks,
                "dataset_bytes": sizes, "counts": manifest["counts"]}
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
