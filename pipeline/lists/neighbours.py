"""Exact top-N neighbour lists for every objective, scaling and metric, as Dask tasks.

What is listed (Steck et al. 2024, Section 2 and the remedies of Section 3):

- item-item: ``cosine`` and ``dot`` of the item embeddings B (one gemm for both); ``model``,
  the score ``a_i . b_j = (A B^T)_ij`` (unique for Eq. 1); ``projected_cosine``, the cosine of the
  rows of ``A B^T``, computed in k dimensions: with ``A = V diag(a)``, ``B = V diag(b)`` and
  orthonormal V, ``(A B^T)(A B^T)^T = A diag(b^2) A^T``, so the rows of ``A diag(|b|)`` have the
  same inner products (and cosines) as the rows of ``A B^T`` (``= V W`` up to the rotation V^T for
  Eq. 1);
- user-item: ``dot``, ``p_u . b_i = (X A B^T)_ui`` (its ranking is the same for every Eq. 1
  scaling), and ``cosine`` of ``p_u`` and ``b_i``; the user's own items are excluded;
- user-user: ``cosine`` of the user embeddings P, and ``projected_cosine``, the cosine of the rows
  of ``X A B^T = P B^T``, computed in k dimensions as the rows of ``P diag(|b|)``.

Scores that do not depend on the Eq. 1 scaling are computed once, from the first scaling, and
labelled ``scaling=invariant``; Eq. 2 has one solution, labelled ``scaling=unique``.

Rows whose norm is below ``neighbours.cosine_norm_floor`` times the largest row norm of their
embedding take no part in cosine lists (``cosine_floor``): their direction is float32 noise.

Query rows go in ranges as Dask tasks on the run's client (``run_topn``, the one way every stage
submits top-N work); the candidate embeddings reach the workers once per list group, as a shared
future (``pipeline.shared``: recomputed, not lost, when a worker dies) or, for user embeddings, as
a task on P's row-block futures; every task calls ``kernels.topn.topn_blocked``. Memory per task
is bounded by the range and the kernel's tiles (see ``topn_blocked``), never O(p^2).
"""

from __future__ import annotations

import operator
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mfsim.kernels.threads import on_one_thread, one_thread, threads
from mfsim.kernels.topn import (
    SYMMETRIC_TILE,
    TopN,
    finish_symmetric,
    merge_states,
    pack_states,
    prepare_symmetric,
    seeded_state,
    symmetric_floors,
    symmetric_pair,
    topn_blocked,
    tournament,
)
from mfsim.pipeline import outputs
from mfsim.pipeline.blocks import CSRBlock, RowBlocks
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.registry import INVARIANT, LISTS, list_defined
from mfsim.pipeline.shared import cluster_threads, is_future, ranges_prioritized, runner, stack, value


@dataclass(frozen=True)
class ListLabel:
    """Where one list is published: kind, objective, scaling label and metric."""

    kind: str
    objective: str
    scaling: str
    metric: str

    @property
    def path(self) -> str:
        """The list's dataset directory in the run (``pipeline.outputs.list_dir``)."""
        return outputs.list_dir(self.kind, self.objective, self.scaling, self.metric)


@dataclass
class GemmGroup:
    """Lists that share queries and candidates of one (objective, scaling), hence one gemm per tile."""

    objective: str
    scaling: str  # the scaling whose embeddings are used
    kind: str
    queries: str
    candidates: str
    outputs: dict[str, ListLabel] = field(default_factory=dict)  # kernel metric -> label


