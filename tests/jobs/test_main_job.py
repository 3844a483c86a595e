"""The main job end to end on small data: every published list against dense NumPy references."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from mfsim.jobs.main_job import run_job
from mfsim.pipeline.lists.holdout import holdout_metrics
from mfsim.pipeline.blocks import RowBlocks
from mfsim.pipeline.config import load_config
from mfsim.pipeline.lists.evaluate import split_holdout
from mfsim.pipeline.model.fit import fit_model
from mfsim.pipeline.simulate import simulate, write_simulation
from tests_support import assert_same_run_tables, check_lists as _check_lists, cosine_rows as _cos, \
    dense_x as _dense_x, run_factor as _factor

TOP_N = 7
RANK = 5  # = the simulator's cluster count: a clear gap after the top 5 singular values
EPS32 = np.finfo(np.float32).eps
AUDIT_ITEMS, EVAL_USERS = 30, 60
# neighbours.cosine_norm_floor of these runs: it drops 2-4 rows of each embedding (relative norms 0.11-0.14)
# from the cosine lists, and no row's relative norm lies within 1% of it (measured on a dense SVD of this X)
NORM_FLOOR = 0.14


def _small_config(root, client, run_id):
    return load_config(None, [
        f"input.path={root / 'sim'}", f"run.output={root / 'runs'}", f"run.run_id={run_id}",
        f"cluster.address={client.scheduler.address}", f"svd.rank={RANK}", f"neighbours.top_n={TOP_N}",
        "objectives.eq1.lambda=2.0", "objectives.eq2.lambda=1.5", "objectives.cosine=null", "preprocess.binarize=true",
        "objectives.eq1.scalings=[symmetric,item_orthonormal,eq2_like]", "neighbours.query_chunk=64",
        "neighbours.candidate_block=16", "ingest.block_rows=64",  # several row blocks
        # the 5th and 6th singular values of this small X are within 10%: enough power iterations
        # that the randomized subspace matches the exact one (error ~ (s_16/s_5)^(2q+1) ~ 1e-6)
        "svd.power_iterations=12",
        "neighbours.user_user=[cosine,projected_cosine]",  # off in conf/default.yaml
        "neighbours.eq1_scalings=all",  # the named scalings' lists too (off in conf/default.yaml): all are checked
        f"neighbours.cosine_norm_floor={NORM_FLOOR}",
        # samples smaller than the data (40 items; ~100 of the 150 users hold items out), so that the
        # one-worker run checks that they do not depend on the workers
        f"audit.max_items={AUDIT_ITEMS}", f"evaluation.max_users={EVAL_USERS}",
    ])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("job")
    cfg = load_config(None, ["simulate.n_users=150", "simulate.n_items=40", "simulate.seed=3"])
    write_simulation(simulate(cfg.simulate), root / "sim", cfg.simulate)
    run_dir, manifest = run_job(_small_config(root, client, "r1"))
    return run_dir, manifest, root / "sim"


def test_one_worker_gives_the_same_run(small_run, client1):
    """Every published table of the 2-worker run, again on 1 worker: the same up to float rounding.

    The SVD sums its per-worker partial products in a fixed order, but which blocks make up a
    worker's partial depends on the worker count, so sigma may differ in the last bits (1e-15
    relative); everything downstream then agrees to float32 rounding, and ids, ranks and counts
    exactly (no near-ties at that level in this data).
    """
    run_dir, _, sim_dir = small_run
    one_dir, _ = run_job(_small_config(sim_dir.parent, client1, "one-worker"))
    files = assert_same_run_tables(run_dir, one_dir)
    assert len(files) > 40


def test_work_held_to_the_workers_gives_the_same_run(small_run, client, monkeypatch):
    """This log is small: its ingest, SVD, fit, embeddings and lists run in this process
    (``blocks.INGEST_HERE_MAX_ROWS``, ``rounds_where``, ``lists_here``), and the manifest says so. Held to tasks on
    the workers (``cluster.small_data_here: false``), every published table is the same (ids, ranks and counts
    exactly; floats to rounding: the SVD's per-worker partial sums group X's 3 blocks otherwise than one sum here,
    as with one worker against two). There the report's figures are drawn on the workers, all but the audit's
    submitted by a thread of their own begun after the factors, once the lists run (``report_figures_early``), the
    audit's by the report stage; here all of them by the report stage; and the id tables are written beside the fit
    there."""
    import threading

    import mfsim.pipeline.blocks as blocks_module
    from mfsim.pipeline.report.build import Figures

    import time

    from mfsim.pipeline.runs.writer import RunWriter

    run_dir, manifest, sim_dir = small_run
    submitted: list[tuple[str, str, bool]] = []  # (thread, figure, on a client)
    draw = Figures.draw
    times: dict[str, list[float]] = {"early figures": [], "parts recorded": []}

    def recorded(self, figures):
        for name, _ in figures:
            if name not in self.drawn:
                submitted.append((threading.current_thread().name, name, self.run.client is not None))
        if threading.current_thread().name == "mfsim-early-report":
            times["early figures"].append(time.perf_counter())
        return draw(self, figures)

    written = RunWriter.written
    monkeypatch.setattr(RunWriter, "written", lambda self, w: (times["parts recorded"].append(time.perf_counter()),
                                                              written(self, w))[1])
    monkeypatch.setattr(Figures, "draw", recorded)
    import mfsim.jobs.stages as stages

    id_writers: list[str] = []  # the thread that writes the id tables (beside the fit, for a log read on the workers)
    write_ids = stages.write_id_tables
    monkeypatch.setattr(stages, "write_id_tables",
                        lambda *a: (id_writers.append(threading.current_thread().name), write_ids(*a))[1])
    places = ("input", "svd", "embeddings", "evaluation", "audit")
    assert [manifest[key]["ran_on"] for key in places] == ["driver"] * 5
    assert manifest["neighbours"]["ran_on"] == {"driver": 18}  # list groups
    cfg = _small_config(sim_dir.parent, client, "on-workers")
    cfg.cluster.small_data_here = False
    workers_dir, on_workers = run_job(cfg)
    assert blocks_module.INGEST_HERE_MAX_ROWS > 0  # the limits are back after the run
    assert [on_workers[key]["ran_on"] for key in places] == ["workers"] * 5
    assert on_workers["neighbours"]["ran_on"] == {"workers": 18}
    assert len(assert_same_run_tables(run_dir, workers_dir)) > 40
    assert id_writers == ["mfsim-early-ids"]
    # the report's figures, drawn as tasks on the workers there and here in the other run: the same figures, each a PNG
    figures = [re.findall(r'<figure id="([^"]+)">\s*<img src="data:image/png;base64,', (d / "report.html").read_text())
               for d in (run_dir, workers_dir)]
    assert figures[0] == figures[1] and len(figures[0]) >= 5
    # the early figures were sampled once the lists had run their first tasks (``lists_running``: a part recorded)
    assert times["early figures"] and min(times["early figures"]) > min(times["parts recorded"])
    early = [name for thread, name, _ in submitted if thread == "mfsim-early-report"]
    assert sorted(early) == sorted(set(figures[1]) - {"audit_jaccard"})
    assert [(name, on_client) for thread, name, on_client in submitted if thread != "mfsim-early-report"] == [
        ("audit_jaccard", True)]


def test_list_groups_on_the_workers_overlap_and_give_the_same_lists(small_run, client, monkeypatch):
    """On the workers, list groups run ``groups_in_flight`` at a time (3 here): the first three groups wait for each
    other before they compute (a barrier that only 3 groups running at once can pass), never more than 3 run, and
    every published table is as in the run whose groups ran here one after another."""
    import threading

    import mfsim.jobs.stages as stages

    run_dir, _, sim_dir = small_run
    lock, meet = threading.Lock(), threading.Barrier(3, timeout=60)
    count = {"started": 0, "running": 0, "most": 0}
    group_lists = stages.group_lists

    def counted(*args, **kwargs):
        with lock:
            first = count["started"] < 3
            count["started"] += 1
            count["running"] += 1
            count["most"] = max(count["most"], count["running"])
        try:
            if first:
                meet.wait()  # raises BrokenBarrierError (the run fails) unless 3 groups run at once
            yield from group_lists(*args, **kwargs)
        finally:
            with lock:
                count["running"] -= 1

    monkeypatch.setattr(stages, "group_lists", counted)
    monkeypatch.setattr(stages, "groups_in_flight", lambda client, tasks_each=4: 3)  # the audit's lists too
    cfg = _small_config(sim_dir.parent, client, "groups-overlap")
    cfg.cluster.small_data_here = False
    overlap_dir, manifest = run_job(cfg)
    assert manifest["neighbours"]["ran_on"] == {"workers": 18}
    assert count["started"] == 18 and count["most"] == 3
    assert len(assert_same_run_tables(run_dir, overlap_dir)) > 40


def test_planned_threads_set_how_much_runs_side_by_side(client):
    """``planned_threads(P)`` (``bench scaling --plan-for``): the job plans its list groups and audit lists in flight
    for P worker threads instead of the client's 2, and for the client's own again after."""
    from mfsim.jobs.stages import groups_in_flight
    from mfsim.pipeline.shared import cluster_threads, planned_threads

    assert cluster_threads(client) == 2 and groups_in_flight(client) == 2  # at least 2
    with planned_threads(64):
        assert cluster_threads(client) == 64
        assert groups_in_flight(client) == 16 and groups_in_flight(client, 10) == 7
        with planned_threads(None):
            assert groups_in_flight(client) == 2
    assert cluster_threads(client) == 2


def test_every_list_matches_numpy(small_run):
    run_dir, manifest, sim_dir = small_run
    assert "neighbours" in manifest["timings"]
    assert manifest["audit"]["verdict"] and manifest["audit"]["invariance"]["passed"]
    assert manifest["factors"]["eq2"]["n_active"] == 5 and manifest["cluster_precision"]["chance"] > 0
    X, users, items = _dense_x(run_dir, sim_dir)
    n, p = X.shape
    # the closed forms from an exact dense SVD, an independent reference for the unique products
    _, s, Vt = np.linalg.svd(X, full_matrices=False)
    V, s = Vt[:RANK].T, s[:RANK]
    lam1, lam2 = 2.0, 1.5
    products = {"eq1": V @ np.diag(s**2 / (s**2 + lam1)) @ V.T,  # A B^T = V W V^T (Eq. 1)
                "eq2": V @ np.diag(np.clip(1 - lam2 / s, 0, None)) @ V.T}  # A B^T of Eq. 2
    # scores are float32 gemm results on O(1)-sized embeddings: error <= k * eps32 * |q||c|
    pairs = [("eq1", s) for s in ("symmetric", "item_orthonormal", "eq2_like")] + [("eq2", "unique")]
    checked = 0
    for objective, scaling in pairs:
        P = _factor(run_dir, objective, scaling, "users")  # user embeddings P = X A
        B = _factor(run_dir, objective, scaling, "items")
        Bn, b_ok = _cos(B, NORM_FLOOR)
        Pn, p_ok = _cos(P, NORM_FLOOR)

        def tol(M1, M2):
            return 8 * RANK * EPS32 * np.linalg.norm(M1, axis=1).max() * np.linalg.norm(M2, axis=1).max() + 1e-6

        no_self_i = ~np.eye(p, dtype=bool)
        no_self_u = ~np.eye(n, dtype=bool)
        invariant = "invariant" if objective == "eq1" else scaling
        lists = {
            ("item_item", scaling, "cosine"): (Bn @ Bn.T, no_self_i & b_ok[None, :] & b_ok[:, None], 8 * RANK * EPS32),
            ("item_item", scaling, "dot"): (B @ B.T, no_self_i, tol(B, B)),
            ("user_item", scaling, "cosine"): (Pn @ Bn.T, (X == 0) & b_ok[None, :] & p_ok[:, None], 8 * RANK * EPS32),
            ("user_user", scaling, "cosine"): (Pn @ Pn.T, no_self_u & p_ok[None, :] & p_ok[:, None], 8 * RANK * EPS32),
        }
        if objective == "eq2" or scaling == "symmetric":  # the scaling-invariant lists come from the first
            AB = products[objective]
            XAB = X @ AB
            ABn, ab_ok = _cos(AB, NORM_FLOOR)
            XABn, xab_ok = _cos(XAB, NORM_FLOOR)
            # these references come from another SVD: add its error, about 1e-5 relative here (rank 5
            # sits before a clear spectral gap, and q=12 power iterations make the subspace accurate)
            svd_tol = 1e-4
            lists.update({
                ("item_item", invariant, "model"): (AB, no_self_i, svd_tol * np.abs(AB).max()),
                ("item_item", invariant, "projected_cosine"): (ABn @ ABn.T, no_self_i & ab_ok[None, :] & ab_ok[:, None],
                                                               svd_tol),
                ("user_item", invariant, "dot"): (XAB, X == 0, svd_tol * np.abs(XAB).max()),
                ("user_user", invariant, "projected_cosine"): (XABn @ XABn.T,
                                                               no_self_u & xab_ok[None, :] & xab_ok[:, None], svd_tol),
            })
        for (kind, label, metric), (ref, ok, tol_) in lists.items():
            dataset = {"item_item": "similar_items", "user_item": "recommendations", "user_user": "similar_users"}[kind]
            path = run_dir / f"{dataset}/objective={objective}/scaling={label}/metric={metric}"
            table = ds.dataset(path, format="parquet").to_table()
            q_col, n_col = {"item_item": ("item_id", "neighbour_id"), "user_item": ("user_id", "item_id"),
                            "user_user": ("user_id", "neighbour_id")}[kind]
            q_ids = items if kind == "item_item" else users
            n_ids = users if kind == "user_user" else items
            _check_lists(table, q_col, n_col, q_ids, n_ids, ref, ok, tol_, what=str(path), top_n=TOP_N)
            checked += 1
    assert checked == 4 * 4 + 2 * 4


def test_cluster_precision_matches_the_published_lists(small_run):
    run_dir, manifest, sim_dir = small_run
    truth = pq.read_table(sim_dir / "items_truth.parquet")
    items = pq.read_table(run_dir / "ids/items.parquet")["item_id"].to_numpy()
    label = dict(zip(truth["item_id"].to_pylist(), truth["cluster"].to_pylist()))
    table = pq.read_table(run_dir / "evaluation/cluster_precision.parquet").to_pylist()
    n_c = np.bincount([label[i] for i in items])
    chance = float((n_c * (n_c - 1)).sum() / (len(items) * (len(items) - 1)))
    checked = 0
    for row in table:
        assert abs(row["chance"] - chance) < 1e-12
        if row["objective"] == "raw":
            continue
        lists = pq.read_table(run_dir / f"similar_items/objective={row['objective']}/scaling="
                                        f"{row['scaling']}/metric={row['metric']}").to_pylist()
        per_item: dict = {}
        for r in lists:
            if r["rank"] <= row["top_n"]:
                per_item.setdefault(r["item_id"], []).append(label[r["neighbour_id"]] == label[r["item_id"]])
        expect = np.mean([np.mean(v) for v in per_item.values()])
        assert abs(row["cluster_precision"] - expect) < 1e-9, row
        checked += 1
    assert checked == 3 * 2 + 2 + 4  # eq1 cosine/dot x 3 scalings + invariant model/projected + eq2 four
    assert {r["objective"] for r in table} == {"raw", "eq1", "eq2"}


def test_user_subset_lists_equal_the_full_run(small_run, client):
    run_dir, _, sim_dir = small_run
    users = pq.read_table(run_dir / "ids/users.parquet")["user_id"].to_pylist()
    wanted = [users[77], users[3], users[140], users[3]]  # unsorted, with a repeat
    cfg = load_config(None, [
        f"input.path={sim_dir}", f"run.output={run_dir.parent}", "run.run_id=sub",
        f"cluster.address={client.scheduler.address}", f"svd.rank={RANK}", f"neighbours.top_n={TOP_N}",
        "objectives.eq1.lambda=2.0", "objectives.eq2.lambda=1.5", "objectives.cosine=null", "preprocess.binarize=true",
        "objectives.eq1.scalings=[symmetric]", "svd.power_iterations=12", "ingest.block_rows=64",
        "neighbours.item_item=[]", "neighbours.user_user=[cosine,projected_cosine]", f"neighbours.users={wanted}",
        "neighbours.eq1_scalings=all",
        "evaluation.holdout=none", "audit.enabled=false",
        "report.enabled=false",
    ])
    sub_dir, _ = run_job(cfg)
    for rel in ["recommendations/objective=eq2/scaling=unique/metric=dot",
                "similar_users/objective=eq1/scaling=symmetric/metric=cosine",
                "similar_users/objective=eq1/scaling=invariant/metric=projected_cosine"]:
        got = pq.read_table(sub_dir / rel).to_pylist()
        full = [r for r in pq.read_table(run_dir / rel).to_pylist() if r["user_id"] in set(wanted)]
        assert [r["user_id"] for r in got] == sorted(r["user_id"] for r in got)  # by query, each once
        key = "item_id" if rel.startswith("recommendations") else "neighbour_id"
        assert [(r["user_id"], r[key], r["rank"]) for r in got] == [(r["user_id"], r[key], r["rank"]) for r in full]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in full], rtol=1e-5, atol=1e-6)


def test_lists_readable_with_partition_columns(small_run):
    run_dir, _, _ = small_run
    combos = set()
    for dataset in ("similar_items", "recommendations", "similar_users"):
        t = ds.dataset(run_dir / dataset, format="parquet", partitioning="hive").to_table()
        assert {"objective", "scaling", "metric", "rank", "score"} <= set(t.column_names)
        combos |= {(dataset, *r.values()) for r in t.select(["objective", "scaling", "metric"]).to_pylist()}
    assert ("similar_items", "eq1", "invariant", "model") in combos
    assert ("similar_items", "eq1", "symmetric", "model") not in combos  # scaling-invariant: written once
    assert ("recommendations", "eq2", "unique", "dot") in combos


def test_inspect_and_audit_commands(small_run):
    import subprocess
    import sys
    from pathlib import Path

    run_dir, _, _ = small_run
    mfsim = str(Path(sys.executable).parent / "mfsim")
    item = pq.read_table(run_dir / "ids/items.parquet")["item_id"][0].as_py()
    r = subprocess.run([mfsim, "neighbours", str(run_dir), "--item", str(item), "--metric", "cosine"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "eq1/symmetric/cosine" in r.stdout and "eq2/unique/cosine" in r.stdout
    first = pq.read_table(run_dir / "similar_items/objective=eq2/scaling=unique/metric=cosine",
                          filters=[("item_id", "=", item), ("rank", "=", 1)])
    header, row1 = r.stdout.splitlines()[1].split(), r.stdout.splitlines()[2].split()
    col = header.index("eq2/unique/cosine")  # columns: rank, then "id (score)" per list
    assert row1[0] == "1" and row1[1 + 2 * (col - 1)] == str(first["neighbour_id"][0].as_py())
    solution = "objective=eq1/scaling=symmetric"
    out = run_dir.parent / "audit.parquet"
    r = subprocess.run([mfsim, "audit", "--users", str(run_dir / "user_embeddings" / solution),
                        "--items", str(run_dir / "item_embeddings" / solution),
                        "--top-n", "5", "--draws", "2", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    table = pq.read_table(out)
    dot = table.filter(pc.equal(table["metric"], "dot"))
    assert dot.num_rows and min(dot["jaccard_mean"].to_pylist()) == 1.0  # scores unchanged by U D, I D^-1


def test_audit_and_evaluation_publish_their_sample_sizes(small_run):
    """The audit's query items and the evaluated users are seeded samples; the tables and the manifest say how many."""
    run_dir, manifest, _ = small_run
    p = manifest["n_items"]
    a, e = manifest["audit"], manifest["evaluation"]
    assert (a["n_items"], a["n_items_sampled"], a["sampled"]) == (p, AUDIT_ITEMS, True) and AUDIT_ITEMS < p
    assert f"of a seeded sample of {AUDIT_ITEMS} of the {p} items" in a["verdict"]
    stability = pq.read_table(run_dir / "audit/stability.parquet")
    names = stability.column_names
    assert names[names.index("jaccard_mean") + 1] == "jaccard_se"
    assert set(stability["n_items"].to_pylist()) == {AUDIT_ITEMS}
    detail = pq.read_table(run_dir / "audit/items.parquet").to_pandas()
    per_comparison = detail.groupby(["metric", "scaling_a", "scaling_b"])["item_id"].apply(lambda x: tuple(sorted(x)))
    assert len(set(per_comparison)) == 1 and len(per_comparison.iloc[0]) == AUDIT_ITEMS  # one sample for all
    least = pq.read_table(run_dir / "audit/least_stable.parquet")
    assert set(least["item_id"].to_pylist()) <= set(per_comparison.iloc[0])
    assert (e["n_users_evaluated"], e["max_users"], e["sampled"]) == (EVAL_USERS, EVAL_USERS, True)
    assert e["n_users_held_out"] > EVAL_USERS
    metrics = pq.read_table(run_dir / "evaluation/metrics.parquet")
    assert metrics.column_names == ["objective", "scaling", "metric", "top_n", "recall", "recall_se", "ndcg",
                                    "ndcg_se", "n_users"]
    assert set(metrics["n_users"].to_pylist()) == {EVAL_USERS}
    assert all(0 < se < 0.5 for se in metrics["ndcg_se"].to_pylist())
    report = (run_dir / "report.html").read_text()
    assert f"Held-out metrics over {EVAL_USERS} of the {e['n_users_held_out']} users" in report
    assert f"Cosine audit over {AUDIT_ITEMS} of the {p} items" in report


