"""The stages of a run, each with one call shape: ``stage(ctx: StageContext) -> StageResult``.

``STAGES`` is the sequence that ``mfsim run`` (and every other way of starting a run) executes:
ingest, fit (preprocess, SVD, the closed forms of Eq. 1 and Eq. 2), factors, neighbours,
evaluation (a second fit on a train split), cluster_precision (when item truth is known), audit,
report. A stage reads what earlier stages left in the context, writes its outputs through the
run writer, and returns its manifest entries and its published tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mfsim.jobs.progress import progress
from mfsim.pipeline import outputs
from mfsim.pipeline.lists.audit import audit_item_lists, random_diagonals
from mfsim.pipeline.config import Config
from mfsim.pipeline.blocks import RowBlocks
from mfsim.pipeline.lists.evaluate import ClusterScorer, cluster_cutoffs, held_out_rows, holdout_sums, merge_sums, \
    sample_users, split_holdout
from mfsim.pipeline.config import Eq1Section, Eq2Section, ObjectivesSection
from mfsim.pipeline.model.fit import Fit, fit_factors, fit_model, fit_spectrum
from mfsim.pipeline.model.lambda_sweep import choose, grid_end_warning, lambda_grid, parse_select_metric, sweep_rows, \
    sweep_table
from mfsim.pipeline.model.factors import scaled_columns
from mfsim.pipeline.ingest import IngestResult, ingest
from mfsim.pipeline.inputs import ItemTruth
from mfsim.pipeline.lists.neighbours import GemmGroup, GroupInputs, client_item_lists, csr_rows, group_inputs, plan_lists, \
    query_ranges, run_symmetric, run_topn, user_rows
from mfsim.pipeline.registry import metrics_of
from mfsim.pipeline.report import HEATMAP_CLUSTERS, audit_jaccards, cluster_boundaries, cluster_order, cosine_matrix, \
    displacement_png, flatten_config, headline, heatmap_grid_png, histogram_png, item_order, lambda_sweep_png, \
    most_different, off_diagonal, pair_sample, pair_scatter_png, pair_scores, quantile_limits, rank_sample, \
    render_report, rescaling_displacement, select_items, spectrum_png
from mfsim.pipeline.parts import ListOutput, ListSink, row_ranges, write_embeddings, write_lists
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.runs.roots import read_latest, read_run_table, resolve_run, run_location
from mfsim.pipeline.runs.posix import RunWriter, package_versions
from mfsim.pipeline.model.svd import aligned_start
from mfsim.pipeline.shared import share

log = logging.getLogger("mfsim.job")
T = TypeVar("T")
ITEM_PART_ROWS = 1 << 18  # rows of B per item-embeddings part (64 MiB at k = 64)


@dataclass
class StageResult:
    """What a stage hands back: entries for the top level of the manifest, its published tables, and
    ``detail`` that later stages may read (the audit's full result, say)."""

    manifest: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pa.Table] = field(default_factory=dict)
    detail: Any = None