def plan_lists(pairs: list[tuple[str, str]], item_item: list[str], user_item: list[str],
               user_user: list[str], eq1_scalings: list[str] | None = None) -> list[GemmGroup]:
    """The gemm groups for the produced (objective, scaling) pairs; scaling-invariant lists once.

    ``eq1_scalings``: the Eq. 1 scalings whose scaling-dependent lists are planned (``neighbours.eq1_scalings``;
    None: every produced one). The invariant Eq. 1 lists are planned from the first Eq. 1 pair either way.
    """
    wanted = ([("item_item", m) for m in item_item] + [("user_item", m) for m in user_item]
              + [("user_user", m) for m in user_user])
    groups: dict[tuple, GemmGroup] = {}
    done_invariant: set[tuple[str, str, str]] = set()
    for objective, scaling in pairs:
        for kind, metric in wanted:
            if not list_defined(objective, kind, metric):
                continue
            spec = LISTS[(kind, metric)]
            if (objective == "eq1" and not spec.scaling_invariant and eq1_scalings is not None
                    and scaling not in eq1_scalings):
                continue
            label_scaling = scaling
            if objective == "eq1" and spec.scaling_invariant:
                if (objective, kind, metric) in done_invariant:
                    continue
                done_invariant.add((objective, kind, metric))
                label_scaling = INVARIANT
            key = (objective, scaling, kind, spec.queries, spec.candidates)
            group = groups.setdefault(key, GemmGroup(objective, scaling, kind, spec.queries, spec.candidates))
            group.outputs[spec.kernel_metric] = ListLabel(kind, objective, label_scaling, metric)
    return list(groups.values())


def column_norms(B: np.ndarray) -> np.ndarray:
    """``|b_j|`` per column of B (float32): for ``B = V diag(b)`` with orthonormal V these are |b|."""
    return np.sqrt(np.einsum("ij,ij->j", B, B, dtype=np.float64)).astype(np.float32)


