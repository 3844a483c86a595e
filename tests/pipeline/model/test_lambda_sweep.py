"""The lambda sweep's grid: per-objective grids, Eq. 2's default reaching below s_k, and the extension past an end
where the best lambda lies (``pipeline.model.lambda_sweep``), with a score whose best lambda is known."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import scipy.sparse as sp

from mfsim.pipeline.blocks import RowBlocks
from mfsim.pipeline.config import load_config
from mfsim.pipeline.model.fit import fit_spectrum
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.model.lambda_sweep import extension, lambda_grid, sweep_lambdas, sweep_ranks


@pytest.fixture(scope="module")
def spectrum():
    X = sp.random(120, 40, density=0.2, random_state=np.random.default_rng(2), dtype=np.float32, format="csr")
    cfg = load_config(None, ["svd.rank=6", "evaluation.holdout=none", "objectives.eq1.lambda=1",
                             "objectives.eq2.lambda=1"])
    return fit_spectrum(RowBlocks.from_scipy(X, 32, None), cfg)


def _peaked_at(peak: float, objective: str):
    """A score of the fit's lambda whose best is ``peak`` (a log-parabola), as ``holdout_metrics`` rows."""
    def score(fit):
        lam = fit.meta[objective]["lambda"]
        ndcg = -float(np.log(lam / peak)) ** 2
        return [{"metric": "dot", "top_n": 20, "recall": ndcg, "ndcg": ndcg, "n_users": 10}]
    return score


def _sweep(spectrum, objective: str, peak: float, *sets: str):
    cfg = load_config(None, [f"objectives.{objective}.lambda=auto",
                             f"objectives.{'eq2' if objective == 'eq1' else 'eq1'}=null", "objectives.cosine=null",
                             *sets])
    return sweep_lambdas(spectrum, cfg.objectives, select_metric="ndcg@20", cutoffs=[20],
                         score=_peaked_at(peak, objective))


def test_extension_steps_past_the_end_by_its_ratio():
    assert extension([1.0, 2.0, 4.0], 1.0) == 0.5
    assert extension([1.0, 2.0, 4.0], 4.0) == 8.0
    assert extension([1.0, 2.0, 4.0], 2.0) is None  # inside
    assert extension([1.0, 4.0], 1.0) is None  # two points: every choice is an end
    assert extension([0.0, 1.0, 2.0], 0.0) is None  # nothing below 0


def test_eq2_default_grid_reaches_a_decade_below_sk():
    sigma = np.array([50.0, 20.0, 5.0])
    g2, g1 = lambda_grid(sigma, "eq2", 13), lambda_grid(sigma, "eq1", 13)
    assert g2[0] == pytest.approx(0.5) and g2[-1] == pytest.approx(50.0) and len(g2) == 13
    assert g1[0] == pytest.approx(25.0) and g1[-1] == pytest.approx(2500.0)


def test_a_best_lambda_below_the_grid_extends_it_until_inside(spectrum):
    sigma = spectrum.svd.sigma
    base = lambda_grid(sigma, "eq2", 5)
    ratio = base[1] / base[0]
    peak = base[0] / ratio ** 1.4  # 1.4 steps of the grid's ratio below its lower end
    out = _sweep(spectrum, "eq2", peak, "objectives.lambda_grid=5")
    grid = out.grids["eq2"]
    assert grid[2:] == pytest.approx(list(base))
    # one step: the best is the new end; two: the best (0.4 steps from the peak) is inside, so it stops
    assert grid[:2] == pytest.approx([base[0] / ratio ** 2, base[0] / ratio])
    assert out.chosen["eq2"] == pytest.approx(base[0] / ratio)
    assert not out.warnings
    table = out.table.filter(pc.equal(out.table["objective"], "eq2")).to_pylist()
    assert [r["lambda"] for r in table] == pytest.approx(grid) and sum(r["chosen"] for r in table) == 1