def _reference_lists(P, B, train, metric, n):
    """Dense float64 top-n of each row of P against B, train items excluded; cosine: zero rows excluded."""
    S = P @ B.T
    ok = train == 0
    if metric == "cosine":
        pn, bn = np.linalg.norm(P, axis=1), np.linalg.norm(B, axis=1)
        S = S / np.where(pn > 0, pn, 1)[:, None] / np.where(bn > 0, bn, 1)[None, :]
        ok &= (pn > 0)[:, None] & (bn > 0)[None, :]
    S = np.where(ok, S, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(S.shape[1]), S.shape), -S), axis=1)[:, :n]
    return [[j for j in row if ok[u, j]] for u, row in enumerate(order)]


def _per_user(lists, test, c):
    """recall@c = hits / min(c, |test|), NDCG@c = DCG / IDCG over min(c, |test|), per user (a loop)."""
    rec, nd = [], []
    for ranked, truth in zip(lists, test):
        truth = set(np.flatnonzero(truth).tolist())
        hits = [j for j, i in enumerate(ranked[:c]) if i in truth]
        rec.append(len(hits) / min(c, len(truth)))
        nd.append(sum(1 / np.log2(j + 2) for j in hits) / sum(1 / np.log2(j + 2) for j in range(min(c, len(truth)))))
    return np.array(rec), np.array(nd)