def gram_factor(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``G`` with ``G G^T = A B^T``: for ``A = V diag(a)``, ``B = V diag(b)`` (orthonormal V, ``a b >= 0`` for both
    objectives) ``G = V diag(sqrt(a b)) = A diag(sqrt(|b| / |a|))`` (float32; a zero column stays zero).

    Eq. 1: ``G = V W^1/2`` for every scaling; Eq. 2: ``G = V diag((1 - lam/s)_+)^1/2``. The model scores
    ``(A B^T)_ij`` are then the Gram matrix of G, symmetric, so their lists take half the gemm.
    """
    a, b = column_norms(A).astype(np.float64), column_norms(B).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a > 0, np.sqrt(b / np.where(a > 0, a, 1.0)), 0.0)
    return np.asarray(A, dtype=np.float32) * ratio.astype(np.float32)


def projected(E: np.ndarray, B: np.ndarray) -> np.ndarray:
    """k-dimensional rows with the inner products of the rows of ``E B^T``: ``E diag(|b|)`` (float32)."""
    return np.asarray(E, dtype=np.float32) * column_norms(B)


def max_row_norm(x: np.ndarray, scale: np.ndarray | None = None) -> float:
    """The largest L2 norm of the rows of ``x`` (of ``x diag(scale)`` when given), accumulated in float64; 0 when
    x has no rows."""
    x = np.asarray(x)
    if scale is not None:
        x = x * np.asarray(scale, dtype=np.float32)
    return float(np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64).max(initial=0.0)))


def cosine_floor(max_norm: float, relative: float) -> float:
    """The absolute norm below which a row takes no cosine part: ``relative`` times the embedding's largest row norm.

    Relative to the largest row because the float32 errors of a factorisation's rows are absolute, at the scale of
    its largest entries, so a row of relative norm r has its direction wrong by about (that error) / r (measured in
    ``neighbours.cosine_norm_floor``'s comment). Scale-free: a common factor on the embedding moves the floor with it.
    """
    return float(relative) * float(max_norm)


# ---------------------------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class QueryRange:
    """Rows ``start:stop`` of query part ``part`` (local row numbers) and their global ids."""

    part: int
    start: int
    stop: int
    first_id: int  # global query row of local row ``start`` (for exclude_self)
    number: int = 0  # the range's place in the run's ranges (the part number of what it writes)


def query_ranges(part_sizes: list[int], part_first_ids: list[int], rows_per_task: int) -> list[QueryRange]:
    """Ranges of at most ``rows_per_task`` rows within each query part, in row order."""
    out = []
    for b, (size, first) in enumerate(zip(part_sizes, part_first_ids)):
        for s in range(0, size, rows_per_task):
            out.append(QueryRange(b, s, min(size, s + rows_per_task), first + s, len(out)))
    return out


@dataclass
class QuerySet:
    """The query rows of a top-N run, in parts (arrays or futures, e.g. one per row block of X).

    ``firsts[b]`` is the global row of part b's first row (the candidate id of that row when
    ``exclude_self``); ``exclude[b]``, when given, is a CSR over part b's rows of the candidates
    each row must not list (a user's own items). ``cosine_min_norm``: the absolute norms below which a
    query row (of ``queries diag(scale)``), resp. a candidate row, takes no part in the cosine lists
    (``cosine_floor``; ``kernels.topn.topn_blocked``).
    """

    parts: list
    sizes: list[int]
    firsts: list[int]
    exclude: list | None = None
    exclude_self: bool = False
    cosine_min_norm: tuple[float, float] = (0.0, 0.0)  # (queries, candidates): below these, no part in cosine lists

    @classmethod
    def whole(cls, queries: Any, n_rows: int, **kwargs: Any) -> "QuerySet":
        """One part of ``n_rows`` rows starting at global row 0."""
        return cls([queries], [n_rows], [0], **kwargs)


def topn_task(queries: np.ndarray, rng: QueryRange, candidates: np.ndarray, *, n: int, metrics: tuple[str, ...],
              candidate_block: int, scale: np.ndarray | None = None, exclude_self: bool = False,
              exclude: CSRBlock | None = None, then: Callable | None = None, then_part: Any = None,
              cosine_min_norm: tuple[float, float] = (0.0, 0.0)) -> Any:
    """Top-N lists ``{metric: TopN}`` of query rows ``rng`` (a Dask task), or ``then(lists, rng, then_part)``.

    ``scale`` multiplies the query columns (``P diag(|b|)`` for projected cosines); ``exclude``
    holds the same rows' excluded candidates. The whole range is one kernel call
    (``query_chunk`` = its rows), which tiles it itself. The kernel's ``ValueError`` (NaN, inf or
    overflowing scores, which extreme input weights can cause) becomes an ``MfsimError``.
    """
    q = queries[rng.start : rng.stop]
    if scale is not None:
        q = q * scale
    ex_indptr = ex_indices = None
    if exclude is not None:
        ex_indptr = exclude.indptr[rng.start : rng.stop + 1]
        ex_indices = exclude.indices
    try:
        lists = topn_blocked(q, candidates, n, metrics=metrics, query_offset=rng.first_id, exclude_self=exclude_self,
                             exclude_indptr=ex_indptr, exclude_indices=ex_indices,
                             query_chunk=max(1, rng.stop - rng.start), candidate_block=candidate_block,
                             cosine_min_norm=cosine_min_norm)
    except ValueError as exc:  # non-finite or overflowing embeddings: the kernel's message says what to do
        raise MfsimError(f"neighbour lists: {exc}") from None
    return lists if then is None else then(lists, rng, then_part)


def run_topn(client, queries: QuerySet, candidates: Any, n: int, metrics: tuple[str, ...], *, rows_per_task: int,
             candidate_block: int, scale: np.ndarray | None = None, then: Callable | None = None,
             then_parts: list | None = None, task: Callable = None) -> Iterator[tuple[QueryRange, Any]]:
    """Top-N of every query row against ``candidates``, as Dask tasks; yields ``(range, result)`` in row order.

    ``task``: what each range runs, ``topn_task`` (the default) or one with its signature
    (``holdout.held_out_rank_task``).
    One task per range of at most ``rows_per_task`` rows of a part (``neighbours.query_chunk``).
    ``candidates`` should already be a future (``pipeline.shared``) so that it travels to each
    worker once; a task whose worker is lost is rerun by the scheduler, its inputs recomputed from
    their lineage.
    A task's result is ``{metric: TopN}``, or ``then(lists, range, then_parts[range.part])``
    computed in the task (e.g. ranking sums against held-out items, so that lists never travel).
    At most ``2 x threads`` ranges are in flight and results are released as they are yielded, so
    memory does not grow with the number of ranges.
    """
    ranges = query_ranges(queries.sizes, queries.firsts, rows_per_task)
    run = runner(client)
    # in this process a range runs as a worker runs it, on one thread: the same tiles, the same float32 scores;
    # ranges run side by side on this process's cores (``local_threads``), each on its own thread
    task = task or topn_task
    task = task if client is not None else one_thread(task)
    pool = None
    if client is None and len(ranges) > 1 and local_threads() > 1:
        pool = ThreadPoolExecutor(max_workers=local_threads(), thread_name_prefix="topn")

    def submit(r: QueryRange):
        kwargs = dict(n=n, metrics=metrics, candidate_block=candidate_block, scale=scale,
                      exclude_self=queries.exclude_self,
                      exclude=queries.exclude[r.part] if queries.exclude is not None else None,
                      then=then, then_part=then_parts[r.part] if then_parts is not None else None,
                      cosine_min_norm=queries.cosine_min_norm)
        if pool is not None:
            return pool.submit(task, queries.parts[r.part], r, candidates, **kwargs)
        with ranges_prioritized():
            return run.submit(task, queries.parts[r.part], r, candidates, pure=False, **kwargs)

    # a bounded window of ranges in flight: results wait on the workers only until this loop takes them
    window = max(2, 2 * cluster_threads(client)) if client is not None else 2 * local_threads()
    # BLAS held at one thread around the pool: each task's own limit (``one_thread``) then saves and restores
    # that same 1, so tasks ending in any order cannot leave it at another value
    with threads(blas=1) if pool is not None else nullcontext():
        try:
            in_flight = deque(submit(r) for r in ranges[:window])
            for i, r in enumerate(ranges):
                fut = in_flight.popleft()
                if i + window < len(ranges):
                    in_flight.append(submit(ranges[i + window]))
                result = fut.result() if isinstance(fut, Future) else value(fut)
                if is_future(fut):
                    fut.release()
                yield r, result
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def local_threads() -> int:
    """Threads for work that runs in this process, one task per thread: numba's thread count (the cores this process
    may use unless ``NUMBA_NUM_THREADS`` says otherwise)."""
    import numba

    return max(1, int(numba.config.NUMBA_NUM_THREADS))


# ---------------------------------------------------------------------------------------------
# symmetric item-item lists: half the gemm, as tasks over pairs of row blocks

#: Most rows in one block of a symmetric run: a pair task holds two blocks' states (rows x 2 N x 8 bytes per
#: metric each, 210 MB for dot and cosine at N = 100).
SYMMETRIC_MAX_BLOCK_ROWS = 65536
#: Blocks of a symmetric run where the catalog allows (36 pair tasks, all of which may run at once). 16 (at least
#: 4,096 rows each: 91 pairs at p = 50k) was measured too, at 200k users x 50k items on 2 workers: item-item
#: lists' critical path 1.47 -> 0.87-1.03 s, their work 20.8 -> 23.4-24.5 s (+12-17%), the whole job's predicted
#: speedup at 32 workers 9.8x -> 8.8-9.4x ...
SYMMETRIC_MIN_BLOCKS = 8
#: ... with at least this many rows each (8192 x 8192 scores: ~0.1 s of one core per pair task).
SYMMETRIC_MIN_BLOCK_ROWS = 8192


def symmetric_blocks(p: int, max_rows: int = SYMMETRIC_MAX_BLOCK_ROWS) -> list[tuple[int, int]]:
    """Row blocks of a symmetric run, a function of p alone (the same parts on one worker or many), split evenly:
    at most ``max_rows`` rows each, and up to ``SYMMETRIC_MIN_BLOCKS`` blocks while each keeps
    ``SYMMETRIC_MIN_BLOCK_ROWS`` rows (smaller catalogs take fewer blocks: a pair task's scheduling costs more than
    its tiles there)."""
    wanted = min(SYMMETRIC_MIN_BLOCKS, -(-p // SYMMETRIC_MIN_BLOCK_ROWS))
    n_blocks = max(1, min(p, max(wanted, -(-p // max_rows))))
    bounds = (np.arange(n_blocks + 1, dtype=np.int64) * p) // n_blocks
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _prepare_task(embedding: np.ndarray, metrics: tuple[str, ...], cosine_norm_floor: float = 0.0):
    try:
        return prepare_symmetric(embedding, metrics, cosine_floor(max_row_norm(embedding), cosine_norm_floor))
    except ValueError as exc:  # non-finite or overflowing embeddings: the kernel's message says what to do
        raise MfsimError(f"neighbour lists: {exc}") from None


def _floors_task(prep, block: tuple[int, int], n: int):
    emb, inv, want = prep
    return on_one_thread(symmetric_floors, emb, inv, block[0], block[1], n, want)


def _block_state(prep, block: tuple[int, int], n: int, floors, parts=()) -> tuple:
    """A block's state at its floors (``seeded_state``), with its packed partial states merged in."""
    return merge_states(seeded_state(block[1] - block[0], n, prep[2], floors), parts)