def test_a_best_lambda_beyond_every_extension_is_a_warning(spectrum):
    out = _sweep(spectrum, "eq1", 1e9, "objectives.eq1.lambda_grid=[1, 10, 100]", "objectives.lambda_grid_extend=3")
    assert out.grids["eq1"] == pytest.approx([1, 10, 100, 1e3, 1e4, 1e5])  # its own list, extended 3 times above
    assert out.chosen["eq1"] == pytest.approx(1e5)
    assert len(out.warnings) == 1 and "largest" in out.warnings[0] and "objectives.eq1.lambda_grid" in out.warnings[0]


def test_no_extension_when_turned_off_or_inside(spectrum):
    out = _sweep(spectrum, "eq1", 1e9, "objectives.eq1.lambda_grid=[1, 10, 100]", "objectives.lambda_grid_extend=0")
    assert out.grids["eq1"] == pytest.approx([1, 10, 100]) and len(out.warnings) == 1
    inside = _sweep(spectrum, "eq1", 10.0, "objectives.eq1.lambda_grid=[1, 10, 100]")
    assert inside.grids["eq1"] == pytest.approx([1, 10, 100]) and inside.chosen["eq1"] == 10 and not inside.warnings


def test_the_rank_sweep_reads_every_rank_off_one_svd_and_picks_the_best(spectrum):
    """A score that peaks at rank 4 and Eq. 2's lambda 0.5: every rank of the grid is swept from the rank-6 SVD's first
    k columns (their singular values are its first k), the chosen rank and lambda are the peak's, the table has a
    row per (rank, lambda) and one chosen row per objective."""
    seen = []

    def score(fit):
        k, lam = len(fit.sigma), fit.meta["eq2"]["lambda"]
        seen.append((k, fit.sigma.copy()))
        ndcg = -abs(k - 4) - abs(np.log(lam / 0.5))
        return [{"metric": "dot", "top_n": 20, "recall": ndcg, "ndcg": ndcg, "n_users": 10}]

    cfg = load_config(None, ["svd.rank=auto", "svd.rank_max=6", "svd.rank_grid=[2, 4, 6]", "objectives.eq1=null",
                             "objectives.cosine=null", "objectives.eq2.lambda_grid=[0.25, 0.5, 1.0]"])
    out = sweep_ranks(spectrum, cfg.objectives, cfg.svd.ranks(), select_metric="ndcg@20", cutoffs=[20], score=score)
    assert out.rank == 4 and out.ranks == [2, 4, 6] and out.chosen == {"eq2": 0.5} and not out.warnings
    for k, sigma in seen:
        np.testing.assert_array_equal(sigma, spectrum.svd.sigma[:k])
    rows = out.table.to_pylist()
    assert [(r["rank"], r["lambda"]) for r in rows] == [(k, lam) for k in (2, 4, 6) for lam in (0.25, 0.5, 1.0)]
    assert [(r["rank"], r["lambda"]) for r in rows if r["chosen"]] == [(4, 0.5)]


def test_a_fixed_lambda_is_scored_at_every_rank_and_the_largest_rank_warns(spectrum):
    def score(fit):
        ndcg = float(len(fit.sigma))  # the more the better: the largest rank wins
        return [{"metric": "dot", "top_n": 20, "recall": ndcg, "ndcg": ndcg, "n_users": 10}]

    cfg = load_config(None, ["svd.rank=auto", "svd.rank_max=6", "svd.rank_grid=[2, 4, 6]", "objectives.eq1=null",
                             "objectives.cosine=null", "objectives.eq2.lambda=0.5"])
    out = sweep_ranks(spectrum, cfg.objectives, cfg.svd.ranks(), select_metric="ndcg@20", cutoffs=[20], score=score)
    assert out.rank == 6 and out.chosen == {}  # the lambda was a number: nothing to choose
    assert [(r["rank"], r["lambda"]) for r in out.table.to_pylist()] == [(2, 0.5), (4, 0.5), (6, 0.5)]
    assert len(out.warnings) == 1 and "largest of the grid" in out.warnings[0] and "svd.rank_max" in out.warnings[0]


