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
from mfsim.pipeline.model.lambda_sweep import extension, lambda_grid, sweep_lambdas


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
