"""Lambda chosen on held-out data from one SVD (``objectives.eq*.lambda: auto``).

Both closed forms depend on lambda only through the singular values (Steck et al. 2024, Eq. 1:
``w_i = s_i^2 / (s_i^2 + lam)``; Eq. 2: soft-thresholding ``(s_i - lam)_+``), so once the train
split's SVD exists, each lambda of a grid costs only its k-column factors and the held-out users'
top-N lists: no refit. The grid is log-spaced over the range where lambda changes most:
``[s_k^2, s_1^2]`` for Eq. 1 (w_i from ~1/2 to ~1) and ``[s_k / 10, s_1]`` for Eq. 2 (from every
component kept at 90% or more of its value to none), or a list (``objectives.<objective>.lambda_grid``,
else ``objectives.lambda_grid``). When the best lambda is an end of the grid, the sweep extends the grid
past that end, one step of the grid's own ratio at a time, up to ``objectives.lambda_grid_extend`` steps.

``sweep_lambdas`` runs the sweep: for each objective with ``lambda: auto``, each grid point's
factors (``fit_factors`` on the one spectrum) scored by a callable the caller passes in (the
held-out metrics of their user-item ``dot`` lists), then the best ``evaluation.select_metric``.
It returns the table and the chosen lambdas; ``with_lambdas`` is the config that uses them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from mfsim.pipeline.config import Config, Eq1Section, Eq2Section, ObjectivesSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.model.fit import Fit, Spectrum, fit_factors
from mfsim.pipeline.progress import progress

log = logging.getLogger("mfsim.job")


#: Eq. 2's default grid starts this factor below s_k: its best lambda lay at s_k, the lower end of a grid from s_k,
#: on ml-100k, ml-latest-small, lastfm-hetrec2011 and a sparser set, and reaching below it added 9% NDCG@20 there.
EQ2_GRID_BELOW_SK = 10.0


def lambda_grid(sigma: np.ndarray, objective: str, grid: int | list[float]) -> np.ndarray:
    """The lambdas to try for ``objective`` (float64, ascending): ``grid`` points log-spaced from s_k^2 to s_1^2
    (``eq1``) or from s_k / ``EQ2_GRID_BELOW_SK`` to s_1 (``eq2``), s_k the smallest positive singular value; or
    the given list."""
    if not isinstance(grid, (int, np.integer)):
        return np.asarray(sorted(set(float(x) for x in grid)), np.float64)
    s = np.asarray(sigma, np.float64)
    s = s[s > 0]
    if s.size == 0:
        raise MfsimError("lambda: auto needs a positive singular value; X has none (every entry zero?)")
    power = {"eq1": 2.0, "eq2": 1.0}[objective]
    lo, hi = float(s.min()) ** power, float(s.max()) ** power
    if objective == "eq2":
        lo /= EQ2_GRID_BELOW_SK
    if hi <= lo:
        return np.asarray([lo])
    return np.geomspace(lo, hi, int(grid))


def parse_select_metric(name: str) -> tuple[str, int]:
    """``"ndcg@20"`` -> ``("ndcg", 20)``."""
    metric, _, cut = name.partition("@")
    return metric, int(cut)


def sweep_rows(objective: str, lam: float, rows: list[dict[str, Any]], metric_name: str = "dot",
               rank: int | None = None) -> dict[str, Any]:
    """One row of ``evaluation/lambda_sweep.parquet`` from ``holdout_metrics`` rows of one (rank, lambda): the
    user-item ``metric_name`` (the model score) list's recall@N and NDCG@N at each cutoff, and their standard errors
    (``recall_se@N``, ``ndcg_se@N``) where the rows have them."""
    out: dict[str, Any] = {"objective": objective, "rank": rank, "lambda": float(lam)}
    n_users = 0
    for r in rows:
        if r["metric"] != metric_name:
            continue
        for m in ("recall", "ndcg"):
            out[f"{m}@{r['top_n']}"] = float(r[m])
            if f"{m}_se" in r:
                out[f"{m}_se@{r['top_n']}"] = float(r[f"{m}_se"])
        n_users = int(r["n_users"])
    out["n_users"] = n_users
    return out


def choose(rows: list[dict[str, Any]], objective: str, select_metric: str) -> float:
    """The lambda of ``objective`` with the largest ``select_metric``; ties: the smallest such lambda."""
    mine = [r for r in rows if r["objective"] == objective]
    if not mine:
        raise MfsimError(f"lambda sweep of {objective}: no grid point was scored")
    if select_metric not in mine[0]:
        raise MfsimError(f"evaluation.select_metric {select_metric!r} is not a column of the sweep "
                         f"({', '.join(k for k in mine[0] if '@' in k)}); pick one of evaluation.cutoffs")
    best = max(r[select_metric] for r in mine)
    return min(r["lambda"] for r in mine if r[select_metric] == best)


def grid_end_warning(objective: str, grid: np.ndarray, chosen: float) -> str | None:
    """A warning when the chosen lambda is the grid's first or last point (of three or more), after the grid's
    extensions: the best lambda may lie beyond it. None otherwise."""
    if len(grid) < 3 or chosen not in (grid[0], grid[-1]):
        return None
    end, beyond = ("smallest", "below") if chosen == grid[0] else ("largest", "above")
    return (f"lambda sweep {objective}: the chosen lambda {chosen:.4g} is the {end} of the grid "
            f"({grid[0]:.4g} .. {grid[-1]:.4g}, extended up to objectives.lambda_grid_extend steps); the best may lie "
            f"{beyond} it: give objectives.{objective}.lambda_grid as a list that reaches further, or raise "
            f"objectives.lambda_grid_extend")


def extension(grid: list[float], chosen: float) -> float | None:
    """The next lambda past the end of ``grid`` (ascending) where ``chosen`` lies: one step of the ratio of the two
    points at that end; None when ``chosen`` is inside, the grid has fewer than 3 points, or no such step exists
    (an end at 0)."""
    if len(grid) < 3 or chosen not in (grid[0], grid[-1]):
        return None
    if chosen == grid[0]:
        return grid[0] ** 2 / grid[1] if grid[0] > 0 else None
    return grid[-1] ** 2 / grid[-2] if grid[-2] > 0 else None


def sweep_table(rows: list[dict[str, Any]], chosen: dict[str, float], cutoffs: list[int],
                chosen_rank: int | None = None) -> pa.Table:
    """``objective``, ``rank``, ``lambda``, ``chosen``, ``n_users``, then ``recall@N``, ``ndcg@N`` and their standard
    errors (``recall_se@N``, ``ndcg_se@N``; null where the score gave none) per cutoff;
    sorted by objective, rank, lambda. ``chosen``: the chosen lambda per objective, at ``chosen_rank``."""
    fields = [("objective", pa.string()), ("rank", pa.int64()), ("lambda", pa.float64()), ("chosen", pa.bool_()),
              ("n_users", pa.int64())]
    fields += [(f"{m}@{c}", pa.float64()) for c in cutoffs for m in ("recall", "ndcg", "recall_se", "ndcg_se")]
    schema = pa.schema(fields)
    data = sorted(({**r, "chosen": chosen.get(r["objective"]) == r["lambda"]
                    and (chosen_rank is None or r["rank"] == chosen_rank)} for r in rows),
                  key=lambda r: (r["objective"], r["rank"] or 0, r["lambda"]))
    return pa.Table.from_pylist([{f.name: d.get(f.name) for f in schema} for d in data], schema=schema)


def sweep_cutoffs(cutoffs: list[int], select_metric: str) -> list[int]:
    """The cutoffs the sweep scores: ``evaluation.cutoffs`` and the one of ``select_metric``, ascending."""
    return sorted(set(cutoffs) | {parse_select_metric(select_metric)[1]})


def one_objective(objective: str, lam: float) -> ObjectivesSection:
    """The objectives of one grid point: ``objective`` alone at ``lam`` (Eq. 1 with its symmetric scaling only)."""
    objectives = ObjectivesSection(eq1=None, eq2=None, cosine=None)
    if objective == "eq1":
        objectives.eq1 = Eq1Section(**{"lambda": float(lam), "scalings": ["symmetric"]})
    else:
        objectives.eq2 = Eq2Section(**{"lambda": float(lam)})
    return objectives


@dataclass(frozen=True)
class Sweep:
    """The sweep's outcome: ``evaluation/lambda_sweep.parquet``, the chosen lambda and the grid per objective, and
    the warnings of choices at a grid's end."""

    table: pa.Table
    chosen: dict[str, float]
    grids: dict[str, list[float]]
    warnings: list[str]
    ran_on: str = "workers"  # where the lambdas were scored: "driver" (in this process) or "workers"
    rank: int | None = None  # svd.rank: auto: the chosen rank
    best_rank: int | None = None  # svd.rank: auto: the rank of the best score (the chosen one, or tied with it)
    ranks: list[int] | None = None  # svd.rank: auto: the ranks tried
    rows: list[dict[str, Any]] | None = None  # the table's rows, as scored
    at: dict[int, "Sweep"] | None = None  # svd.rank: auto: each rank's own lambda sweep