def _pair_task(prep, a: tuple[int, int], b: tuple[int, int], floors_a, floors_b, *, n: int, tile: int):
    """One pair of blocks (``symmetric_pair``) from fresh states at the blocks' floors: the partial states of ``a``
    and ``b`` over this pair's scores, packed (``pack_states``); ``a == b``: the block with itself, one state. No
    pair waits for another."""
    emb, inv, _ = prep
    state_a = _block_state(prep, a, n, floors_a)
    state_b = state_a if a == b else _block_state(prep, b, n, floors_b)
    buf = np.empty(tile * tile, dtype=np.float32)
    on_one_thread(symmetric_pair, emb, inv, a, b, states_a=state_a, states_b=state_b, tile=tile, buf=buf)
    return pack_states(state_a) if a == b else (pack_states(state_a), pack_states(state_b))


def _merge_task(prep, block: tuple[int, int], floors, *parts, n: int):
    """Partial states of one block merged into one (``merge_states``), packed."""
    return pack_states(_block_state(prep, block, n, floors, parts))


def _finish_task(prep, block: tuple[int, int], floors, *parts, n: int, rng: QueryRange, candidate_block: int,
                 then: Callable | None, then_part: Any):
    emb, inv, want = prep
    state = _block_state(prep, block, n, floors, parts)
    lists = on_one_thread(finish_symmetric, emb, inv, block[0], block[1], n=n, want=want, states=state, floors=floors,
                          candidate_block=candidate_block)
    return lists if then is None else then(lists, rng, then_part)


