"""The cosine audit: how far item-item cosine lists move under the arbitrary scaling of Eq. 1.

Steck, Ekanadham & Kallus (2024), "Is Cosine-Similarity of Embeddings Really About Similarity?",
Section 2: every minimizer of Eq. 1 has the same product ``A B^T``, and for any invertible diagonal
D, ``(A D, B D^-1)`` is another minimizer. The cosine similarity of the item embeddings B changes
with D, so item-item cosine lists of an Eq. 1 model are one arbitrary choice among many. The
audit measures how much they change, as the Jaccard overlap of each item's top-N set under two
solutions of the same family:

- between every pair of the produced named scalings (``registry.EQ1_SCALINGS``), and
- between each scaling and ``draws`` random rescalings ``(A D, B D^-1)`` with log-normal diagonal
  entries ``d = exp(spread z)``, ``z ~ N(0, 1)`` (label ``random_sd=<spread>``).

Three item-item lists are compared (``registry.AUDIT_METRICS``): ``cosine`` of the rows of B, which moves;
``model``, the score ``a_i . b_j = (A B^T)_ij``, and ``projected_cosine``, the cosine of the rows
of ``A B^T`` (computed in k dimensions by ``pipeline.lists.neighbours.projected``), which are the same
for every solution. The two invariant lists are computed once, from one canonical form of the
family: ``G = V W^1/2`` and ``A_proj = V W``, read off the first scaling's (A, B)
(``gram_factor``, ``projected``); a solution has these lists when its ``A B^T`` equals the
canonical one, which the audit checks for every solution it compares (``product_deviation``).
They come out at Jaccard 1, and the cosine lists are measured against the same standard.

Lists are compared tie-aware (``jaccard.tie_aware_jaccard``): two top-N lists agree when they differ only
by candidates whose score lies within float32 rounding of the best candidate left out (the
(N+1)-th), for such a candidate could as well have been left out. Items that are copies of each
other (the same users, so the same row of V; common in sparse catalogs) tie exactly, and which of
them makes a list is rounding. Such swaps count as agreement and are reported as
``boundary_ties``. Rows whose norm is below ``cosine_norm_floor`` times the largest row norm of
their embedding have no cosine list and are nobody's cosine neighbour, as in the published lists
(``neighbours.cosine_norm_floor``).

At catalog scale the query items are a seeded sample of ``max_items`` (``sample_rows``); the
candidates stay all items, so each sampled item's list, and its Jaccard, is exactly what the
unsampled audit gives it, and ``jaccard_se`` is the standard error of the mean over the sample.

``audit_embedding_pair`` runs the same audit on any (user, item) embedding pair whose dot product
is the model (any matrix factorization or two-tower model): ``U D`` and ``I D^-1`` give the same
scores, yet other cosine lists.

Everything here works on row indices; callers map them to ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from itertools import combinations, islice
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from mfsim.kernels.topn import TopN, topn_blocked
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.lists.jaccard import check_int, near_cut, score_bound, tie_aware_jaccard, valid_mask
from mfsim.pipeline.lists.neighbours import cosine_floor, gram_factor, max_row_norm, projected
from mfsim.pipeline.progress import Progress
from mfsim.pipeline.registry import AUDIT_METRICS, INVARIANT_METRICS, LISTS
from mfsim.pipeline.shared import beside, range_priority, task_priority, value, worker_addresses

ItemListsFn = Callable[..., TopN]  # (queries, candidates, n, metric, exclude_self=..., cosine_min_norm=...) -> TopN

# Mean Jaccard of the cosine lists below which the verdict says they change with the scaling.
INVARIANT_MIN_MEAN = 0.99

# Named streams of the audit's seed, so that the diagonals and the samples do not share draws.
_STREAM_USERS = 1
_STREAM_CHECK = 2
_STREAM_ITEMS = 3

# Sample sizes of the score-invariance check (rows x columns of U I^T in float64: 8 MB).
_CHECK_ROWS = 1000

STABILITY_SCHEMA = pa.schema([
    ("objective", pa.string()),
    ("kind", pa.string()),
    ("metric", pa.string()),
    ("scaling_a", pa.string()),
    ("scaling_b", pa.string()),
    ("top_n", pa.int64()),
    ("n_items", pa.int64()),  # query rows compared: (sampled) items (item_item) or sampled users (user_item)
    ("draws", pa.int64()),  # 1 for a pair of named scalings, the number of random D otherwise
    ("jaccard_mean", pa.float64()),
    ("jaccard_se", pa.float64()),  # sd (ddof 1) of the per-row Jaccards of ``detail`` / sqrt(n_items)
    ("jaccard_p10", pa.float64()),
    ("jaccard_p50", pa.float64()),
    ("jaccard_p90", pa.float64()),
    ("jaccard_min", pa.float64()),
    ("boundary_ties", pa.int64()),  # swaps at a float32 tie with the (N+1)-th score, counted as agreement (all rows, draws)
    ("product_deviation", pa.float64()),  # max |P_a - P_b| / sum_l |a_il b_jl| of the two solutions' scores, sampled
])
_LABEL = pa.dictionary(pa.int32(), pa.string())
DETAIL_SCHEMA = pa.schema([
    ("objective", _LABEL), ("kind", _LABEL), ("metric", _LABEL), ("scaling_a", _LABEL), ("scaling_b", _LABEL),
    ("index", pa.int64()),  # query row: item index (item_item) or user index (user_item)
    ("jaccard", pa.float64()),  # tie-aware; for random D: the mean over the draws
    ("boundary_ties", pa.float64()),  # the row's boundary ties; for random D: the mean over the draws
])
LEAST_STABLE_SCHEMA = pa.schema([
    ("objective", pa.string()), ("kind", pa.string()), ("metric", pa.string()), ("scaling_a", pa.string()),
    ("scaling_b", pa.string()), ("rank", pa.int64()), ("index", pa.int64()), ("jaccard", pa.float64()),
])


@dataclass
class AuditResult:
    """What an audit measured.

    Attributes
    ----------
    stability : pyarrow.Table, ``STABILITY_SCHEMA``
        One row per comparison and metric. For random rescalings the Jaccards of all draws are
        pooled (``draws x n_items`` values) into one row per (scaling_a, kind, metric): the mean
        is the mean over draws and items, the quantiles (linear interpolation) are those of the
        pooled values. ``jaccard_se = sd(j) / sqrt(n_items)`` over the per-row values j of
        ``detail`` (sd with ddof 1; NaN below 2 rows): the standard error of ``jaccard_mean``
        when the rows are a random sample, for the draws drawn. Jaccards are tie-aware
        (``tie_aware_jaccard``); ``boundary_ties`` counts the swaps that this counted as
        agreement, over all rows and draws; ``product_deviation`` is the largest relative
        difference between the two solutions' scores on a sample of entries (for random
        rescalings, over the draws): float32 rounding, below ~2^-22, for equally good solutions.
    detail : pyarrow.Table, ``DETAIL_SCHEMA``
        Per query row and comparison; for random rescalings the row's mean over the draws.
    least_stable : pyarrow.Table, ``LEAST_STABLE_SCHEMA``
        Per comparison of a ``cosine`` list, the rows with the lowest Jaccard (ties: smaller index
        first), ranked from 1.
    summary : dict
        JSON-able digest for the run manifest, with a one-line ``verdict``.
    """

    stability: pa.Table
    detail: pa.Table
    least_stable: pa.Table
    summary: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# building blocks


def random_diagonals(k: int, draws: int, spread: float, seed: int) -> np.ndarray:
    """Diagonals of ``draws`` random invertible D: ``d = exp(spread z)``, ``z ~ N(0, 1)`` i.i.d.

    Parameters
    ----------
    k : int
        Rank (embedding dimensions).
    draws : int
        Number of diagonals, >= 0.
    spread : float
        Standard deviation of ``log d``, > 0 (``1.0``: a typical entry is within a factor e of 1).
    seed : int
        >= 0; ``numpy.random.default_rng(seed)`` draws z as ``standard_normal((draws, k))``.

    Returns
    -------
    (draws, k) float64, all entries > 0.

    Notes
    -----
    Log-normal entries are positive (a sign flip would not change any cosine's magnitude, only
    which items are close) and symmetric in ``log d``: D and D^-1 are equally likely.
    O(draws k) time and memory.
    """
    check_int(k, "k", 1)
    check_int(draws, "draws", 0)
    check_int(seed, "seed", 0)
    if not np.isfinite(spread) or spread <= 0:
        raise MfsimError(f"spread (the sd of log d) must be a finite number > 0; received {spread!r}.")
    z = np.random.default_rng(int(seed)).standard_normal((int(draws), int(k)))
    return np.exp(float(spread) * z)  # d = exp(spread z)


def sample_rows(n: int, max_rows: int, seed: int, *, stream: int = _STREAM_USERS,
                name: str = "max_users") -> np.ndarray:
    """Sorted positions of a seeded sample of at most ``max_rows`` of ``n`` rows (all when n <= max).

    Uniform without replacement, from ``default_rng([seed, stream])``: a function of (n, max_rows,
    seed, stream) only. The user-item audit samples users (stream 1; ``jobs.audit_cmd`` reads
    only these rows of a users file and gets the same sample as ``audit_embedding_pair`` on the
    whole matrix), the Eq. 1 audit its query items (stream 3). ``name`` names ``max_rows`` in errors.
    """
    check_int(n, "n", 0)
    check_int(max_rows, name, 1)
    check_int(seed, "seed", 0)
    if n <= max_rows:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(stream)])
    return np.sort(rng.choice(n, size=int(max_rows), replace=False)).astype(np.int64)


def default_item_lists(queries: np.ndarray, candidates: np.ndarray, n: int, metric: str,
                       exclude_self: bool = True, cosine_min_norm: tuple[float, float] = (0.0, 0.0)) -> TopN:
    """Top-N lists in this process with ``kernels.topn.topn_blocked`` (bounded memory, exact); ``cosine_min_norm``:
    the absolute norms below which a query, resp. a candidate, takes no part in cosine lists."""
    return topn_blocked(queries, candidates, n, metrics=(metric,), exclude_self=exclude_self,
                        cosine_min_norm=cosine_min_norm)[metric]


def without_self(top: TopN, self_ids: np.ndarray, n: int) -> TopN:
    """Lists that had their own query as a candidate, with it removed and cut to ``n`` entries.

    From lists of length ``n + 1`` over all candidates this gives the top n of the other
    candidates, in the same order (score descending, then smaller id), which is what
    ``exclude_self`` gives for queries that are not a contiguous range of the candidates.
    ``self_ids[r]``: the candidate id of query row r. O(q n).
    """
    idx, scores, cnt = np.asarray(top.indices), np.asarray(top.scores), np.asarray(top.counts)
    keep = (np.arange(idx.shape[1])[None, :] < cnt[:, None]) & (idx != np.asarray(self_ids)[:, None])
    order = np.argsort(~keep, axis=1, kind="stable")[:, :n]  # the kept entries first, in list order
    counts = np.minimum(keep.sum(axis=1), n).astype(np.int32)
    out_idx = np.full((idx.shape[0], n), -1, dtype=np.int32)
    out_sc = np.full((idx.shape[0], n), -np.inf, dtype=np.float32)
    w = order.shape[1]
    out_idx[:, :w] = np.take_along_axis(idx, order, axis=1)
    out_sc[:, :w] = np.take_along_axis(scores, order, axis=1)
    pad = np.arange(n)[None, :] >= counts[:, None]
    out_idx[pad], out_sc[pad] = -1, -np.inf
    return TopN(out_idx, out_sc, counts)


def _rescale(A: np.ndarray, B: np.ndarray, d: np.ndarray, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """``(A D, B D^-1)`` in float32, one rounding from float64.

    An error when an entry leaves the normal float32 range (overflow, or a non-zero entry below
    ``finfo(float32).tiny``, where the rounding is no longer 2^-24 relative and the invariant
    scores would change).
    """
    return _rescaled(A, d, names[0], d), _rescaled(B, 1.0 / d, names[1], d)


#: Rows rescaled per step by ``_rescaled`` (its float64 temporaries: 16 MiB at k = 64).
_RESCALE_ROWS = 1 << 15


def _rescaled(x: np.ndarray, scale: np.ndarray, name: str, d: np.ndarray) -> np.ndarray:
    """``x diag(scale)`` in float32 (one rounding of the float64 product), ``_RESCALE_ROWS`` rows at a time;
    ``_rescale``'s range check."""
    tiny, big = np.finfo(np.float32).tiny, np.finfo(np.float32).max
    out = np.empty(x.shape, np.float32)
    for lo in range(0, len(x), _RESCALE_ROWS):
        x64 = x[lo : lo + _RESCALE_ROWS] * scale  # float64: A D, B D^-1
        mag = np.abs(x64)
        if mag.max(initial=0.0) >= big or ((mag < tiny) & (mag > 0)).any():
            raise MfsimError(
                f"rescaling {name} by a random diagonal (entries from {d.min():.3g} to {d.max():.3g}) leaves the "
                "float32 range. Lower audit.spread (the sd of log d), e.g. to 1.0."
            )
        out[lo : lo + _RESCALE_ROWS] = x64
    return out