def sweep_lambdas(spectrum: Spectrum, objectives: ObjectivesSection, *, select_metric: str, cutoffs: list[int],
                  score: Callable[[Fit], list[dict[str, Any]]], rank: int | None = None) -> Sweep:
    """For each objective with ``lambda: auto``, every lambda of its grid (``lambda_grid`` of the spectrum's
    singular values and ``objectives.grid_of(objective)``): the factors of Eq. 1 (``w_i = s_i^2 / (s_i^2 + lam)``)
    or Eq. 2 (``(s_i - lam)_+``) from the one SVD, ``score(fit)`` (rows as ``holdout_metrics`` gives them, the
    ``dot`` list among them), and the lambda with the best ``select_metric`` (``choose``); while that is an end of
    the grid, one more point past it (``extension``), up to ``objectives.lambda_grid_extend`` points.
    ``cutoffs``: the columns of the table (``sweep_cutoffs``)."""
    rows: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    grids: dict[str, list[float]] = {}
    warnings: list[str] = []
    for objective in objectives.auto():
        grid = [float(lam) for lam in lambda_grid(spectrum.svd.sigma, objective, objectives.grid_of(objective))]

        def run(lam: float) -> None:
            fit = fit_factors(spectrum, one_objective(objective, lam), warn=False)
            rows.append(sweep_rows(objective, lam, score(fit), rank=rank))

        for lam in progress(grid, len(grid), f"lambda sweep {objective}"):
            run(lam)
        chosen[objective] = choose(rows, objective, select_metric)
        for _ in range(objectives.lambda_grid_extend):
            lam = extension(grid, chosen[objective])
            if lam is None:
                break
            log.info("lambda sweep %s: the best lambda %.4g is an end of the grid; trying %.4g", objective,
                     chosen[objective], lam)
            run(lam)
            grid = sorted([*grid, lam])
            chosen[objective] = choose(rows, objective, select_metric)
        grid = np.asarray(grid)
        grids[objective] = [float(lam) for lam in grid]
        edge = grid_end_warning(objective, grid, chosen[objective])
        if edge:
            warnings.append(edge)
        log.info("lambda sweep %s: %d lambdas from %.4g to %.4g; chosen %.4g (%s %.4f)", objective, len(grid),
                 grid[0], grid[-1], chosen[objective], select_metric,
                 max(r[select_metric] for r in rows if r["objective"] == objective))
    return Sweep(sweep_table(rows, chosen, cutoffs), chosen, grids, warnings, rows=rows)