#: Partial states merged by one task (``_merge_task``), and at most alive per block before they are: a block's
#: pairs' partials are merged 4 at a time as they come, the last ones by its finishing task.
SYMMETRIC_MERGE_FAN_IN = 4


def run_symmetric(client, embedding: Any, p: int, n: int, metrics: tuple[str, ...], *, candidate_block: int,
                  then: Callable | None = None, then_part: Any = None, label: str | None = None,
                  tile: int = SYMMETRIC_TILE, max_block_rows: int = SYMMETRIC_MAX_BLOCK_ROWS,
                  cosine_norm_floor: float = 0.0) -> Iterator[tuple[QueryRange, Any]]:
    """Top-N of every row of one embedding (p rows, a future) against all its rows, no self-neighbour, as Dask
    tasks computing only the score tiles on and above the diagonal; yields ``(range, result)`` per row block.
    Without a client (``client`` None, the embedding an array) the same tasks run in this process, in the same
    order: the same lists bit for bit.

    The lists equal ``run_topn`` with the embedding as queries and candidates (``kernels.topn.topn_symmetric``
    is the in-process form). Every pair of row blocks (``tournament`` order) is a task of its own, which starts
    both blocks' states afresh at their floors (``symmetric_floors``) and returns their partial states over its
    scores, packed (the keys above the floor only); no pair waits for another, so all of them can run at once.
    Each block's partials are merged ``SYMMETRIC_MERGE_FAN_IN`` at a time as they come (``_merge_task``; a merge
    of partials from one floor gives the state one scan would), and its last task merges the rest and finishes
    its lists (``finish_symmetric``) and, with ``then``, writes them there (``then(lists, range, then_part)``),
    so lists never travel to the driver. A lost worker's partials are recomputed from their lineage. Memory:
    per pair task two blocks' states (``16 rows N`` bytes per metric each); per block at most
    ``SYMMETRIC_MERGE_FAN_IN`` packed partials waiting, each about its rows x the keys its pair put above the
    floor (~``3 N / blocks`` per row and metric); O(p N) over the cluster, never O(p^2). ``label``: a progress
    line over the pair tasks.
    ``cosine_norm_floor``: rows whose norm is below this times the largest row norm take no part in the cosine
    lists (``cosine_floor``; ``neighbours.cosine_norm_floor``).
    """
    from mfsim.pipeline.progress import progress

    blocks = symmetric_blocks(p, max_block_rows)
    run = runner(client)  # without a client the same tasks run here, one after another, as they are submitted
    prep = run.submit(_prepare_task, embedding, tuple(metrics), cosine_norm_floor, pure=False)
    floors = [run.submit(_floors_task, prep, b, n, pure=False) for b in blocks]
    waiting: list[list] = [[] for _ in blocks]  # per block, its partial states not merged yet
    pairs = []

    def add(i: int, part) -> None:
        waiting[i].append(part)
        if len(waiting[i]) == SYMMETRIC_MERGE_FAN_IN:
            waiting[i] = [run.submit(_merge_task, prep, blocks[i], floors[i], *waiting[i], n=n, pure=False)]

    for rnd in tournament(len(blocks)):
        for u, v in rnd:
            both = run.submit(_pair_task, prep, blocks[u], blocks[v], floors[u], floors[v], n=n, tile=tile, pure=False)
            pairs.append(both)
            if u == v:
                add(u, both)
            else:
                add(u, run.submit(operator.getitem, both, 0, pure=False))
                add(v, run.submit(operator.getitem, both, 1, pure=False))
    finals = [run.submit(_finish_task, prep, b, floors[i], *waiting[i], n=n, rng=QueryRange(0, b[0], b[1], b[0], i),
                         candidate_block=candidate_block, then=then, then_part=then_part, pure=False)
              for i, b in enumerate(blocks)]
    waiting.clear()  # only the tasks hold the partials and floors now: each is freed once no task needs it
    floors.clear()
    if client is not None:
        from distributed import as_completed

        done = as_completed(pairs)
        del pairs  # only as_completed holds the pair futures now: each state is freed once its successors ran
        for fut in progress(done, done.count(), label or "symmetric pairs"):
            if fut.status == "error":
                fut.result()  # raises the task's exception
            del fut
    else:
        for _ in progress(range(len(pairs)), len(pairs), label or "symmetric pairs"):
            pass
        del pairs
    for i, fut in enumerate(finals):
        result = value(fut)
        if is_future(fut):
            fut.release()
        finals[i] = None
        yield QueryRange(0, blocks[i][0], blocks[i][1], blocks[i][0], i), result