@dataclass
class StageContext:
    """Everything a stage may read: the config, the Dask client, the run writer, and what earlier stages made."""

    cfg: Config
    client: Any
    run: RunWriter
    truth: ItemTruth | None = None
    data: IngestResult | None = None
    fit: Fit | None = None
    scorer: ClusterScorer | None = None  # cluster precision of item-item lists, fed as they are written
    subset: np.ndarray | None = None  # user rows of neighbours.users (None: all users)
    train: tuple | None = None  # (train, test, Spectrum) of the lambda sweep's split, reused by the evaluation
    results: dict[str, StageResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """A named stage, when it runs, and whether the runner times it (``fit`` times its own parts)."""

    name: str
    fn: Callable[[StageContext], StageResult]
    when: Callable[[StageContext], bool] = lambda ctx: True
    timed: bool = True


# ---------------------------------------------------------------------------------------------
# the stages


def ingest_stage(ctx: StageContext) -> StageResult:
    """The log -> X in row blocks on the workers; ``ids/users.parquet`` and ``ids/items.parquet``.

    Also resolves ``neighbours.users`` and the item truth's labels, so that bad ids fail before
    the heavy stages.
    """
    cfg = ctx.cfg
    data = ctx.data = ingest(ctx.client, cfg.input, cfg.ingest, keep_ts=cfg.evaluation.holdout == "temporal")
    ctx.run.write_table(outputs.USERS_IDS, outputs.id_table(data.user_ids, outputs.USER_ID, data.user_counts))
    ctx.run.write_table(outputs.ITEMS_IDS, outputs.id_table(data.item_ids, outputs.ITEM_ID, data.item_counts))
    c = data.counts
    log.info("ingest: %d users x %d items, %d non-zeros", c["n_users"], c["n_items"], c["nnz"])
    ctx.run.set_counts({k: c[k] for k in ("n_users", "n_items", "nnz")})
    ctx.subset = user_rows(data.user_ids, cfg.neighbours.users)
    if ctx.truth is not None:
        labels = ctx.truth.column_by_item(data.item_ids, cfg.input.item_col, cfg.evaluation.truth_cluster_col, -1)
        ctx.scorer = ClusterScorer(labels, cluster_cutoffs(cfg.evaluation.cutoffs, cfg.neighbours.top_n))
    return StageResult({"input": {"path": cfg.input.path, "files": data.files}, "counts": c,
                        **{k: c[k] for k in ("n_users", "n_items", "nnz")}})


def fit_stage(ctx: StageContext) -> StageResult:
    """Preprocess, SVD, factors and the cosine-trained model (timed as ``preprocess``, ``svd``, ``factors``,
    ``cosine``); ``svd/singular_values.parquet``. With ``lambda: auto`` first the lambda sweep on the held-out
    split (``lambda_sweep``), whose chosen lambdas the published fit then uses."""
    sweep = None
    if ctx.cfg.objectives.auto():
        with ctx.run.stage("lambda_sweep"):
            sweep = lambda_sweep(ctx)
    start, warm = warm_start(ctx)
    fit = ctx.fit = fit_model(ctx.data.X, ctx.cfg, ctx.run.stage, start=start)
    ctx.run.write_table(outputs.SINGULAR_VALUES, outputs.singular_values_table(fit.sigma))
    ctx.run.write_table(outputs.SVD_BASIS, outputs.embedding_table(ctx.data.item_ids, outputs.ITEM_ID, fit.V))
    log.info("svd: rank %d, sigma %.4g .. %.4g", len(fit.sigma), fit.sigma[0], fit.sigma[-1])
    meta = fit.manifest_meta()
    if meta.get("eq2", {}).get("n_active") == 0:
        ctx.warnings.append(f"eq2: objectives.eq2.lambda={meta['eq2']['lambda']} is >= every singular value "
                            f"(largest {float(fit.sigma[0]):.4g}): every Eq. 2 embedding is zero")
    info = fit.svd_info
    svd = {"rank": len(fit.sigma), "solver": info.get("solver", ctx.cfg.svd.solver),
           **{key: info.get(key) for key in ("passes", "blocks", "block_size", "estimated_error", "converged")},
           "warm_start": warm}
    if svd["converged"] is False:
        ctx.warnings.append(f"svd: not converged after {svd['blocks']} blocks (estimated error "
                            f"{svd['estimated_error']:.3g} > svd.tol={ctx.cfg.svd.tol:g}); raise svd.max_blocks "
                            f"(now {ctx.cfg.svd.max_blocks}) or svd.tol")
    est = svd["estimated_error"]
    log.info("svd: %s, %s passes, %s blocks, estimated error %s", svd["solver"], svd["passes"], svd["blocks"],
             "-" if est is None else f"{est:.2g}")
    if "cosine" in meta:
        c = meta["cosine"]
        log.info("cosine model: %d iterations in %.1fs, loss %.6g -> %.6g, gamma %.4g (%s)", c["iterations"],
                 c["seconds"], c["start_loss"], c["loss"], c["gamma"], c["message"])
        if not c["converged"]:
            ctx.warnings.append(f"cosine model: not converged after {c['iterations']} iterations ({c['message']}); "
                                "raise objectives.cosine.max_iterations or objectives.cosine.tol")
    tables = {}
    if sweep is not None:
        table, chosen = sweep
        for objective, lam in chosen.items():
            meta[objective]["lambda_chosen"] = {"by": ctx.cfg.evaluation.select_metric, "on": "held-out split",
                                                "grid": table.filter(pc.equal(table["objective"], objective))
                                                ["lambda"].to_pylist(), "output": outputs.LAMBDA_SWEEP}
        ctx.run.write_table(outputs.LAMBDA_SWEEP, table)
        tables["lambda_sweep"] = table
    return StageResult({"preprocess": fit.prep.describe(), "svd": svd, "factors": meta}, tables)


def lambda_sweep(ctx: StageContext) -> tuple[pa.Table, dict[str, float]]:
    """``lambda: auto``: the train split's SVD once, then for each lambda of the grid its factors and the held-out
    users' user-item ``dot`` lists (the model score); the lambda with the best ``evaluation.select_metric`` per
    objective replaces ``auto`` in ``ctx.cfg``. The split and its SVD are kept for the evaluation stage."""
    cfg = ctx.cfg
    ecfg = cfg.evaluation
    train, test = split_holdout(ctx.data.X, ecfg.holdout, ecfg.fraction, ecfg.seed)
    spectrum = fit_spectrum(train, cfg)
    ctx.train = (train, test, spectrum)
    sweep_cfg = cfg.model_copy(deep=True)
    sweep_cfg.neighbours.user_item = ["dot"]
    cutoffs = sorted(set(ecfg.cutoffs) | {parse_select_metric(ecfg.select_metric)[1]})
    sweep_cfg.evaluation.cutoffs = cutoffs
    rows: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    for objective in cfg.objectives.auto():
        grid = lambda_grid(spectrum.svd.sigma, objective, cfg.objectives.lambda_grid)
        for lam in progress(grid, len(grid), f"lambda sweep {objective}"):
            objectives = ObjectivesSection(eq1=None, eq2=None, cosine=None)
            if objective == "eq1":
                objectives.eq1 = Eq1Section(**{"lambda": float(lam), "scalings": ["symmetric"]})
            else:
                objectives.eq2 = Eq2Section(**{"lambda": float(lam)})
            fit = fit_factors(spectrum, objectives, warn=False)
            ev, _ = holdout_metrics(ctx.client, sweep_cfg, fit, train, test, ctx.data.user_ids, ctx.data.item_ids,
                                    show_progress=False)
            rows.append(sweep_rows(objective, float(lam), ev))
        chosen[objective] = choose(rows, objective, ecfg.select_metric)
        edge = grid_end_warning(objective, grid, chosen[objective])
        if edge:
            ctx.warnings.append(edge)
        log.info("lambda sweep %s: %d lambdas from %.4g to %.4g; chosen %.4g (%s %.4f)", objective, len(grid),
                 grid[0], grid[-1], chosen[objective], ecfg.select_metric,
                 max(r[ecfg.select_metric] for r in rows if r["objective"] == objective))
    resolved = cfg.model_copy(deep=True)
    for objective, lam in chosen.items():
        getattr(resolved.objectives, objective).lambda_ = lam
    ctx.cfg = resolved
    return sweep_table(rows, chosen, cutoffs), chosen


def warm_start(ctx: StageContext) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """``svd.warm_start``: the previous run's V_k (``svd/basis.parquet``) aligned to this run's items, and what
    the manifest says of it; (None, None) for a cold start (not asked, no previous run, or no basis in it)."""
    cfg = ctx.cfg
    asked = cfg.svd.warm_start
    if not asked or cfg.svd.solver != "krylov":
        return None, None
    if asked == "previous":
        latest = read_latest(cfg.run.output)
        if latest is None:
            log.info("svd.warm_start=previous: no published run in %s yet; cold start", cfg.run.output)
            return None, None
        previous = run_location(cfg.run.output, latest)
    else:
        previous = resolve_run(asked)
    try:
        basis = read_run_table(previous, outputs.SVD_BASIS)
    except (OSError, MfsimError) as exc:
        log.warning("svd.warm_start: %s has no readable %s (%s); cold start", previous, outputs.SVD_BASIS, exc)
        return None, None
    v = np.asarray(basis["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                   np.float64).reshape(basis.num_rows, -1)
    start, matched = aligned_start(basis[outputs.ITEM_ID], v, ctx.data.item_ids, cfg.svd.seed)
    log.info("svd.warm_start: V_k of %s, %d of %d items matched", previous, matched, len(ctx.data.item_ids))
    return start, {"from": str(previous), "matched_items": matched}


def factors_stage(ctx: StageContext) -> StageResult:
    """``item_embeddings/objective=<o>/scaling=<s>/part-*.parquet`` (B) and ``user_embeddings/...`` (P = X A),
    each part written by the worker that holds it (P's row blocks; B built on a worker from the shared V,
    ``ITEM_PART_ROWS`` rows a part)."""
    data, fit, client, loc = ctx.data, ctx.fit, ctx.client, ctx.run.location
    offsets = fit.X.row_offsets
    item_ids = share(client, data.item_ids, "item-ids")
    pending = []
    for objective, scaling in fit.factors:
        items_dir = outputs.embeddings_dir("items", objective, scaling)
        B_shared = fit.factors.on_client(client, (objective, scaling))[1]  # built on the workers
        for part_no, (start, stop) in enumerate(row_ranges(len(data.item_ids), ITEM_PART_ROWS)):
            pending.append(client.submit(write_embeddings, loc, outputs.part_file(items_dir, part_no), outputs.ITEM_ID,
                                         item_ids, B_shared, start, stop, pure=False))
        users_dir = outputs.embeddings_dir("users", objective, scaling)
        for b, fut in enumerate(fit.users((objective, scaling))):
            ids = data.user_ids.slice(int(offsets[b]), int(offsets[b + 1] - offsets[b]))
            pending.append(client.submit(write_embeddings, loc, outputs.part_file(users_dir, b), outputs.USER_ID,
                                         ids, fut, pure=False))
    for w in progress(_results_in_order(pending), len(pending), "factors parts"):
        ctx.run.written(w)
    return StageResult()


def _results_in_order(futures: list) -> Iterator[Any]:
    """Each future's result in submission order, released once taken."""
    for fut in futures:
        result = fut.result()
        fut.release()
        yield result


def neighbours_stage(ctx: StageContext) -> StageResult:
    """Every configured top-N list as ``similar_items/``, ``recommendations/`` and ``similar_users/`` datasets,
    ``objective=/scaling=/metric=/part-*.parquet``, each part written by the task that computed it.

    The tasks of item-item lists also compute their cluster-precision sums, so no list comes back.
    """
    cfg, data, fit, client = ctx.cfg, ctx.data, ctx.fit, ctx.client
    ncfg = cfg.neighbours
    written: set[str] = set()
    cluster = None
    if ctx.scorer is not None:
        cluster = (share(client, ctx.scorer.labels, "cluster-labels"), list(ctx.scorer.cutoffs))
    for g in plan_lists(list(fit.factors), ncfg.item_item, ncfg.user_item, ncfg.user_user):
        A, B = fit.factors.on_client(client, (g.objective, g.scaling))  # futures: built on the workers
        user_parts = fit.users((g.objective, g.scaling)) if g.kind != "item_item" else []
        inputs = group_inputs(client, g, A, B, user_parts, data.X, data.user_ids, data.item_ids, ctx.subset,
                              cosine_norm_floor=ncfg.cosine_norm_floor)
        lists = tuple(ListOutput(km, label.kind, label.path,
                                 (label.objective, label.scaling, label.metric)
                                 if cluster is not None and label.kind == "item_item" else None)
                      for km, label in g.outputs.items())
        cand_ids = share(client, inputs.candidate_ids, "candidate-ids")
        sinks = [ListSink(ctx.run.location, lists, cand_ids if g.kind == "item_item" else share(client, ids, "query-ids"),
                          cand_ids, cluster) for ids in inputs.query_id_parts]
        if g.kind == "item_item" and g.queries == g.candidates:  # a Gram matrix: half the gemm
            results = run_symmetric(client, inputs.candidates, len(data.item_ids), capped(ncfg.top_n, inputs),
                                    tuple(g.outputs),
                                    candidate_block=ncfg.candidate_block, cosine_norm_floor=ncfg.cosine_norm_floor,
                                    then=write_lists, then_part=sinks[0],
                                    label=group_label(g, "neighbours item_item"))
        else:
            results = group_progress(run_topn(
                client, inputs.queries, inputs.candidates, capped(ncfg.top_n, inputs), tuple(g.outputs),
                rows_per_task=ncfg.query_chunk, candidate_block=ncfg.candidate_block, scale=inputs.scale,
                then=write_lists, then_parts=sinks), g, inputs, ncfg.query_chunk, f"neighbours {g.kind}")
        for _, (parts, sums) in results:
            for w in parts:
                ctx.run.written(w)
            for key, s in sums.items():
                ctx.scorer.add_sums(key, s)
        written.update(out.directory for out in lists)
        del A, B, inputs  # the group's factors and candidates leave the workers
    log.info("neighbours: %d lists written", len(written))
    return StageResult()


def group_progress(results: Iterable[T], g: GemmGroup, inputs: GroupInputs, rows_per_task: int,
                   stage: str) -> Iterator[T]:
    """``results`` of ``run_topn`` for list group ``g``, one progress step per query range, labelled
    ``<stage> <objective>/<scaling> <metric>+<metric>`` (``neighbours item_item eq1/symmetric dot+cosine``)."""
    n_ranges = len(query_ranges(inputs.queries.sizes, inputs.queries.firsts, rows_per_task))
    return progress(results, n_ranges, group_label(g, stage))


def group_label(g: GemmGroup, stage: str) -> str:
    """``<stage> <objective>/<scaling> <metric>+<metric>``, the progress label of list group ``g``."""
    return f"{stage} {g.objective}/{g.scaling} " + "+".join(label.metric for label in g.outputs.values())


def capped(n: int, inputs) -> int:
    """A list length no longer than the candidates: top_n = 100000 on 1,682 items allocates 1,682 per row, not 1e5."""
    return max(1, min(int(n), len(inputs.candidate_ids)))


def evaluation_stage(ctx: StageContext) -> StageResult:
    """Both objectives fit on a train split; recall@N and NDCG@N of every user-item list on the held-out items.

    The published factors and lists come from the fit on all data; this second fit uses the same
    config on the train split only. Writes ``evaluation/metrics.parquet`` (``holdout_metrics``).
    """
    cfg, data = ctx.cfg, ctx.data
    ecfg = cfg.evaluation
    if ctx.train is not None:  # the lambda sweep's split and SVD: only the factors of the chosen lambdas are new
        train, test, spectrum = ctx.train
        fit = fit_factors(spectrum, cfg.objectives)
    else:
        train, test = split_holdout(data.X, ecfg.holdout, ecfg.fraction, ecfg.seed)
        fit = fit_model(train, cfg)
    rows, sample = holdout_metrics(ctx.client, cfg, fit, train, test, data.user_ids, data.item_ids)
    table = pa.Table.from_pylist(rows, schema=outputs.EVALUATION_SCHEMA)
    ctx.run.write_table(outputs.EVALUATION_METRICS, table)
    summary: dict[str, Any] = {"holdout": ecfg.holdout, "fraction": ecfg.fraction, **sample}
    cutoffs = tuple(ecfg.cutoffs)
    if rows:
        best = max(rows, key=lambda r: (r["top_n"] == cutoffs[0], r["ndcg"]))
        summary["best_at_first_cutoff"] = {k: best[k] for k in ("objective", "scaling", "metric", "top_n", "ndcg")}
    return StageResult({"evaluation": summary}, {"evaluation": table})


def holdout_metrics(client, cfg: Config, fit: Fit, train: RowBlocks, test: RowBlocks, user_ids: pa.Array,
                    item_ids: pa.Array, show_progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of ``evaluation/metrics.parquet`` for the fit on ``train``, and the manifest's account of the users.

    The users are ``sample_users(held_out_rows(test), evaluation.max_users, evaluation.seed)``:
    all users with held-out items, or a seeded sample of ``max_users`` of them, whose lists alone
    are computed (``O(max_users p k)`` per list). Per list and cutoff: the mean recall and NDCG
    over those users and their standard errors ``sd / sqrt(n_users)``.
    """
    ecfg, ncfg = cfg.evaluation, cfg.neighbours
    held = held_out_rows(test)
    users = sample_users(held, ecfg.max_users, ecfg.seed)
    sampled = users.size < held.size
    subset, then_parts = None, test.parts
    if sampled:  # only the sample's lists; the sample's held-out rows, gathered on a worker from the blocks read
        subset = users
        needed = set((np.searchsorted(test.row_offsets, users, side="right") - 1).tolist())
        parts = [part if b in needed else None for b, part in enumerate(test.parts)]
        then_parts = [client.submit(csr_rows, parts, test.row_offsets, users, test.n_cols, pure=False)]
    cutoffs = tuple(ecfg.cutoffs)
    rows = []
    for g in plan_lists(list(fit.factors), [], ncfg.user_item or list(metrics_of("user_item")), []):
        A, B = fit.factors.on_client(client, (g.objective, g.scaling))
        inputs = group_inputs(client, g, A, B, fit.users((g.objective, g.scaling)), train, user_ids, item_ids, subset,
                              cosine_norm_floor=ncfg.cosine_norm_floor)
        results = run_topn(
            client, inputs.queries, inputs.candidates, capped(max(cutoffs), inputs), tuple(g.outputs),
            rows_per_task=ncfg.query_chunk,
            candidate_block=ncfg.candidate_block, then=partial(holdout_sums, cutoffs=cutoffs), then_parts=then_parts)
        if show_progress:
            results = group_progress(results, g, inputs, ncfg.query_chunk, "evaluation")
        results = [res for _, res in results]
        for kernel_metric, label in g.outputs.items():
            merged = merge_sums([res[kernel_metric] for res in results])
            means, se = merged.finish(), merged.standard_errors()
            for c in cutoffs:
                rows.append({"objective": label.objective, "scaling": label.scaling, "metric": label.metric,
                             "top_n": c, "recall": means["recall"][c], "recall_se": se["recall"][c],
                             "ndcg": means["ndcg"][c], "ndcg_se": se["ndcg"][c], "n_users": merged.count})
    return rows, {"n_users_held_out": int(held.size), "n_users_evaluated": int(users.size),
                  "max_users": ecfg.max_users, "sampled": bool(sampled)}


def cluster_precision_stage(ctx: StageContext) -> StageResult:
    """``evaluation/cluster_precision.parquet``: the scorer's lists and the raw-column cosine of X as the baseline."""
    scorer = ctx.scorer
    scorer.add_raw_baseline(ctx.fit.X.gather())
    table = pa.Table.from_pylist(scorer.rows(), schema=outputs.CLUSTER_PRECISION_SCHEMA)
    ctx.run.write_table(outputs.CLUSTER_PRECISION, table)
    return StageResult({"cluster_precision": {"truth": ctx.truth.path, "chance": scorer.chance,
                                              "cutoffs": scorer.cutoffs}}, {"cluster_precision": table})


def audit_stage(ctx: StageContext) -> StageResult:
    """Jaccard@N of item-item lists across the Eq. 1 scalings and random rescalings ``(A D, B D^-1)``.

    Writes ``audit/stability.parquet``, ``audit/items.parquet`` (per item) and ``audit/least_stable.parquet``,
    the last two keyed by ``item_id``; at most ``audit.max_items`` query items (a seeded sample), all items as
    candidates; cosine lists with the norm floor ``neighbours.cosine_norm_floor``.
    """
    acfg, ncfg = ctx.cfg.audit, ctx.cfg.neighbours
    eq1 = ctx.fit.factors.of("eq1", ctx.client)  # each scaling's (A, B) built on the workers when the audit reads it
    p = len(ctx.data.item_ids)
    result = audit_item_lists(eq1, top_n=max(1, min(acfg.top_n or ncfg.top_n, p)), draws=acfg.draws, spread=acfg.spread,
                              seed=acfg.seed, least_stable=acfg.least_stable, max_items=acfg.max_items,
                              cosine_norm_floor=ncfg.cosine_norm_floor,
                              item_lists_fn=client_item_lists(ctx.client, rows_per_task=ncfg.query_chunk,
                                                              candidate_block=ncfg.candidate_block))
    ctx.run.write_table(outputs.AUDIT_STABILITY, result.stability)
    ctx.run.write_table(outputs.AUDIT_ITEMS, outputs.keyed_by_item(result.detail, ctx.data.item_ids))
    ctx.run.write_table(outputs.AUDIT_LEAST_STABLE, outputs.keyed_by_item(result.least_stable, ctx.data.item_ids))
    return StageResult({"audit": result.summary}, {"audit": result.stability}, detail=result)


def report_stage(ctx: StageContext) -> StageResult:
    """``report.html``, one self-contained file (figures inline).

    The headline (the audit's finding in one sentence); figures that show the arbitrary scaling of
    Eq. 1 at a glance (cosine against model score of random item pairs under two equally good
    solutions, rank displacement of top-N lists under a random rescaling, audit histograms of cosine
    and of the invariant metrics, Fig. 1-style heatmaps with a difference panel), the spectrum and the
    lambda sweep; the tables; what was skipped and why; the run's input, configuration, versions and
    stage timings. Samples (``report.pairs``, ``report.rank_items``) keep every figure O(sample x p k),
    never p x p.
    """
    cfg, data, fit, rcfg = ctx.cfg, ctx.data, ctx.fit, ctx.cfg.report
    p, k = fit.V.shape
    keys = list(fit.factors)
    eq1 = fit.factors.of("eq1")  # scaling -> (A, B), built from V when read
    names = list(eq1)
    audit = ctx.results["audit"].detail if "audit" in ctx.results else None
    audit_summary = dict(getattr(audit, "summary", None) or {})
    top_n = max(1, min(cfg.audit.top_n or cfg.neighbours.top_n, p - 1))
    spread = cfg.audit.spread
    d = random_diagonals(k, 1, spread, cfg.audit.seed)[0]  # the audit's first random D
    meta = fit.manifest_meta()
    lambdas = {o: meta[o]["lambda"] for o in ("eq1", "eq2") if o in meta}
    skipped: dict[str, str] = {}
    found: dict[str, Any] = {}  # what one figure hands to a later one and to the headline
    figures: list[tuple[str, Callable[[], tuple[bytes, str]]]] = []

    def title_of(key: tuple[str, str]) -> str:
        return f"{key[0]} / {key[1]}" + (" (trained with cosine)" if key[0] == "cosine" else "")

    rescaled = f"{names[0]} x random D" if names else None  # the first scaling as (A D, B D^-1)

    def b_rows(name: str, items: np.ndarray) -> np.ndarray:
        """Rows ``items`` of B of a named Eq. 1 scaling, or of ``B D^-1`` for ``rescaled``."""
        if name == rescaled:
            return fit.factors.b(("eq1", names[0]))[items] / d
        return fit.factors.b(("eq1", name))[items]

    def pairs() -> tuple[bytes, str]:
        i, j = pair_sample(p, rcfg.pairs, rcfg.seed)
        cos, model = pair_scores(eq1, i, j)  # each named solution built when read, one at a time
        A, B = eq1[names[0]]
        more = pair_scores({rescaled: (scaled_columns(A, d), scaled_columns(B, 1 / d))}, i, j)
        del A, B
        cos.update(more[0])
        model.update(more[1])
        a, b = most_different(cos)
        found["pair"] = (a, b)
        png = pair_scatter_png(cos[a], cos[b], model[a], model[b], (f"eq1 / {a}", f"eq1 / {b}"))
        return png, (f"Cosine cos(b_i, b_j) (left) and model score a_i . b_j = (A B^T)_ij (right) of {len(i)} random "
                     f"item pairs under Eq. 1's {a} (x) and {b} (y): of the named scalings and the first one rescaled "
                     "by the audit's random D, the two whose cosines differ most on this sample. Both have the same "
                     "A B^T, so the scores lie on the diagonal while the cosines scatter around it.")

    def displacement() -> tuple[bytes, str]:
        rows = rank_sample(p, rcfg.rank_items, rcfg.seed)
        s = names[0]
        A, B = eq1[s]
        disp = rescaling_displacement(A, B, rows, d, top_n)
        del A, B
        finite = {m: v[~np.isnan(v)] for m, v in disp.items()}
        found["kept"] = {m: float(np.mean(np.isfinite(v))) if v.size else float("nan") for m, v in finite.items()}
        found["rank_items"], found["rank_scaling"] = len(rows), s
        panels = {f"cosine lists, cos(b_i, b_j), eq1 / {s}": disp["cosine"],
                  f"model-score lists, a_i . b_j, eq1 / {s}": disp["model"]}
        png = displacement_png(panels, top_n, f"Top-{top_n} lists of {len(rows)} random items: rank change "
                                              f"under (A D, B D^-1), a random D")
        return png, (f"Each item of the top-{top_n} lists of {len(rows)} random items under eq1 / {s}, by how many "
                     f"ranks it moves when the solution becomes (A D, B D^-1) with the audit's first random diagonal "
                     f"D (log-normal, sd {spread:g}); red: it leaves the list. The model scores, and so their lists, "
                     "are the same for every D; the cosine lists are reshuffled.")

    def audit_histograms() -> tuple[bytes, str]:
        groups = audit_jaccards(audit.detail)
        n = audit_summary.get("top_n", top_n)
        png = histogram_png(groups, f"Per-item Jaccard@{n} between equally good solutions, by list metric",
                            f"Jaccard@{n} per item")
        return png, (f"Per-item Jaccard@{n} of the item-item lists of two equally good Eq. 1 solutions, pooled over "
                     "the comparisons: between the named scalings (top) and against random rescalings (A D, B D^-1) "
                     "(bottom); 1.0 is the same list. The cosine lists move; the model and projected_cosine lists, "
                     "whose scores are the same for every solution, do not.")

    def heatmaps() -> tuple[bytes, str]:
        labels = ctx.scorer.labels if ctx.scorer is not None else None
        m = min(rcfg.heatmap_items, p)
        if labels is not None and (labels >= 0).any():
            popularity = None
            pop_col = cfg.evaluation.truth_popularity_col
            if pop_col and pop_col in ctx.truth.table.column_names:
                popularity = ctx.truth.column_by_item(data.item_ids, cfg.input.item_col, pop_col, -np.inf)
            items = select_items(item_order(cluster=labels, popularity=popularity), m, seed=0)
            boundaries = cluster_boundaries(labels[items])
            ordering = f"{len(items)} items sorted by true cluster (lines), then by popularity"
        else:
            items = item_order(popularity=data.item_counts)[:m]  # the most popular: the best-estimated directions
            order, groups = cluster_order(fit.V[items] * fit.sigma, HEATMAP_CLUSTERS, rcfg.seed)
            items, boundaries = items[order], cluster_boundaries(groups)
            ordering = (f"the {len(items)} most popular items grouped by k-means (lines) on their SVD coordinates "
                        "V_k diag(sigma), the same for every solution")
        panels = [(title_of(key), fit.factors.b(key)[items]) for key in keys]
        limits = quantile_limits(np.concatenate([off_diagonal(cosine_matrix(B)) for _, B in panels]), center=0.0)
        pair = found.get("pair") or ((names[0], rescaled) if names else ())
        diff = (f"eq1: {pair[0]} minus {pair[1]}", b_rows(pair[0], items), b_rows(pair[1], items)) if pair else None
        png = heatmap_grid_png(panels, boundaries, limits=limits, difference=diff)
        text = (f"Cosine of the item embeddings B, {ordering}; colours end at +-{limits[1]:.2f}, the 1st or 99th "
                "percentile of the off-diagonal cosines, whichever is further from 0"
                + (f", and the last panel is {pair[0]} minus {pair[1]}" if diff else "")
                + ". Eq. 1's scalings have the same A B^T but different cosines; Eq. 2's solution is unique")
        if any(key[0] == "cosine" for key in keys):
            text += ", and cosine / unique is trained with cosine similarity, so its cosine is what it was fit for"
        return png, text + "."

    def spectrum() -> tuple[bytes, str]:
        return spectrum_png(fit.sigma, lambdas), ("Singular values of X with the lambda thresholds of Eq. 1 and Eq. 2 "
                                                  "(as fitted), and the weight each objective gives each component.")

    sweep = next((r.tables["lambda_sweep"] for r in ctx.results.values() if "lambda_sweep" in r.tables), None)
    select_metric = getattr(cfg.evaluation, "select_metric", "ndcg@20")

    def lambda_sweep() -> tuple[bytes, str]:
        return lambda_sweep_png(sweep, select_metric), (
            f"Held-out {select_metric} on the train/test split for each lambda tried (log axis); the star marks "
            "the lambda the run chose (lambda: auto). Eq. 1's lambda acts on s^2 and Eq. 2's on s, hence one "
            "panel each.")

    if names and p >= 2:
        figures += [("pairs", pairs), ("rank_displacement", displacement)]
    else:
        skipped["pair scatter and rank displacement"] = ("one item only: no pairs" if names
                                                         else "no Eq. 1 solution (objectives.eq1 is null)")
    if audit is not None and audit.detail.num_rows and "cosine" in (audit_summary.get("metrics") or {}):
        figures.append(("audit_jaccard", audit_histograms))
    elif audit is not None:
        skipped["audit histograms"] = audit_summary.get("verdict") or "the audit compared nothing"
    if keys:
        figures.append(("heatmaps", heatmaps))
    figures.append(("spectrum", spectrum))
    if sweep is not None and select_metric in sweep.column_names:
        figures.append(("lambda_sweep", lambda_sweep))
    elif sweep is not None:
        skipped["lambda sweep figure"] = (f"evaluation.select_metric {select_metric!r} is not a column of the sweep "
                                          f"({', '.join(c for c in sweep.column_names if '@' in c)})")
    else:
        skipped["lambda sweep"] = "every lambda was given as a number (no objectives.*.lambda: auto)"
    images: dict[str, bytes] = {}
    captions: dict[str, str] = {}
    for name, draw in progress(figures, len(figures), "report figures"):
        images[name], captions[name] = draw()

    if ctx.truth is None:
        skipped["cluster precision (Fig. 1 in numbers)"] = (
            "no item truth: evaluation.item_truth is null and there is no items_truth.parquet beside the input; "
            "the heatmaps are grouped by k-means instead of true clusters")
    if cfg.evaluation.holdout == "none":
        skipped["held-out evaluation"] = "evaluation.holdout is none"
    if audit is None:
        skipped["cosine audit"] = ("audit.enabled is false" if not cfg.audit.enabled
                                   else "no Eq. 1 solution to audit (objectives.eq1 is null)")
    tables: dict[str, Any] = {}
    for key, title in (("cluster_precision", "Cluster precision@N (the paper's Fig. 1 in numbers)"),
                       ("evaluation", "Held-out recall@N and NDCG@N"), ("audit", "Cosine audit: stability")):
        if key in ctx.results and key in ctx.results[key].tables:
            tables[title] = ctx.results[key].tables[key]
    if sweep is not None:
        tables["Lambda sweep: held-out metrics per lambda tried"] = sweep

    c = data.counts
    summary = [f"{c['n_users']} users x {c['n_items']} items, {c['nnz']} non-zeros; SVD rank {len(fit.sigma)}."]
    if "evaluation" in ctx.results:
        ev = ctx.results["evaluation"].manifest["evaluation"]
        summary.append(f"Held-out metrics over {ev['n_users_evaluated']} of the {ev['n_users_held_out']} users with "
                       "held-out items" + (" (a seeded sample of evaluation.max_users)" if ev["sampled"] else "")
                       + "; recall_se and ndcg_se are their standard errors.")
    if audit is not None:
        if "n_items_sampled" in audit_summary:
            summary.append(f"Cosine audit over {audit_summary['n_items_sampled']} of the {audit_summary['n_items']} "
                           "items" + (" (a seeded sample of audit.max_items)" if audit_summary.get("sampled") else "")
                           + ", every item a candidate; jaccard_se is the standard error of jaccard_mean.")
        summary.append(audit_summary.get("verdict", ""))
    finding = headline(audit_summary)
    if finding is None and "kept" in found:
        finding = (f"Under a random rescaling (A D, B D^-1), which leaves every score of Eq. 1 unchanged, the top-"
                   f"{top_n} cosine lists of {found['rank_items']} random items keep {found['kept']['cosine']:.0%} of "
                   f"their items; their model-score lists keep {found['kept']['model']:.0%}.")

    resolved = cfg.resolved()
    flat = flatten_config(resolved)
    config_rows = []
    for key in ("input.path", "preprocess.binarize", "preprocess.column_weighting", "svd.rank", "svd.solver",
                "objectives.eq1.lambda", "objectives.eq1.scalings", "objectives.eq2.lambda", "objectives.cosine.lambda",
                "neighbours.top_n", "neighbours.item_item", "evaluation.holdout", "evaluation.cutoffs",
                "audit.draws", "audit.spread", "audit.top_n", "audit.max_items", "report.heatmap_items",
                "report.pairs", "report.rank_items", "report.seed"):
        if key in flat:
            value = flat[key]
            objective = key.split(".")[1] if key.startswith("objectives.") else None
            if objective in lambdas and key.endswith(".lambda") and value == "auto":
                value = f"auto: {lambdas[objective]:.4g}"
            config_rows.append({"key": key, "value": "null" if value is None else value})
    source = ctx.results["ingest"].manifest.get("input", {}) if "ingest" in ctx.results else {}
    files = source.get("files") or []
    run_info = {
        "Input": [{"path": source.get("path", cfg.input.path), "files": len(files),
                   "bytes": sum(int(f.get("size") or 0) for f in files),
                   "rows read": sum(int(f.get("rows") or 0) for f in files),
                   "users": c["n_users"], "items": c["n_items"], "non-zeros": c["nnz"]}],
        "Configuration (summary)": config_rows,
        "Versions": [{"package": name, "version": v} for name, v in package_versions().items()],
        "Stage timings (s)": [{"stage": name, "seconds": t} for name, t in dict(ctx.run.timings).items()],
    }
    page = render_report(title=f"mfsim run {ctx.run.run_id}", headline=finding, summary_lines=summary, tables=tables,
                         images=images, captions=captions, skipped=skipped, run_info=run_info, config=resolved)
    ctx.run.write_bytes(outputs.REPORT, page)
    return StageResult()

STAGES: tuple[Stage, ...] = (
    Stage("ingest", ingest_stage),
    Stage("fit", fit_stage, timed=False),
    Stage("factors", factors_stage),
    Stage("neighbours", neighbours_stage),
    Stage("evaluation", evaluation_stage, lambda ctx: ctx.cfg.evaluation.holdout != "none"),
    Stage("cluster_precision", cluster_precision_stage, lambda ctx: ctx.scorer is not None),
    Stage("audit", audit_stage, lambda ctx: ctx.cfg.audit.enabled and any(o == "eq1" for o, _ in ctx.fit.factors)),
    Stage("report", report_stage, lambda ctx: ctx.cfg.report.enabled),
)