def sweep_ranks(spectrum: Spectrum, objectives: ObjectivesSection, ranks: list[int], *, select_metric: str,
                cutoffs: list[int], score: Callable[[Fit], list[dict[str, Any]]], within_se: float = 0.0,
                earlier: Sweep | None = None) -> Sweep:
    """``svd.rank: auto``: for each rank k of ``ranks``, the closed forms from the first k columns of the one SVD
    (``Spectrum.truncated``: for both objectives the rank-k solution is the rank-k truncation's), each objective's
    lambdas swept at that rank (``sweep_lambdas``; a numeric lambda is its grid's one point); the lambdas are those
    chosen at the chosen rank. Costs per (rank, lambda) its factors and the held-out lists only.

    Ranks are compared by their best ``select_metric`` (any objective, any lambda); a rank within ``within_se``
    standard errors of the best (the best score's own ``<metric>_se@N``; 0 where the score gives none) is tied with
    it, and the largest tied rank is chosen (``choose_rank``). The best score at the largest rank is a warning.
    ``earlier``: a sweep of other ranks (of a smaller SVD of the same split) whose ranks are compared with these."""
    swept = ObjectivesSection(eq1=objectives.eq1.model_copy(deep=True) if objectives.eq1 else None,
                              eq2=objectives.eq2.model_copy(deep=True) if objectives.eq2 else None, cosine=None,
                              lambda_grid=objectives.lambda_grid, lambda_grid_extend=objectives.lambda_grid_extend)
    for name in ("eq1", "eq2"):
        section = getattr(swept, name)
        if section is not None and section.lambda_ != "auto":  # a number: scored at every rank as it is
            section.lambda_grid, section.lambda_ = [float(section.lambda_)], "auto"
    ranks = [k for k in ranks if k <= len(spectrum.svd.sigma)]
    if not ranks and earlier is None:
        raise MfsimError(f"svd.rank: auto: no rank of the grid is within the {len(spectrum.svd.sigma)} singular values "
                         "of the train split's SVD; lower svd.rank_grid")
    at: dict[int, Sweep] = dict(earlier.at) if earlier is not None else {}
    for k in ranks:
        at[k] = sweep_lambdas(spectrum.truncated(k), swept, select_metric=select_metric, cutoffs=cutoffs,
                              score=score, rank=k)
        log.info("rank sweep: k = %d, best %s %.4f", k, select_metric,
                 max(r[select_metric] for r in at[k].rows))
    ranks = sorted(at)
    rows = [r for k in ranks for r in at[k].rows]
    k, top = choose_rank(rows, select_metric, within_se)
    chosen = {name: lam for name, lam in at[k].chosen.items() if name in objectives.auto()}
    log.info("rank sweep: %d ranks from %d to %d; best %d (%s %.4f); chosen %d (%.4f, tied within %g standard "
             "errors)", len(ranks), ranks[0], ranks[-1], top, select_metric, best_of(rows, top, select_metric), k,
             best_of(rows, k, select_metric), within_se)
    warnings = list(at[k].warnings)
    if len(ranks) >= 3 and top == ranks[-1]:
        warnings.append(f"rank sweep: the chosen rank {k} is the largest of the grid ({', '.join(map(str, ranks))}); "
                        "a larger one may be better: raise svd.rank_max (and svd.rank_grid, if given) or "
                        "svd.rank_extend")
    return Sweep(sweep_table(rows, at[k].chosen, cutoffs, chosen_rank=k), chosen, at[k].grids, warnings,
                 rank=k, best_rank=top, ranks=ranks, rows=rows, at=at)


