"""The stages of a run, each with one call shape: ``stage(ctx: StageContext) -> StageResult``.

``STAGES`` is the sequence that ``mfsim run`` (and every other way of starting a run) executes:
ingest, fit (preprocess, SVD, the closed forms of Eq. 1 and Eq. 2), factors, neighbours,
evaluation (a second fit on a train split), cluster_precision (when item truth is known), audit,
report. A stage reads what earlier stages left in the context, calls the pipeline, writes its
outputs through the run writer, and returns its manifest entries and its published tables.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa

from mfsim.jobs.progress import progress
from mfsim.kernels import sparse
from mfsim.pipeline import outputs
from mfsim.pipeline import blocks
from mfsim.pipeline.blocks import RowBlocks, lists_here, rounds_where
from mfsim.pipeline.cluster import ClusterOnDemand
from mfsim.pipeline.config import Config, NeighboursSection
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.ingest import IngestResult, ingest
from mfsim.pipeline.inputs import ItemTruth
from mfsim.pipeline.lists.audit import audit_item_lists
from mfsim.pipeline.lists.evaluate import ClusterScorer, cluster_cutoffs, list_length, split_holdout
from mfsim.pipeline.lists.holdout import group_label, group_progress, holdout_metrics
from mfsim.pipeline.lists.neighbours import GemmGroup, GroupInputs, client_item_lists, group_inputs, plan_lists, \
    run_symmetric, run_topn, user_rows
from mfsim.pipeline.model.fit import Fit, Spectrum, fit_factors, fit_model, fit_spectrum
from mfsim.pipeline.model.lambda_sweep import Sweep, sweep_cutoffs, sweep_lambdas, sweep_ranks, with_lambdas
from mfsim.pipeline.model.svd import basis_start
from mfsim.pipeline.parts import ListOutput, ListSink, row_ranges, write_embeddings, write_lists
from mfsim.pipeline.runs.writer import RunWriter, package_versions
from mfsim.pipeline.runs.roots import open_root, read_run_table, resolve_run
from mfsim.pipeline.shared import cluster_threads, is_future, runner, value, where_of

log = logging.getLogger("mfsim.job")
ITEM_PART_ROWS = 1 << 18  # rows of B per item-embeddings part (64 MiB at k = 64)


@dataclass
class StageResult:
    """What a stage hands back: entries for the top level of the manifest, its published tables, and
    ``detail`` that later stages may read (the audit's full result, say)."""

    manifest: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pa.Table] = field(default_factory=dict)
    detail: Any = None
    #: the stage's last wait, for tasks it submitted that need not hold up the next stage: the runner calls it at
    #: the end of the next stage (inside its timing), so those tasks run beside that stage's
    wait_later: Callable[[], None] | None = None


@dataclass
class StageContext:
    """Everything a stage may read: the config, the Dask client (``client``: started when first read), the run
    writer, and what earlier stages made."""

    cfg: Config
    clients: ClusterOnDemand
    run: RunWriter
    truth: ItemTruth | None = None
    data: IngestResult | None = None
    fit: Fit | None = None
    scorer: ClusterScorer | None = None  # cluster precision of item-item lists, fed as they are written
    subset: np.ndarray | None = None  # user rows of neighbours.users (None: all users)
    train: tuple | None = None  # (train, test, Spectrum) of the held-out split (``holdout_split``): sweep, evaluation
    results: dict[str, StageResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    early: dict[str, Beside] = field(default_factory=dict)  # stage name -> its part begun early (``Stage.early``)
    #: set once the lists' first tasks have run (their first range recorded) or their stage has ended: work begun
    #: early waits for it, so that it does not hold this process's GIL while the lists' first tasks are submitted
    lists_running: threading.Event = field(default_factory=threading.Event)

    @property
    def client(self) -> Any:
        """The run's Dask client; the first read starts the embedded cluster (``ClusterOnDemand``): read it only
        for work that the placement rule (``pipeline.blocks``) sends to the workers."""
        return self.clients.get()


@dataclass(frozen=True)
class Stage:
    """A named stage, when it runs, whether the runner times it (``fit`` times its own parts), the modules it
    imports when it runs (``imports``: the runner imports them beside the earlier stages, ``main_job.run_stages``),
    and the part of it that can begin early: ``early(ctx)``, called right after the stage ``early_after``, returns
    that work as a call (or None: nothing to begin), which runs in a thread beside the stages in between
    (``Beside``, in ``ctx.early[name]``, whose ``result()`` the stage reads)."""

    name: str
    fn: Callable[[StageContext], StageResult]
    when: Callable[[StageContext], bool] = lambda ctx: True
    timed: bool = True
    imports: tuple[str, ...] = ()
    early: Callable[[StageContext], Callable[[], Any] | None] | None = None
    early_after: str = ""


class Beside:
    """``work()`` in a thread of its own (a daemon: a run that fails before reading it does not wait for it);
    ``result()`` waits for it and returns its value, or raises its error."""

    def __init__(self, work: Callable[[], Any], name: str):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"mfsim-early-{name}", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], Any]) -> None:
        try:
            self._value = work()
        except BaseException as exc:  # handed to the reader
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


