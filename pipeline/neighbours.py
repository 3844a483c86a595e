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

Query rows go in ranges as Dask tasks on the run's client; the candidate embeddings are scattered
to the workers once per list group and every task calls ``kernels.topn.topn_blocked``. Memory per
task is bounded by the chunk sizes (see ``topn_blocked``), never O(p^2).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from mfsim.kernels.topn import TopN, topn_blocked
from mfsim.pipeline.blocks import CSRBlock

INVARIANT = "invariant"

# (kind, metric) -> (query embedding, candidate embedding, kernel metric)
LIST_SOURCES = {
    ("item_item", "cosine"): ("B", "B", "cosine"),
    ("item_item", "dot"): ("B", "B", "dot"),
    ("item_item", "model"): ("A", "B", "dot"),
    ("item_item", "projected_cosine"): ("A_proj", "A_proj", "cosine"),
    ("user_item", "dot"): ("P", "B", "dot"),
    ("user_item", "cosine"): ("P", "B", "cosine"),
    ("user_user", "cosine"): ("P", "P", "cosine"),
    ("user_user", "projected_cosine"): ("P_proj", "P_proj", "cosine"),
}
# lists whose scores (or ranking) are the same for every Eq. 1 scaling
SCALING_INVARIANT = {("item_item", "model"), ("item_item", "projected_cosine"), ("user_item", "dot"),
                     ("user_user", "projected_cosine")}


@dataclass(frozen=True)
class ListLabel:
    kind: str
    objective: str
    scaling: str
    metric: str

    @property
    def path(self) -> str:
        return f"neighbours/kind={self.kind}/objective={self.objective}/scaling={self.scaling}/metric={self.metric}"


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
               user_user: list[str]) -> list[GemmGroup]:
    """The gemm groups for the produced (objective, scaling) pairs; scaling-invariant lists once."""
    wanted = ([("item_item", m) for m in item_item] + [("user_item", m) for m in user_item]
              + [("user_user", m) for m in user_user])
    groups: dict[tuple, GemmGroup] = {}
    done_invariant: set[tuple[str, str, str]] = set()
    for objective, scaling in pairs:
        for kind, metric in wanted:
            label_scaling = scaling
            if objective == "eq1" and (kind, metric) in SCALING_INVARIANT:
                if (objective, kind, metric) in done_invariant:
                    continue
                done_invariant.add((objective, kind, metric))
                label_scaling = INVARIANT
            q, c, kernel_metric = LIST_SOURCES[(kind, metric)]
            key = (objective, scaling, kind, q, c)
            group = groups.setdefault(key, GemmGroup(objective, scaling, kind, q, c))
            group.outputs[kernel_metric] = ListLabel(kind, objective, label_scaling, metric)
    return list(groups.values())


def column_norms(B: np.ndarray) -> np.ndarray:
    """``|b_j|`` per column of B (float32): for ``B = V diag(b)`` with orthonormal V these are |b|."""
    return np.sqrt(np.einsum("ij,ij->j", B, B, dtype=np.float64)).astype(np.float32)


def projected(E: np.ndarray, B: np.ndarray) -> np.ndarray:
    """k-dimensional rows with the inner products of the rows of ``E B^T``: ``E diag(|b|)`` (float32)."""
    return np.asarray(E, dtype=np.float32) * column_norms(B)


# ---------------------------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class QueryRange:
    """Rows ``start:stop`` of query part ``part`` (local row numbers) and their global ids."""

    part: int
    start: int
    stop: int
    first_id: int  # global query row of local row ``start`` (for exclude_self)


def topn_task(queries: np.ndarray, scale: np.ndarray | None, rng: QueryRange, candidates: np.ndarray, n: int,
              metrics: tuple[str, ...], exclude_self: bool, exclude: CSRBlock | None,
              query_chunk: int, candidate_block: int) -> dict[str, TopN]:
    """Top-N lists of query rows ``rng`` (a Dask task). ``scale`` multiplies the query columns
    (``P diag(|b|)`` for projected cosines); ``exclude`` holds the same rows' excluded candidates."""
    q = queries[rng.start : rng.stop]
    if scale is not None:
        q = q * scale
    ex_indptr = ex_indices = None
    if exclude is not None:
        ex_indptr = exclude.indptr[rng.start : rng.stop + 1]
        ex_indices = exclude.indices
    return topn_blocked(q, candidates, n, metrics=metrics, query_offset=rng.first_id, exclude_self=exclude_self,
                        exclude_indptr=ex_indptr, exclude_indices=ex_indices, query_chunk=query_chunk,
                        candidate_block=candidate_block)


def query_ranges(part_sizes: list[int], part_first_ids: list[int], rows_per_task: int) -> list[QueryRange]:
    """Ranges of at most ``rows_per_task`` rows within each query part, in row order."""
    out = []
    for b, (size, first) in enumerate(zip(part_sizes, part_first_ids)):
        for s in range(0, size, rows_per_task):
            out.append(QueryRange(b, s, min(size, s + rows_per_task), first + s))
    return out


def run_group(client, query_parts: list[Any], query_sizes: list[int], query_first_ids: list[int],
              candidates: Any, n: int, metrics: tuple[str, ...], *, scale: np.ndarray | None = None,
              exclude_self: bool = False, exclude_parts: list[Any] | None = None, rows_per_task: int = 2048,
              query_chunk: int = 2048, candidate_block: int = 65536) -> Iterator[tuple[QueryRange, dict[str, TopN]]]:
    """Submit one task per query range; yield ``(range, {metric: TopN})`` in row order.

    ``query_parts``/``exclude_parts`` are arrays or futures; ``candidates`` should already be
    scattered (a future) so it travels to each worker once. At most ``2 x threads`` ranges are in
    flight and results are released as they are yielded, so memory does not grow with the number
    of ranges.
    """
    ranges = query_ranges(query_sizes, query_first_ids, rows_per_task)

    def submit(r: QueryRange):
        return client.submit(topn_task, query_parts[r.part], scale, r, candidates, n, metrics, exclude_self,
                             exclude_parts[r.part] if exclude_parts is not None else None, query_chunk,
                             candidate_block, pure=False)

    # a bounded window of ranges in flight: results wait on the workers only until this loop takes them
    window = max(2, 2 * sum(client.nthreads().values()))
    in_flight = deque(submit(r) for r in ranges[:window])
    for i, r in enumerate(ranges):
        fut = in_flight.popleft()
        if i + window < len(ranges):
            in_flight.append(submit(ranges[i + window]))
        result = fut.result()
        fut.release()
        yield r, result