def best_of(rows: list[dict[str, Any]], rank: int, select_metric: str) -> float:
    """The best ``select_metric`` of ``rank``'s rows (any objective, any lambda)."""
    return max(r[select_metric] for r in rows if r["rank"] == rank)


def choose_rank(rows: list[dict[str, Any]], select_metric: str, within_se: float) -> tuple[int, int]:
    """``(chosen, best)``: ``best`` is the rank of the best row's ``select_metric`` (ties: the smaller rank);
    ``chosen`` the largest rank whose best score is at least that score less ``within_se`` times its standard
    error (the row's ``<metric>_se@N``, 0 where absent). Larger ranks win the ties because the published fit has
    more data than the held-out split it was chosen on, and the rank the data supports grows with it."""
    metric, _, cut = select_metric.partition("@")
    top_row = max(rows, key=lambda r: (r[select_metric], -r["rank"]))
    floor = top_row[select_metric] - within_se * (top_row.get(f"{metric}_se@{cut}") or 0.0)
    tied = [k for k in {r["rank"] for r in rows} if best_of(rows, k, select_metric) >= floor]
    return max(tied), top_row["rank"]


def with_lambdas(cfg: Config, chosen: dict[str, float], rank: int | None = None) -> Config:
    """A copy of ``cfg`` whose ``objectives.<objective>.lambda`` is the chosen lambda, for each one in ``chosen``,
    and, given ``rank`` (``svd.rank: auto``), whose ``svd.rank`` is that rank (``SvdSection.at_rank``)."""
    resolved = cfg.model_copy(deep=True)
    for objective, lam in chosen.items():
        getattr(resolved.objectives, objective).lambda_ = lam
    if rank is not None:
        resolved.svd = resolved.svd.at_rank(rank)  # the Krylov sizes of that rank, where they were auto
    return resolved