# Factors may be futures (built on the workers: ``factors.ObjectiveFactors`` on a client): every step on them
# runs ``beside`` them (``pipeline.shared``), here or as a task, and ``value`` reads its result.


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(value(beside(np.shape, x)))


def _take_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[rows])


# Every partial sum of a float32 dot product q . c is at most |q| |c| in magnitude: keeping the
# largest such product below 1e38 (float32 max 3.4e38) keeps every score finite.
_SCORE_LIMIT = 1e38


#: The progress label of both audits: one step per list computed.
PROGRESS_LABEL = "audit lists"


def _lists(fn: ItemListsFn, queries: np.ndarray, candidates: np.ndarray, n: int, metric: str, *,
           exclude_self: bool, what: str, cosine_norm_floor: float = 0.0,
           queries_of_candidates: bool = True) -> TopN:
    """Call the list function after checking that no score can overflow float32.

    Cosine lists get the norm floor ``cosine_norm_floor`` relative to the largest row norm of each side's
    embedding: the candidates', also for the queries when they are rows of the candidates (item-item, sampled
    or not), else the queries' own."""
    norms = [value(f) for f in [beside(max_row_norm, x) for x in (queries, candidates)]]  # one round trip
    if not norms[0] * norms[1] < _SCORE_LIMIT:
        raise MfsimError(
            f"scores of {what} would overflow float32 (largest row norms {norms[0]:.3g} and {norms[1]:.3g}). "
            "Scale the embeddings down (any common factor leaves every list unchanged) or lower audit.spread."
        )
    floors = (0.0, 0.0)
    if metric == "cosine" and cosine_norm_floor > 0:
        q_ref = norms[1] if queries_of_candidates else norms[0]
        floors = (cosine_floor(q_ref, cosine_norm_floor), cosine_floor(norms[1], cosine_norm_floor))
    return fn(queries, candidates, n, metric, exclude_self=exclude_self, cosine_min_norm=floors)