@pytest.mark.parametrize("max_users", [25, 1000])
def test_held_out_metrics_on_the_sampled_users_match_numpy(client, max_users):
    """Held-out recall and NDCG (and their standard errors) of each user-item list on the users of the seeded
    sample, against dense NumPy lists from the same train-split factors; 1000 > users: every user with held-out items."""
    rng = np.random.default_rng(21)
    n, p = 90, 24
    X = sp.csr_matrix((rng.random((n, p)) < 0.3) * rng.integers(1, 4, (n, p)), dtype=np.float32)
    cfg = load_config(None, ["svd.rank=4", "objectives.eq1.scalings=[symmetric,item_orthonormal]",
                             "neighbours.eq1_scalings=all",  # every user-item list, the named scalings' cosine too
                             "objectives.eq1.lambda=2.0", "objectives.eq2.lambda=1.0", "objectives.cosine=null",
                             "evaluation.cutoffs=[3,8]",
                             f"evaluation.max_users={max_users}", "evaluation.seed=5", "neighbours.query_chunk=8",
                             "neighbours.candidate_block=16"])
    train, test = split_holdout(RowBlocks.from_scipy(X, 16, client=client), "random", 0.3, 5)
    fit = fit_model(train, cfg)
    rows, sample = holdout_metrics(client, cfg, fit, train, test, pa.array(np.arange(n) + 500), pa.array(np.arange(p)))
    tr, te = train.gather().toarray().astype(np.float64), test.gather().toarray()
    held = np.flatnonzero((te > 0).any(axis=1))
    if max_users < held.size:  # the documented sample: default_rng([seed, 1]) draws max_users of them, sorted
        users = np.sort(held[np.random.default_rng([5, 1]).choice(held.size, max_users, replace=False)])
    else:
        users = held
    assert sample == {"n_users_held_out": held.size, "n_users_evaluated": users.size, "max_users": max_users,
                      "sampled": max_users < held.size}
    first = cfg.objectives.eq1.scalings[0]
    labels = set()
    for r in rows:
        scaling = first if r["scaling"] == "invariant" else r["scaling"]  # invariant lists come from the first
        A, B = (x.astype(np.float64) for x in fit.factors[(r["objective"], scaling)])
        lists = _reference_lists(tr[users] @ A, B, tr[users], r["metric"], max(cfg.evaluation.cutoffs))
        rec, nd = _per_user(lists, te[users], r["top_n"])
        assert r["n_users"] == users.size
        assert r["recall"] == pytest.approx(rec.mean(), rel=1e-12) and r["ndcg"] == pytest.approx(nd.mean(), rel=1e-12)
        assert r["recall_se"] == pytest.approx(np.std(rec, ddof=1) / np.sqrt(users.size), rel=1e-9)
        assert r["ndcg_se"] == pytest.approx(np.std(nd, ddof=1) / np.sqrt(users.size), rel=1e-9)
        labels.add((r["objective"], r["scaling"], r["metric"], r["top_n"]))
    assert len(labels) == len(rows) == 2 * (2 + 1 + 2)  # cutoffs x (eq1: invariant dot + 2 cosines; eq2: both)


