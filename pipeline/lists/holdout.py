"""Held-out recall@N and NDCG@N of a fit's user-item lists, computed as Dask tasks; the progress labels of list groups.

``holdout_metrics`` scores the user-item lists of a fit on the train split against the held-out
entries of the test split (``evaluate.split_holdout``): the lists of each group are computed by
``neighbours.run_topn`` and scored inside their tasks (``evaluate.holdout_sums``), so only the
sums come back. The evaluation stage and the lambda sweep both call it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa

from mfsim.pipeline.blocks import RowBlocks
from mfsim.pipeline.config import Config
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.lists.evaluate import held_out_rows, holdout_sums, list_length, merge_sums, rank_sums, sample_users
from mfsim.pipeline.lists.neighbours import GemmGroup, GroupInputs, csr_rows, group_inputs, plan_lists, query_ranges, \
    run_topn
from mfsim.pipeline.model.fit import Fit
from mfsim.pipeline.progress import progress
from mfsim.pipeline.registry import metrics_of
from mfsim.pipeline.shared import runner

T = TypeVar("T")


def holdout_metrics(client, cfg: Config, fit: Fit, train: RowBlocks, test: RowBlocks, user_ids: pa.Array,
                    item_ids: pa.Array, show_progress: bool = True, by_rank: bool = False
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of ``evaluation/metrics.parquet`` for the fit on ``train``, and the manifest's account of the users.

    ``by_rank``: groups of ``dot`` and ``cosine`` lists are scored from the held-out items' positions in them
    (``held_out_rank_task``), not from the lists: the same sums bit for bit at a fraction of the cost.

    The users are ``sample_users(held_out_rows(test), evaluation.max_users, evaluation.seed)``:
    all users with held-out items, or a seeded sample of ``max_users`` of them, whose lists alone
    are computed (``O(max_users p k)`` per list). Per list and cutoff: the mean recall and NDCG
    over those users and their standard errors ``sd / sqrt(n_users)``.
    """
    ecfg, ncfg = cfg.evaluation, cfg.neighbours
    if client is not None and test.client is None:  # a split read here, its lists on the workers: shared once
        run = runner(client)
        test = RowBlocks([run.share(part, "test-block") for part in test.parts], test.row_offsets, test.n_cols,
                         client, test.nnz)
    held = held_out_rows(test)
    users = sample_users(held, ecfg.max_users, ecfg.seed)
    sampled = users.size < held.size
    subset, then_parts = None, test.parts
    if sampled:  # only the sample's lists; the sample's held-out rows, gathered on a worker from the blocks read
        subset = users
        needed = set((np.searchsorted(test.row_offsets, users, side="right") - 1).tolist())
        parts = [part if b in needed else None for b, part in enumerate(test.parts)]
        then_parts = [runner(client).submit(csr_rows, parts, test.row_offsets, users, test.n_cols)]
    cutoffs = tuple(ecfg.cutoffs)
    rows = []
    for g in plan_lists(list(fit.factors), [], ncfg.user_item or list(metrics_of("user_item")), [],
                        cfg.list_scalings()):
        A, B = fit.factors.pair((g.objective, g.scaling), client)
        inputs = group_inputs(client, g, A, B, fit.users((g.objective, g.scaling)), X=train, user_ids=user_ids,
                              item_ids=item_ids, subset=subset, cosine_norm_floor=ncfg.cosine_norm_floor)
        ranked = by_rank and set(g.outputs) <= {"dot", "cosine"} and inputs.scale is None \
            and not inputs.queries.exclude_self
        results = run_topn(
            client, inputs.queries, inputs.candidates, list_length(max(cutoffs), len(inputs.candidate_ids)),
            tuple(g.outputs), rows_per_task=ncfg.query_chunk,
            candidate_block=ncfg.candidate_block, then=partial(holdout_sums, cutoffs=cutoffs), then_parts=then_parts,
            task=partial(held_out_rank_task, cutoffs=cutoffs) if ranked else None)
        if show_progress:
            results = group_progress(results, g, inputs, ncfg.query_chunk, "evaluation")
        rows += _group_rows(g, [res for _, res in results], cutoffs)
    return rows, {"n_users_held_out": int(held.size), "n_users_evaluated": int(users.size),
                  "max_users": ecfg.max_users, "sampled": bool(sampled)}


def held_out_rank_task(queries: np.ndarray, rng, candidates: np.ndarray, *, n: int, metrics: tuple[str, ...],
                       candidate_block: int, exclude: Any = None, then_part: Any = None, cutoffs: tuple[int, ...],
                       cosine_min_norm: tuple[float, float] = (0.0, 0.0), **_: Any) -> dict[str, Any]:
    """``{metric: MetricSums}`` of one query range's lists of length ``n`` against its held-out items (``then_part``,
    the test split's rows) from the items' positions (``kernels.ranks.held_out_ranks``), as ``topn_task`` with
    ``then=holdout_sums`` gives them from the lists. ``run_topn``'s task signature; dot and cosine lists of unscaled
    queries only (the caller checks)."""
    from mfsim.kernels.ranks import held_out_ranks

    q = queries[rng.start : rng.stop]
    test_ptr = then_part.indptr[rng.start : rng.stop + 1]
    ex_ptr = ex_idx = None
    if exclude is not None:
        ex_ptr, ex_idx = exclude.indptr[rng.start : rng.stop + 1], exclude.indices
    try:
        ranks = held_out_ranks(q, candidates, test_ptr, then_part.indices, metrics=metrics, exclude_indptr=ex_ptr,
                               exclude_indices=ex_idx, query_chunk=max(1, rng.stop - rng.start),
                               candidate_block=candidate_block, cosine_min_norm=cosine_min_norm)
    except ValueError as exc:  # as ``topn_task``'s
        raise MfsimError(f"neighbour lists: {exc}") from None
    return {m: rank_sums(r, test_ptr, then_part.indices, n, cutoffs) for m, r in ranks.items()}


def _group_rows(g: GemmGroup, results: list[dict], cutoffs: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per list of group ``g`` and cutoff: the sums of every query range merged, as means and standard
    errors."""
    rows = []
    for kernel_metric, label in g.outputs.items():
        merged = merge_sums([res[kernel_metric] for res in results])
        means, se = merged.finish(), merged.standard_errors()
        for c in cutoffs:
            rows.append({"objective": label.objective, "scaling": label.scaling, "metric": label.metric,
                         "top_n": c, "recall": means["recall"][c], "recall_se": se["recall"][c],
                         "ndcg": means["ndcg"][c], "ndcg_se": se["ndcg"][c], "n_users": merged.count})
    return rows


def group_progress(results: Iterable[T], g: GemmGroup, inputs: GroupInputs, rows_per_task: int,
                   stage: str) -> Iterator[T]:
    """``results`` of ``run_topn`` for list group ``g``, one progress step per query range, labelled
    ``<stage> <objective>/<scaling> <metric>+<metric>`` (``neighbours item_item eq1/symmetric dot+cosine``)."""
    n_ranges = len(query_ranges(inputs.queries.sizes, inputs.queries.firsts, rows_per_task))
    return progress(results, n_ranges, group_label(g, stage))


def group_label(g: GemmGroup, stage: str) -> str:
    """``<stage> <objective>/<scaling> <metric>+<metric>``, the progress label of list group ``g``."""
    return f"{stage} {g.objective}/{g.scaling} " + "+".join(label.metric for label in g.outputs.values())