# ---------------------------------------------------------------------------------------------
# the stages


def ingest_stage(ctx: StageContext) -> StageResult:
    """The log -> X in row blocks on the workers; ``ids/users.parquet`` and ``ids/items.parquet``.

    Also resolves ``neighbours.users`` and the item truth's labels, so that bad ids fail before
    the heavy stages.
    """
    cfg = ctx.cfg
    # the SVD's kernels loaded while the driver waits on the workers (an SVD of a small X runs in the driver, and the
    # first kernel a process calls sets numba up: ~0.2 s); not waited for (a later call waits on numba's own lock)
    threading.Thread(target=_load_kernels, name="mfsim-kernel-load", daemon=True).start()
    data = ctx.data = ingest(lambda: ctx.client, cfg.input, cfg.ingest, keep_ts=cfg.evaluation.holdout == "temporal",
                             here_max_rows=blocks.INGEST_HERE_MAX_ROWS)
    writing = None
    if data.ran_on == "workers":  # its id tables (0.13 s of Parquet for 1M users) written in a thread beside the fit,
        # waited for at its end (``wait_later``: a failed write fails the run there)
        writing = Beside(partial(write_id_tables, ctx.run, data), "ids")
    else:
        write_id_tables(ctx.run, data)
    c = data.counts
    log.info("ingest: %d users x %d items, %d non-zeros", c["n_users"], c["n_items"], c["nnz"])
    ctx.run.set_counts({k: c[k] for k in ("n_users", "n_items", "nnz")})
    ctx.subset = user_rows(data.user_ids, cfg.neighbours.users)
    if ctx.truth is not None:
        labels = ctx.truth.column_by_item(data.item_ids, cfg.input.item_col, cfg.evaluation.truth_cluster_col, -1)
        ctx.scorer = ClusterScorer(labels, cluster_cutoffs(cfg.evaluation.cutoffs, cfg.neighbours.top_n))
    return StageResult({"input": {"path": cfg.input.path, "files": data.files, "ran_on": data.ran_on}, "counts": c,
                        **{k: c[k] for k in ("n_users", "n_items", "nnz")}},
                       wait_later=writing.result if writing is not None else None)


def _load_kernels() -> None:
    """``kernels.sparse.load`` for a thread of its own: an error there (a kernel that does not load) is left to the
    kernel's first call in the SVD, which raises it where it matters."""
    try:
        sparse.load()
    except Exception:  # noqa: BLE001 - raised again by the SVD's own call
        pass


def write_id_tables(run: RunWriter, data: IngestResult) -> None:
    """``ids/users.parquet`` and ``ids/items.parquet``: each id, its row or column of X, its interactions."""
    run.write_table(outputs.USERS_IDS, outputs.id_table(data.user_ids, outputs.USER_ID, data.user_counts))
    run.write_table(outputs.ITEMS_IDS, outputs.id_table(data.item_ids, outputs.ITEM_ID, data.item_counts))


