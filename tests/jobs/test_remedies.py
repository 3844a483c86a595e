"""The paper's remedies in a run: lambda chosen on held-out data from one SVD, and the cosine-trained model."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from mfsim.jobs.main_job import run_job
from mfsim.pipeline.lists.holdout import holdout_metrics
from mfsim.pipeline.blocks import RowBlocks
from mfsim.pipeline.config import load_config
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.lists.evaluate import split_holdout
from mfsim.pipeline.model.fit import fit_model
from mfsim.pipeline.model.lambda_sweep import grid_end_warning
from mfsim.pipeline.simulate import simulate, write_simulation
from tests_support import check_lists, cosine_rows, dense_x, run_factor

RANK, TOP_N, GRID = 5, 7, 5
EPS32 = np.finfo(np.float32).eps


def _config(root, client, run_id, *extra):
    return load_config(None, [
        f"input.path={root / 'sim'}", f"run.output={root / 'runs'}", f"run.run_id={run_id}",
        f"cluster.address={client.scheduler.address}", f"svd.rank={RANK}", f"neighbours.top_n={TOP_N}",
        "preprocess.binarize=true", "objectives.eq1.scalings=[symmetric,item_orthonormal]", "svd.power_iterations=12",
        f"objectives.lambda_grid={GRID}", "objectives.cosine.max_iterations=40", "ingest.block_rows=64",
        "neighbours.user_user=[cosine,projected_cosine]", "audit.draws=1", "report.enabled=false", *extra,
    ])


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("remedies")
    cfg = load_config(None, ["simulate.n_users=200", "simulate.n_items=40", "simulate.seed=4"])
    write_simulation(simulate(cfg.simulate), root / "sim", cfg.simulate)
    run_dir, manifest = run_job(_config(root, client, "auto"))
    return run_dir, manifest, root


def test_a_lambda_at_the_end_of_the_grid_is_a_warning():
    grid = np.geomspace(2.0, 50.0, 5)
    low, high = grid_end_warning("eq2", grid, grid[0]), grid_end_warning("eq1", grid, grid[-1])
    assert "eq2" in low and "smallest" in low and "below" in low and "objectives.lambda_grid" in low
    assert "eq1" in high and "largest" in high and "above" in high
    assert grid_end_warning("eq2", grid, grid[2]) is None
    assert grid_end_warning("eq2", grid[:2], grid[0]) is None  # two points: every choice is an end


def test_lambda_auto_without_a_held_out_split_is_a_config_error():
    with pytest.raises(MfsimError) as e:
        load_config(None, ["evaluation.holdout=none"])
    msg = str(e.value)
    assert "objectives.eq1.lambda" in msg and "objectives.eq2.lambda" in msg and "evaluation.holdout" in msg
    load_config(None, ["evaluation.holdout=none", "objectives.eq1.lambda=3", "objectives.eq2.lambda=1"])  # fine


def test_the_sweep_picks_the_best_lambda_and_the_run_uses_it(auto_run):
    run_dir, manifest, _ = auto_run
    sweep = pq.read_table(run_dir / "evaluation/lambda_sweep.parquet")
    assert {"objective", "lambda", "chosen", "n_users", "recall@20", "ndcg@20", "ndcg@10"} <= set(sweep.column_names)
    sigma = pq.read_table(run_dir / "svd/singular_values.parquet")
    extend = manifest["config"]["objectives"]["lambda_grid_extend"]
    for objective, power, below in (("eq1", 2, 1), ("eq2", 1, 10)):
        rows = sweep.filter(pc.equal(sweep["objective"], objective)).to_pylist()
        lams = [r["lambda"] for r in rows]
        assert GRID <= len(rows) <= GRID + extend and lams == sorted(lams)
        assert lams == manifest["factors"][objective]["lambda_chosen"]["grid"]
        steps = np.diff(np.log(lams))  # log-spaced, and an extension steps by the grid's own ratio
        np.testing.assert_allclose(steps, steps[0], rtol=1e-9)
        span = np.exp(steps[0] * (GRID - 1))  # GRID points span s_1^p / s_k^p of the train split's SVD (Eq. 2: x 10)
        s_all = sigma["sigma"].to_numpy()  # the published SVD is of all data: its ratio is close, not equal
        assert 0.5 < span / ((s_all[0] / s_all[-1]) ** power * below) < 2
        chosen_at = lams.index(next(r["lambda"] for r in rows if r["chosen"]))
        if len(rows) < GRID + extend:  # the extension stopped: the best is inside the grid
            assert 0 < chosen_at < len(rows) - 1
        best = max(r["ndcg@20"] for r in rows)
        chosen = [r for r in rows if r["chosen"]]
        assert len(chosen) == 1 and chosen[0]["ndcg@20"] == best
        f = manifest["factors"][objective]
        assert f["lambda"] == chosen[0]["lambda"] and f["lambda_chosen"]["by"] == "ndcg@20"
        assert f["lambda_chosen"]["ran_on"] == "driver"  # a small X: its lambdas scored in process (rounds_where)
        assert manifest["config"]["objectives"][objective]["lambda"] == "auto"


def test_the_sweep_scores_equal_a_refit_at_the_chosen_lambda(auto_run, client):
    """The sweep's metrics of the chosen lambda (factors from the one SVD) equal those of a fresh fit with that
    lambda given as a number (its own preprocess and SVD of the train split), and the evaluation table's."""
    run_dir, manifest, root = auto_run
    sweep = pq.read_table(run_dir / "evaluation/lambda_sweep.parquet").to_pylist()
    lam1, lam2 = manifest["factors"]["eq1"]["lambda"], manifest["factors"]["eq2"]["lambda"]
    cfg = _config(root, client, "refit", f"objectives.eq1.lambda={lam1}", f"objectives.eq2.lambda={lam2}",
                  "objectives.cosine=null", "neighbours.user_item=[dot]")
    ev = pq.read_table(run_dir / "evaluation/metrics.parquet").to_pylist()
    X, _, _ = dense_x(run_dir, root / "sim")
    blocks = RowBlocks.from_scipy(sp.csr_matrix(X.astype(np.float32)), 64, client)
    train, test = split_holdout(blocks, cfg.evaluation.holdout, cfg.evaluation.fraction, cfg.evaluation.seed)
    refit = fit_model(train, cfg)
    item_ids = pq.read_table(run_dir / "ids/items.parquet")["item_id"]
    user_ids = pq.read_table(run_dir / "ids/users.parquet")["user_id"]
    rows, _ = holdout_metrics(client, cfg, refit, train, test, user_ids, item_ids)
    for objective, label in (("eq1", "invariant"), ("eq2", "unique")):
        swept = next(r for r in sweep if r["objective"] == objective and r["chosen"])
        for c in cfg.evaluation.cutoffs:
            ref = next(r for r in rows if (r["objective"], r["scaling"], r["metric"], r["top_n"]) ==
                       (objective, label, "dot", c))
            pub = next(r for r in ev if (r["objective"], r["scaling"], r["metric"], r["top_n"]) ==
                       (objective, label, "dot", c))
            # float32 lists from two SVDs of the same matrix: equal up to near-ties, 1e-6 in these means
            assert abs(swept[f"ndcg@{c}"] - ref["ndcg"]) < 1e-6, (objective, c)
            assert abs(swept[f"recall@{c}"] - ref["recall"]) < 1e-6, (objective, c)
            assert swept[f"ndcg@{c}"] == pub["ndcg"] and swept[f"recall@{c}"] == pub["recall"]