def client_item_lists(client, *, rows_per_task: int, candidate_block: int) -> Callable[..., TopN]:
    """An ``item_lists_fn`` for the audit: ``(queries, candidates, n, metric, exclude_self, cosine_min_norm) -> TopN``
    on Dask, or in this process without a client (``cosine_min_norm``: absolute norm floors of the queries and the
    candidates, as in ``QuerySet``)."""
    run = runner(client)

    def as_future(x: Any, name: str) -> Any:
        return x if is_future(x) else run.share_f32(x, name)

    def item_lists(queries: Any, candidates: Any, n: int, metric: str, exclude_self: bool = True,
                   cosine_min_norm: tuple[float, float] = (0.0, 0.0)) -> TopN:
        """Arrays (shared here) or futures of float32 arrays on the workers."""
        cand = as_future(candidates, "audit-candidates")
        q = cand if queries is candidates else as_future(queries, "audit-queries")
        n_queries = client.submit(len, q, pure=False).result() if is_future(queries) else len(queries)
        query_set = QuerySet.whole(q, n_queries, exclude_self=exclude_self,
                                   cosine_min_norm=tuple(float(v) for v in cosine_min_norm))
        parts = [lists[metric] for _, lists in run_topn(client, query_set, cand, n, (metric,),
                                                        rows_per_task=rows_per_task, candidate_block=candidate_block)]
        return TopN(*(np.concatenate([getattr(p, f) for p in parts]) for f in TopN._fields))

    return item_lists