def fit_stage(ctx: StageContext) -> StageResult:
    """Preprocess, SVD, factors and the cosine-trained model (timed as ``preprocess``, ``svd``, ``factors``,
    ``cosine``); ``svd/singular_values.parquet`` and ``svd/basis.parquet``. With ``lambda: auto`` first the lambda
    sweep on the held-out split (``lambda_sweep``), whose chosen lambdas the published fit then uses."""
    skipped = cosine_within_size(ctx)
    sweep = None
    if ctx.cfg.objectives.auto() or ctx.cfg.svd.rank == "auto":
        with ctx.run.stage("lambda_sweep"):
            sweep = lambda_sweep(ctx)
        # the chosen lambdas (and rank) replace auto for every later stage
        ctx.cfg = with_lambdas(ctx.cfg, sweep.chosen, sweep.rank)
        ctx.warnings.extend(sweep.warnings)
    start, warm = warm_start(ctx)
    fit = ctx.fit = fit_model(ctx.data.X, ctx.cfg, ctx.run.stage, start=start)
    with ctx.run.stage("svd"):  # its tables, in its time (``timings`` adds the parts)
        ctx.run.write_table(outputs.SINGULAR_VALUES, outputs.singular_values_table(fit.sigma))
        ctx.run.write_table(outputs.SVD_BASIS, outputs.embedding_table(ctx.data.item_ids, outputs.ITEM_ID, fit.V))
    log.info("svd: rank %d, sigma %.4g .. %.4g", len(fit.sigma), fit.sigma[0], fit.sigma[-1])
    meta = fit.manifest_meta()
    svd, warnings = fit_entries(fit, meta, ctx.cfg, warm)
    ctx.warnings.extend(warnings)
    tables = {}
    if sweep is not None:
        for objective in sweep.chosen:
            meta[objective]["lambda_chosen"] = {"by": ctx.cfg.evaluation.select_metric, "on": "held-out split",
                                                "grid": sweep.grids[objective], "output": outputs.LAMBDA_SWEEP,
                                                "ran_on": sweep.ran_on}
        if sweep.rank is not None:
            svd["rank_chosen"] = {"rank": sweep.rank, "by": ctx.cfg.evaluation.select_metric, "on": "held-out split",
                                  "best_score_rank": sweep.best_rank, "within_se": ctx.cfg.svd.rank_within_se,
                                  "rank_extend": ctx.cfg.svd.rank_extend,
                                  "grid": sweep.ranks, "rank_max": ctx.cfg.svd.rank_max,
                                  "output": outputs.LAMBDA_SWEEP, "ran_on": sweep.ran_on}
        ctx.run.write_table(outputs.LAMBDA_SWEEP, sweep.table)
        tables["lambda_sweep"] = sweep.table
    return StageResult({"preprocess": fit.prep.describe(), "svd": svd, "factors": meta, **skipped}, tables)


def holdout_split(ctx: StageContext) -> tuple[RowBlocks, RowBlocks, Spectrum]:
    """``ctx.train``: X's held-out split (``evaluation.holdout``) and the train split's SVD, placed by
    ``holdout_where``; made once, for the lambda sweep and the evaluation."""
    if ctx.train is None:
        cfg = ctx.cfg
        ecfg = cfg.evaluation
        train, test = split_holdout(ctx.data.X, ecfg.holdout, ecfg.fraction, ecfg.seed)
        _, _, spectrum, train, test = holdout_where(ctx, fit_spectrum(train, cfg), train, test)
        ctx.train = (train, test, spectrum)
    return ctx.train


def cosine_within_size(ctx: StageContext) -> dict[str, Any]:
    """``objectives.cosine.max_nnz``: above it the cosine-trained model is left out of this run (every fit, the
    evaluation's too), with a warning that says how to ask for it; the manifest's ``skipped`` says why."""
    ccfg = ctx.cfg.objectives.cosine
    nnz = int(ctx.data.counts["nnz"])
    if ccfg is None or ccfg.max_nnz is None or nnz <= ccfg.max_nnz:
        return {}
    why = (f"X has {nnz:,} non-zeros, above objectives.cosine.max_nnz={ccfg.max_nnz:,}: its L-BFGS (hundreds of "
           "evaluations, each 5k columns of products over X) would cost hundreds of times the SVD")
    ctx.warnings.append(f"cosine model: not trained: {why}; set objectives.cosine.max_nnz=null (or above {nnz}) "
                        "to train it")
    cfg = ctx.cfg.model_copy(deep=True)
    cfg.objectives.cosine = None
    ctx.cfg = cfg
    return {"skipped": {"cosine-trained model": why}}


def fit_entries(fit: Fit, meta: dict[str, Any], cfg: Config, warm: dict[str, Any] | None
                ) -> tuple[dict[str, Any], list[str]]:
    """The manifest's ``svd`` entry of ``fit``, and the warnings of the fit: every Eq. 2 embedding zero, the SVD or
    the cosine model not converged."""
    warnings = []
    if meta.get("eq2", {}).get("n_active") == 0:
        warnings.append(f"eq2: objectives.eq2.lambda={meta['eq2']['lambda']} is >= every singular value "
                        f"(largest {float(fit.sigma[0]):.4g}): every Eq. 2 embedding is zero")
    info = fit.svd_info
    svd = {"rank": len(fit.sigma), "solver": info.get("solver", cfg.svd.solver),
           **{key: info.get(key) for key in ("passes", "blocks", "block_size", "estimated_error", "converged",
                                             "ran_on")},
           "warm_start": warm}
    if svd["converged"] is False:
        what = (f"svd: not converged after {svd['blocks']} blocks (estimated error {svd['estimated_error']:.3g} > "
                f"svd.tol={cfg.svd.tol:g}): its top singular vectors are not yet the data's")
        if not cfg.svd.accept_unconverged:
            raise MfsimError(f"{what}; nothing published. Raise svd.max_blocks (now {cfg.svd.max_blocks}), loosen "
                             "svd.tol, or set svd.accept_unconverged: true to publish it anyway")
        warnings.append(f"{what}; published as svd.accept_unconverged asked: raise svd.max_blocks "
                        f"(now {cfg.svd.max_blocks}) or svd.tol")
    est = svd["estimated_error"]
    log.info("svd: %s, %s passes, %s blocks, estimated error %s", svd["solver"], svd["passes"], svd["blocks"],
             "-" if est is None else f"{est:.2g}")
    if "cosine" in meta:
        c = meta["cosine"]
        log.info("cosine model: %d iterations in %.1fs, loss %.6g -> %.6g, gamma %.4g (%s)", c["iterations"],
                 c["seconds"], c["start_loss"], c["loss"], c["gamma"], c["message"])
        if not c["converged"]:
            warnings.append(f"cosine model: not converged after {c['iterations']} iterations ({c['message']}); "
                            "raise objectives.cosine.max_iterations or objectives.cosine.tol")
    return svd, warnings