def test_audit_command_refuses_ambiguous_pairs_and_explains_the_cosine_model(small_run, tmp_path):
    """A run's ``user_embeddings/`` (every objective and scaling), users and items of different runs or solutions:
    refused with what to pass; the cosine-trained model: not audited, and the line says why."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    run_dir, _, _ = small_run
    mfsim = str(Path(sys.executable).parent / "mfsim")

    def audit(users, items):
        return subprocess.run([mfsim, "audit", "--users", str(users), "--items", str(items), "--top-n", "5",
                               "--draws", "1"], capture_output=True, text=True, timeout=120)

    r = audit(run_dir / "user_embeddings", run_dir / "item_embeddings")
    assert r.returncode == 2 and "holds 4 embedding sets (objective=eq1/scaling=eq2_like" in r.stderr, r.stderr
    first = run_dir / "user_embeddings" / "objective=eq1/scaling=eq2_like"
    assert f"pass one of them, e.g. --users {first}" in r.stderr
    one, other = "objective=eq1/scaling=symmetric", "objective=eq2/scaling=unique"
    r = audit(run_dir / "user_embeddings" / one, run_dir / "item_embeddings" / other)
    assert r.returncode == 2 and "--users is objective=eq1 and --items objective=eq2" in r.stderr, r.stderr
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    r = audit(run_dir / "user_embeddings" / one, copy / "item_embeddings" / one)
    assert r.returncode == 2 and f"--users is from run {run_dir} and --items from run {copy}" in r.stderr, r.stderr
    fake = tmp_path / "model" / "objective=cosine" / "scaling=unique"  # a cosine-trained model's pair
    for side in ("users", "items"):
        shutil.copytree(run_dir / f"{side[:-1]}_embeddings" / one, fake / side)
    r = audit(fake / "users", fake / "items")
    assert r.returncode == 0 and "its cosine lists are its own scores" in r.stdout and "jaccard" not in r.stdout


def test_work_begun_early_hands_back_its_value_or_its_error():
    """``Beside``: a stage's early part runs in a thread of its own; ``result()`` waits for it, returns its value,
    or raises its error in the stage that reads it (the run fails there, as if the stage had done the work)."""
    import threading

    from mfsim.jobs.stages import Beside

    go = threading.Event()

    def work():
        go.wait(5)
        return threading.current_thread().name

    started = Beside(work, "report")
    go.set()
    assert started.result() == "mfsim-early-report"

    def fails():
        raise ValueError("the report's data")

    with pytest.raises(ValueError, match="the report's data"):
        Beside(fails, "report").result()


def test_a_stage_that_fails_waits_for_the_factors_parts_still_being_written(small_run, client, monkeypatch, tmp_path):
    """On a client the factors' parts are written beside the next stage (``StageResult.wait_later``). When that stage
    fails, they finish before its error is raised, so no worker writes into the run after it is aborted: the error is
    the stage's, no part ends after it, and nothing of the run is left in the output root, visible or hidden."""
    import dataclasses
    import time
    import uuid

    import mfsim.jobs.main_job as main_job
    import mfsim.jobs.stages as stages
    from mfsim.pipeline.errors import MfsimError
    from mfsim.pipeline.parts import write_embeddings

    _, _, sim_dir = small_run
    ended = tmp_path / "ended"
    ended.mkdir()

    def slow_write(*args, **kwargs):  # runs on the workers (pickled by value): each part takes 0.3 s more
        time.sleep(0.3)
        out = write_embeddings(*args, **kwargs)
        (ended / uuid.uuid4().hex).touch()
        return out

    def failing(ctx):
        raise MfsimError("the neighbours stage failed")

    monkeypatch.setattr(stages, "write_embeddings", slow_write)
    monkeypatch.setattr(main_job, "STAGES", tuple(dataclasses.replace(s, fn=failing) if s.name == "neighbours" else s
                                                  for s in stages.STAGES))
    cfg = _small_config(sim_dir.parent, client, "fails-after-factors")
    cfg.cluster.small_data_here = False
    with pytest.raises(MfsimError, match="the neighbours stage failed"):
        run_job(cfg)
    n_ended = len(list(ended.iterdir()))
    # 4 solutions x (1 item part + 3 user blocks) here, 0.3 s each: without the wait most are still running now
    assert n_ended >= 8
    time.sleep(1.0)
    assert len(list(ended.iterdir())) == n_ended
    assert not [p.name for p in (sim_dir.parent / "runs").iterdir() if "fails-after-factors" in p.name]