# ---------------------------------------------------------------------------------------------
# what a list group reads


def user_rows(user_ids: pa.Array, wanted: list | None) -> np.ndarray | None:
    """Row numbers of the ``neighbours.users`` ids (None: all users), sorted, each once."""
    if wanted is None:
        return None
    try:
        asked = pa.array(wanted).cast(user_ids.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise MfsimError(f"neighbours.users holds values that are not {user_ids.type} ids ({exc}); "
                         "list ids as they appear in the input") from exc
    rows = pc.index_in(asked, value_set=user_ids)
    if rows.null_count:
        missing = [w for w, r in zip(wanted, rows.to_pylist()) if r is None]
        raise MfsimError(f"neighbours.users lists unknown user ids {missing[:5]}; use ids present in the input")
    return np.unique(rows.to_numpy().astype(np.int64))  # sorted, once each: lists stay sorted by query


def csr_rows(blocks: list[CSRBlock], offsets: np.ndarray, rows: np.ndarray, n_cols: int) -> CSRBlock:
    """The CSR rows ``rows`` (global row numbers) of local blocks, as one CSRBlock (pattern only)."""
    block_of = np.searchsorted(offsets, rows, side="right") - 1
    indptr = [0]
    indices = []
    for r, b in zip(rows, block_of):
        blk, local = blocks[b], r - offsets[b]
        lo, hi = blk.indptr[local], blk.indptr[local + 1]
        indices.append(blk.indices[lo:hi])
        indptr.append(indptr[-1] + hi - lo)
    idx = np.concatenate(indices) if indices else np.zeros(0, np.int32)
    return CSRBlock(np.asarray(indptr, np.int64), idx.astype(np.int32), np.ones(len(idx), np.float32), n_cols)


@dataclass
class GroupInputs:
    """What one gemm group runs on: queries, candidates (a future), their ids, the query scale.

    ``query_id_parts[b]``: the ids of query part b's rows, in local row order.
    """

    queries: QuerySet
    candidates: Any
    candidate_ids: pa.Array
    query_id_parts: list[pa.Array]
    scale: np.ndarray | None = None

    def query_ids(self, r: QueryRange) -> pa.Array:
        """The ids of the query rows of range ``r``."""
        return self.query_id_parts[r.part].slice(r.start, r.stop - r.start)


def group_cosine_min_norms(client, g: GemmGroup, candidates: Any, user_parts: list, scale: np.ndarray | None,
                           relative: float) -> tuple[float, float]:
    """``QuerySet.cosine_min_norm`` of group ``g``: ``cosine_floor`` of the largest row norm of the query embedding
    (every row of P, ``diag(scale)`` applied, also when only a subset of users is queried) and of the candidates;
    ``(0, 0)`` when the group has no cosine list or the floor is 0. One small task per row block of P."""
    if relative <= 0 or "cosine" not in g.outputs:
        return 0.0, 0.0
    run = runner(client)
    c_max = value(run.submit(max_row_norm, candidates))
    if g.kind == "item_item":  # queries are the candidates
        return cosine_floor(c_max, relative), cosine_floor(c_max, relative)
    q_max = max(run.gather([run.submit(max_row_norm, part, scale) for part in user_parts]), default=0.0)
    return cosine_floor(q_max, relative), cosine_floor(c_max, relative)


def group_inputs(client, g: GemmGroup, A: Any, B: Any, user_parts: list, X: RowBlocks,
                 user_ids: pa.Array, item_ids: pa.Array, subset: np.ndarray | None = None,
                 cosine_norm_floor: float = 0.0) -> GroupInputs:
    """Queries and candidates of group ``g`` from the factors (A, B) and the user embeddings P = X A.

    A and B: float32 p x k arrays, or futures of them (``Factors.pair``); the embeddings derived
    from them (``projected``, ``gram_factor``) are tasks on the workers.
    ``user_parts``: P per row block of X (futures); ``subset``: the user rows of
    ``neighbours.users`` (None: all users). Item-item groups query every item against every item.
    ``cosine_norm_floor``: ``neighbours.cosine_norm_floor``, set in ``queries.cosine_min_norm``
    (``group_cosine_min_norms``), except for a Gram group (item-item, the same embedding both sides), which
    ``run_symmetric`` lists with the floor its own first task finds.
    """
    p = len(item_ids)
    run = runner(client)
    if not is_future(A):  # arrays: shared once each
        A, B = run.share_f32(A, "factor-a"), run.share_f32(B, "factor-b")
    if client is not None:  # P and X read in this process (small enough for it), the lists on the workers
        user_parts = [part if is_future(part) else run.share_f32(part, "user-embeddings") for part in user_parts]
        if not all(is_future(part) for part in X.parts):
            X = RowBlocks([part if is_future(part) else run.share(part, "x-block") for part in X.parts],
                          X.row_offsets, X.n_cols, client, X.nnz)
    if g.kind == "item_item":
        emb = {"A": lambda: A, "B": lambda: B, "A_proj": lambda: run.submit(projected, A, B),
               "G": lambda: run.submit(gram_factor, A, B)}  # on the workers, from A and B
        cand = emb[g.candidates]()
        if g.queries == g.candidates:  # a Gram group runs ``run_symmetric``, whose first task takes the cosine floor
            # from the embedding itself (``_prepare_task``): no round trip for it here, and no floor in its queries
            return GroupInputs(QuerySet.whole(cand, p, exclude_self=True), cand, item_ids, [item_ids])
        q = emb[g.queries]()
        floors = group_cosine_min_norms(client, g, cand, [], None, cosine_norm_floor)
        return GroupInputs(QuerySet.whole(q, p, exclude_self=True, cosine_min_norm=floors), cand, item_ids, [item_ids])
    scale = value(run.submit(column_norms, B)) if g.queries == "P_proj" else None
    if g.kind == "user_item":
        cand, cand_ids = B, item_ids
    else:  # P stacked on a worker from its row blocks: the candidates keep P's lineage
        cand, cand_ids = run.submit(stack, scale, None, *user_parts), user_ids
    floors = group_cosine_min_norms(client, g, cand, user_parts, scale, cosine_norm_floor)
    if subset is None:
        queries = QuerySet(user_parts, np.diff(X.row_offsets).tolist(), X.row_offsets[:-1].tolist(),
                           exclude=X.parts if g.kind == "user_item" else None, exclude_self=g.kind == "user_user",
                           cosine_min_norm=floors)
        offsets = X.row_offsets
        id_parts = [outputs.id_rows(user_ids, int(offsets[b]), int(offsets[b + 1] - offsets[b]))
                    for b in range(len(X.parts))]
        return GroupInputs(queries, cand, cand_ids, id_parts, scale)
    # the subset's rows of P and of X taken on a worker (tasks on the row-block futures, lineage kept)
    P_sub = run.submit(stack, None, subset, *user_parts)
    if g.kind == "user_item":
        needed = set((np.searchsorted(X.row_offsets, subset, side="right") - 1).tolist())
        parts = [part if b in needed else None for b, part in enumerate(X.parts)]  # only the blocks read
        excl = run.submit(csr_rows, parts, X.row_offsets, subset, X.n_cols)
    else:  # each query's own row, by an exclusion mask: the subset's rows are not contiguous
        excl = run.share(CSRBlock(np.arange(len(subset) + 1, dtype=np.int64), subset.astype(np.int32),
                                      np.ones(len(subset), np.float32), X.n_rows), "exclude")
    ids = user_ids.take(pa.array(subset))
    queries = QuerySet.whole(P_sub, len(subset), exclude=[excl], cosine_min_norm=floors)
    return GroupInputs(queries, cand, cand_ids, [ids], scale)
