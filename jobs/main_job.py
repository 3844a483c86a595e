"""The main batch job: conf -> Dask client -> pipeline stages -> one atomically published run.

Stages, each timed under ``timings`` in the manifest: ingest, preprocess, svd, factors,
neighbours, evaluation (a second fit on a train split), cluster_precision (when item truth is
known), audit, report.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mfsim.jobs.progress import progress
from mfsim.pipeline import outputs
from mfsim.pipeline.blocks import CSRBlock, RowBlocks
from mfsim.pipeline.cluster import get_client
from mfsim.pipeline.config import Config
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.factors import build_embeddings, user_embeddings_blocks
from mfsim.pipeline.ingest import IngestResult, ingest
from mfsim.pipeline.neighbours import GemmGroup, column_norms, plan_lists, projected, run_group
from mfsim.pipeline.preprocess import Preprocessor, preprocess
from mfsim.pipeline.runs import RunWriter, validate_run_id
from mfsim.pipeline.svd import truncated_svd

log = logging.getLogger("mfsim.job")


@dataclass
class Fit:
    """One fit of both objectives: preprocessed X, its SVD, and the factors per (objective, scaling)."""

    X: RowBlocks
    prep: Preprocessor
    sigma: np.ndarray
    V: np.ndarray
    factors: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]
    meta: dict[str, Any]
    user_parts: dict[tuple[str, str], list] = field(default_factory=dict)  # P = X A per row block, when computed

    def users(self, key: tuple[str, str]) -> list:
        """User embeddings ``P = X_eff A`` of (objective, scaling) per row block (futures), computed once."""
        if key not in self.user_parts:
            self.user_parts[key] = user_embeddings_blocks(self.X, self.factors[key][0], self.prep.col_offset)
        return self.user_parts[key]


def fit_model(X_raw: RowBlocks, cfg: Config, run: RunWriter | None = None, prefix: str = "") -> Fit:
    """Preprocess, truncated SVD and the closed forms of Eq. 1 and Eq. 2 (timed when ``run`` is given)."""

    def stage(name):
        return run.stage(prefix + name) if run is not None else nullcontext()

    with stage("preprocess"):
        X, prep = preprocess(X_raw, cfg.preprocess)
    with stage("svd"):
        svd = truncated_svd(X, cfg.svd, col_offset=prep.col_offset)
    with stage("factors"):
        emb = build_embeddings(svd.sigma, svd.V, cfg.objectives)
    return Fit(X, prep, np.asarray(svd.sigma), np.asarray(svd.V), emb["factors"], emb["meta"])


def run_job(cfg: Config, *, scheduler: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Run every configured stage and publish ``<run.output>/<run_id>/``; returns (run dir, manifest)."""
    if cfg.run.run_id is not None:
        validate_run_id(cfg.run.run_id)
    warnings: list[str] = []
    extra: dict[str, Any] = {}
    truth = load_item_truth(cfg)  # read before any work: a bad truth file fails fast
    with RunWriter(cfg.run.output, cfg.run.run_id) as run:
        with get_client(cfg.cluster, scheduler) as client:
            with run.stage("ingest"):
                data = ingest(client, cfg.input, cfg.ingest, keep_ts=cfg.evaluation.holdout == "temporal")
                run.write_table(outputs.USERS_IDS, outputs.id_table(data.user_ids, cfg.input.user_col, data.user_counts))
                run.write_table(outputs.ITEMS_IDS, outputs.id_table(data.item_ids, cfg.input.item_col, data.item_counts))
            c = data.counts
            log.info("ingest: %d users x %d items, %d non-zeros", c["n_users"], c["n_items"], c["nnz"])

            fit = fit_model(data.X, cfg, run)
            run.write_table(outputs.SINGULAR_VALUES, outputs.singular_values_table(fit.sigma))
            log.info("svd: rank %d, sigma %.4g .. %.4g", len(fit.sigma), fit.sigma[0], fit.sigma[-1])
            with run.stage("factors"):
                write_factors(run, cfg, data, fit)
            meta = _factors_meta(fit.meta)
            if meta.get("eq2", {}).get("n_active") == 0:
                warnings.append(f"eq2: objectives.eq2.lambda={meta['eq2']['lambda']} is >= every singular value "
                                f"(largest {float(fit.sigma[0]):.4g}): every Eq. 2 embedding is zero")

            subset = user_rows(data.user_ids, cfg.neighbours.users)  # unknown ids fail before the heavy stages
            scorer = None
            if truth is not None:
                from mfsim.jobs.evaluation_job import ClusterScorer, cluster_cutoffs, truth_labels

                scorer = ClusterScorer(truth_labels(truth, data.item_ids, cfg.input.item_col,
                                                    cfg.evaluation.truth_cluster_col), cluster_cutoffs(cfg))
            with run.stage("neighbours"):
                n_lists = neighbours_stage(client, run, cfg, data, fit, subset=subset, scorer=scorer)
            log.info("neighbours: %d lists written", n_lists)

            if cfg.evaluation.holdout != "none":
                from mfsim.jobs.evaluation_job import evaluation_stage

                with run.stage("evaluation"):
                    extra["evaluation"] = evaluation_stage(client, run, cfg, data)
            if scorer is not None:
                from mfsim.jobs.evaluation_job import cluster_precision_stage

                with run.stage("cluster_precision"):
                    extra["cluster_precision"] = cluster_precision_stage(run, fit, scorer, truth.path)
            if cfg.audit.enabled and cfg.objectives.eq1 is not None and fit.factors:
                from mfsim.jobs.audit_job import audit_stage

                with run.stage("audit"):
                    extra["audit"] = audit_stage(client, run, cfg, fit)
            if cfg.report.enabled:
                from mfsim.jobs.report_job import report_stage

                with run.stage("report"):
                    report_stage(run, cfg, data, fit, truth, extra)
        manifest = {
            "config": cfg.resolved(),
            "input": {"path": cfg.input.path, "files": data.files},
            "counts": c,
            **{k: c[k] for k in ("n_users", "n_items", "nnz")},
            "preprocess": fit.prep.describe(),
            "svd": {"rank": len(fit.sigma), "solver": cfg.svd.solver},
            "factors": meta,
            **{key: value for stage in extra.values() for key, value in stage.get("manifest", {}).items()},
            "warnings": warnings,
        }
        for w in warnings:
            log.warning("%s", w)
        run_dir = run.publish(manifest)
    run.manifest["_tables"] = {k: v.get("table") for k, v in extra.items()}
    return run_dir, run.manifest