def lambda_sweep(ctx: StageContext) -> Sweep:
    """``lambda: auto``: the train split's SVD once, then each lambda of the grid scored by the held-out users'
    user-item ``dot`` lists (the model score; ``sweep_lambdas``). The split and its SVD are kept in ``ctx.train``
    for the evaluation stage."""
    cfg, data = ctx.cfg, ctx.data
    ecfg = cfg.evaluation
    # each lambda is a round of P = X A and the held-out users' lists: here when that is small (holdout_where); the
    # evaluation stage takes the split where it was placed, gathered once
    train, test, spectrum = holdout_split(ctx)
    client, where, spectrum, train, test = holdout_where(ctx, spectrum, train, test)
    cutoffs = sweep_cutoffs(ecfg.cutoffs, ecfg.select_metric)
    score_cfg = cfg.model_copy(deep=True)
    score_cfg.neighbours.user_item = ["dot"]
    score_cfg.evaluation.cutoffs = cutoffs

    def score(fit: Fit) -> list[dict[str, Any]]:
        return holdout_metrics(client, score_cfg, fit, train=train, test=test, user_ids=data.user_ids,
                               item_ids=data.item_ids, show_progress=False, by_rank=True)[0]

    if cfg.svd.rank == "auto":
        ranked = partial(sweep_ranks, objectives=cfg.objectives, select_metric=ecfg.select_metric, cutoffs=cutoffs,
                         score=score, within_se=cfg.svd.rank_within_se)
        sweep = ranked(spectrum, ranks=cfg.svd.ranks())
        for _ in range(cfg.svd.rank_extend):  # the best score at the largest rank: one SVD at twice that rank
            largest = max(sweep.ranks)
            if sweep.best_rank != largest or len(spectrum.svd.sigma) < largest:
                break
            log.info("rank sweep: the best score is at the largest rank %d; the train split's SVD at %d",
                     largest, 2 * largest)
            wider_cfg = cfg.model_copy(deep=True)
            wider_cfg.svd = cfg.svd.at_rank(2 * largest)
            wider = fit_spectrum(ctx.train[0], wider_cfg)  # the raw train split, as holdout_split placed it
            if len(wider.svd.sigma) <= largest:  # the split has no more singular values
                break
            # the evaluation stage reads the wider SVD's first k columns; ``score`` the split where it now runs
            client, where, spectrum, train, test = holdout_where(ctx, wider, ctx.train[0], ctx.train[1])
            ctx.train = (ctx.train[0], ctx.train[1], spectrum)
            sweep = ranked(spectrum, ranks=[len(spectrum.svd.sigma)], earlier=sweep)
    else:
        sweep = sweep_lambdas(spectrum, cfg.objectives, select_metric=ecfg.select_metric, cutoffs=cutoffs,
                              score=score, rank=cfg.svd.fit_rank)
    return replace(sweep, ran_on=where)


def holdout_where(ctx: StageContext, spectrum: Spectrum, train: RowBlocks, test: RowBlocks
                  ) -> tuple[Any, str, Spectrum, RowBlocks, RowBlocks]:
    """Where the held-out lists of a fit on ``train`` run: ``(client, where, spectrum, train, test)``, the last three
    gathered into this process (client None, ``"driver"``) when one fit's user embeddings (``nnz x k``) and its lists
    (held-out users x p x k) are small (``rounds_where``), else as they are (``"workers"``). The same metrics bit for
    bit either way."""
    cfg = ctx.cfg
    users = min(train.n_rows, cfg.evaluation.max_users)
    dense = users * train.n_cols * cfg.svd.fit_rank
    X_here, where = rounds_where(spectrum.X, cfg.svd.fit_rank, dense_work=dense)
    if where == "driver" and spectrum.X.client is None and not lists_here(dense):
        where = "workers"  # X read here (a small log), its lists too large for this process: P and X shared out
    if where == "workers":
        return ctx.client, where, spectrum, train, test
    return None, where, replace(spectrum, X=X_here), train.here(), test.here()  # here() of a local split: itself