def in_order(jobs: list[Callable[[], Any]], at_once: int) -> "InOrder":
    """Each job's result, in the jobs' order (``InOrder``): with ``at_once`` > 1 the jobs run on that many threads,
    the first ``2 x at_once`` started now and each later one when a result is taken (so at most that many results
    wait), else one after another here as they are taken."""
    return InOrder(jobs, at_once)


#: Lists side by side from which the audit ranks their tasks (``ranked``): from 3, the count a cluster of more threads
#: than two lists' tasks gets (``jobs.stages.groups_in_flight``). Measured at 200k x 50k (10 tasks a list): planned
#: for 32 threads (4 lists side by side), the audit's predicted time at 32 workers 3.0 -> 2.7 s (one round instead
#: of 12-17, its serial part 0.9 -> 0.5 s); on 2 workers (2 lists side by side, the workers never short of tasks)
#: ranked lists ran one after another with a worker idle at each list's end: audit 35.3 -> 40.3 s, so not there.
RANKED_FROM = 3


def ranked(jobs: list[Callable[[], Any]], workers: list[str] | None) -> tuple[list[Callable[[], Any]], int]:
    """``(jobs, first)``: each job run with its tasks ranked on a cluster (``shared.task_priority``; no change in
    this process): its list's ranges in the jobs' order (``range_priority``), so that lists side by side finish in
    the order they are taken, and every other task of a job (its list's inputs: rescaled factors, norms, sampled
    rows) at ``first``, before any range, and sent to one of ``workers`` at once, so that the next lists' inputs are
    made while the cluster computes ranges. The same results in any order."""
    first = len(jobs) + 1

    def run(j: int, job: Callable[[], Any]) -> Any:
        with task_priority(first, workers), range_priority(len(jobs) - j):
            return job()

    return [partial(run, j, job) for j, job in enumerate(jobs)], first


class InOrder(Iterator[Any]):
    """``in_order``'s iterator; ``close()`` (also on leaving a ``with`` block, on the last result and on a job's
    error) cancels the jobs not yet running and waits for the running ones."""

    def __init__(self, jobs: list[Callable[[], Any]], at_once: int):
        self._waiting = iter(jobs)
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="audit-lists") if at_once > 1 else None
        self._started = deque(self._pool.submit(job) for job in islice(self._waiting, 2 * at_once)) if self._pool \
            else deque()

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        if self._pool is None:
            return next(self._waiting)()
        if not self._started:
            self.close()
            raise StopIteration
        fut = self._started.popleft()
        job = next(self._waiting, None)
        if job is not None:
            self._started.append(self._pool.submit(job))
        try:
            return fut.result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._closed = True
        for fut in self._started:
            fut.cancel()
        self._started.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "InOrder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# collecting comparisons


class _Collector:
    """Accumulates comparisons into the stability, detail and least-stable tables."""

    def __init__(self, top_n: int, least_stable: int):
        self.top_n = top_n
        self.least_stable = least_stable
        self.rows: list[dict[str, Any]] = []
        self.detail: list[pa.Table] = []
        self.least: list[dict[str, Any]] = []

    def add(self, objective: str, kind: str, metric: str, scaling_a: str, scaling_b: str, *, index: np.ndarray,
            compared: list[tuple[np.ndarray, np.ndarray]], deviation: float) -> None:
        """Add one comparison of the query rows ``index``: per draw the per-row (Jaccard, boundary ties) of
        ``tie_aware_jaccard``, pooled into one stability row; ``deviation``: the two solutions'
        ``product_deviation``."""
        jaccards = [j for j, _ in compared]
        ties = [t for _, t in compared]
        pooled = np.concatenate(jaccards) if jaccards else np.zeros(0)
        per_row = np.mean(jaccards, axis=0) if jaccards else np.zeros(0)
        ties_per_row = np.mean(ties, axis=0) if ties else np.zeros(0)
        if pooled.size:
            p10, p50, p90 = np.quantile(pooled, [0.1, 0.5, 0.9])
            stats = (float(pooled.mean()), float(p10), float(p50), float(p90), float(pooled.min()))
        else:  # no query rows: nothing measured
            stats = (float("nan"),) * 5
        # standard error of the mean over rows: sd(per-row values, ddof 1) / sqrt(rows)
        se = float(per_row.std(ddof=1) / np.sqrt(per_row.size)) if per_row.size >= 2 else float("nan")
        self.rows.append(dict(
            objective=objective, kind=kind, metric=metric, scaling_a=scaling_a, scaling_b=scaling_b,
            top_n=self.top_n, n_items=int(per_row.size), draws=len(jaccards), jaccard_mean=stats[0],
            jaccard_se=se, jaccard_p10=stats[1], jaccard_p50=stats[2], jaccard_p90=stats[3], jaccard_min=stats[4],
            boundary_ties=int(sum(int(t.sum()) for t in ties)), product_deviation=float(deviation),
        ))
        n = per_row.size
        labels = [objective, kind, metric, scaling_a, scaling_b]
        cols = [pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([v], pa.string()))
                for v in labels]
        self.detail.append(pa.Table.from_arrays(
            cols + [pa.array(np.asarray(index, dtype=np.int64)), pa.array(per_row, pa.float64()),
                    pa.array(ties_per_row, pa.float64())], schema=DETAIL_SCHEMA))
        if metric == "cosine" and self.least_stable > 0 and n:
            order = np.lexsort((index, per_row))[: self.least_stable]  # lowest Jaccard, then smaller index
            for rank, r in enumerate(order, start=1):
                self.least.append(dict(objective=objective, kind=kind, metric=metric, scaling_a=scaling_a,
                                       scaling_b=scaling_b, rank=rank, index=int(index[r]),
                                       jaccard=float(per_row[r])))

    def tables(self) -> tuple[pa.Table, pa.Table, pa.Table]:
        """The stability, detail and least-stable tables of every comparison added."""
        stability = pa.Table.from_pylist(self.rows, schema=STABILITY_SCHEMA)
        detail = pa.concat_tables(self.detail) if self.detail else DETAIL_SCHEMA.empty_table()
        least = pa.Table.from_pylist(self.least, schema=LEAST_STABLE_SCHEMA)
        return stability, detail, least