def test_the_cosine_model_lists_are_its_own_cosines(auto_run):
    run_dir, manifest, root = auto_run
    c = manifest["factors"]["cosine"]
    assert c["iterations"] > 0 and c["loss"] < c["start_loss"] and c["gamma"] > 0
    # the train split's own model (the evaluation's): its convergence in the manifest, a warning when it did not
    e = manifest["evaluation"]["cosine"]
    assert 0 < e["iterations"] <= 40 and e["loss"] > 0
    assert e["converged"] != any("cosine model on the train split did not converge" in w for w in manifest["warnings"])
    X, users, items = dense_x(run_dir, root / "sim")
    n, p = X.shape
    B = run_factor(run_dir, "cosine", "unique", "items")
    P = run_factor(run_dir, "cosine", "unique", "users")
    # every embedding of the model has length gamma^1/2 (a user with no item: zero)
    np.testing.assert_allclose(np.linalg.norm(B, axis=1), np.sqrt(c["gamma"]), rtol=1e-6)
    pn = np.linalg.norm(P, axis=1)
    np.testing.assert_allclose(pn[pn > 0], np.sqrt(c["gamma"]), rtol=1e-6)
    Bn, b_ok = cosine_rows(B)
    Pn, p_ok = cosine_rows(P)
    tol = 8 * RANK * EPS32 * max(1.0, c["gamma"])
    # its scores gamma cos(x_u A, b_i) rank as its cosines: published once, as metric=cosine
    assert manifest["factors"]["cosine"]["users_without_cosine_list"] == int((~p_ok).sum())
    lists = {
        ("similar_items", "cosine"): (Bn @ Bn.T, ~np.eye(p, dtype=bool), "item_id", "neighbour_id", items, items),
        ("recommendations", "cosine"): (Pn @ Bn.T, (X == 0) & p_ok[:, None], "user_id", "item_id", users, items),
        ("similar_users", "cosine"): (Pn @ Pn.T, ~np.eye(n, dtype=bool) & p_ok[:, None] & p_ok[None, :],
                                      "user_id", "neighbour_id", users, users),
    }
    for (dataset, metric), (ref, ok, q_col, n_col, q_ids, n_ids) in lists.items():
        path = run_dir / f"{dataset}/objective=cosine/scaling=unique/metric={metric}"
        check_lists(ds.dataset(path, format="parquet").to_table(), q_col, n_col, q_ids, n_ids, ref, ok, tol,
                    what=str(path), top_n=TOP_N)
    # no item-item score matrix: no model / projected_cosine lists for this objective; its dot lists are its cosine
    for name in ("similar_items/objective=cosine/scaling=unique/metric=model",
                 "similar_items/objective=cosine/scaling=unique/metric=projected_cosine",
                 "similar_items/objective=cosine/scaling=unique/metric=dot",
                 "recommendations/objective=cosine/scaling=unique/metric=dot"):
        assert not (run_dir / name).exists()
    # it has held-out metrics and cluster precision like the others
    ev = pq.read_table(run_dir / "evaluation/metrics.parquet")
    assert "cosine" in ev["objective"].to_pylist()
    cp = pq.read_table(run_dir / "evaluation/cluster_precision.parquet")
    assert set(cp.filter(pc.equal(cp["objective"], "cosine"))["metric"].to_pylist()) == {"cosine"}


