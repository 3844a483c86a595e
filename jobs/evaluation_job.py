"""Evaluation stages of the main job: held-out ranking metrics and cluster precision (Fig. 1 in numbers)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mfsim.pipeline.blocks import CSRBlock
from mfsim.pipeline.config import Config
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.evaluate import MetricSums, chance_level, cluster_sums, merge_sums, raw_cosine_topn, ranking_sums, \
    split_holdout
from mfsim.pipeline.neighbours import plan_lists, query_ranges, topn_task

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
    from mfsim.jobs.main_job import fit_model

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
        B = fit.factors[(g.objective, g.scaling)][1]
        parts = fit.users((g.objective, g.scaling))
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
    try:
        value_set = t[item_col].combine_chunks().cast(item_ids.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise MfsimError(f"the ids in column '{item_col}' of the item truth {truth.path} are not {item_ids.type} "
                         f"like the log's ({exc}); fix evaluation.item_truth") from exc
    pos = pc.index_in(item_ids, value_set=value_set)
    labels = np.full(len(item_ids), -1, dtype=np.int64)
    found = pos.is_valid().to_numpy(zero_copy_only=False)
    cl = t[cluster_col].to_numpy()
    labels[found] = cl[pos.drop_null().to_numpy()]
    return labels


def cluster_cutoffs(cfg: Config) -> list[int]:
    """``evaluation.cutoffs`` that item-item lists of length ``neighbours.top_n`` can serve."""
    top_n = cfg.neighbours.top_n
    cutoffs = [c for c in cfg.evaluation.cutoffs if c <= top_n] or [top_n]
    skipped = [c for c in cfg.evaluation.cutoffs if c > top_n]
    if skipped:
        log.warning("cluster precision: cutoffs %s exceed neighbours.top_n=%d; using %s", skipped, top_n, cutoffs)
    return cutoffs


class ClusterScorer:
    """Cluster precision@N of item-item lists, summed chunk by chunk as the lists are written.

    Only items with a known cluster are queries; a neighbour without a known cluster counts as a
    miss, and the chance level accounts for that: a random other item (of all p - 1) is in a
    labelled query's cluster c with probability (n_c - 1) / (p - 1), so chance =
    sum_c n_c (n_c - 1) / (k (p - 1)) over the k labelled items (the usual chance level when
    every item is labelled).
    """

    def __init__(self, labels: np.ndarray, cutoffs: list[int]):
        self.labels = labels
        self.cutoffs = cutoffs
        self.sums: dict[tuple[str, str, str], MetricSums] = {}
        known = labels[labels >= 0]
        p = len(labels)
        self.chance = chance_level(known) * (len(known) - 1) / (p - 1) if len(known) >= 2 else float("nan")

    def add(self, key: tuple[str, str, str], first_row: int, indices: np.ndarray, counts: np.ndarray) -> None:
        q = self.labels[first_row : first_row + len(counts)]
        keep = q >= 0
        if not keep.any():
            return
        s = cluster_sums(indices[keep], counts[keep], q[keep], self.labels, self.cutoffs)
        self.sums[key] = self.sums[key].merge(s) if key in self.sums else s


def cluster_precision_stage(run, fit, scorer: ClusterScorer, truth_path: str) -> dict[str, Any]:
    """Writes ``evaluation/cluster_precision.parquet``: the scorer's lists, and the cosine of the raw columns of
    X (after preprocessing, before factorization: ``objective=raw``, ``scaling=none``) as the baseline."""
    raw = raw_cosine_topn(fit.X.gather(), max(scorer.cutoffs),
                          item_chunk=max(1, min(2048, RAW_TILE_BYTES // (4 * max(1, fit.X.n_cols)))))
    scorer.add(("raw", "none", "cosine"), 0, raw.indices, raw.counts)
    order = sorted(scorer.sums, key=lambda key: (key[0] != "raw", key))
    rows = []
    for objective, scaling, metric in order:
        prec = scorer.sums[(objective, scaling, metric)].finish()["precision"]
        for c in scorer.cutoffs:
            rows.append({"objective": objective, "scaling": scaling, "metric": metric, "top_n": c,
                         "cluster_precision": prec[c], "chance": scorer.chance})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("objective", pa.string()), ("scaling", pa.string()), ("metric", pa.string()), ("top_n", pa.int32()),
        ("cluster_precision", pa.float64()), ("chance", pa.float64())]))
    run.write_table("evaluation/cluster_precision.parquet", table)
    return {"manifest": {"cluster_precision": {"truth": truth_path, "chance": scorer.chance,
                                               "cutoffs": scorer.cutoffs}},
            "table": table, "labels": scorer.labels}


# the raw-cosine baseline's dense tile (item_chunk x p float32) stays under this many bytes
RAW_TILE_BYTES = 256 * 2**20


def format_table(table: pa.Table, value_cols: list[str]) -> str:
    """A fixed-width text table of the rows (for the terminal)."""
    cols = table.column_names
    rows = table.to_pylist()
    cells = [[(f"{r[c]:.4f}" if c in value_cols and r[c] is not None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)