def warm_start(ctx: StageContext) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """``svd.warm_start``: the previous run's V_k (``svd/basis.parquet``) aligned to this run's items, and what
    the manifest says of it; (None, None) for a cold start (not asked, no previous run, or no basis in it)."""
    cfg = ctx.cfg
    asked = cfg.svd.warm_start
    if not asked or cfg.svd.solver != "krylov":
        return None, None
    if asked == "previous":
        root = open_root(cfg.run.output)
        latest = root.read_latest()
        if latest is None:
            log.info("svd.warm_start=previous: no published run in %s yet; cold start", cfg.run.output)
            return None, None
        previous = root.run_location(latest)
    else:
        previous = resolve_run(asked)
    try:
        basis = read_run_table(previous, outputs.SVD_BASIS)
    except (OSError, MfsimError) as exc:
        log.warning("svd.warm_start: %s has no readable %s (%s); cold start", previous, outputs.SVD_BASIS, exc)
        return None, None
    start, matched = basis_start(basis, ctx.data.item_ids, cfg.svd.seed, id_col=outputs.ITEM_ID)
    log.info("svd.warm_start: V_k of %s, %d of %d items matched", previous, matched, len(ctx.data.item_ids))
    return start, {"from": str(previous), "matched_items": matched}


def factors_stage(ctx: StageContext) -> StageResult:
    """``item_embeddings/objective=<o>/scaling=<s>/part-*.parquet`` (B) and ``user_embeddings/...`` (P = X A),
    each part written by the worker that holds it (P's row blocks; B built on a worker from the shared V,
    ``ITEM_PART_ROWS`` rows a part). On a client the stage submits the parts and leaves: they are written beside the
    next stage's lists, which do not read them, and recorded at its end (``StageResult.wait_later``)."""
    data, fit, loc = ctx.data, ctx.fit, ctx.run.location
    client = None if fit.X.client is None else ctx.client  # X (hence P) here when the fit ran here (``fit_spectrum``)
    run = runner(client)
    offsets = fit.X.row_offsets
    item_ids = run.share(data.item_ids, "item-ids")
    pending = []
    for objective, scaling in fit.factors:
        items_dir = outputs.embeddings_dir("items", objective, scaling)
        B_shared = fit.factors.pair((objective, scaling), client)[1]  # built on the workers
        for part_no, (start, stop) in enumerate(row_ranges(len(data.item_ids), ITEM_PART_ROWS)):
            pending.append(run.submit(write_embeddings, loc, outputs.part_file(items_dir, part_no), outputs.ITEM_ID,
                                      item_ids, B_shared, start=start, stop=stop, pure=False))
        users_dir = outputs.embeddings_dir("users", objective, scaling)
        for b, fut in enumerate(fit.users((objective, scaling))):
            ids = outputs.id_rows(data.user_ids, int(offsets[b]), int(offsets[b + 1] - offsets[b]))
            pending.append(run.submit(write_embeddings, loc, outputs.part_file(users_dir, b), outputs.USER_ID,
                                      ids, fut, pure=False))

    def record() -> None:
        for w in progress(_results_in_order(pending), len(pending), "factors parts"):
            ctx.run.written(w)

    if client is None:  # written already
        record()
    return StageResult({"embeddings": {"ran_on": where_of(client)}}, wait_later=None if client is None else record)


def _results_in_order(futures: list) -> Iterator[Any]:
    """Each future's result in submission order, released once taken."""
    for fut in futures:
        result = value(fut)
        if is_future(fut):
            fut.release()
        yield result


#: List groups on the workers run side by side, as many as keep the cluster's threads busy at this many tasks a group
#: (a symmetric group's ``tournament`` round runs 4 pairs at once below 524,288 items), and at least 2: one group's
#: tail overlaps the next one's start. Each group in flight holds its factors, candidates and running states.
GROUP_TASKS_AT_ONCE = 4


class GroupEnd(NamedTuple):
    """A list group ended (``neighbours_stage``), with its error or None."""

    error: BaseException | None