def test_the_cosine_model_is_left_out_above_its_size_with_a_warning(auto_run, client):
    """``objectives.cosine.max_nnz`` below X's non-zeros: no fit trains the model (the published one nor the
    evaluation's), the warning says how to ask for it, the manifest says why; the other objectives are as they were."""
    run_dir, manifest, root = auto_run
    nnz = manifest["nnz"]
    assert "cosine" in manifest["factors"] and "skipped" not in manifest
    small_dir, small = run_job(_config(root, client, "no-cosine", f"objectives.cosine.max_nnz={nnz - 1}"))
    assert "cosine" not in small["factors"]
    assert f"{nnz:,} non-zeros" in small["skipped"]["cosine-trained model"]
    assert any("objectives.cosine.max_nnz=null" in w for w in small["warnings"])
    assert not (small_dir / "item_embeddings" / "objective=cosine").exists()
    assert {r["objective"] for r in pq.read_table(small_dir / "evaluation" / "metrics.parquet").to_pylist()} \
        == {"eq1", "eq2"}
    for objective in ("eq1", "eq2"):  # the rest of the run is unchanged
        assert small["factors"][objective]["lambda"] == manifest["factors"][objective]["lambda"]
        np.testing.assert_array_equal(run_factor(small_dir, objective, "unique" if objective == "eq2" else "symmetric",
                                                 "items"),
                                      run_factor(run_dir, objective, "unique" if objective == "eq2" else "symmetric",
                                                 "items"))
    _, exact = run_job(_config(root, client, "cosine-at-size", f"objectives.cosine.max_nnz={nnz}"))
    assert "cosine" in exact["factors"] and "skipped" not in exact


@pytest.fixture(scope="module")
def rank_run(auto_run, client):
    """``svd.rank: auto`` over ranks 3, 5 and 8 of one rank-8 SVD of the train split, with both lambdas auto."""
    _, _, root = auto_run
    run_dir, manifest = run_job(_config(root, client, "rank-auto", "svd.rank=auto", "svd.rank_max=8",
                                        "svd.rank_grid=[3, 5, 8]", "svd.rank_extend=0", "objectives.cosine=null"))
    return run_dir, manifest, root


