"""Evaluation stages of the main job: held-out ranking metrics and cluster precision (Fig. 1 in numbers)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.blocks import CSRBlock
from pipeline.config import Config
from pipeline.evaluate import MetricSums, chance_level, cluster_precision, merge_sums, raw_cosine_topn, \
    ranking_sums, split_holdout
from pipeline.neighbours import plan_lists, query_ranges, topn_task

log = logging.getLogger("mfsim.evaluation")


def _eval_task(queries, scale, rng, candidates, n, metrics, train: CSRBlock, test: CSRBlock, cutoffs,
               query_chunk, candidate_block) -> dict[str, MetricSums]:
    """Top-N of one range of users (train items excluded) scored against their held-out items (a task)."""
    lists = topn_task(queries, scale, rng, candidates, n, metrics, False, train, query_chunk, candidate_block)
    indptr = test.indptr[rng.start : rng.stop + 1]
    return {m: ranking_sums(top.indices, top.counts, indptr, test.indices, cutoffs) for m, top in lists.items()}


def evaluation_stage(client, run, cfg: Config, data) -> dict[str, Any]:
    """Fit both objectives on a train split; recall@N and NDCG@N of every user-item list on the held-out items.

    The published factors and lists come from the fit on all data; this second fit uses the same
    config on the train split only. Writes ``evaluation/metrics.parquet``.
    """
    from jobs.main_job import fit_model
    from pipeline.factors import user_embeddings_blocks

    ecfg = cfg.evaluation
    train, test = split_holdout(data.X, ecfg.holdout, ecfg.fraction, ecfg.seed)
    fit = fit_model(train, cfg)
    metrics_wanted = cfg.neighbours.user_item or ["dot", "cosine"]
    groups = plan_lists(list(fit.factors), [], metrics_wanted, [])
    n = max(ecfg.cutoffs)
    sizes = np.diff(train.row_offsets).tolist()
    firsts = train.row_offsets[:-1].tolist()
    ranges = query_ranges(sizes, firsts, cfg.neighbours.query_chunk)
    rows = []
    for g in groups:
        A, B = fit.factors[(g.objective, g.scaling)]
        parts = user_embeddings_blocks(fit.X, A, fit.prep.col_offset)
        cand = client.scatter(np.ascontiguousarray(B), broadcast=True, hash=False)
        futures = [client.submit(_eval_task, parts[r.part], None, r, cand, n, tuple(g.outputs), train.parts[r.part],
                                 test.parts[r.part], tuple(ecfg.cutoffs), min(cfg.neighbours.query_chunk, 1024),
                                 cfg.neighbours.candidate_block, pure=False) for r in ranges]
        results = client.gather(futures)
        for kernel_metric, label in g.outputs.items():
            sums = merge_sums([res[kernel_metric] for res in results]).finish()
            n_users = sum(res[kernel_metric].count for res in results)
            for c in ecfg.cutoffs:
                rows.append({"objective": label.objective, "scaling": label.scaling, "metric": label.metric,
                             "top_n": c, "recall": sums["recall"][c], "ndcg": sums["ndcg"][c], "n_users": n_users})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("objective", pa.string()), ("scaling", pa.string()), ("metric", pa.string()), ("top_n", pa.int32()),
        ("recall", pa.float64()), ("ndcg", pa.float64()), ("n_users", pa.int64())]))
    run.write_table("evaluation/metrics.parquet", table)
    best = max(rows, key=lambda r: (r["top_n"] == ecfg.cutoffs[0], r["ndcg"])) if rows else None
    summary: dict[str, Any] = {"holdout": ecfg.holdout, "fraction": ecfg.fraction}
    if best:
        summary["best_at_first_cutoff"] = {k: best[k] for k in ("objective", "scaling", "metric", "top_n", "ndcg")}
    return {"manifest": {"evaluation": summary}, "table": table}


def truth_labels(truth, item_ids: pa.Array, item_col: str, cluster_col: str) -> np.ndarray:
    """Cluster label per item index (-1 for items absent from the truth file)."""
    t = truth.table
    pos = pc.index_in(item_ids, value_set=t[item_col].combine_chunks().cast(item_ids.type))
    labels = np.full(len(item_ids), -1, dtype=np.int64)
    found = pos.is_valid().to_numpy(zero_copy_only=False)
    cl = t[cluster_col].to_numpy()
    labels[found] = cl[pos.drop_null().to_numpy()]
    return labels


def cluster_precision_stage(run, cfg: Config, data, fit, truth, item_lists: dict) -> dict[str, Any]:
    """Share of item-item neighbours in the item's own cluster, per list and cutoff, with chance level.

    Also for the cosine of the raw columns of X (``objective=raw``, ``scaling=none``), the baseline.
    Writes ``evaluation/cluster_precision.parquet``.
    """
    labels = truth_labels(truth, data.item_ids, cfg.input.item_col, cfg.evaluation.truth_cluster_col)
    known = labels >= 0
    if not known.any():
        log.warning("item truth %s names none of the items; no cluster precision", truth.path)
        return {}
    chance = chance_level(labels[known])
    top_n = cfg.neighbours.top_n
    cutoffs = [c for c in cfg.evaluation.cutoffs if c <= top_n] or [top_n]
    skipped = [c for c in cfg.evaluation.cutoffs if c > top_n]
    if skipped:
        log.warning("cluster precision: cutoffs %s exceed neighbours.top_n=%d; using %s", skipped, top_n, cutoffs)
    rows = []

    def add(objective, scaling, metric, indices, counts):
        q = known  # queries with a known cluster; unknown candidates never match
        prec = cluster_precision(indices[q], counts[q], labels[q], labels, cutoffs)
        for c in cutoffs:
            rows.append({"objective": objective, "scaling": scaling, "metric": metric, "top_n": c,
                         "cluster_precision": prec[c], "chance": chance})

    raw = raw_cosine_topn(fit.X.gather(), max(cutoffs))
    add("raw", "none", "cosine", raw.indices, raw.counts)
    for label, parts in sorted(item_lists.items(), key=lambda kv: (kv[0].objective, kv[0].scaling, kv[0].metric)):
        parts = sorted(parts, key=lambda p: p[0])
        indices = np.concatenate([p[1].indices for p in parts])
        counts = np.concatenate([p[1].counts for p in parts])
        add(label.objective, label.scaling, label.metric, indices, counts)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("objective", pa.string()), ("scaling", pa.string()), ("metric", pa.string()), ("top_n", pa.int32()),
        ("cluster_precision", pa.float64()), ("chance", pa.float64())]))
    run.write_table("evaluation/cluster_precision.parquet", table)
    return {"manifest": {"cluster_precision": {"truth": truth.path, "chance": chance, "cutoffs": cutoffs}},
            "table": table, "labels": labels}


def format_table(table: pa.Table, value_cols: list[str]) -> str:
    """A fixed-width text table of the rows (for the terminal)."""
    cols = table.column_names
    rows = table.to_pylist()
    cells = [[(f"{r[c]:.4f}" if c in value_cols and r[c] is not None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)