# ---------------------------------------------------------------------------------------------
# factors


def _embedding_parts(client, futures, ids: pa.Array, id_col: str, offsets: np.ndarray):
    """Tables of one embedding, block by block, so only one block is in this process at a time."""
    for b, fut in enumerate(futures):
        emb = client.gather(fut) if client is not None else fut
        yield outputs.embedding_table(ids.slice(int(offsets[b]), int(offsets[b + 1] - offsets[b])), id_col, emb)


def write_factors(run: RunWriter, cfg: Config, data: IngestResult, fit: Fit) -> None:
    """``factors/objective=<o>/scaling=<s>/items.parquet`` (B) and ``users.parquet`` (P = X A)."""
    for (objective, scaling), (A, B) in fit.factors.items():
        where = outputs.factors_dir(objective, scaling)
        run.write_table(f"{where}/items.parquet", outputs.embedding_table(data.item_ids, cfg.input.item_col, B))
        parts = fit.users((objective, scaling))
        run.write_table_parts(f"{where}/users.parquet", _embedding_parts(
            fit.X.client, parts, data.user_ids, cfg.input.user_col, fit.X.row_offsets))


def _factors_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of ``build_embeddings``'s metadata."""
    out: dict[str, Any] = {}
    if "eq1" in meta:
        out["eq1"] = {"lambda": meta["eq1"]["lambda"],
                      "scalings": {k: {"alpha": a, "beta": b} for k, (a, b) in meta["eq1"]["scalings"].items()}}
    if "eq2" in meta:
        out["eq2"] = {"lambda": meta["eq2"]["lambda"], "n_active": int(meta["eq2"]["n_active"])}
    return out


# ---------------------------------------------------------------------------------------------
# neighbours


def user_rows(user_ids: pa.Array, wanted: list | None) -> np.ndarray | None:
    """Row numbers of the ``neighbours.users`` ids (None: all users)."""
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


def _csr_rows(blocks: list[CSRBlock], offsets: np.ndarray, rows: np.ndarray, n_cols: int) -> CSRBlock:
    """The CSR rows ``rows`` (global row numbers) of local blocks, as one CSRBlock."""
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
class QuerySet:
    """Query rows of a list group: parts (futures), their sizes and first global rows, and their ids."""

    parts: list
    sizes: list[int]
    firsts: list[int]
    ids_of: Callable[[Any], pa.Array]
    exclude: list | None = None
    exclude_self: bool = False