def test_the_rank_sweeps_lists_equal_a_fit_at_each_rank_ids_and_ranks_exact(rank_run, client):
    """The lists the sweep scores at rank k (the closed forms from the first k columns of one rank-8 SVD of the
    train split) are those of a fit at rank k (its own rank-k SVD): every user's top-N ids in the same order, for
    Eq. 1's and Eq. 2's model score at each rank of the grid. Both SVDs are exact here (40 items: the Krylov space
    holds the whole row space, tol 1e-12), so the float32 factors agree to their last bits and the lists exactly,
    apart from scores within float32 rounding of each other (the kernel's documented near-ties; none here)."""
    from mfsim.kernels.topn import topn_blocked
    from mfsim.pipeline.model.fit import fit_factors, fit_spectrum

    run_dir, _, root = rank_run
    X, _, _ = dense_x(run_dir, root / "sim")
    blocks = RowBlocks.from_scipy(sp.csr_matrix(X.astype(np.float32)), 64, None)
    sweep = pq.read_table(run_dir / "evaluation/lambda_sweep.parquet").to_pylist()
    cfg = _config(root, client, "exact", "svd.rank=8", "svd.tol=1e-12", "objectives.cosine=null",
                  "objectives.eq1.lambda=1", "objectives.eq2.lambda=1")
    train, _ = split_holdout(blocks, cfg.evaluation.holdout, cfg.evaluation.fraction, cfg.evaluation.seed)
    spectrum = fit_spectrum(train, cfg)
    seen = train.here().parts
    ex_indptr = np.concatenate([[0], np.cumsum(np.concatenate([np.diff(b.indptr) for b in seen]))]).astype(np.int64)
    ex_indices = np.concatenate([b.indices for b in seen])
    compared = 0
    for k in (3, 5, 8):
        objectives = cfg.objectives.model_copy(deep=True)
        for objective in ("eq1", "eq2"):
            at_k = [r for r in sweep if r["objective"] == objective and r["rank"] == k]
            top = max(r["ndcg@20"] for r in at_k)
            getattr(objectives, objective).lambda_ = min(r["lambda"] for r in at_k if r["ndcg@20"] == top)
        swept = fit_factors(spectrum.truncated(k), objectives)
        at_rank = cfg.model_copy(deep=True)
        at_rank.svd.rank, at_rank.objectives = k, objectives
        refit = fit_model(train, at_rank)
        assert len(refit.sigma) == k and np.allclose(refit.sigma, spectrum.svd.sigma[:k], rtol=1e-12)
        for key in (("eq1", "symmetric"), ("eq2", "unique")):
            lists = []
            for fit in (swept, refit):
                P = np.concatenate(fit.users(key))
                B = fit.factors.pair(key, None)[1]
                lists.append(topn_blocked(P, B, TOP_N, metrics=("dot",), exclude_indptr=ex_indptr,
                                          exclude_indices=ex_indices)["dot"])
            a, b = lists
            np.testing.assert_array_equal(a.counts, b.counts)
            np.testing.assert_array_equal(a.indices, b.indices, err_msg=f"{key} at rank {k}")
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
            compared += int(a.counts.sum())
    assert compared > 3 * 2 * 150 * 3  # most of the 200 users have more than 3 items to rank