def test_rank_auto_config():
    assert load_config(None, ["svd.rank=auto"]).svd.ranks() == [16, 32, 64, 128, 256]
    svd = load_config(None, ["svd.rank=auto", "svd.rank_max=100"]).svd
    assert svd.ranks() == [12, 25, 50, 100] and svd.fit_rank == 100 and svd.block_size == 16
    # the published fit at a chosen (or extended) rank: that rank's Krylov sizes where they were auto
    at = load_config(None, ["svd.rank=auto"]).svd.at_rank(512)
    assert (at.rank, at.fit_rank, at.block_size, at.max_blocks) == (512, 512, 32, 65)
    given = load_config(None, ["svd.rank=auto", "svd.block_size=8", "svd.max_blocks=300"]).svd.at_rank(512)
    assert (given.rank, given.block_size, given.max_blocks) == (512, 8, 300)
    with pytest.raises(MfsimError, match="svd.rank_grid .* goes above svd.rank_max=100"):
        load_config(None, ["svd.rank=auto", "svd.rank_max=100", "svd.rank_grid=[50, 200]"])
    with pytest.raises(MfsimError, match="svd.rank.*held-out data.*evaluation.holdout is none"):
        load_config(None, ["svd.rank=auto", "evaluation.holdout=none", "objectives.eq1.lambda=1",
                           "objectives.eq2.lambda=1"])
    with pytest.raises(MfsimError, match="svd.rank must be auto or an integer >= 1"):
        load_config(None, ["svd.rank=best"])


def test_rank_auto_on_a_matrix_smaller_than_rank_max():
    """120 x 40 with rank_max 256: the train SVD takes every rank the matrix has (40), the sweep the grid's ranks
    within them."""
    X = sp.random(120, 40, density=0.2, random_state=np.random.default_rng(5), dtype=np.float32, format="csr")
    cfg = load_config(None, ["svd.rank=auto", "objectives.cosine=null"])
    spec = fit_spectrum(RowBlocks.from_scipy(X, 32, None), cfg)
    assert len(spec.svd.sigma) == 40

    def score(fit):
        ndcg = float(len(fit.sigma))
        return [{"metric": "dot", "top_n": 20, "recall": ndcg, "ndcg": ndcg, "n_users": 10}]

    out = sweep_ranks(spec, cfg.objectives, cfg.svd.ranks(), select_metric="ndcg@20", cutoffs=[20], score=score)
    assert out.ranks == [16, 32] and out.rank == 32


def test_ranks_within_one_standard_error_of_the_best_are_tied_and_the_largest_wins(spectrum):
    """Scores with standard errors: rank 2 best (0.50 +- 0.03), rank 4 0.48 within one error, rank 6 0.46 outside:
    with ``within_se=1`` rank 4 is chosen (its best lambda), with 0 rank 2; neither warns (the best is not the
    largest rank); the table keeps the errors."""
    best = {2: 0.50, 4: 0.48, 6: 0.46}

    def score(fit):
        k, lam = len(fit.sigma), fit.meta["eq2"]["lambda"]
        ndcg = best[k] - abs(np.log(lam / 0.5)) / 10
        return [{"metric": "dot", "top_n": 20, "recall": ndcg, "ndcg": ndcg, "recall_se": 0.03, "ndcg_se": 0.03,
                 "n_users": 10}]

    cfg = load_config(None, ["svd.rank=auto", "svd.rank_max=6", "svd.rank_grid=[2, 4, 6]", "objectives.eq1=null",
                             "objectives.cosine=null", "objectives.eq2.lambda_grid=[0.25, 0.5, 1.0]"])
    assert cfg.svd.rank_within_se == 1.0
    tied = sweep_ranks(spectrum, cfg.objectives, cfg.svd.ranks(), select_metric="ndcg@20", cutoffs=[20], score=score,
                       within_se=cfg.svd.rank_within_se)
    assert (tied.rank, tied.best_rank, tied.chosen) == (4, 2, {"eq2": 0.5}) and not tied.warnings
    assert [(r["rank"], r["lambda"]) for r in tied.table.to_pylist() if r["chosen"]] == [(4, 0.5)]
    assert {r["ndcg_se@20"] for r in tied.table.to_pylist()} == {0.03}
    exact = sweep_ranks(spectrum, cfg.objectives, cfg.svd.ranks(), select_metric="ndcg@20", cutoffs=[20],
                        score=score, within_se=0.0)
    assert (exact.rank, exact.best_rank) == (2, 2)
