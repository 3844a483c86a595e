"""Tasks that build a run's Parquet parts where they are computed and write them there.

Lists and embeddings never pass through the driver: a top-N task turns its lists into
``outputs.neighbour_table`` rows and writes ``part-<range>.parquet`` below the run's
``storage.Location``; a user-embedding task writes its row block of P = X A; an item-embedding
task its rows of B. Each returns ``storage.Written`` (path, rows, schema) for the manifest, and a
top-N task also the cluster-precision sums of its item-item lists (``evaluate.cluster_range_sums``),
so the driver's memory does not grow with the number of items or users.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from mfsim.kernels.topn import TopN
from mfsim.pipeline import outputs
from mfsim.pipeline.lists.evaluate import MetricSums, cluster_range_sums
from mfsim.pipeline.runs.storage import Location, Written, write_part


class ListOutput(NamedTuple):
    """One list a top-N task writes: the kernel metric it comes from, its kind and directory, and its key in the
    cluster scorer (``(objective, scaling, metric)``, or None when it is not scored)."""

    kernel_metric: str
    kind: str
    directory: str
    score_key: tuple[str, str, str] | None = None


class ListSink(NamedTuple):
    """What a top-N task of one query part needs to write its lists (``then_part`` of ``run_topn``).

    ``query_ids``: the part's ids (local row order); ``cluster``: (labels, cutoffs) of the item
    truth when item-item lists are scored, else None. Futures inside are resolved by Dask.
    """

    location: Location
    lists: tuple[ListOutput, ...]
    query_ids: Any
    candidate_ids: Any
    cluster: Any = None


def write_lists(lists: dict[str, TopN], rng, sink: ListSink) -> tuple[list[Written], dict[tuple, MetricSums]]:
    """``then`` of ``run_topn``: write each list of query range ``rng`` as ``<directory>/part-<rng.number>.parquet``."""
    qids = sink.query_ids.slice(rng.start, rng.stop - rng.start)
    written, sums = [], {}
    for out in sink.lists:
        top = lists[out.kernel_metric]
        table = outputs.neighbour_table(out.kind, qids, sink.candidate_ids, top.indices, top.scores, top.counts)
        written.append(write_part(sink.location, outputs.part_file(out.directory, rng.number), table))
        if out.score_key is not None and sink.cluster is not None:
            labels, cutoffs = sink.cluster
            s = cluster_range_sums(labels, cutoffs, rng.first_id, top.indices, top.counts)
            if s is not None:
                sums[out.score_key] = s
    return written, sums


def write_embeddings(location: Location, relative: str, id_col: str, ids: pa.Array, emb: np.ndarray,
                     start: int = 0, stop: int | None = None) -> Written:
    """Rows ``start:stop`` of ``emb`` with their ids (``ids[start:stop]``) as one embeddings part (a task)."""
    stop = len(ids) if stop is None else stop
    table = outputs.embedding_table(ids.slice(start, stop - start), id_col, emb[start:stop])
    return write_part(location, relative, table)


def row_ranges(n: int, rows_per_part: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` covering ``range(n)`` in parts of at most ``rows_per_part`` rows (one empty part for n = 0)."""
    if n == 0:
        return [(0, 0)]
    return [(s, min(n, s + rows_per_part)) for s in range(0, n, rows_per_part)]
