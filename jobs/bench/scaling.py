"""``mfsim bench scaling``: the whole job's task graph recorded on the cluster it runs on, and its predicted time on
1 to 128 workers (``pipeline.trace``).

The job is ``bench pipeline``'s (the same synthetic power-law log under ``--workdir`` and the same defaults); every
task's compute interval, worker, dependencies and result size are recorded by a scheduler plugin and every timed
stage's interval by the run writer. Per stage it prints wall time T, task work W, serial time I, critical path S,
the most tasks ready at once and the predicted seconds ``I + sum over rounds max(W_r / P, S_r)`` for P = 1, 2, 8,
32, 128, then the whole job's predicted speedup from one worker. ``check_workers`` runs the job again on each of
those worker counts and prints the measured stage times next to the prediction from the recorded graph, with the
error per stage. Each run is preceded by a small job on the same cluster (``WARM_UP``), so that imports and kernel
loads are not in the recorded times.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mfsim.jobs.bench.ingest import ready_log
from mfsim.jobs.bench.pipeline import BENCH_DEFAULTS
from mfsim.pipeline.config import load_config
from mfsim.pipeline.shared import planned_threads
from mfsim.pipeline.trace import WORKER_COUNTS, StageClock, kind_rows, recorded_tasks, stage_seconds, stage_table

#: The warm-up job before each recorded run (rows, users, items of its synthetic log), on the same cluster.
WARM_UP = (50_000, 5_000, 1_000)


def _recorded_run(cfg, warm_cfg=None, plan_for: int | None = None) -> tuple[dict, list, list]:
    """Run the job on ``cfg``'s embedded cluster with the recorder on: (manifest, tasks, stages). ``warm_cfg``: a
    small job run first on the same cluster, every stage on the workers, not recorded: the imports and kernel loads
    of the driver and of each worker then stay out of the recorded times, as they would in a long-lived process.
    ``plan_for``: the recorded job plans its concurrency for that many worker threads (``planned_threads``)."""
    from mfsim.jobs.main_job import run_job
    from mfsim.pipeline.cluster import get_client
    from mfsim.pipeline.runs import writer

    clock = StageClock()
    with get_client(cfg.cluster) as client:
        if warm_cfg is not None:
            run_job(warm_cfg, client=client)
        writer.STAGE_LISTENERS.append(clock)
        try:
            with recorded_tasks(client) as tasks, planned_threads(plan_for):
                _, manifest = run_job(cfg, client=client)
        finally:
            writer.STAGE_LISTENERS.remove(clock)
    return manifest, tasks, clock.stages


def _line(name: str, r: dict[str, Any], workers: Sequence[int]) -> str:
    """One row of the table; T and I left blank where ``r`` has none (the neighbours stage's tasks by kind)."""
    pred = r["predicted"]
    speedup = pred[1] / pred[32] if 1 in pred and 32 in pred and pred[32] > 0 else float("nan")
    T, I = (f"{r[key]:>{w}.2f}" if key in r else " " * w for key, w in (("T", 8), ("I", 8)))
    return (f"{name:<18}{T}{r['W']:>9.2f}{I}{r['S']:>8.2f}{r['tasks']:>7}{r.get('rounds', ''):>7}"
            f"{r.get('max_ready', ''):>6}" + "".join(f"{pred[p]:>9.2f}" for p in workers) + f"{speedup:>9.1f}")


def _print_table(table: dict[str, Any], workers: Sequence[int]) -> None:
    head = f"{'stage':<18}{'T s':>8}{'W s':>9}{'I s':>8}{'S s':>8}{'tasks':>7}{'rounds':>7}{'ready':>6}"
    print(head + "".join(f"{f'P={p}':>9}" for p in workers) + f"{'x at 32':>9}")
    for name, r in [*table["stages"].items(), ("job", table["job"])]:
        print(_line(name, r, workers))
    print("predicted speedup of the whole job from 1 worker: "
          + ", ".join(f"{p} workers {x:.1f}x" for p, x in table["job"]["predicted_speedup"].items()))


def user_item_anchor(run_dir: Path, sample: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """The bare sgemm of the run's user-item list groups, on one thread: per (objective, scaling) under
    ``recommendations`` (each group's lists come from one gemm ``P B^T`` of users x items x k), the fastest plain
    tiling (``neighbours._bare_gemm_of``'s square tiles) of a seeded ``sample`` of users against random embeddings
    of the run's shapes, scaled to all users (the work per user is the same). Values do not change a gemm's time."""
    from mfsim.jobs.bench.neighbours import _bare_gemm_of
    from mfsim.kernels.threads import blas_limit
    from mfsim.pipeline.runs.results import open_run

    run = open_run(str(run_dir))
    groups = sorted({(objective, scaling) for objective, scaling, _ in run.lists("user_item")})
    users, items = int(run.manifest["n_users"]), int(run.manifest["n_items"])
    k = int(run.manifest["svd"]["rank"])
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((min(sample, users), k)).astype(np.float32)
    c = rng.standard_normal((items, k)).astype(np.float32)
    with blas_limit(1):
        one = min(_bare_gemm_of(q, c, 2048, 1280, 1)["square_tiles"] for _ in range(2))
    per_group = one * users / q.shape[0]
    return {"groups": ["/".join(g) for g in groups], "users": users, "items": items, "rank": k,
            "bare_gemm_s": per_group * len(groups)}


def run_bench_scaling(users: int = 200_000, items: int = 50_000, nnz: int = 5_000_000, *, config: str | None = None,
                      overrides: list[str] | None = None, workdir: Path | None = None, n_workers: int = 2,
                      check_workers: Sequence[int] = (), trace_out: Path | None = None,
                      workers: Sequence[int] = WORKER_COUNTS, plan_for: int | None = None) -> dict[str, Any]:
    """Record the job's task graph on ``n_workers`` workers of one thread, print the per-stage model, and, for each
    of ``check_workers``, the measured stage times on that many workers against the prediction; returns the
    numbers (``predicted_speedup``: the whole job's, ``{P: x}``).

    ``plan_for``: record the graph the job gives a cluster of that many worker threads (``planned_threads``: as many
    list groups and audit lists side by side as it would keep there, each in the same tasks), not the one it gives
    the recording cluster; the check runs plan for their own."""
    own_dir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="mfsim-bench-scaling-")) if own_dir else Path(workdir)
    log_dir = base / f"log-{users}x{items}x{nnz}"
    counts = tuple(sorted({*workers, *check_workers, 1}))
    try:
        ready_log(log_dir, nnz, users, items)
        warm_dir = base / "log-warm-up"
        ready_log(warm_dir, WARM_UP[0], WARM_UP[1], WARM_UP[2])

        def config_for(n: int, log: Path = log_dir, name: str = "scaling", *more: str):
            out_root = base / f"runs-{name}-{n}"
            shutil.rmtree(out_root, ignore_errors=True)
            return load_config(config, [f"input.path={log}", f"run.output={out_root}", "run.run_id=bench",
                                        f"cluster.n_workers={n}", "cluster.threads_per_worker=1",
                                        *BENCH_DEFAULTS, *(overrides or []), *more])

        def warm(n: int):
            return config_for(n, warm_dir, "warm-up", "cluster.small_data_here=false")

        manifest, tasks, stages = _recorded_run(config_for(n_workers), warm(n_workers), plan_for)
        table = stage_table(tasks, stages, counts)
        planned = f", planned for {plan_for} worker threads" if plan_for else ""
        print(f"{users:,} users x {items:,} items x {nnz:,} non-zeros, recorded on {n_workers} workers x 1 thread"
              f"{planned}: {len(tasks):,} tasks")
        _print_table(table, counts)
        lists = next((s for s in stages if s.name == "neighbours"), None)
        kinds = kind_rows(tasks, lists, workers=counts) if lists is not None else {}
        for name, r in kinds.items():
            print(_line(f"  {name}", r, counts))
        if kinds:
            print("  (the neighbours stage's tasks by the lists they make: work and critical path only)")
        if "user_item" in kinds:
            anchor = user_item_anchor(base / f"runs-scaling-{n_workers}" / "bench")
            ratio = kinds["user_item"]["W"] / anchor["bare_gemm_s"] if anchor["bare_gemm_s"] else float("nan")
            kinds["user_item"].update(bare_gemm=anchor, over_bare_gemm=ratio)
            print(f"  user-item lists: task work {kinds['user_item']['W']:.1f} s = {ratio:.2f}x the bare gemm of their "
                  f"shapes ({len(anchor['groups'])} x {anchor['users']:,} users x {anchor['items']:,} items x k = "
                  f"{anchor['rank']}: {anchor['bare_gemm_s']:.1f} s on one thread; groups "
                  f"{', '.join(anchor['groups'])})")
        out: dict[str, Any] = {"users": users, "items": items, "nnz": nnz, "recorded_workers": n_workers,
                               "planned_for": plan_for or n_workers,
                               "stages": table["stages"], "job": table["job"],
                               "predicted_speedup": table["job"]["predicted_speedup"], "timings": manifest["timings"],
                               "neighbours_by_kind": kinds}
        if trace_out is not None:
            Path(trace_out).write_text(json.dumps({
                "stages": [s.__dict__ for s in stages],
                "tasks": [{**t.__dict__, "deps": list(t.deps)} for t in tasks]}))
        checks = {}
        for n in check_workers:
            _, _, measured_stages = _recorded_run(config_for(n), warm(n))
            measured = stage_seconds(measured_stages)
            rows = {name: {"measured": measured.get(name, 0.0), "predicted": r["predicted"][n]}
                    for name, r in table["stages"].items()}
            total_m = sum(v["measured"] for v in rows.values())
            total_p = table["job"]["predicted"][n]
            print(f"check on {n} workers: measured vs predicted from the {n_workers}-worker graph")
            for name, v in [*rows.items(), ("job", {"measured": total_m, "predicted": total_p})]:
                err = (v["predicted"] - v["measured"]) / v["measured"] if v["measured"] > 0 else float("nan")
                v["error"] = err
                print(f"  {name:<18}{v['measured']:>9.2f}s measured{v['predicted']:>9.2f}s predicted  {err:+.1%}")
            checks[n] = {"stages": rows, "job": {"measured": total_m, "predicted": total_p,
                                                 "error": (total_p - total_m) / total_m if total_m else None}}
        if checks:
            out["check"] = checks
        return out
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