def test_the_rank_sweep_equals_a_refit_at_each_rank(rank_run, client):
    """Each rank's scores in the sweep (the closed forms from the first k columns of the one rank-8 SVD) equal those
    of a fit at that rank (its own SVD of the train split at rank k) with that rank's best lambdas; the run publishes
    the chosen rank's fit."""
    run_dir, manifest, root = rank_run
    chosen = manifest["svd"]["rank_chosen"]
    assert chosen["grid"] == [3, 5, 8] and chosen["rank_max"] == 8 and chosen["by"] == "ndcg@20"
    assert manifest["svd"]["rank"] == chosen["rank"] and manifest["config"]["svd"]["rank"] == "auto"
    assert len(pq.read_table(run_dir / "svd/singular_values.parquet")) == chosen["rank"]
    sweep = pq.read_table(run_dir / "evaluation/lambda_sweep.parquet").to_pylist()
    assert {r["rank"] for r in sweep} == {3, 5, 8}
    best_row = max(sweep, key=lambda r: (r["ndcg@20"], -r["rank"]))
    assert {r["rank"] for r in sweep if r["chosen"]} == {chosen["rank"]} and chosen["within_se"] == 1.0
    # the largest rank whose best score is within one standard error of the best one's
    floor = best_row["ndcg@20"] - best_row["ndcg_se@20"]
    tied = [k for k in (3, 5, 8) if max(r["ndcg@20"] for r in sweep if r["rank"] == k) >= floor]
    assert chosen["rank"] == max(tied) and chosen["best_score_rank"] == best_row["rank"]
    X, _, _ = dense_x(run_dir, root / "sim")
    blocks = RowBlocks.from_scipy(sp.csr_matrix(X.astype(np.float32)), 64, client)
    item_ids = pq.read_table(run_dir / "ids/items.parquet")["item_id"]
    user_ids = pq.read_table(run_dir / "ids/users.parquet")["user_id"]
    for k in (3, 8):
        lams = {}
        for objective in ("eq1", "eq2"):
            at_k = [r for r in sweep if r["objective"] == objective and r["rank"] == k]
            top = max(r["ndcg@20"] for r in at_k)
            lams[objective] = min(r["lambda"] for r in at_k if r["ndcg@20"] == top)
        cfg = _config(root, client, f"refit-{k}", f"svd.rank={k}", f"objectives.eq1.lambda={lams['eq1']}",
                      f"objectives.eq2.lambda={lams['eq2']}", "objectives.cosine=null", "neighbours.user_item=[dot]")
        train, test = split_holdout(blocks, cfg.evaluation.holdout, cfg.evaluation.fraction, cfg.evaluation.seed)
        rows, _ = holdout_metrics(client, cfg, fit_model(train, cfg), train, test, user_ids, item_ids)
        for objective, label in (("eq1", "invariant"), ("eq2", "unique")):
            swept = next(r for r in sweep
                         if (r["objective"], r["rank"], r["lambda"]) == (objective, k, lams[objective]))
            for c in cfg.evaluation.cutoffs:
                ref = next(r for r in rows if (r["objective"], r["scaling"], r["metric"], r["top_n"]) ==
                           (objective, label, "dot", c))
                # float32 lists from two SVDs of the same matrix (rank k, and rank 8 truncated): equal up to near-ties
                assert abs(swept[f"ndcg@{c}"] - ref["ndcg"]) < 1e-6, (objective, k, c)
                assert abs(swept[f"recall@{c}"] - ref["recall"]) < 1e-6, (objective, k, c)


def test_a_best_score_at_the_largest_rank_extends_the_rank_grid_once(auto_run, client, monkeypatch):
    """Held-out scores made to grow with the rank (the real metrics plus 0.1 per singular value of the fit): with
    ranks 1 and 2 of ``rank_max: 2`` the best score is at rank 2, so the train split's SVD is computed again at 4
    and rank 4 swept too, and not again (``rank_extend: 1``: no 8); rank 4 is chosen (a warning says the best is
    still the largest), the published fit is at rank 4 with that rank's Krylov sizes, and the evaluation reads the
    wider SVD's first 4 columns: its Eq. 1 / Eq. 2 dot metrics are the sweep's at rank 4 and the chosen lambdas."""
    import mfsim.jobs.stages as stages

    real = stages.holdout_metrics

    def growing(client, cfg, fit, *args, **kwargs):
        rows, sample = real(client, cfg, fit, *args, **kwargs)
        return [{**r, "ndcg": r["ndcg"] + 0.1 * len(fit.sigma)} for r in rows], sample

    monkeypatch.setattr(stages, "holdout_metrics", growing)
    _, _, root = auto_run
    run_dir, manifest = run_job(_config(root, client, "rank-extend", "svd.rank=auto", "svd.rank_max=2",
                                        "svd.rank_grid=[1, 2]", "objectives.cosine=null"))
    chosen = manifest["svd"]["rank_chosen"]
    sweep = pq.read_table(run_dir / "evaluation/lambda_sweep.parquet").to_pylist()
    assert chosen["grid"] == [1, 2, 4] and {r["rank"] for r in sweep} == {1, 2, 4} and chosen["rank_extend"] == 1
    assert chosen["rank"] == chosen["best_score_rank"] == 4 and manifest["svd"]["rank"] == 4
    assert any("largest of the grid (1, 2, 4)" in w and "svd.rank_extend" in w for w in manifest["warnings"])
    assert len(pq.read_table(run_dir / "svd/singular_values.parquet")) == 4
    assert manifest["config"]["svd"]["rank"] == "auto"
    metrics = pq.read_table(run_dir / "evaluation/metrics.parquet").to_pylist()
    at_chosen = [r for r in sweep if r["rank"] == 4 and r["chosen"]]
    assert {r["objective"] for r in at_chosen} == {"eq1", "eq2"}
    for r in at_chosen:
        label = {"eq1": "invariant", "eq2": "unique"}[r["objective"]]
        ev = next(m for m in metrics if (m["objective"], m["scaling"], m["metric"], m["top_n"]) ==
                  (r["objective"], label, "dot", 20))
        assert ev["ndcg"] == pytest.approx(r["ndcg@20"], abs=1e-12)