def _metric_digest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (kind, metric): min and mean of jaccard_mean over comparisons, the lowest comparison, the smallest
    jaccard_min and the boundary ties of all comparisons."""
    out: dict[str, Any] = {}
    for r in rows:
        key = r["metric"] if r["objective"] == "eq1" else f"{r['kind']}/{r['metric']}"
        out.setdefault(key, []).append(r)
    digest = {}
    for key, rs in out.items():
        means = np.array([r["jaccard_mean"] for r in rs])
        low = rs[int(np.argmin(means))]
        digest[key] = {"min_jaccard_mean": float(means.min()), "mean_jaccard_mean": float(means.mean()),
                       "min_jaccard_p50": float(min(r["jaccard_p50"] for r in rs)),
                       "min_jaccard_min": float(min(r["jaccard_min"] for r in rs)),
                       "boundary_ties": int(sum(r["boundary_ties"] for r in rs)),
                       "lowest": [low["scaling_a"], low["scaling_b"]], "comparisons": len(rs)}
    return digest


# ---------------------------------------------------------------------------------------------
# Eq. 1 audit


def _check_factors(factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Mapping[str, tuple[np.ndarray, np.ndarray]]:
    """The factors as float32 pairs, checked; a mapping that builds its pairs on access (``factors.Factors.of``)
    is checked pair by pair and returned as it is, so its pairs are never all held at once."""
    if not isinstance(factors, Mapping) or not factors:
        raise MfsimError("factors must map at least one Eq. 1 scaling name to its (A, B); received none.")
    lazy = not isinstance(factors, dict)
    if lazy and getattr(factors, "client", None) is not None:
        return factors  # futures of factors built on the workers from the SVD's V (finite, p x k, float32)
    out = {}
    shape = None
    for name, pair in factors.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise MfsimError(
                f"factors[{name!r}] must be a pair (A, B) of p x k arrays; received {type(pair).__name__}."
            )
        A, B = (np.asarray(x) for x in pair)
        if A.ndim != 2 or A.shape != B.shape:
            raise MfsimError(
                f"factors[{name!r}]: A and B must both be p x k; received shapes {A.shape} and {B.shape}."
            )
        if shape is not None and A.shape != shape:
            raise MfsimError(
                f"every scaling must have factors of the same shape; {name!r} has {A.shape}, the first "
                f"{shape}. Audit factors of one SVD and one lambda."
            )
        shape = A.shape
        A = np.ascontiguousarray(A, dtype=np.float32)
        B = np.ascontiguousarray(B, dtype=np.float32)
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise MfsimError(f"factors[{name!r}] contain NaN or infinite values; check the factorisation.")
        if not lazy:
            out[str(name)] = (A, B)
    return factors if lazy else out


def _product_deviations(factors: Mapping[str, tuple[np.ndarray, np.ndarray]], names: list[str], diags: np.ndarray,
                        seed: int) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """``product_deviation`` of every compared pair of solutions, on a sample of the entries of ``A B^T``.

    The largest ``|P_x - P_y| / sum_l |a_il b_jl|`` over ``_CHECK_ROWS`` seeded rows and columns, products in
    float64 of the float32 factors: for each pair of named scalings, and for each scaling the largest over its
    random rescalings ``(A D, B D^-1)`` (the sampled rows rescaled by ``_rescaled``, as all rows are for the
    lists). The only error is then the float32 rounding of the factors: one rounding of 2^-24 per entry, two
    for a rescaled one, so equally good solutions differ by at most ``~6 x 2^-24 sum_l |a_il b_jl|`` (the same
    sum for every solution: ``|a_il b_jl| = |v_il w_l v_jl|``).
    """
    p = _shape(factors[names[0]][0])[0]
    rng = np.random.default_rng([seed, _STREAM_CHECK])
    rows = np.sort(rng.choice(p, size=min(p, _CHECK_ROWS), replace=False))
    cols = np.sort(rng.choice(p, size=min(p, _CHECK_ROWS), replace=False))
    sample = {}
    for s in names:
        A, B = factors[s]
        sample[s] = (value(beside(_take_rows, A, rows)), value(beside(_take_rows, B, cols)))
    a0, b0 = (x.astype(np.float64) for x in sample[names[0]])
    denom = np.abs(a0) @ np.abs(b0).T  # sum_l |a_il b_jl|
    product = {s: a.astype(np.float64) @ b.astype(np.float64).T for s, (a, b) in sample.items()}
    pairs = {(x, y): _relative_max(product[x] - product[y], denom) for x, y in combinations(names, 2)}
    rescaled = {}
    for s in names:
        a, b = sample[s]
        rescaled[s] = max((_relative_max(_rescaled(a, d, f"A of {s!r}", d).astype(np.float64)
                                         @ _rescaled(b, 1.0 / d, f"B of {s!r}", d).astype(np.float64).T
                                         - product[s], denom) for d in diags), default=0.0)
    return pairs, rescaled


def _relative_max(diff: np.ndarray, denom: np.ndarray) -> float:
    """``max |diff| / denom``, inf where denom is 0 and diff is not."""
    diff = np.abs(diff)
    positive = denom > 0
    if positive.all():  # the rule: one division, no masks
        return float(np.divide(diff, denom, out=diff).max(initial=0.0))
    rel = np.zeros_like(diff)
    np.divide(diff, denom, out=rel, where=positive)
    rel[~positive & (diff > 0)] = np.inf
    return float(rel.max(initial=0.0))


# A product that differs by more than this (relative to sum_l |a_il b_jl|) is not float32 rounding
# of one solution (at most ~6 x 2^-24 = 3.6e-7, see _product_deviations) but another model.
_FAMILY_TOL = 1e-5


def _row_norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def _score_bounds(metric: str, queries: Any, candidates: Any, k: int) -> Callable[[], float | np.ndarray]:
    """``tie_aware_jaccard``'s bound for lists of ``queries`` against ``candidates`` (arrays or futures), read by
    the function returned (the norms' tasks are submitted now and read then: no round trip of their own before the
    lists'): the cosine's ``score_bound``, or for dot products per query row
    ``score_bound("dot", k) |q| max_j |c_j|``."""
    if metric == "cosine":
        return lambda: score_bound("cosine", k)
    q, c = beside(_row_norms, queries), beside(max_row_norm, candidates)
    return lambda: score_bound("dot", k) * value(q) * value(c)


def audit_item_lists(
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    top_n: int,
    draws: int,
    spread: float,
    seed: int,
    least_stable: int = 20,
    max_items: int | None = None,
    cosine_norm_floor: float = 0.0,
    item_lists_fn: ItemListsFn | None = None,
    lists_at_once: int = 1,
) -> AuditResult:
    """Jaccard@N of item-item lists between equally good Eq. 1 solutions.

    Parameters
    ----------
    factors : mapping scaling name -> (A, B)
        Minimizers of Eq. 1 from one SVD and lambda (``pipeline.model.factors.eq1_factors``), A and B
        p x k (float32), all with the same ``A B^T``; checked on a sample of entries. A dict is
        read once; any other mapping (``Factors.of("eq1")``) is read pair by pair as needed. The
        first scaling's pair gives the canonical form of the invariant lists.
    top_n : int
        List length N.
    draws : int
        Random rescalings ``(A D, B D^-1)`` per scaling, >= 0; the same ``draws`` diagonals
        (``random_diagonals(k, draws, spread, seed)``) serve every scaling.
    spread : float
        Standard deviation of ``log d``.
    seed : int
        >= 0, for the diagonals and the product check's sample.
    least_stable : int, default 20
        Items listed per comparison of the cosine lists.
    max_items : int, optional
        Query items: ``sample_rows(p, max_items, seed, stream=3)``, all when p <= max_items (and
        when None). Candidates are always all p items: a sampled item's list is the top N of the
        p - 1 others (``without_self`` of a top N + 2), the same list as unsampled.
    cosine_norm_floor : float, default 0
        Rows whose norm is below this times the largest row norm of their embedding (B of each
        solution, A_proj) have no cosine list and are no one's cosine neighbour
        (``neighbours.cosine_norm_floor``; 0: only zero rows).
    item_lists_fn : callable, optional
        ``(queries, candidates, n, metric, exclude_self=True, cosine_min_norm=(0, 0)) -> TopN`` with
        metric ``"dot"`` or ``"cosine"`` and absolute norm floors; default ``default_item_lists``
        (in process). The pipeline passes a Dask-backed one.
    lists_at_once : int, default 1
        Lists computed side by side (each by ``item_lists_fn`` on a thread of this process; for a Dask-backed
        function, so that the cluster has more than one list's tasks to run), started in the order they are
        compared and at most ``2 x lists_at_once`` ahead of the comparison; 1: one after another. On a cluster
        their tasks are ranked (``ranked``): the lists finish in that order. The same result either way.

    Returns
    -------
    AuditResult
        ``stability`` rows: ``C(s, 2)`` pairs of the s scalings (scaling_a listed first in
        ``factors``) plus one pooled ``random_sd=<spread>`` row per scaling, for each of
        ``AUDIT_METRICS``; objective ``eq1``, kind ``item_item``, ``n_items`` the m audited
        items; ``detail`` and ``least_stable`` cover those m items only.

    Raises
    ------
    MfsimError
        On malformed factors, factors of different solutions (products differ beyond float32
        rounding), bad parameters, a spread so large that ``A D`` or ``B D^-1`` leaves the float32
        range, or embeddings whose scores would overflow float32.

    Notes
    -----
    The invariant lists (``model``: ``G = V W^1/2``, ``projected_cosine``: ``A_proj = V W``) do not
    depend on the solution, so they are computed once, from the canonical form ``gram_factor`` and
    ``projected`` read off the first scaling's (A, B). Computing them from each solution's factors
    instead gives, for every solution, other float32 roundings of the same scores, and where
    items tie exactly (copies: items with the same users have the same row of V) the lists then
    differ by which copies make the cut. Every compared solution's ``A B^T`` is checked against
    the others' on a sample (``product_deviation``, an error beyond ``_FAMILY_TOL``); with that,
    its invariant lists are the canonical ones: Jaccard 1, no boundary ties. The summary counts the
    entries of the canonical lists within float32 rounding of their cut (``tied_at_cut``): the
    entries that a computation from another solution's factors could swap.

    The cosine lists are computed for every solution, N + 1 long, and compared by
    ``tie_aware_jaccard`` with the bound ``score_bound("cosine", k)``. Each distinct list is
    computed once: the base lists of every scaling are reused by all its pairs and draws. At most
    s + 1 + 2 ``lists_at_once`` lists are held at once (``m x (N + 1) x 8`` bytes each, m audited items)
    besides the per-item Jaccards. Time: ``s (1 + draws) + 2`` list computations of ``O(m p k)`` each
    (``topn_blocked``); never O(p^2) memory. Each computed list is a step of the progress
    ``audit lists`` (``pipeline.progress``).
    """
    factors = _check_factors(factors)
    check_int(top_n, "top_n", 1)
    check_int(least_stable, "least_stable", 0)
    if not (np.isfinite(cosine_norm_floor) and 0 <= cosine_norm_floor < 1):
        raise MfsimError(f"cosine_norm_floor must be a number in [0, 1); received {cosine_norm_floor!r}.")
    names = list(factors)
    p, k = _shape(factors[names[0]][0])
    diags = random_diagonals(k, draws, spread, seed)
    fn = item_lists_fn or default_item_lists
    top_n = int(top_n)
    label_random = f"random_sd={float(spread)}"
    collect = _Collector(top_n, int(least_stable))
    index = (np.arange(p, dtype=np.int64) if max_items is None
             else sample_rows(p, max_items, int(seed), stream=_STREAM_ITEMS, name="max_items"))
    sampled = index.size < p
    varying = [m for m in AUDIT_METRICS if m not in INVARIANT_METRICS]
    bar = Progress(len(varying) * len(names) * (1 + diags.shape[0]) + len(AUDIT_METRICS) - len(varying),
                   PROGRESS_LABEL)

    def matrices(pair: Callable[[], tuple[np.ndarray, np.ndarray]], spec) -> dict[str, np.ndarray]:
        """The query and candidate matrices of one list from ``pair()``'s (A, B), which are then let go:
        at p = 1M, k = 64 each p x k array is 256 MB, so a list holds only what it reads."""
        A, B = pair()
        build = {"A": lambda: A, "B": lambda: B,
                 "A_proj": lambda: beside(projected, A, B),  # rows with the cosines of the rows of A B^T: V W
                 "G": lambda: beside(gram_factor, A, B)}  # G G^T = A B^T: V W^1/2
        with np.errstate(over="ignore"):  # an overflow shows as an infinite norm in _lists
            return {name: build[name]() for name in {spec.queries, spec.candidates}}

    def rescaled(s: str, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        A, B = factors[s]
        A = beside(_rescaled, A, d, f"A of {s!r}", d)  # one side at a time: at most three p x k arrays at once
        return A, beside(_rescaled, B, 1.0 / d, f"B of {s!r}", d)

    def lists(pair: Callable[[], tuple[np.ndarray, np.ndarray]], metric: str) -> tuple[TopN, Any]:
        """Every query item's N + 1 best of the p - 1 other items, and the lists' ``tie_aware_jaccard`` bound."""
        spec = LISTS[("item_item", metric)]
        mats = matrices(pair, spec)
        queries = mats[spec.queries] if not sampled else beside(_take_rows, mats[spec.queries], index)
        bound = _score_bounds(spec.kernel_metric, queries, mats[spec.candidates], k)
        if not sampled:
            return _lists(fn, queries, mats[spec.candidates], top_n + 1, spec.kernel_metric, exclude_self=True,
                          what=f"{metric} lists", cosine_norm_floor=cosine_norm_floor), bound()
        top = _lists(fn, queries, mats[spec.candidates], top_n + 2, spec.kernel_metric, exclude_self=False,
                     what=f"{metric} lists", cosine_norm_floor=cosine_norm_floor)
        return without_self(top, index, top_n + 1), bound()

    # every list of the audit, in the order the comparisons below take them (``in_order``): per metric, the
    # canonical one (invariant lists), or each scaling's base list then each scaling's draws
    jobs: list[Callable[[], tuple[TopN, Any]]] = []
    for metric in AUDIT_METRICS:
        if metric in INVARIANT_METRICS:
            jobs.append(lambda metric=metric: lists(lambda: factors[names[0]], metric))
            continue
        jobs += [lambda s=s, metric=metric: lists(lambda: factors[s], metric) for s in names]
        jobs += [lambda s=s, d=d, metric=metric: lists(lambda: rescaled(s, d), metric) for s in names for d in diags]
    # ranked where two lists' tasks cannot keep the cluster busy (``RANKED_FROM``): without a rank, lists side by
    # side finish together and the next ones' inputs are made while the cluster has nothing to run
    client = getattr(factors, "client", None)  # factors built on a client's workers, or None
    first, workers = 0, None
    if client is not None and lists_at_once >= RANKED_FROM:
        workers = worker_addresses(client)
        jobs, first = ranked(jobs, workers)
    computed = in_order(jobs, int(lists_at_once))  # the first lists start now, beside the product check below

    def taken() -> tuple[TopN, Any]:
        """The next list of ``jobs``; one step of the progress."""
        out = next(computed)
        bar.step()
        return out

    # a solution with the canonical product has the canonical invariant lists: Jaccard 1, no ties, per draw
    same = [(np.ones(index.size), np.zeros(index.size, dtype=np.int64))]
    tied: dict[str, int] = {}
    no_list: dict[str, int] = {}  # audited items without a cosine list (norm below the floor, or zero), per list
    with bar, computed:  # leaving it (an error too) cancels the lists not yet started
        with task_priority(first, workers) if workers else nullcontext():  # its samples before the lists' ranges
            pair_dev, draw_dev = _product_deviations(factors, names, diags, int(seed))
        deviation = max([*pair_dev.values(), *draw_dev.values()], default=0.0)
        if deviation > _FAMILY_TOL:
            raise MfsimError(
                f"the audited factors must be solutions of one Eq. 1 problem (the same A B^T); the products of "
                f"scalings {names} and their rescalings differ by up to {deviation:.3g} relative (float32 rounding "
                f"gives < {_FAMILY_TOL:g}). Pass only eq1 scalings of one SVD and lambda."
            )
        for metric in AUDIT_METRICS:
            if metric in INVARIANT_METRICS:
                canonical, bound = taken()
                valid = valid_mask(canonical.indices[:, :top_n], np.minimum(canonical.counts, top_n))
                near = near_cut(canonical.scores, canonical.counts, top_n,
                                 np.broadcast_to(np.asarray(bound, np.float64), (index.size,)))
                tied[metric] = int((valid & near).sum())
                if LISTS[("item_item", metric)].kernel_metric == "cosine":
                    no_list[metric] = int((canonical.counts == 0).sum())
                del canonical
                for a, b in combinations(names, 2):
                    collect.add("eq1", "item_item", metric, a, b, index=index, compared=same,
                                deviation=pair_dev[(a, b)])
                if diags.shape[0]:
                    for s in names:
                        collect.add("eq1", "item_item", metric, s, label_random, index=index,
                                    compared=same * diags.shape[0], deviation=draw_dev[s])
                continue
            base = {s: taken() for s in names}  # reused by every pair and draw
            no_list.update({f"{metric} {s}": int((base[s][0].counts == 0).sum()) for s in names})
            for a, b in combinations(names, 2):
                collect.add("eq1", "item_item", metric, a, b, index=index,
                            compared=[tie_aware_jaccard(base[a][0], base[b][0], top_n, base[a][1])],
                            deviation=pair_dev[(a, b)])
            if diags.shape[0]:
                for s in names:
                    compared = [tie_aware_jaccard(base[s][0], taken()[0], top_n, base[s][1]) for _ in diags]
                    collect.add("eq1", "item_item", metric, s, label_random, index=index, compared=compared,
                                deviation=draw_dev[s])
            del base
    stability, detail, least = collect.tables()
    summary = _eq1_summary(collect.rows, names=names, top_n=top_n, p=p, m=int(index.size), draws=int(draws),
                           spread=float(spread), seed=int(seed), deviation=deviation, tied=tied,
                           floor=float(cosine_norm_floor), no_list=no_list)
    return AuditResult(stability, detail, least, summary)


def _eq1_summary(rows: list[dict[str, Any]], *, names: list[str], top_n: int, p: int, m: int, draws: int,
                 spread: float, seed: int, deviation: float, tied: dict[str, int], floor: float,
                 no_list: dict[str, int]) -> dict[str, Any]:
    """The Eq. 1 audit's manifest digest and verdict: ``rows`` the stability rows, ``names`` the scalings (the
    first the canonical one), m of the p items audited, ``deviation`` the largest ``product_deviation``,
    ``tied`` the invariant lists' entries within rounding of their cut, ``no_list`` the items without a cosine
    list per list, ``floor`` the ``cosine_norm_floor``."""
    digest = _metric_digest(rows)
    trivial = top_n >= p - 1
    summary: dict[str, Any] = {
        "objective": "eq1", "top_n": top_n, "n_items": p, "n_items_sampled": m, "sampled": m < p,
        "scalings": names, "draws": draws, "spread": spread,
        "seed": seed, "comparisons": len(rows) // len(AUDIT_METRICS), "metrics": digest,
        "product_max_rel_deviation": deviation, "trivial": trivial, "cosine_norm_floor": floor,
        "without_cosine_list": no_list,
        "boundary_ties": {metric: d["boundary_ties"] for metric, d in digest.items()},
    }
    inv = [digest[m] for m in INVARIANT_METRICS if m in digest]
    inv_mean = min((d["min_jaccard_mean"] for d in inv), default=float("nan"))
    inv_p50 = min((d["min_jaccard_p50"] for d in inv), default=float("nan"))
    inv_min = min((d["min_jaccard_min"] for d in inv), default=float("nan"))
    passed = bool(inv) and inv_min == 1.0
    summary["invariance"] = {"metrics": list(INVARIANT_METRICS), "canonical": names[0], "min_jaccard_mean": inv_mean,
                             "min_jaccard_p50": inv_p50, "min_jaccard_min": inv_min, "passed": passed,
                             "tied_at_cut": tied}
    if "cosine" not in digest:
        summary["verdict"] = "nothing to compare: one eq1 scaling and audit.draws = 0"
        return summary
    cos = digest["cosine"]
    if trivial:
        summary["verdict"] = (f"top_n {top_n} >= number of items - 1 ({p - 1}): every list holds every item, so "
                              "the audit cannot show a change; lower audit.top_n")
        return summary
    moved = "change with" if cos["min_jaccard_mean"] < INVARIANT_MIN_MEAN else "hardly change with"
    sample = f" of a seeded sample of {m} of the {p} items" if m < p else ""
    verdict = (f"item-item cosine lists of Eq. 1 {moved} the arbitrary scaling: mean Jaccard@{top_n} "
               f"{cos['mean_jaccard_mean']:.2f} across {cos['comparisons']} comparisons{sample} (lowest "
               f"{cos['min_jaccard_mean']:.2f}, {cos['lowest'][0]} vs {cos['lowest'][1]}; {cos['boundary_ties']:,} "
               "boundary ties over all items and comparisons, i.e. an item swapped at a list's last place with "
               "one whose score is within float32 rounding of its own, counted as agreement); ")
    scaled = {key: v for key, v in no_list.items() if key.startswith("cosine ")}
    if any(scaled.values()):
        low, high = min(scaled.values()), max(scaled.values())
        verdict += (f"{low if low == high else f'{low}-{high}'} of the {m} items have no cosine list under a named "
                    f"scaling (row norm below cosine_norm_floor {floor:g} of the largest; two empty lists agree); ")
    if passed:
        verdict += (f"model and projected_cosine lists are identical ({inv_mean:.3f}, lowest {inv_min:.3f}): "
                    f"computed once from the canonical form, with every solution's A B^T equal to it within "
                    f"float32 rounding (largest relative deviation {deviation:.1e}); "
                    f"{sum(tied.values())} of their entries lie within float32 rounding of the cut")
    else:
        verdict += (f"model and projected_cosine lists moved ({inv_mean:.3f}, lowest {inv_min:.3f}) although "
                    "their scores do not depend on the scaling: the audit's self-check failed")
    summary["verdict"] = verdict
    return summary


# ---------------------------------------------------------------------------------------------
# any (user, item) embedding pair


def _check_embeddings(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise MfsimError(f"{name} must be a non-empty 2-D array (rows x k); received shape {x.shape}.")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise MfsimError(f"{name} must hold real numbers; received dtype {x.dtype}.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise MfsimError(f"{name} contains NaN or infinite values (after the cast to float32); fix or drop those rows.")
    return x


def _score_change(U: np.ndarray, I: np.ndarray, UD: np.ndarray, ID: np.ndarray, urows: np.ndarray,
                  irows: np.ndarray) -> tuple[float, float]:
    """Max ``|U I^T - (U D)(I D^-1)^T|`` on a sample, absolute and relative to ``sum_l |u_l i_l|``.

    float64 products of the float32 embeddings: the rescaled ones carry one float32 rounding per
    entry, so a score moves by at most ~2^-23 ``sum_l |u_l i_l|`` (1.2e-7 relative).
    """
    u, i = U[urows].astype(np.float64), I[irows].astype(np.float64)
    diff = np.abs(UD[urows].astype(np.float64) @ ID[irows].astype(np.float64).T - u @ i.T)
    denom = np.abs(u) @ np.abs(i).T
    rel = np.zeros_like(diff)
    np.divide(diff, denom, out=rel, where=denom > 0)
    rel[(denom == 0) & (diff > 0)] = np.inf
    return float(diff.max(initial=0.0)), float(rel.max(initial=0.0))


# Scores count as unchanged when they move by less than this relative to sum_l |u_l i_l|: 8x the
# float32 rounding bound 2^-23 of _score_change (slack for the rounding of the float64 sums).
_SCORE_TOL = 1e-6


def audit_embedding_pair(
    U: np.ndarray,
    I: np.ndarray,
    *,
    top_n: int,
    draws: int,
    spread: float,
    seed: int,
    least_stable: int = 20,
    max_users: int = 10_000,
    user_index: np.ndarray | None = None,
    cosine_norm_floor: float = 0.0,
    item_lists_fn: ItemListsFn | None = None,
) -> AuditResult:
    """Audit any (user, item) embeddings whose dot product is the model: ``U D``, ``I D^-1`` score the same.

    Steck et al. (2024), Section 2: the argument of Eq. 1 holds for every model scored by
    ``u . i``; a random diagonal D rescales the dimensions without changing any score, and the
    audit measures how far cosine lists move.

    Parameters
    ----------
    U : (n, k) array
        User embeddings.
    I : (p, k) array
        Item embeddings.
    top_n, draws, spread, seed, least_stable
        As for ``audit_item_lists``; ``draws`` >= 1.
    max_users : int, default 10000
        User-item lists are evaluated on ``sample_rows(n, max_users, seed)``: all users when
        n <= max_users, else a seeded sample (the cost of the user-item lists is then
        ``O(max_users p k)`` per draw, independent of n).
    user_index : (n,) int array, optional
        Original row numbers of U's rows, used in the output tables (when U is already a sample).
    cosine_norm_floor : float, default 0
        As for ``audit_item_lists``: relative to the largest row norm of the item embeddings, and of
        the sampled users' rows.
    item_lists_fn : callable, optional
        As for ``audit_item_lists``.

    Returns
    -------
    AuditResult
        ``stability`` rows with objective ``external``, scaling_a ``given``, scaling_b
        ``random_sd=<spread>``, draws pooled: (``item_item``, ``cosine``) over all items,
        (``user_item``, ``cosine``) and the invariant check (``user_item``, ``dot``) over the
        sampled users. ``summary`` reports the largest score change under D on a sample of at
        most 1000 x 1000 (user, item) pairs (``score_change_max_abs``, ``score_change_max_rel``,
        also each row's ``product_deviation``).

    Notes
    -----
    Lists are N + 1 long and compared by ``tie_aware_jaccard``: cosines with the bound
    ``score_bound("cosine", k)``, dot products per user with ``score_bound("dot", k) |u| max_i |i|``
    of the given embeddings (the rescaled ones have the same ``sum_l |u_l i_l|``, which bounds the
    rounding of either computation). The dot lists rank the same scores, so they agree: Jaccard 1.
    Item-item lists exclude the item itself; user-item lists exclude nothing (the interactions
    are not known here). Lists: ``3 (1 + draws)`` computations, item-item ``O(p^2 k)``, user-item
    ``O(m p k)`` for m sampled users; memory O((p + m) N) per list, never O(p^2). Each is a step
    of the progress ``audit lists`` (``pipeline.progress``).
    """
    U = _check_embeddings(U, "user embeddings U")
    I = _check_embeddings(I, "item embeddings I")
    if U.shape[1] != I.shape[1]:
        raise MfsimError(
            f"user and item embeddings must have the same k; received {U.shape[1]} and {I.shape[1]} columns. "
            "Pass both embeddings of one model."
        )
    check_int(top_n, "top_n", 1)
    check_int(draws, "draws", 1)
    check_int(least_stable, "least_stable", 0)
    if not (np.isfinite(cosine_norm_floor) and 0 <= cosine_norm_floor < 1):
        raise MfsimError(f"cosine_norm_floor must be a number in [0, 1); received {cosine_norm_floor!r}.")
    diags = random_diagonals(U.shape[1], draws, spread, seed)
    n_users, p = U.shape[0], I.shape[0]
    if user_index is None:
        user_index = np.arange(n_users, dtype=np.int64)
    user_index = np.asarray(user_index, dtype=np.int64)
    if user_index.shape != (n_users,):
        raise MfsimError(f"user_index must have one entry per row of U ({n_users}); received shape {user_index.shape}.")
    rows = sample_rows(n_users, max_users, seed)
    Us, uidx = U[rows], user_index[rows]
    fn = item_lists_fn or default_item_lists
    top_n = int(top_n)
    label_random = f"random_sd={float(spread)}"

    bar = Progress(3 * (1 + diags.shape[0]), PROGRESS_LABEL)  # the 3 lists of ``lists`` per solution

    def stepped(top: TopN) -> TopN:
        bar.step()
        return top

    def lists(Ux: np.ndarray, Ix: np.ndarray) -> dict[tuple[str, str], TopN]:
        n, floor = top_n + 1, float(cosine_norm_floor)
        return {
            ("item_item", "cosine"): stepped(_lists(fn, Ix, Ix, n, "cosine", exclude_self=True,
                                                    what="item-item lists", cosine_norm_floor=floor)),
            ("user_item", "cosine"): stepped(_lists(fn, Ux, Ix, n, "cosine", exclude_self=False,
                                                    what="user-item lists", cosine_norm_floor=floor,
                                                    queries_of_candidates=False)),
            ("user_item", "dot"): stepped(_lists(fn, Ux, Ix, n, "dot", exclude_self=False,
                                                 what="user-item lists")),  # the invariant check
        }

    k = U.shape[1]
    bounds = {("item_item", "cosine"): score_bound("cosine", k), ("user_item", "cosine"): score_bound("cosine", k),
              ("user_item", "dot"): score_bound("dot", k) * _row_norms(Us) * max_row_norm(I)}
    with bar:
        base = lists(Us, I)
        js: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {key: [] for key in base}
        rng = np.random.default_rng([int(seed), _STREAM_CHECK])
        check_u = np.sort(rng.choice(Us.shape[0], size=min(Us.shape[0], _CHECK_ROWS), replace=False))
        check_i = np.sort(rng.choice(p, size=min(p, _CHECK_ROWS), replace=False))
        max_abs = max_rel = 0.0
        for d in diags:
            UD, ID = _rescale(Us, I, d, ("U", "I"))
            a, r = _score_change(Us, I, UD, ID, check_u, check_i)
            max_abs, max_rel = max(max_abs, a), max(max_rel, r)
            for key, other in lists(UD, ID).items():
                js[key].append(tie_aware_jaccard(base[key], other, top_n, bounds[key]))
    collect = _Collector(top_n, int(least_stable))
    for (kind, metric), values in js.items():
        index = np.arange(p, dtype=np.int64) if kind == "item_item" else uidx
        collect.add("external", kind, metric, "given", label_random, index=index, compared=values, deviation=max_rel)
    stability, detail, least = collect.tables()
    digest = _metric_digest(collect.rows)
    unchanged = max_rel <= _SCORE_TOL
    summary: dict[str, Any] = {
        "objective": "external", "top_n": top_n, "n_items": p, "n_users": n_users, "n_users_sampled": len(rows),
        "draws": int(draws), "spread": float(spread), "seed": int(seed), "metrics": digest,
        "score_change_max_abs": max_abs, "score_change_max_rel": max_rel, "scores_unchanged": unchanged,
        "trivial": top_n >= p - 1, "cosine_norm_floor": float(cosine_norm_floor),
        "boundary_ties": {key: d["boundary_ties"] for key, d in digest.items()},
    }
    ii, uc, ud = (digest[k]["mean_jaccard_mean"] for k in ("item_item/cosine", "user_item/cosine", "user_item/dot"))
    ud_min = digest["user_item/dot"]["min_jaccard_min"]
    verdict = (f"a rescaling (U D, I D^-1) that leaves every score unchanged (max relative change {max_rel:.1e}) "
               f"moves cosine lists: mean Jaccard@{top_n} {ii:.2f} item-item, {uc:.2f} user-item; "
               f"user-item dot lists {'are stable' if ud_min == 1.0 else 'moved'} ({ud:.3f}, lowest {ud_min:.3f}; "
               f"{digest['user_item/dot']['boundary_ties']} boundary ties)")
    if not unchanged:
        verdict += "; the scores changed beyond float32 rounding: check the embeddings for subnormal values"
    if summary["trivial"]:
        verdict = (f"top_n {top_n} >= number of items - 1 ({p - 1}): every list holds every item, so the audit "
                   "cannot show a change; lower --top-n")
    summary["verdict"] = verdict
    return AuditResult(stability, detail, least, summary)
