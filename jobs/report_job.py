"""The report stage of the main job: ``report/index.html`` with its PNG figures."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from mfsim.pipeline.config import Config
from mfsim.pipeline.report import cluster_boundaries, heatmap_grid_png, histogram_png, item_order, render_report, \
    select_items, spectrum_png


def report_stage(run, cfg: Config, data, fit, truth, extra: dict[str, Any]) -> None:
    """Fig. 1-style heatmaps, the spectrum with the lambda thresholds, the tables and the audit histograms."""
    labels = extra.get("cluster_precision", {}).get("labels")
    if labels is not None and (labels >= 0).any():
        popularity = None
        pop_col = cfg.evaluation.truth_popularity_col
        if truth is not None and pop_col and pop_col in truth.table.column_names:
            pos = pc.index_in(data.item_ids, value_set=truth.table[cfg.input.item_col].combine_chunks()
                              .cast(data.item_ids.type))
            pop = truth.table[pop_col].to_numpy().astype(np.float64)
            popularity = np.where(pos.is_valid().to_numpy(zero_copy_only=False),
                                  pop[pos.fill_null(0).to_numpy()], -np.inf)
        order = item_order(cluster=labels, popularity=popularity)
        ordering = "items sorted by true cluster, then by popularity"
    else:
        order = item_order(v1=fit.V[:, 0])
        ordering = "items in the order of the first right singular vector (no cluster truth)"
    items = select_items(order, cfg.report.heatmap_items, seed=0)
    boundaries = cluster_boundaries(labels[items]) if labels is not None else None

    images: dict[str, bytes] = {}
    captions: dict[str, str] = {}
    panels = [(f"{objective} / {scaling}", B[items]) for (objective, scaling), (_, B) in fit.factors.items()]
    if panels:
        images["heatmaps"] = heatmap_grid_png(panels, boundaries)
        captions["heatmaps"] = (f"Cosine similarity of the item embeddings B, {len(items)} items ({ordering}). "
                                "Eq. 1's scalings are equally good solutions (same A B^T), yet their cosines differ; "
                                "Eq. 2's solution is unique.")
    lambdas = {}
    if cfg.objectives.eq1 is not None:
        lambdas["eq1"] = cfg.objectives.eq1.lambda_
    if cfg.objectives.eq2 is not None:
        lambdas["eq2"] = cfg.objectives.eq2.lambda_
    images["spectrum"] = spectrum_png(fit.sigma, lambdas)
    captions["spectrum"] = "Singular values of X with the lambda thresholds, and the weights of each objective."

    audit = extra.get("audit", {}).get("result")
    if audit is not None and audit.detail.num_rows:
        d = audit.detail.filter(pc.equal(audit.detail["metric"], "cosine")).to_pydict()
        groups: dict[str, list] = {}
        for a, b, j in zip(d["scaling_a"], d["scaling_b"], d["jaccard"]):
            groups.setdefault(f"{a} vs {b}", []).append(j)
        if groups:
            images["audit_jaccard"] = histogram_png({k: np.asarray(v) for k, v in groups.items()},
                                                    "Item-item cosine lists: Jaccard@N between equally good solutions",
                                                    "Jaccard@N per item")
            captions["audit_jaccard"] = "1.0: the item's list is the same under both solutions."

    tables = {}
    for key, title in (("cluster_precision", "Cluster precision@N (the paper's Fig. 1 in numbers)"),
                       ("evaluation", "Held-out recall@N and NDCG@N"), ("audit", "Cosine audit: stability")):
        if extra.get(key, {}).get("table") is not None:
            tables[title] = extra[key]["table"]
    c = data.counts
    summary = [f"{c['n_users']} users x {c['n_items']} items, {c['nnz']} non-zeros; SVD rank {len(fit.sigma)}."]
    if audit is not None:
        summary.append(audit.summary.get("verdict", ""))
    files = render_report(title=f"mfsim run {run.run_id}", summary_lines=summary, tables=tables, images=images,
                          captions=captions)
    for name, content in files.items():
        run.path(f"report/{name}").write_bytes(content)
