"""The cosine audit stage of the main job (Eq. 1's equally good solutions, compared list by list)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mfsim.pipeline.audit import audit_item_lists
from mfsim.pipeline.config import Config
from mfsim.pipeline.neighbours import query_ranges, topn_task


def dask_item_lists(client, query_chunk: int, candidate_block: int):
    """An ``item_lists_fn`` for the audit that runs the top-N kernel as Dask tasks over query ranges."""

    def item_lists(queries: np.ndarray, candidates: np.ndarray, n: int, metric: str, exclude_self: bool = True):
        from mfsim.kernels.topn import TopN

        cand = client.scatter(np.ascontiguousarray(candidates, dtype=np.float32), broadcast=True, hash=False)
        q = cand if queries is candidates else client.scatter(np.ascontiguousarray(queries, dtype=np.float32),
                                                              broadcast=True, hash=False)
        ranges = query_ranges([len(queries)], [0], query_chunk)
        futures = [client.submit(topn_task, q, None, r, cand, n, (metric,), exclude_self, None,
                                 min(query_chunk, 1024), candidate_block, pure=False) for r in ranges]
        parts = [f[metric] for f in client.gather(futures)]
        return TopN(np.concatenate([p.indices for p in parts]), np.concatenate([p.scores for p in parts]),
                    np.concatenate([p.counts for p in parts]))

    return item_lists


def audit_stage(client, run, cfg: Config, fit) -> dict[str, Any]:
    """Jaccard@N of item-item lists across the Eq. 1 scalings and random rescalings ``(A D, B D^-1)``.

    Writes ``audit/stability.parquet``, ``audit/detail.parquet`` and ``audit/least_stable.parquet``.
    """
    acfg = cfg.audit
    eq1 = {scaling: ab for (objective, scaling), ab in fit.factors.items() if objective == "eq1"}
    if not eq1:
        return {}
    result = audit_item_lists(eq1, top_n=acfg.top_n or cfg.neighbours.top_n, draws=acfg.draws, spread=acfg.spread,
                              seed=acfg.seed, least_stable=acfg.least_stable,
                              item_lists_fn=dask_item_lists(client, cfg.neighbours.query_chunk,
                                                            cfg.neighbours.candidate_block))
    run.write_table("audit/stability.parquet", result.stability)
    run.write_table("audit/detail.parquet", result.detail)
    run.write_table("audit/least_stable.parquet", result.least_stable)
    return {"manifest": {"audit": result.summary}, "table": result.stability, "result": result}