def groups_in_flight(client, tasks_each: int = GROUP_TASKS_AT_ONCE) -> int:
    """How many list groups (or lists) of ``tasks_each`` tasks at once run side by side on ``client``'s workers: as
    many as keep every thread busy, at least 2; 1 in this process."""
    if client is None:
        return 1
    threads = cluster_threads(client)
    return max(2, -(-threads // max(1, tasks_each)))


def neighbours_stage(ctx: StageContext) -> StageResult:
    """Every configured top-N list as ``similar_items/``, ``recommendations/`` and ``similar_users/`` datasets,
    ``objective=/scaling=/metric=/part-*.parquet``, each part written by the task that computed it.

    The tasks of item-item lists also compute their cluster-precision sums, so no list comes back. Groups on the
    workers run ``groups_in_flight`` at a time, each driven by a thread of this process; groups that run here run
    alone, one after another (the workers' groups before them finished). The same lists either way.
    """
    cfg, data, fit = ctx.cfg, ctx.data, ctx.fit
    ncfg = cfg.neighbours
    written: set[str] = set()
    places: dict[str, int] = {}
    X_here = None  # X's pattern in this process (the users' own items, excluded from their lists), once
    labels: dict[str, Any] = {}  # the item truth's labels where the groups run, shared once per place
    done: queue.Queue = queue.Queue()  # (parts written, cluster sums) of every range, then its group's GroupEnd

    def lists_of(g: GemmGroup, client, X: RowBlocks) -> None:
        """Group ``g``'s lists; what each range wrote goes to ``done`` for this thread to record."""
        where = where_of(client)
        cluster = None
        if ctx.scorer is not None:
            cluster = (labels[where], list(ctx.scorer.cutoffs))
        A, B = fit.factors.pair((g.objective, g.scaling), client)  # futures: built on the workers
        user_parts = fit.users((g.objective, g.scaling)) if g.kind != "item_item" else []
        inputs = group_inputs(client, g, A, B, user_parts, X=X, user_ids=data.user_ids, item_ids=data.item_ids,
                              subset=ctx.subset, cosine_norm_floor=ncfg.cosine_norm_floor)
        lists = tuple(ListOutput(km, label.kind, label.path,
                                 (label.objective, label.scaling, label.metric)
                                 if cluster is not None and label.kind == "item_item" else None)
                      for km, label in g.outputs.items())
        run = runner(client)
        cand_ids = run.share(inputs.candidate_ids, "candidate-ids")
        sinks = [ListSink(ctx.run.location, lists,
                          cand_ids if g.kind == "item_item" else run.share(ids, "query-ids"), cand_ids, cluster)
                 for ids in inputs.query_id_parts]
        for _, result in group_lists(client, g, inputs, sinks, ncfg, len(data.item_ids)):
            done.put(result)
        written.update(out.directory for out in lists)

    def one_group(g: GemmGroup, client, X: RowBlocks) -> None:
        """``lists_of(g)``, then its end (with its error, if any) on ``done``."""
        error = None
        try:
            lists_of(g, client, X)
        except BaseException as exc:  # raised by the thread that records (``record``)
            error = exc
        done.put(GroupEnd(error))

    def record(n_groups: int) -> None:
        """Record what ranges wrote until ``n_groups`` groups ended; a group's error is raised here."""
        while n_groups:
            item = done.get()
            if isinstance(item, GroupEnd):
                n_groups -= 1
                if item.error is not None:
                    raise item.error
                continue
            ctx.lists_running.set()
            parts, sums = item
            for w in parts:
                ctx.run.written(w)
            for key, s in sums.items():  # a key is one group's: its sums add in its ranges' order
                ctx.scorer.add_sums(key, s)

    pool, running, limit = None, 0, 1
    try:
        for g in plan_lists(list(fit.factors), ncfg.item_item, ncfg.user_item, ncfg.user_user, cfg.list_scalings()):
            client = group_client(ctx, g)
            X = data.X
            if client is None and g.kind != "item_item":
                X = X_here = X_here or data.X.here()
            where = where_of(client)
            places[where] = places.get(where, 0) + 1
            if ctx.scorer is not None and where not in labels:
                labels[where] = runner(client).share(ctx.scorer.labels, "cluster-labels")
            if client is None:  # here: alone, after the workers' groups
                record(running)
                running = 0
                one_group(g, None, X)
                record(1)
                continue
            if pool is None:
                limit = groups_in_flight(client)
                pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="list-group")
            if running == limit:  # one ends before the next starts
                record(1)
                running -= 1
            pool.submit(one_group, g, client, X)
            running += 1
        record(running)
    finally:  # on an error, the groups still running finish before it is raised
        ctx.lists_running.set()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    log.info("neighbours: %d lists written", len(written))
    return StageResult({"neighbours": {"ran_on": places}})  # list groups per place


def group_client(ctx: StageContext, g: GemmGroup) -> Any:
    """Where list group ``g`` runs: this process (None) when its gemm (queries x candidates x k) is small
    (``blocks.lists_here``) and its user rows are here too, else the run's client. The same lists either way."""
    fit, data = ctx.fit, ctx.data
    n_users = len(ctx.subset) if ctx.subset is not None else data.X.n_rows
    p, k = len(data.item_ids), fit.V.shape[1]
    queries = p if g.kind == "item_item" else n_users
    candidates = data.X.n_rows if g.kind == "user_user" else p
    users_here = g.kind == "item_item" or fit.X.client is None
    return None if users_here and lists_here(queries * candidates * k) else ctx.client


def group_lists(client, g: GemmGroup, inputs: GroupInputs, sinks: list[ListSink], ncfg: NeighboursSection,
                p: int) -> Iterable[tuple[Any, Any]]:
    """The top-N tasks of list group ``g`` (``run_symmetric`` for an item Gram matrix, ``run_topn`` otherwise), each
    writing its lists through its sink; yields (range, (parts written, cluster sums)) with progress."""
    n = list_length(ncfg.top_n, len(inputs.candidate_ids))
    if g.kind == "item_item" and g.queries == g.candidates:  # a Gram matrix: half the gemm
        return run_symmetric(client, inputs.candidates, p, n, tuple(g.outputs), candidate_block=ncfg.candidate_block,
                             cosine_norm_floor=ncfg.cosine_norm_floor, then=write_lists, then_part=sinks[0],
                             label=group_label(g, "neighbours item_item"))
    return group_progress(run_topn(
        client, inputs.queries, inputs.candidates, n, tuple(g.outputs),
        rows_per_task=ncfg.query_chunk, candidate_block=ncfg.candidate_block, scale=inputs.scale,
        then=write_lists, then_parts=sinks), g, inputs, ncfg.query_chunk, f"neighbours {g.kind}")


def evaluation_stage(ctx: StageContext) -> StageResult:
    """Both objectives fit on a train split; recall@N and NDCG@N of every user-item list on the held-out items.

    The published factors and lists come from the fit on all data; this second fit uses the same
    config on the train split only. Writes ``evaluation/metrics.parquet`` (``holdout_metrics``).
    """
    cfg, data = ctx.cfg, ctx.data
    ecfg = cfg.evaluation
    # the lambda sweep's split and SVD when it ran: only the factors of the chosen lambdas are new
    train, test, spectrum = holdout_split(ctx)
    client, where, spectrum, train, test = holdout_where(ctx, spectrum, train, test)
    fit = fit_factors(spectrum.truncated(cfg.svd.fit_rank), cfg.objectives)  # rank: auto: the chosen rank's columns
    rows, sample = holdout_metrics(client, cfg, fit, train=train, test=test, user_ids=data.user_ids,
                                   item_ids=data.item_ids, by_rank=True)
    table = pa.Table.from_pylist(rows, schema=outputs.EVALUATION_SCHEMA)
    ctx.run.write_table(outputs.EVALUATION_METRICS, table)
    summary: dict[str, Any] = {"holdout": ecfg.holdout, "fraction": ecfg.fraction, **sample, "ran_on": where}
    if "cosine" in fit.meta:  # the train split's own cosine-trained model: its convergence is reported as the published
        c = fit.meta["cosine"]
        summary["cosine"] = {k: c[k] for k in ("iterations", "converged", "seconds", "loss", "message")}
        if not c["converged"]:
            ctx.warnings.append(f"evaluation: the cosine model on the train split did not converge after "
                                f"{c['iterations']} iterations ({c['message']}); its held-out metrics are those of "
                                "an unfinished model: raise objectives.cosine.max_iterations or objectives.cosine.tol")
    cutoffs = tuple(ecfg.cutoffs)
    if rows:
        best = max(rows, key=lambda r: (r["top_n"] == cutoffs[0], r["ndcg"]))
        summary["best_at_first_cutoff"] = {k: best[k] for k in ("objective", "scaling", "metric", "top_n", "ndcg")}
    return StageResult({"evaluation": summary}, {"evaluation": table})


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
    p = len(ctx.data.item_ids)
    # each list is (query items) x p x k of gemm: in this process when that is small, as the lambda sweep's lists
    here = lists_here(min(acfg.max_items, p) * p * ctx.fit.V.shape[1])
    client = None if here else ctx.client
    eq1 = ctx.fit.factors.of("eq1", client)  # on a client each scaling's (A, B) is built on the workers when read
    result = audit_item_lists(eq1, top_n=list_length(acfg.top_n or ncfg.top_n, p), draws=acfg.draws,
                              spread=acfg.spread, seed=acfg.seed, least_stable=acfg.least_stable,
                              max_items=acfg.max_items, cosine_norm_floor=ncfg.cosine_norm_floor,
                              item_lists_fn=client_item_lists(client, rows_per_task=ncfg.query_chunk,
                                                              candidate_block=ncfg.candidate_block),
                              lists_at_once=groups_in_flight(client, -(-min(acfg.max_items, p) // ncfg.query_chunk)))
    result.summary["ran_on"] = "driver" if client is None else "workers"
    ctx.run.write_table(outputs.AUDIT_STABILITY, result.stability)
    ctx.run.write_table(outputs.AUDIT_ITEMS, outputs.keyed_by_item(result.detail, ctx.data.item_ids))
    ctx.run.write_table(outputs.AUDIT_LEAST_STABLE, outputs.keyed_by_item(result.least_stable, ctx.data.item_ids))
    return StageResult({"audit": result.summary}, {"audit": result.stability}, detail=result)


def report_client(ctx: StageContext) -> Any:
    """Where the report's figures are drawn: as tasks on the run's workers when X is held there (``blocks``'
    placement: a run too small for that draws here, and its fresh workers do not import matplotlib for ~2 s of
    figures), else here (None)."""
    return ctx.client if ctx.clients.started and ctx.fit.X.client is not None else None


def report_figures_early(ctx: StageContext) -> Callable[[], Any] | None:
    """The report's figures that need no audit (``start_figures``: all but the audit's histograms), sampled and
    submitted by a thread begun right after the factors, once the lists' first tasks have run
    (``StageContext.lists_running``), so that the workers draw them beside the lists; None where the report draws
    here (the drawing would only take this process's time from the stages in between)."""
    client = report_client(ctx)
    if client is None:
        return None
    from mfsim.pipeline.report.build import start_figures

    tables = {name: t for r in ctx.results.values() for name, t in r.tables.items()}
    start = partial(start_figures, ctx.cfg, ctx.fit, ctx.data, truth=ctx.truth,
                    labels=ctx.scorer.labels if ctx.scorer is not None else None, sweep=tables.get("lambda_sweep"),
                    client=client)

    def once_lists_run() -> Any:
        ctx.lists_running.wait()  # the lists' first tasks before the figures' sampling (1 s of this process at 200k)
        return start()

    return once_lists_run


def report_stage(ctx: StageContext) -> StageResult:
    """``report.html``, one self-contained file (figures inline; ``build_report``): the headline, figures that
    show the arbitrary scaling of Eq. 1 at a glance, the spectrum and the lambda sweep, the tables, what was
    skipped and why, and the run's input, configuration, versions and stage timings. The figures are drawn as tasks
    on the workers where ``report_client`` says so, those that need no audit begun after the factors
    (``report_figures_early``), else here."""
    from mfsim.pipeline.report.build import build_report  # matplotlib: imported by the runs that draw a report

    early = ctx.early.pop("report", None)
    audit = ctx.results["audit"].detail if "audit" in ctx.results else None
    page = build_report(ctx.cfg, ctx.fit, ctx.data, title=f"mfsim run {ctx.run.run_id}", truth=ctx.truth,
                        labels=ctx.scorer.labels if ctx.scorer is not None else None, audit=audit,
                        tables={name: t for r in ctx.results.values() for name, t in r.tables.items()},
                        manifest={key: v for r in ctx.results.values() for key, v in r.manifest.items()},
                        timings=dict(ctx.run.timings), versions=package_versions(), warnings=ctx.warnings,
                        client=report_client(ctx), started=early.result() if early is not None else None)
    ctx.run.write_bytes(outputs.REPORT, page)
    return StageResult()


STAGES: tuple[Stage, ...] = (
    Stage("ingest", ingest_stage),
    Stage("fit", fit_stage, timed=False),
    Stage("factors", factors_stage),
    Stage("neighbours", neighbours_stage),
    Stage("evaluation", evaluation_stage, lambda ctx: ctx.cfg.evaluation.holdout != "none"),
    Stage("cluster_precision", cluster_precision_stage, lambda ctx: ctx.truth is not None),  # the scorer's source
    Stage("audit", audit_stage, lambda ctx: ctx.cfg.audit.enabled and ctx.cfg.objectives.eq1 is not None),
    Stage("report", report_stage, lambda ctx: ctx.cfg.report.enabled, imports=("mfsim.pipeline.report.build",),
          early=report_figures_early, early_after="factors"),
)