def neighbours_stage(client, run: RunWriter, cfg: Config, data: IngestResult, fit: Fit, *,
                     subset: np.ndarray | None = None, scorer=None) -> int:
    """Every configured top-N list, written as ``neighbours/kind=/objective=/scaling=/metric=/part-*.parquet``.

    ``subset``: the user rows of ``neighbours.users`` (None: all users). Item-item lists are also
    handed to ``scorer.add`` (cluster precision) as they are written, so none is kept in memory.
    """
    from mfsim.pipeline.outputs import neighbour_table

    ncfg = cfg.neighbours
    groups = plan_lists(list(fit.factors), ncfg.item_item, ncfg.user_item, ncfg.user_user)
    written: set[str] = set()
    kernel = dict(query_chunk=min(ncfg.query_chunk, 1024), candidate_block=ncfg.candidate_block,
                  rows_per_task=ncfg.query_chunk)

    for g in groups:
        A, B = fit.factors[(g.objective, g.scaling)]
        scale = None
        if g.kind == "item_item":
            emb = {"A": A, "B": B, "A_proj": projected(A, B)}
            cand = client.scatter(np.ascontiguousarray(emb[g.candidates]), broadcast=True, hash=False)
            q = cand if g.queries == g.candidates else client.scatter(np.ascontiguousarray(emb[g.queries]),
                                                                      broadcast=True, hash=False)
            queries = QuerySet([q], [len(A)], [0], lambda r: data.item_ids.slice(r.first_id, r.stop - r.start),
                               exclude_self=True)
            cand_ids = data.item_ids
        else:
            parts = fit.users((g.objective, g.scaling))
            if g.queries == "P_proj":
                scale = column_norms(B)
            if g.kind == "user_item":
                cand, cand_ids = client.scatter(np.ascontiguousarray(B), broadcast=True, hash=False), data.item_ids
            else:
                P = np.concatenate(client.gather(parts))
                cand, cand_ids = client.scatter(P * scale if scale is not None else P, broadcast=True, hash=False), data.user_ids
            queries = _user_queries(client, g, parts, data, subset)
        results = run_group(client, queries.parts, queries.sizes, queries.firsts, cand, ncfg.top_n, tuple(g.outputs),
                            scale=scale, exclude_self=queries.exclude_self, exclude_parts=queries.exclude, **kernel)
        n_ranges = sum(-(-size // ncfg.query_chunk) for size in queries.sizes)
        names = "+".join(label.metric for label in g.outputs.values())
        results = progress(results, n_ranges, f"neighbours {g.kind} {g.objective}/{g.scaling} {names}")
        for part_no, (r, lists) in enumerate(results):
            qids = queries.ids_of(r)
            for kernel_metric, label in g.outputs.items():
                top = lists[kernel_metric]
                run.write_table(f"{label.path}/part-{part_no:05d}.parquet",
                                neighbour_table(label.kind, qids, cand_ids, top.indices, top.scores, top.counts))
                written.add(label.path)
                if scorer is not None and label.kind == "item_item":
                    scorer.add((label.objective, label.scaling, label.metric), r.first_id, top.indices, top.counts)
    return len(written)


def _user_queries(client, g: GemmGroup, parts: list, data: IngestResult, subset: np.ndarray | None) -> QuerySet:
    """Query rows of a user-item or user-user group: all users (per row block) or ``neighbours.users``."""
    X = data.X
    if subset is None:
        sizes = np.diff(X.row_offsets).tolist()
        firsts = X.row_offsets[:-1].tolist()
        return QuerySet(parts, sizes, firsts, lambda r: data.user_ids.slice(r.first_id, r.stop - r.start),
                        exclude=X.parts if g.kind == "user_item" else None, exclude_self=g.kind == "user_user")
    P_sub = np.concatenate(client.gather(parts))[subset]
    if g.kind == "user_item":
        excl = _csr_rows(X.local_parts(), X.row_offsets, subset, X.n_cols)
    else:  # each query's own row, by an exclusion mask: the subset's rows are not contiguous
        excl = CSRBlock(np.arange(len(subset) + 1, dtype=np.int64), subset.astype(np.int32),
                        np.ones(len(subset), np.float32), X.n_rows)
    ids = data.user_ids.take(pa.array(subset))
    return QuerySet([client.scatter(P_sub, hash=False)], [len(subset)], [0], lambda r: ids.slice(r.start, r.stop - r.start),
                    exclude=[client.scatter(excl, hash=False)])


# ---------------------------------------------------------------------------------------------
# item truth


@dataclass
class ItemTruth:
    path: str
    table: pa.Table  # item id column, cluster, optional popularity


def load_item_truth(cfg: Config) -> ItemTruth | None:
    """``evaluation.item_truth``, or ``items_truth.parquet`` beside the input log (the simulator's)."""
    import pyarrow.parquet as pq

    path = cfg.evaluation.item_truth
    if path is None and cfg.input.path:
        beside = Path(cfg.input.path) / "items_truth.parquet"
        if beside.is_file():
            path = str(beside)
    if path is None:
        return None
    if not Path(path).is_file():
        raise MfsimError(f"evaluation.item_truth {path} does not exist; pass a Parquet file with "
                         f"'{cfg.input.item_col}' and '{cfg.evaluation.truth_cluster_col}' columns or null")
    try:
        t = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise MfsimError(f"{path} is not a readable Parquet file ({exc}); fix evaluation.item_truth") from exc
    need = [cfg.input.item_col, cfg.evaluation.truth_cluster_col]
    for col in need:
        if col not in t.column_names:
            raise MfsimError(f"column '{col}' is missing from the item truth {path}; its columns are "
                             f"{t.column_names}; set evaluation.truth_cluster_col / input.item_col")
    cluster = t[cfg.evaluation.truth_cluster_col]
    if not pa.types.is_integer(cluster.type) or cluster.null_count:
        raise MfsimError(f"column '{cfg.evaluation.truth_cluster_col}' of the item truth {path} must hold integer "
                         f"cluster labels without nulls, got {cluster.type} with {cluster.null_count} nulls")
    return ItemTruth(path, t)
